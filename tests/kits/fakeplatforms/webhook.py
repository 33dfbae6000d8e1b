"""A fake receiver for the generic signed webhook: verifies our v1 signature and
timestamp like a careful receiver would, records deliveries, answers
`{"messageId": ...}`, and can fail, rate-limit or redirect on request."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from aiohttp import web

from channels import WebhookRequest

from ._base import FakePlatform, webhook_request


def v1(secret: str, timestamp: str, body: bytes) -> str:
    return (
        "v1="
        + hmac.new(secret.encode(), f"v1:{timestamp}:".encode() + body, hashlib.sha256).hexdigest()
    )


class FakeWebhook(FakePlatform):
    kind = "webhook"

    def __init__(self) -> None:
        super().__init__()
        self.inbound_secret = secrets.token_urlsafe(24)  # what we verify
        self.outbound_secret = secrets.token_urlsafe(24)  # what the receiver verifies
        self.rejected: list[str] = []  # why the receiver refused a request
        self.redirect_to: str | None = None
        self.hosts: list[str] = []  # Host headers seen (pinning keeps the name)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/hook", self._receive), web.post("/elsewhere", self._elsewhere)]

    def instance_settings(self) -> dict[str, Any]:
        return {"deliveryUrl": f"{self.base_url}/hook", "allowLoopbackHttp": True}

    def instance_secrets(self) -> dict[str, str]:
        return {"inboundSecret": self.inbound_secret, "outboundSecret": self.outbound_secret}

    def event_ref(self, event_id: str) -> str:
        return f"evt-{event_id}"

    # --- the receiver --------------------------------------------------------------------
    async def _elsewhere(self, request: web.Request) -> web.Response:
        self.calls.append(("elsewhere", await request.read()))
        return web.json_response({"messageId": "followed-a-redirect"})

    async def _receive(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.hosts.append(request.headers.get("Host", ""))
        timestamp = request.headers.get("X-Cowork-Timestamp", "")
        given = request.headers.get("X-Cowork-Signature", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
            self.rejected.append("timestamp")
            return web.json_response({"error": "stale timestamp"}, status=401)
        if not hmac.compare_digest(given, v1(self.outbound_secret, timestamp, raw)):
            self.rejected.append("signature")
            return web.json_response({"error": "bad signature"}, status=401)
        body = json.loads(raw)
        self.calls.append((body.get("type", ""), body))
        if self.redirect_to is not None:
            raise web.HTTPTemporaryRedirect(self.redirect_to)
        failure = self.injected()
        if failure is not None:
            headers = (
                {"Retry-After": str(int(failure.retry_after))}
                if failure.retry_after is not None
                else None
            )
            return web.json_response(
                {"error": "injected failure"}, status=failure.status, headers=headers
            )
        return web.json_response(self._apply(body))

    def _apply(self, body: dict[str, Any]) -> dict[str, Any]:
        kind, target = body.get("type"), body.get("target") or {}
        chat = target.get("chatId", "")
        if kind == "probe":
            return {"ok": True}
        if kind == "typing":
            self.typing.append(chat)
            return {"ok": True}
        if kind == "reaction":
            entry = (chat, target.get("messageId") or "", body.get("reaction") or "")
            if entry not in self.reactions:  # this receiver treats a resend as a no-op
                self.reactions.append(entry)
            return {"ok": True}
        if kind == "answer_interaction":
            self.answered.append((body.get("interaction") or {}).get("id", ""))
            return {"ok": True}
        if kind == "edit":
            posted = self.edit(chat, body.get("editMessageId") or "", body.get("text") or "")
            if posted is not None and body.get("buttons") is not None:
                posted.buttons = [[b["label"] for b in row] for row in body["buttons"]]
            return {"messageId": body.get("editMessageId")}
        text = body.get("text") or ((body.get("file") or {}).get("filename") or "")
        posted = self.post(
            chat,
            text,
            thread_id=target.get("threadId"),
            buttons=[[b["label"] for b in row] for row in body.get("buttons") or []],
        )
        return {"messageId": posted.message_id}

    # --- requests a sender would send us --------------------------------------------------
    def signed_body(
        self,
        payload: dict[str, Any],
        *,
        secret: str | None = None,
        timestamp: float | None = None,
        now: float | None = None,
    ) -> WebhookRequest:
        raw = json.dumps(payload).encode()
        stamp = str(int(timestamp if timestamp is not None else time.time()))
        return webhook_request(
            raw,
            {
                "Content-Type": "application/json",
                "X-Cowork-Timestamp": stamp,
                "X-Cowork-Signature": v1(secret or self.inbound_secret, stamp, raw),
            },
            now=now,
        )

    def signed_message(
        self,
        text: str,
        *,
        chat_id: str = "100",
        user_id: str = "7",
        event_id: str = "1",
        thread_id: str | None = None,
    ) -> WebhookRequest:
        payload: dict[str, Any] = {
            "id": self.event_ref(event_id),
            "chatId": chat_id,
            "userId": user_id,
            "text": text,
            "username": "ada",
            "isDirect": chat_id == user_id,
        }
        if thread_id is not None:
            payload["threadId"] = thread_id
        return self.signed_body(payload)

    def signed_button_press(
        self, token: str, *, chat_id: str = "100", user_id: str = "7", event_id: str = "2"
    ) -> WebhookRequest:
        return self.signed_body(
            {
                "id": self.event_ref(event_id),
                "chatId": chat_id,
                "userId": user_id,
                "text": "",
                "interaction": {"id": f"int-{event_id}", "token": token},
            }
        )
