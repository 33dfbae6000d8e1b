"""A fake WhatsApp Cloud API (Graph): `POST /{phone_number_id}/messages`,
`GET /{phone_number_id}`, Graph-style errors, and signed webhook events."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

from aiohttp import web

from channels import WebhookRequest

from ._base import FakePlatform, webhook_request


class FakeWhatsApp(FakePlatform):
    kind = "whatsapp"
    authenticates_api = True

    def __init__(self) -> None:
        super().__init__()
        self.phone_number_id = str(100_000_000 + secrets.randbelow(10**8))
        self.access_token = "EAA" + secrets.token_urlsafe(32)
        self.app_secret = secrets.token_hex(16)
        self.verify_token = secrets.token_urlsafe(16)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/{phone}/messages", self._send), web.get("/{phone}", self._number)]

    def instance_settings(self) -> dict[str, Any]:
        return {
            "apiBase": self.base_url,
            "allowLoopbackHttp": True,
            "phoneNumberId": self.phone_number_id,
        }

    def instance_secrets(self) -> dict[str, str]:
        return {
            "accessToken": self.access_token,
            "appSecret": self.app_secret,
            "verifyToken": self.verify_token,
        }

    def event_ref(self, event_id: str) -> str:
        return f"wamid.IN{event_id}"

    # --- the API ------------------------------------------------------------------------
    @staticmethod
    def _error(
        status: int, message: str, code: int = 100, retry_after: float | None = None
    ) -> web.Response:
        headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else None
        return web.json_response(
            {
                "error": {
                    "message": message,
                    "type": "OAuthException",
                    "code": code,
                    "fbtrace_id": "fake",
                }
            },
            status=status,
            headers=headers,
        )

    def _refused(self, request: web.Request) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.access_token}".encode()):
            return self._error(401, "Invalid OAuth access token.", code=190)
        if request.match_info["phone"] != self.phone_number_id:
            return self._error(400, "Unsupported post request.", code=100)
        return None

    async def _number(self, request: web.Request) -> web.Response:
        self.calls.append(("number", None))
        refused = self._refused(request)
        if refused is not None:
            return refused
        return web.json_response(
            {
                "id": self.phone_number_id,
                "display_phone_number": "+1 555 0100",
                "verified_name": "Cowork",
            }
        )

    async def _send(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("messages", body))
        refused = self._refused(request)
        if refused is not None:
            return refused
        failure = self.injected()
        if failure is not None:
            if failure.status == 429:
                return self._error(
                    429, "Rate limit hit", code=130429, retry_after=failure.retry_after
                )
            return self._error(failure.status, "Injected failure", code=131000)
        if body.get("messaging_product") != "whatsapp" or not body.get("to"):
            return self._error(400, "Invalid parameter")
        if body.get("type") == "text":
            text = (body.get("text") or {}).get("body", "")
            if not text or len(text) > 4096:
                return self._error(400, "Param text['body'] is invalid", code=100)
            posted = self.post(body["to"], text)
        elif body.get("type") == "interactive":
            labels = self._choices(body.get("interactive") or {})
            if isinstance(labels, web.Response):
                return labels
            posted = self.post(body["to"], body["interactive"]["body"]["text"], buttons=labels)
        elif body.get("type") == "reaction":
            reaction = body.get("reaction") or {}
            if not str(reaction.get("message_id", "")).startswith("wamid.") or not reaction.get(
                "emoji"
            ):
                return self._error(400, "Param reaction is invalid", code=100)
            # a new reaction to a message replaces the previous one
            self.reactions = [
                r for r in self.reactions if r[:2] != (body["to"], reaction["message_id"])
            ]
            self.reactions.append((body["to"], reaction["message_id"], reaction["emoji"]))
            return web.json_response(
                {
                    "messaging_product": "whatsapp",
                    "contacts": [{"input": body["to"], "wa_id": body["to"]}],
                    "messages": [{"id": "wamid.REACT" + self.new_message_id()}],
                }
            )
        else:
            return self._error(400, f"Unsupported message type {body.get('type')!r}")
        wamid = "wamid.FAKE" + posted.message_id
        posted.message_id = wamid
        return web.json_response(
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": body["to"], "wa_id": body["to"]}],
                "messages": [{"id": wamid}],
            }
        )

    def _choices(self, interactive: dict[str, Any]) -> list[list[str]] | web.Response:
        if interactive.get("type") == "button":
            buttons = interactive["action"]["buttons"]
            if not 1 <= len(buttons) <= 3:
                return self._error(400, "buttons: between 1 and 3 expected", code=131009)
            if any(len(b["reply"]["title"]) > 20 for b in buttons):
                return self._error(400, "button title too long", code=131009)
            return [[b["reply"]["title"] for b in buttons]]
        if interactive.get("type") == "list":
            rows = [r for s in interactive["action"]["sections"] for r in s["rows"]]
            if not 1 <= len(rows) <= 10:
                return self._error(400, "list: between 1 and 10 rows expected", code=131009)
            return [[r["title"]] for r in rows]
        return self._error(400, "unsupported interactive type", code=131009)

    # --- requests Meta would send us -------------------------------------------------------
    def sign(self, body: bytes, secret: str | None = None) -> str:
        key = (secret or self.app_secret).encode()
        return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()

    def event(
        self,
        messages: list[dict[str, Any]],
        *,
        statuses: list[dict[str, Any]] | None = None,
        name: str = "Ada Lovelace",
        wa_id: str = "100",
    ) -> bytes:
        value: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "metadata": {
                "display_phone_number": "15550100",
                "phone_number_id": self.phone_number_id,
            },
            "contacts": [{"profile": {"name": name}, "wa_id": wa_id}],
        }
        if messages:
            value["messages"] = messages
        if statuses:
            value["statuses"] = statuses
        return json.dumps(
            {
                "object": "whatsapp_business_account",
                "entry": [{"id": "WABA1", "changes": [{"field": "messages", "value": value}]}],
            }
        ).encode()

    def signed(self, body: bytes) -> WebhookRequest:
        return webhook_request(
            body, {"Content-Type": "application/json", "X-Hub-Signature-256": self.sign(body)}
        )

    # WhatsApp chats are direct only: the chat is the sender's wa_id.
    def signed_message(
        self,
        text: str,
        *,
        chat_id: str = "100",
        user_id: str = "7",
        event_id: str = "1",
        thread_id: str | None = None,
    ) -> WebhookRequest:
        return self.signed(
            self.event(
                [
                    {
                        "from": chat_id,
                        "id": self.event_ref(event_id),
                        "timestamp": "1700000000",
                        "type": "text",
                        "text": {"body": text},
                    }
                ],
                wa_id=chat_id,
            )
        )

    def signed_button_press(
        self, token: str, *, chat_id: str = "100", user_id: str = "7", event_id: str = "2"
    ) -> WebhookRequest:
        return self.signed(
            self.event(
                [
                    {
                        "from": chat_id,
                        "id": self.event_ref(event_id),
                        "timestamp": "1700000000",
                        "type": "interactive",
                        "interactive": {
                            "type": "button_reply",
                            "button_reply": {"id": token, "title": "Approve"},
                        },
                    }
                ],
                wa_id=chat_id,
            )
        )

    def subscribe_check(self, verify_token: str, challenge: str = "1158201444") -> WebhookRequest:
        return webhook_request(
            b"",
            {},
            method="GET",
            query={
                "hub.mode": "subscribe",
                "hub.verify_token": verify_token,
                "hub.challenge": challenge,
            },
        )
