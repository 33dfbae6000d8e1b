"""Signal provider: a local signal-cli daemon's JSON-RPC (`signal-cli daemon --http
--receive-mode=manual`), https://github.com/AsamK/signal-cli/blob/master/man/signal-cli-jsonrpc.5.adoc.

Signal has no webhooks and no bot API: the instance speaks to a signal-cli
daemon registered as the bot's number, at `apiBase` (`POST /api/v1/rpc`,
JSON-RPC 2.0). Inbound is its `receive` method, polled by the transport
(channels/providers/_signal_rpc.py); outbound `send` (to a number or a group,
with attachments as data URIs; `editTimestamp` edits an earlier message),
`sendReaction` and `sendTyping`. A chat is a number, or `group.<groupId>`; a
message is known by its author's timestamp, so a message id here is
`<timestamp>` with the author in the target's user id.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any, ClassVar, Literal

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
    file_bytes,
    require_reaction,
    require_text,
    unsupported,
)

GROUP = "group."
MAX_TEXT = 4000
_ids = itertools.count(1)


class SignalSettings(ApiBaseSettings, TransportSettings):
    api_base: str | None = Field(max_length=512)  # the daemon, e.g. http://127.0.0.1:8080
    account: str = Field(pattern=r"^\+[0-9]{6,15}$")  # the bot's number
    transport: Literal["outbound"] = "outbound"  # signal-cli is polled


class SignalSecrets(ProviderSettings):
    """signal-cli's HTTP daemon has no credential: keep it on loopback."""


class SignalProvider(OutboundOnly):
    kind: ClassVar[str] = "signal"
    capabilities: ClassVar[Capabilities] = Capabilities(
        threads=False,
        edit=True,
        buttons=None,
        file_upload=True,
        file_download=False,
        typing=True,
        reactions=True,
        max_text_length=MAX_TEXT,
        parse_modes=frozenset({"plain"}),
        max_file_bytes=100 * 1024 * 1024,
        interaction_ack="none",
        rate_limit="retry_after",
        ephemeral=False,
        inbound="outbound",
        verification="none needed: the instance polls its own signal-cli daemon",
    )
    settings_model: ClassVar[type[ProviderSettings]] = SignalSettings
    secrets_model: ClassVar[type[ProviderSettings]] = SignalSecrets
    resolve: ClassVar[_ssrf.Resolver | None] = None

    def __init__(self, config: InstanceConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.settings: SignalSettings = config.settings
        self.http = http
        self._url = (self.settings.api_base or "").rstrip("/") + "/api/v1/rpc"

    # --- inbound: one envelope of `receive` ---------------------------------------------------
    @p.contract_errors
    def parse(self, request: WebhookRequest) -> WebhookResult:
        data = p.json_object(request.body, "envelope")
        envelope = p.obj(data, "envelope") or data
        message = p.obj(envelope, "dataMessage")
        source = p.text(envelope, "sourceNumber", max_length=32) or p.text(
            envelope, "source", max_length=64
        )
        if message is None or not source or source == self.settings.account:
            return WebhookResult()  # receipts, typing, sync messages, our own
        timestamp = p.integer(message, "timestamp") or p.integer(envelope, "timestamp")
        if timestamp is None:
            raise p.BadRequest("payload.invalid", "'timestamp' is missing")
        group = p.obj(message, "groupInfo")
        group_id = p.text(group, "groupId", max_length=128) if group else None
        raw = p.text(message, "message", max_length=16384) or ""
        attachments = [
            {
                "provider_file_id": p.ident(item, "id", required=True),
                "filename": p.text(item, "filename", max_length=512),
                "mime_type": p.text(item, "contentType", max_length=128),
                "size_bytes": p.integer(item, "size"),
            }
            for item in p.items(message, "attachments")[:10]
            if isinstance(item, dict)
        ]
        if not raw.strip() and not attachments:
            return WebhookResult()
        inbound = p.inbound(
            self.config,
            request,
            event_type="message",
            provider_event_id=f"{source}:{timestamp}",
            provider_message_id=str(timestamp),
            target={
                "chat_id": GROUP + group_id if group_id else source,
                "is_direct": group_id is None,
                "user_id": source,
                "message_id": str(timestamp),
            },
            sender={
                "provider_user_id": source,
                "display_name": p.text(envelope, "sourceName", max_length=512),
            },
            attachments=attachments,
            text=raw,
            raw_text=raw,
            **p.command_fields(raw),
        )
        return WebhookResult(messages=[inbound])

    # --- JSON-RPC -----------------------------------------------------------------------------
    async def rpc(self, method: str, params: dict[str, Any], *, timeout: float = 30.0) -> Any:
        operation = f"signal {method}"
        _, body = await call_json(
            self.http,
            "POST",
            self._url,
            operation=operation,
            json={
                "jsonrpc": "2.0",
                "method": method,
                "params": {"account": self.settings.account, **params},
                "id": next(_ids),
            },
            timeout=timeout,
            pin=self.settings.api_policy,
            resolve=type(self).resolve,
        )
        if not isinstance(body, dict):
            raise DeliveryFailed(
                f"{operation}: not a JSON-RPC answer", code="platform.bad_response"
            )
        error = body.get("error")
        if isinstance(error, dict):
            detail = str(error.get("message", ""))[:200]
            limited = "rate limit" in detail.lower()
            raise DeliveryFailed(
                f"{operation}: {detail}",
                code="rate_limited" if limited else "platform.rejected",
                permanent=not limited,
            )
        return body.get("result")

    def _to(self, chat: str) -> dict[str, Any]:
        return {"groupId": chat[len(GROUP) :]} if chat.startswith(GROUP) else {"recipient": [chat]}

    async def send(self, delivery: ChannelOutbound) -> SendResult:
        target, kind = delivery.target, delivery.type
        check_buttons(delivery, self.capabilities.buttons)  # none: refused if any
        to = self._to(target.chat_id)
        if kind in (DeliveryType.TEXT, DeliveryType.EDIT):
            params = {**to, "message": require_text(delivery, MAX_TEXT)}
            if kind == DeliveryType.EDIT:
                if not delivery.edit_message_id:
                    raise DeliveryFailed(
                        "an edit needs the Signal message timestamp",
                        code="delivery.invalid",
                        permanent=True,
                    )
                params["editTimestamp"] = int(delivery.edit_message_id)
            result = await self.rpc("send", params)
            sent = result.get("timestamp") if isinstance(result, dict) else None
            if kind == DeliveryType.EDIT:
                return SendResult(delivery.edit_message_id)
            return SendResult(str(sent) if sent is not None else None)
        if kind == DeliveryType.FILE:
            file, content = file_bytes(delivery, self.capabilities.max_file_bytes)
            data = base64.b64encode(content).decode()
            uri = f"data:{file.mime_type};filename={file.filename};base64,{data}"
            params = {**to, "message": delivery.text or "", "attachments": [uri]}
            result = await self.rpc("send", params)
            sent = result.get("timestamp") if isinstance(result, dict) else None
            return SendResult(str(sent) if sent is not None else None)
        if kind == DeliveryType.REACTION:
            emoji, message = require_reaction(delivery)
            author = target.user_id or target.chat_id
            await self.rpc(
                "sendReaction",
                {**to, "emoji": emoji, "targetAuthor": author, "targetTimestamp": int(message)},
            )
            return SendResult()
        if kind == DeliveryType.TYPING:
            await self.rpc("sendTyping", to)
            return SendResult()
        raise unsupported("signal", f"{kind} deliveries")

    async def receive(self, timeout_seconds: int) -> list[Any]:
        """One `receive` (manual receive mode): the envelopes that arrived."""
        result = await self.rpc(
            "receive", {"timeout": timeout_seconds}, timeout=timeout_seconds + 10.0
        )
        if not isinstance(result, list):
            raise DeliveryFailed("signal receive: unexpected answer", code="platform.bad_response")
        return result

    async def probe(self) -> str:
        result = await self.rpc("version", {})
        version = result.get("version", "?") if isinstance(result, dict) else "?"
        return f"signal-cli {version} for {self.settings.account}"
