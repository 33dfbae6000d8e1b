"""The one interface every fake chat platform offers the tests.

A fake is a real HTTP server on loopback speaking the platform's own request
and response formats (the provider's outbound code runs unmodified against
it), plus what the tests need: requests a real platform would send us, signed
as the platform signs them, and a record of what the platform received.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from channels import WebhookRequest


@dataclass
class Posted:
    """One message as the platform's chat shows it (edits change `text` in place)."""

    message_id: str
    chat_id: str
    text: str
    thread_id: str | None = None
    buttons: list[list[str]] = field(default_factory=list)  # labels, by row
    edits: int = 0


@dataclass
class Failure:
    status: int
    retry_after: float | None
    remaining: int


def webhook_request(
    body: bytes,
    headers: dict[str, str],
    *,
    method: str = "POST",
    query: dict[str, str] | None = None,
    now: float | None = None,
) -> WebhookRequest:
    return WebhookRequest(
        method=method,
        path="/webhooks/x",
        query=query or {},
        headers=CIMultiDict(headers),
        body=body,
        remote="127.0.0.1",
        received_at=datetime.now(UTC),
        now=now or time.time(),
    )


class FakePlatform:
    """Base: subclasses add the platform's routes in `routes()` and implement the
    request builders. Every API handler should start with `self.injected()`."""

    kind: str = ""
    # True when the fake's API refuses credentials other than its own (the
    # conformance suite then checks that probe() fails with wrong secrets).
    authenticates_api: bool = False
    # False when the platform authenticates requests without covering the body
    # (Telegram's secret-token header): a tampered body cannot be detected.
    signs_body: bool = True
    # False when the fake has no API to inject failures into (CLI writes stdout):
    # the suite then skips the 5xx/4xx failure checks for it, explicitly.
    injects_failures: bool = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []  # (operation, request body) in order
        self.chats: dict[str, list[Posted]] = {}
        self.typing: list[str] = []  # chat ids that got a typing indicator
        self.reactions: list[tuple[str, str, str]] = []  # (chat, message id, emoji)
        self.answered: list[str] = []  # interaction ids answered
        self._failures: list[Failure] = []
        self._after_drop: list[Failure] = []  # due once the connection is next dropped
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self._next_id = 1000

    # --- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.add_routes(self.routes())
        # A long poll still open at stop (getUpdates, /sync, receive) is cut, not
        # waited for: tests stop their fakes right after their runtimes.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    # --- what tests configure an instance with --------------------------------------
    def instance_settings(self) -> dict[str, Any]:
        """Settings JSON (camelCase) for an instance talking to this fake."""
        return {"apiBase": self.base_url, "allowLoopbackHttp": True}

    def instance_secrets(self) -> dict[str, str]:
        raise NotImplementedError

    # --- how the platform names the suite's abstract ids -----------------------------
    # Tests speak of chat "100", user "7", thread "55", event "41"; a platform whose
    # ids look different (email addresses, "wamid." prefixes) maps them here, and
    # the parsed message / delivery target must carry the mapped value.
    def chat_ref(self, chat_id: str) -> str:
        return chat_id

    def user_ref(self, user_id: str) -> str:
        return user_id

    def thread_ref(self, thread_id: str) -> str:
        return thread_id

    def event_ref(self, event_id: str) -> str:
        return event_id

    def reaction_ref(self, emoji: str) -> str:
        """How `reactions` records an emoji (Slack records its name)."""
        return emoji

    # --- requests the platform would send us ----------------------------------------
    def signed_message(
        self,
        text: str,
        *,
        chat_id: str = "100",
        user_id: str = "7",
        event_id: str = "1",
        thread_id: str | None = None,
    ) -> WebhookRequest:
        raise NotImplementedError

    def signed_button_press(
        self, token: str, *, chat_id: str = "100", user_id: str = "7", event_id: str = "2"
    ) -> WebhookRequest | None:
        """None when the platform has no buttons."""
        return None

    def tampered(self, request: WebhookRequest) -> WebhookRequest:
        """The same request with one byte of the body changed."""
        body = bytearray(request.body)
        body[len(body) // 2] ^= 0x01
        return webhook_request(
            bytes(body),
            dict(request.headers),
            method=request.method,
            query=dict(request.query),
            now=request.now,
        )

    # --- failure injection and records ----------------------------------------------
    def fail_next(self, status: int, retry_after: float | None = None, count: int = 1) -> None:
        """The next `count` API calls answer `status` in the platform's own error format."""
        self._failures.append(Failure(status, retry_after, count))

    def fail_after_drop(self, status: int, retry_after: float | None = None) -> None:
        """The first API call after the next dropped connection (`drop_next`) answers
        `status`: the reconnect meets it, whatever polls end before the drop."""
        self._after_drop.append(Failure(status, retry_after, 1))

    def dropped(self) -> None:
        """A fake calls this as it drops a connection (`drop_next`)."""
        self._failures.extend(self._after_drop)
        self._after_drop.clear()

    def injected(self) -> Failure | None:
        """Handlers call this first; a non-None result must be answered as that error."""
        if not self._failures:
            return None
        failure = self._failures[0]
        failure.remaining -= 1
        if failure.remaining <= 0:
            self._failures.pop(0)
        return failure

    def new_message_id(self) -> str:
        self._next_id += 1
        return str(self._next_id)

    def post(
        self,
        chat_id: str,
        text: str,
        *,
        thread_id: str | None = None,
        buttons: list[list[str]] | None = None,
    ) -> Posted:
        posted = Posted(self.new_message_id(), chat_id, text, thread_id, buttons or [])
        self.chats.setdefault(chat_id, []).append(posted)
        return posted

    def edit(self, chat_id: str, message_id: str, text: str) -> Posted | None:
        for posted in self.chats.get(chat_id, []):
            if posted.message_id == message_id:
                posted.text, posted.edits = text, posted.edits + 1
                return posted
        return None

    # --- outbound transports (a fake of a kind in channels TRANSPORTS) -------------------
    # The platform's side of the connection the instance dials: what a signed
    # webhook request would carry, sent over it instead; a cut mid-stream; and
    # `conflicts`, the times two connections of one bot were live at once.
    conflicts: int = 0

    def transport_settings(self) -> dict[str, Any]:
        """Settings of an instance receiving over its outbound transport (short
        long polls, so tests stop quickly)."""
        return {**self.instance_settings(), "transport": "outbound", "pollTimeoutSeconds": 1}

    async def emit(self, request: WebhookRequest) -> None:
        """Send what `request` carries over the outbound connection."""
        raise NotImplementedError(f"{self.kind} has no outbound transport fake")

    def drop_next(self) -> None:
        """Cut the connection right as it carries the next traffic (unconfirmed)."""
        raise NotImplementedError(f"{self.kind} has no outbound transport fake")

    def texts(self, chat_id: str) -> list[str]:
        return [p.text for p in self.chats.get(chat_id, [])]
