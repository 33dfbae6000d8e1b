"""A fake mail system: an SMTP server on loopback (aiosmtpd) that records every
message, with injectable 4xx/5xx replies, plus the relay's signed webhook
requests carrying inbound mail."""

from __future__ import annotations

import asyncio
import json
import secrets
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from channels import WebhookRequest

from ._base import FakePlatform, webhook_request


def address_of(chat_id: str) -> str:
    """Tests name chats with short ids; email chats are addresses."""
    return chat_id.lower() if "@" in chat_id else f"user{chat_id}@example.com"


class _Recorder:
    def __init__(self, fake: FakeEmail) -> None:
        self.fake = fake

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        self.fake.calls.append(("noop", None))
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # SMTP lines end in CRLF; read the message as a mail client shows it.
        raw = envelope.original_content or envelope.content
        message = message_from_bytes(raw.replace(b"\r\n", b"\n"), policy=policy.default)
        assert isinstance(message, EmailMessage)
        files = [part.get_filename() for part in message.iter_attachments()]
        self.fake.calls.append(("data", message))
        if files:
            self.fake.calls.append(("attachments", files))
        reply = self.fake.next_reply()
        if reply is not None:
            return reply
        self.fake.messages.append(message)
        body = message.get_body(preferencelist=("plain",))
        text = body.get_content().rstrip("\n") if body is not None else ""
        for rcpt in envelope.rcpt_tos:
            posted = self.fake.post(rcpt.lower(), text, thread_id=message.get("References"))
            posted.message_id = str(message.get("Message-ID", posted.message_id))
        return "250 Message accepted for delivery"


class FakeEmail(FakePlatform):
    kind = "email"
    signs_body = False  # the relay authenticates with a bearer secret, not a body signature

    def __init__(self) -> None:
        super().__init__()
        self.relay_secret = secrets.token_urlsafe(24)
        self.messages: list[EmailMessage] = []
        self.smtp_port = 0
        self._server: asyncio.AbstractServer | None = None
        self._replies: list[str] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        handler = _Recorder(self)
        self._server = await loop.create_server(
            lambda: SMTP(handler, hostname="fake-mx.test", ident="fake ESMTP"), "127.0.0.1", 0
        )
        self.smtp_port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"smtp://127.0.0.1:{self.smtp_port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def instance_settings(self) -> dict[str, Any]:
        return {
            "smtpHost": "127.0.0.1",
            "smtpPort": self.smtp_port,
            "smtpStarttls": False,
            "fromAddress": "bot@cowork.test",
        }

    def instance_secrets(self) -> dict[str, str]:
        return {"relaySecret": self.relay_secret}

    def chat_ref(self, chat_id: str) -> str:
        return address_of(chat_id)

    def user_ref(self, user_id: str) -> str:
        return address_of(user_id)

    def thread_ref(self, thread_id: str) -> str:
        return f"<{thread_id}@mail.example.com>"

    def event_ref(self, event_id: str) -> str:
        return f"<msg{event_id}@mail.example.com>"

    # --- failure injection ----------------------------------------------------------
    def reply_next(self, smtp_reply: str) -> None:
        """The next message is refused with this SMTP reply, e.g. "451 4.3.0 try later"."""
        self._replies.append(smtp_reply)

    def next_reply(self) -> str | None:
        if self._replies:
            return self._replies.pop(0)
        failure = self.injected()
        if failure is None:
            return None
        # HTTP-style failures in SMTP terms: 429 and 5xx are temporary, other 4xx final.
        if failure.status == 429 or failure.status >= 500:
            return "451 4.3.0 Injected temporary failure"
        return "550 5.1.1 Injected permanent failure"

    # --- requests the relay would send us --------------------------------------------
    def relay_request(
        self, mail: dict[str, Any], *, token: str | None = None, scheme: str = "Bearer"
    ) -> WebhookRequest:
        headers = {"Content-Type": "application/json"}
        if token != "":
            headers["Authorization"] = f"{scheme} {token or self.relay_secret}"
        return webhook_request(json.dumps(mail).encode(), headers)

    def signed_message(
        self,
        text: str,
        *,
        chat_id: str = "100",
        user_id: str = "7",
        event_id: str = "1",
        thread_id: str | None = None,
    ) -> WebhookRequest:
        mail: dict[str, Any] = {
            "messageId": self.event_ref(event_id),
            "from": f"Ada Lovelace <{address_of(chat_id)}>",
            "to": "bot@cowork.test",
            "subject": "Build status",
            "text": text,
        }
        if thread_id is not None:
            mail["inReplyTo"] = mail["references"] = self.thread_ref(thread_id)
        return self.relay_request(mail)
