"""Matrix provider: a bot account on the client-server API, receiving over `/sync`
(channels/providers/_matrix_sync.py; Matrix has no webhook for bots) and sending
room events.

https://spec.matrix.org/v1.11/client-server-api/: every call carries the bot's
access token as a bearer. Sending is `PUT /rooms/{roomId}/send/{type}/{txnId}`,
and the server answers a repeated transaction id with the event it made the
first time, so the delivery's idempotency key as the transaction id makes a
re-sent delivery one message. Edits are replacement events (`m.replace`, the
new text in `m.new_content`, a `* `-prefixed fallback body); reactions are
`m.reaction` annotations; typing is `PUT /rooms/{roomId}/typing/{userId}`.
Rate limits answer 429 `M_LIMIT_EXCEEDED` with `retry_after_ms`.
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar, Literal
from urllib.parse import quote

import httpx
from pydantic import Field

from schemas import ChannelOutbound, DeliveryType

from .. import _ssrf
from .._provider import (
    ApiBaseSettings,
    Capabilities,
    DeliveryFailed,
    InstanceConfig,
    ProviderSettings,
    SendResult,
    WebhookRequest,
    WebhookResult,
)
from .._transport import OutboundOnly, TransportSettings
from . import _payload as p
from ._platform_http import (
    call_json,
    check_buttons,
    require_object,
    require_reaction,
    require_text,
    unsupported,
)

CLIENT = "/_matrix/client/v3"
MAX_TEXT = 16000


class MatrixSettings(ApiBaseSettings, TransportSettings):
    # The homeserver's client-server API base, e.g. https://matrix.example.org.
    api_base: str | None = Field(max_length=512)
    user_id: str = Field(pattern=r"^@[^:\s]{1,255}:[^\s]{1,255}$")  # the bot: its own events
    transport: Literal["outbound"] = "outbound"  # Matrix has no webhook for bots
    auto_join: bool = True  # join the rooms the bot is invited to


class MatrixSecrets(ProviderSettings):
    access_token: str = Field(min_length=1, max_length=1024, repr=False)


class MatrixProvider(OutboundOnly):
    kind: ClassVar[str] = "matrix"
    capabilities: ClassVar[Capabilities] = Capabilities(
        threads=False,
        edit=True,
        buttons=None,
        file_upload=False,
        file_download=False,
        typing=True,
        reactions=True,
        max_text_length=MAX_TEXT,
        parse_modes=frozenset({"plain"}),
        max_file_bytes=0,
        interaction_ack="none",
        rate_limit="retry_after",
        ephemeral=False,
        inbound="outbound",
        verification="none needed: the bot reads /sync with its access token (no inbound request)",
    )
    settings_model: ClassVar[type[ProviderSettings]] = MatrixSettings
    secrets_model: ClassVar[type[ProviderSettings]] = MatrixSecrets
    resolve: ClassVar[_ssrf.Resolver | None] = None

    def __init__(self, config: InstanceConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.settings: MatrixSettings = config.settings
        self.secrets: MatrixSecrets = config.secrets
        self.http = http
        self._api = (self.settings.api_base or "").rstrip("/") + CLIENT

    # --- inbound (from /sync, one room event at a time) --------------------------------------
    @p.contract_errors
    def parse(self, request: WebhookRequest) -> WebhookResult:
        """`{"room_id", "event"}`: one timeline event of a sync response."""
        data = p.json_object(request.body, "room event")
        room = p.text(data, "room_id", required=True, max_length=255)
        event = p.obj(data, "event", required=True)
        if p.text(event, "type") != "m.room.message":
            return WebhookResult()
        sender = p.text(event, "sender", required=True, max_length=255)
        content = p.obj(event, "content") or {}
        relation = p.obj(content, "m.relates_to") or {}
        if sender == self.settings.user_id or p.text(relation, "rel_type") == "m.replace":
            return WebhookResult()  # its own echo, or an edit of an earlier message
        if p.text(content, "msgtype") not in ("m.text", "m.notice", "m.emote"):
            return WebhookResult()
        raw = p.text(content, "body", max_length=16384) or ""
        if not raw.strip():
            return WebhookResult()
        event_id = p.text(event, "event_id", required=True, max_length=255)
        message = p.inbound(
            self.config,
            request,
            event_type="message",
            provider_event_id=event_id,
            provider_message_id=event_id,
            target={"chat_id": room, "user_id": sender, "message_id": event_id},
            sender={"provider_user_id": sender, "username": sender},
            text=raw,
            raw_text=raw,
            **p.command_fields(raw),
        )
        return WebhookResult(messages=[message])

    # --- the client-server API ---------------------------------------------------------------
    async def call(
        self,
        method: str,
        path: str,
        operation: str,
        *,
        json: Any = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        _, body = await call_json(
            self.http,
            method,
            self._api + path,
            operation=f"matrix {operation}",
            json=json,
            headers={"Authorization": f"Bearer {self.secrets.access_token}"},
            timeout=timeout,
            pin=self.settings.api_policy,
            resolve=type(self).resolve,
        )
        return require_object(f"matrix {operation}", body)

    async def _send_event(self, room: str, kind: str, txn: str, content: dict[str, Any]) -> str:
        # The transaction id: the server makes one event of a repeated one.
        txn_id = hashlib.sha256(txn.encode()).hexdigest()[:32]
        answer = await self.call(
            "PUT",
            f"/rooms/{quote(room, safe='')}/send/{kind}/{txn_id}",
            f"send {kind}",
            json=content,
        )
        event_id = answer.get("event_id")
        if not isinstance(event_id, str):
            raise DeliveryFailed("matrix send: no event id", code="platform.bad_response")
        return event_id

    async def send(self, delivery: ChannelOutbound) -> SendResult:
        room = delivery.target.chat_id
        kind = delivery.type
        check_buttons(delivery, self.capabilities.buttons)  # none: refused if any
        if kind == DeliveryType.TEXT:
            text = require_text(delivery, MAX_TEXT)
            content: dict[str, Any] = {"msgtype": "m.text", "body": text}
            if delivery.reply_to_message_id:
                content["m.relates_to"] = {
                    "m.in_reply_to": {"event_id": delivery.reply_to_message_id}
                }
            event = await self._send_event(
                room, "m.room.message", delivery.idempotency_key, content
            )
            return SendResult(event)
        if kind == DeliveryType.EDIT:
            if not delivery.edit_message_id:
                raise DeliveryFailed(
                    "an edit needs the Matrix event id", code="delivery.invalid", permanent=True
                )
            text = require_text(delivery, MAX_TEXT)
            content = {
                "msgtype": "m.text",
                "body": f"* {text}",
                "m.new_content": {"msgtype": "m.text", "body": text},
                "m.relates_to": {"rel_type": "m.replace", "event_id": delivery.edit_message_id},
            }
            await self._send_event(room, "m.room.message", delivery.idempotency_key, content)
            return SendResult(delivery.edit_message_id)
        if kind == DeliveryType.REACTION:
            emoji, message = require_reaction(delivery)
            annotation = {"rel_type": "m.annotation", "event_id": message, "key": emoji}
            await self._send_event(
                room, "m.reaction", delivery.idempotency_key, {"m.relates_to": annotation}
            )
            return SendResult()
        if kind == DeliveryType.TYPING:
            user = quote(self.settings.user_id, safe="")
            await self.call(
                "PUT",
                f"/rooms/{quote(room, safe='')}/typing/{user}",
                "typing",
                json={"typing": True, "timeout": 5000},
            )
            return SendResult()
        raise unsupported("matrix", f"{kind} deliveries")

    async def sync(self, since: str | None, timeout_seconds: int) -> dict[str, Any]:
        """One `/sync` long poll (channels/providers/_matrix_sync.py)."""
        query = f"?timeout={timeout_seconds * 1000}"
        if since:
            query += f"&since={quote(since, safe='')}"
        return await self.call("GET", f"/sync{query}", "sync", timeout=timeout_seconds + 10.0)

    async def join(self, room: str) -> None:
        await self.call("POST", f"/join/{quote(room, safe='')}", "join", json={})

    async def probe(self) -> str:
        me = await self.call("GET", "/account/whoami", "whoami")
        if me.get("user_id") != self.settings.user_id:
            raise DeliveryFailed(
                "matrix whoami: the access token is not the configured userId's",
                code="platform.rejected",
                permanent=True,
            )
        return f"matrix bot {self.settings.user_id}"
