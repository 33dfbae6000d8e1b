"""The CLI "platform": a terminal, i.e. input lines and an output stream.

There is no HTTP server: a message is a stdin line handed to the provider as a
`STDIN` request, and deliveries are the JSON lines the provider writes. The
provider built from `instance_settings()` appends them to a file the fake
owns (what the conformance suite uses); `output` is an in-memory stream for
tests that hand it to `CliProvider(config, None, output=fake.output)`.
"""

from __future__ import annotations

import io
import json
import secrets
import tempfile
from pathlib import Path
from typing import Any

from channels import WebhookRequest

from ._base import FakePlatform, Posted, webhook_request

USER = "ada"


class FakeCli(FakePlatform):
    kind = "cli"
    injects_failures = False  # a terminal has no API that answers 4xx/5xx

    def __init__(self) -> None:
        super().__init__()
        self.output = io.StringIO()
        # Created by the provider's first write, removed by stop().
        self.output_path = Path(tempfile.gettempdir()) / f"fake-cli-{secrets.token_hex(8)}.jsonl"

    async def start(self) -> None:
        self.base_url = f"file://{self.output_path}"

    async def stop(self) -> None:
        self.output_path.unlink(missing_ok=True)

    def instance_settings(self) -> dict[str, Any]:
        return {"user": USER, "outputFormat": "json", "outputPath": str(self.output_path)}

    def instance_secrets(self) -> dict[str, str]:
        return {}

    # Every chat of a CLI instance is the one local terminal, and its user is the
    # configured one; line ids are what a JSON line carries.
    def chat_ref(self, chat_id: str) -> str:
        return "local"

    def user_ref(self, user_id: str) -> str:
        return USER

    def event_ref(self, event_id: str) -> str:
        return f"line-{event_id}"

    # --- requests the terminal "sends" ---------------------------------------------------
    def line(self, raw: str) -> WebhookRequest:
        return webhook_request(raw.encode(), {}, method="STDIN")

    def signed_message(
        self,
        text: str,
        *,
        chat_id: str = "100",
        user_id: str = "7",
        event_id: str = "1",
        thread_id: str | None = None,
    ) -> WebhookRequest:
        return self.line(json.dumps({"id": self.event_ref(event_id), "text": text}))

    def signed_button_press(
        self, token: str, *, chat_id: str = "100", user_id: str = "7", event_id: str = "2"
    ) -> WebhookRequest:
        return self.line(
            json.dumps(
                {
                    "id": self.event_ref(event_id),
                    "interaction": {"id": f"press-{event_id}", "token": token},
                }
            )
        )

    # --- what the terminal shows -----------------------------------------------------------
    def delivered(self) -> list[dict[str, Any]]:
        """Every delivery written (JSON lines, file first, then the in-memory stream)."""
        text = self.output_path.read_text() if self.output_path.exists() else ""
        text += self.output.getvalue()
        return [json.loads(line) for line in text.splitlines() if line]

    @property  # type: ignore[override]
    def chats(self) -> dict[str, list[Posted]]:
        """The terminal as a chat: messages in order, edits applied in place."""
        chats: dict[str, list[Posted]] = {}
        by_id: dict[str, Posted] = {}
        for record in self.delivered():
            chat = (record.get("target") or {}).get("chatId", "local")
            if record.get("type") == "edit":
                posted = by_id.get(record.get("editMessageId") or record["messageId"])
                if posted is not None:
                    posted.text, posted.edits = record.get("text", ""), posted.edits + 1
                continue
            posted = Posted(
                record["messageId"],
                chat,
                record.get("text", ""),
                buttons=[[b["label"] for b in row] for row in record.get("buttons") or []],
            )
            by_id[posted.message_id] = posted
            chats.setdefault(chat, []).append(posted)
        return chats

    @chats.setter
    def chats(self, value: dict[str, list[Posted]]) -> None:
        pass  # derived from the output; the base class's initial {} is ignored
