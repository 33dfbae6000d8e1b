"""Discord provider: the Interactions endpoint in, REST API out.

Discord signs each interaction with the application's Ed25519 key over
`X-Signature-Timestamp + body`. Slash commands are answered "deferred" (type 5)
and button presses "deferred update" (type 6) right in the webhook answer, so
Discord's 3-second deadline never depends on the workspace. A thread is a
channel in Discord: a message in a thread targets the thread's channel id.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, ClassVar
from urllib.parse import quote

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import Field

from schemas import ChannelInteraction, ChannelOutbound, ChannelSender, ChannelTarget, DeliveryType

from .. import _ssrf
from .._provider import (
    ApiBaseSettings,
    BadRequest,
    ButtonLimits,
    Capabilities,
    DeliveryFailed,
    InstanceConfig,
    ProviderSettings,
    SendResult,
    VerificationFailed,
    WebhookRequest,
    WebhookResult,
    check_timestamp,
)
from .._transport import TransportSettings, transport_request
from . import _payload as p
from ._platform_http import (
    call_json,
    check_buttons,
    checked_socket_url,
    file_bytes,
    invalid,
    require_object,
    require_reaction,
    require_text,
    unsupported,
)

DEFAULT_API_BASE = "https://discord.com/api/v10"
PING, APPLICATION_COMMAND, MESSAGE_COMPONENT = 1, 2, 3
PONG, DEFERRED_MESSAGE, DEFERRED_UPDATE, CHANNEL_MESSAGE = 1, 5, 6, 4
_THREAD_CHANNEL_TYPES = {10, 11, 12}
_STRING_OPTION = 3
_BUTTON_STYLES = {"default": 2, "success": 3, "danger": 4}
_SUPPRESS_NOTIFICATIONS = 1 << 12
_EPHEMERAL = 1 << 6


class DiscordSettings(ApiBaseSettings, TransportSettings):  # apiBase None: the real API
    DEFAULT_API_BASE: ClassVar[str | None] = DEFAULT_API_BASE
    application_id: str = Field(pattern=r"^[0-9]{1,20}$")
    public_key: str = Field(pattern=r"^[0-9a-fA-F]{64}$")  # public: not a secret
    prompt_command: str = Field(default="ask", pattern=r"^[a-z0-9_-]{1,32}$")


class DiscordSecrets(ProviderSettings):
    bot_token: str = Field(min_length=1, max_length=256, repr=False)


class DiscordProvider:
    kind: ClassVar[str] = "discord"
    capabilities: ClassVar[Capabilities] = Capabilities(
        threads=True,
        edit=True,
        buttons=ButtonLimits(25, 5, 100),
        file_upload=True,
        file_download=False,
        typing=True,
        reactions=True,
        max_text_length=2000,
        parse_modes=frozenset({"plain", "markdown"}),
        max_file_bytes=10 * 1024 * 1024,
        interaction_ack="required",
        rate_limit="retry_after",
        ephemeral=True,
        verification="Ed25519 signature (X-Signature-Ed25519) over X-Signature-Timestamp "
        "+ body with the application public key, 5 min skew",
    )
    settings_model: ClassVar[type[ProviderSettings]] = DiscordSettings
    secrets_model: ClassVar[type[ProviderSettings]] = DiscordSecrets
    # Replaced in tests to answer DNS for made-up names; None means the system resolver
    # (used only for an operator-set apiBase, whose calls are resolved and pinned).
    resolve: ClassVar[_ssrf.Resolver | None] = None

    def __init__(self, config: InstanceConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.settings: DiscordSettings = config.settings
        self.secrets: DiscordSecrets = config.secrets
        self.http = http
        self._api = (self.settings.api_base or DEFAULT_API_BASE).rstrip("/")
        self._key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.settings.public_key))

    # --- inbound -----------------------------------------------------------------------
    def handshake(self, request: WebhookRequest) -> WebhookResult | None:
        return None

    def verify(self, request: WebhookRequest) -> None:
        timestamp = request.headers.get("X-Signature-Timestamp", "")
        signature_hex = request.headers.get("X-Signature-Ed25519", "")
        try:
            signature = bytes.fromhex(signature_hex)
        except ValueError:
            raise VerificationFailed(
                "signature.invalid", "the Discord signature is not hex"
            ) from None
        if not timestamp or len(signature) != 64:
            raise VerificationFailed(
                "signature.invalid", "the Discord signature or timestamp is missing"
            )
        check_timestamp(request.now, timestamp, "Discord")  # a captured request goes stale
        try:
            self._key.verify(signature, timestamp.encode() + request.body)
        except InvalidSignature:
            raise VerificationFailed(
                "signature.invalid", "the Discord signature does not match"
            ) from None

    @p.contract_errors
    def parse(self, request: WebhookRequest) -> WebhookResult:
        data = p.json_object(request.body, "interaction")
        kind = p.integer(data, "type")
        if kind == PING:
            return _answer(PONG)
        if kind not in (APPLICATION_COMMAND, MESSAGE_COMPONENT):
            raise BadRequest("payload.unsupported", f"interaction type {kind} is not handled")
        interaction_id = p.ident(data, "id", required=True)
        response_token = p.text(data, "token", required=True, max_length=2048)
        body = p.obj(data, "data", required=True)
        user = p.obj(p.obj(data, "member") or {}, "user") or p.obj(data, "user", required=True)
        user_id = p.ident(user, "id", required=True)
        sender = ChannelSender(
            provider_user_id=user_id,
            username=p.text(user, "username", max_length=256),
            display_name=p.text(user, "global_name", max_length=512),
            is_bot=p.flag(user, "bot"),
        )
        channel = p.obj(data, "channel") or {}
        channel_id = p.ident(data, "channel_id") or p.ident(channel, "id", required=True)
        is_thread = p.integer(channel, "type") in _THREAD_CHANNEL_TYPES
        message = p.obj(data, "message") or {}
        message_id = p.ident(message, "id")
        target = ChannelTarget(
            chat_id=channel_id,
            is_direct=data.get("guild_id") is None,
            thread_id=channel_id if is_thread else None,
            user_id=user_id,
            message_id=message_id,
        )
        if kind == MESSAGE_COMPONENT:
            token = p.text(body, "custom_id", required=True, max_length=100)
            press = p.inbound(
                self.config,
                request,
                event_type="interaction",
                provider_event_id=interaction_id,
                provider_message_id=message_id,
                target=target,
                sender=sender,
                interaction=ChannelInteraction(
                    id=interaction_id, token=token, kind="button", response_token=response_token
                ),
            )
            return _answer(DEFERRED_UPDATE, press)
        name = p.text(body, "name", required=True, max_length=32).lower()
        values = _string_options(body)
        fields: dict[str, Any]
        if name == self.settings.prompt_command:  # `/ask text:...` is a prompt
            prompt = " ".join(values)
            fields = {"text": prompt, "raw_text": f"/{name} {prompt}".strip()}
        else:
            raw = " ".join([f"/{name}", *values])
            parsed = p.split_command(raw)
            if parsed is None:
                raise BadRequest("payload.invalid", "the command name is not valid")
            fields = {
                "text": raw,
                "raw_text": raw,
                "is_command": True,
                "command": parsed[0],
                "command_args": parsed[2],
            }
        command = p.inbound(
            self.config,
            request,
            event_type="command",
            provider_event_id=interaction_id,
            target=target,
            sender=sender,
            interaction=ChannelInteraction(
                id=interaction_id, token=name, kind="command", response_token=response_token
            ),
            **fields,
        )
        return _answer(DEFERRED_MESSAGE, command)

    # --- outbound ----------------------------------------------------------------------
    async def _call(self, method: str, path: str, operation: str, **kw: Any) -> Any:
        headers = {"Authorization": f"Bot {self.secrets.bot_token}"}
        _, body = await call_json(
            self.http,
            method,
            self._api + path,
            operation=f"discord {operation}",
            headers=headers,
            pin=self.settings.api_policy,
            resolve=type(self).resolve,
            **kw,
        )
        return body

    def _components(self, delivery: ChannelOutbound) -> list[dict[str, Any]]:
        rows = check_buttons(delivery, self.capabilities.buttons)
        return [
            {
                "type": 1,
                "components": [
                    {
                        "type": 2,
                        "style": _BUTTON_STYLES[b.style],
                        "label": b.label[:80],
                        "custom_id": b.token,
                    }
                    for b in row
                ],
            }
            for row in rows
        ]

    async def send(self, delivery: ChannelOutbound) -> SendResult:
        target = delivery.target
        channel = target.thread_id or target.chat_id
        limit = self.capabilities.max_text_length
        kind = delivery.type
        if kind in (DeliveryType.TEXT, DeliveryType.BUTTONS):
            payload = {
                **self._message(delivery, require_text(delivery, limit)),
                "components": self._components(delivery),
            }
            return _sent(
                await self._call(
                    "POST", f"/channels/{channel}/messages", "create message", json=payload
                )
            )
        if kind == DeliveryType.EDIT:
            if not delivery.edit_message_id:
                raise invalid("an edit needs the Discord message id")
            payload = {
                "content": require_text(delivery, limit),
                "components": self._components(delivery),
            }
            await self._call(
                "PATCH",
                f"/channels/{channel}/messages/{delivery.edit_message_id}",
                "edit message",
                json=payload,
            )
            return SendResult(delivery.edit_message_id)
        if kind == DeliveryType.TYPING:
            await self._call("POST", f"/channels/{channel}/typing", "typing")
            return SendResult()
        if kind == DeliveryType.REACTION:
            # Needs a message id: a button press carries one, a slash command does not
            # (the router reacts only to messages with a provider message id).
            emoji, message = require_reaction(delivery)
            await self._call(
                "PUT",
                f"/channels/{channel}/messages/{quote(message, safe='')}"
                f"/reactions/{quote(emoji, safe='')}/@me",
                "add reaction",
            )
            return SendResult()
        if kind == DeliveryType.ANSWER_INTERACTION:
            return await self._answer_interaction(delivery)
        if kind == DeliveryType.FILE:
            file, content = file_bytes(delivery, self.capabilities.max_file_bytes)
            payload = self._message(delivery, (delivery.text or "")[:limit])
            payload["attachments"] = [{"id": 0, "filename": file.filename}]
            return _sent(
                await self._call(
                    "POST",
                    f"/channels/{channel}/messages",
                    "upload file",
                    data={"payload_json": json.dumps(payload)},
                    files={"files[0]": (file.filename, content, file.mime_type)},
                )
            )
        raise unsupported("discord", f"{kind} deliveries")

    def _message(self, delivery: ChannelOutbound, text: str) -> dict[str, Any]:
        # The nonce lets Discord itself drop a re-sent delivery (enforce_nonce); no
        # @everyone or role pings from agent output.
        nonce = hashlib.sha256(delivery.delivery_id.encode()).hexdigest()[:25]
        payload: dict[str, Any] = {
            "content": text,
            "nonce": nonce,
            "enforce_nonce": True,
            "allowed_mentions": {"parse": []},
        }
        if delivery.reply_to_message_id:
            payload["message_reference"] = {
                "message_id": delivery.reply_to_message_id,
                "fail_if_not_exists": False,
            }
        if delivery.silent:
            payload["flags"] = _SUPPRESS_NOTIFICATIONS
        return payload

    async def _answer_interaction(self, delivery: ChannelOutbound) -> SendResult:
        interaction = delivery.interaction
        if interaction is None or not interaction.response_token:
            raise invalid("answering needs the Discord interaction id and token")
        text = (delivery.text or "Done.")[: self.capabilities.max_text_length]
        token = interaction.response_token
        try:
            await self._call(
                "POST",
                f"/interactions/{interaction.id}/{token}/callback",
                "interaction callback",
                json={
                    "type": CHANNEL_MESSAGE,
                    "data": {
                        "content": text,
                        "flags": _EPHEMERAL,
                        "allowed_mentions": {"parse": []},
                    },
                },
            )
        except DeliveryFailed as exc:
            if exc.status != 400 or "already been acknowledged" not in str(exc):
                raise
            # Deferred by the webhook answer: fill in the original response instead.
            await self._call(
                "PATCH",
                f"/webhooks/{self.settings.application_id}/{token}/messages/@original",
                "edit interaction response",
                json={"content": text, "allowed_mentions": {"parse": []}},
            )
        return SendResult()

    # --- the Gateway (channels/providers/_discord_gateway.py) ------------------------------
    async def gateway_url(self) -> str:
        """Where to connect: `GET /gateway/bot` (https://discord.com/developers/docs/
        events/gateway#get-gateway-bot), checked as the API base is when it is ours."""
        answer = require_object(
            "discord get gateway", await self._call("GET", "/gateway/bot", "get gateway")
        )
        return self.checked_gateway_url(answer.get("url"))

    def checked_gateway_url(self, url: Any) -> str:
        """A Gateway URL (from the API or a READY's resume URL), which the bot token
        goes to: checked (channels/providers/_platform_http.py checked_socket_url)."""
        return checked_socket_url(url, self.settings.api_policy, "discord gateway")

    def gateway_message(self, data: dict[str, Any]) -> WebhookResult:
        """A MESSAGE_CREATE dispatch as a message (nothing for bots' and webhooks'
        own messages, or one without text: MESSAGE_CONTENT not granted)."""
        return self._gateway_message(transport_request(json.dumps(data).encode()))

    @p.contract_errors
    def _gateway_message(self, request: WebhookRequest) -> WebhookResult:
        data = p.json_object(request.body, "message")
        author = p.obj(data, "author", required=True)
        if p.flag(author, "bot") or data.get("webhook_id") is not None:
            return WebhookResult()
        raw = p.text(data, "content", max_length=4000) or ""
        if not raw.strip():
            return WebhookResult()
        message_id = p.ident(data, "id", required=True)
        channel_id = p.ident(data, "channel_id", required=True)
        user_id = p.ident(author, "id", required=True)
        message = p.inbound(
            self.config,
            request,
            event_type="message",
            provider_event_id=message_id,
            provider_message_id=message_id,
            target={
                "chat_id": channel_id,
                "is_direct": data.get("guild_id") is None,
                "user_id": user_id,
                "message_id": message_id,
            },
            sender={
                "provider_user_id": user_id,
                "username": p.text(author, "username", max_length=256),
                "display_name": p.text(author, "global_name", max_length=512),
                "is_bot": False,
            },
            attachments=[
                {
                    "provider_file_id": p.ident(item, "id", required=True),
                    "download_url": p.text(item, "url", max_length=2048),
                    "filename": p.text(item, "filename", max_length=512),
                    "mime_type": p.text(item, "content_type", max_length=128),
                    "size_bytes": p.integer(item, "size"),
                }
                for item in p.items(data, "attachments")[:10]
                if isinstance(item, dict)
            ],
            text=raw,
            raw_text=raw,
            **p.command_fields(raw),
        )
        return WebhookResult(messages=[message])

    async def acknowledge(self, interaction: dict[str, Any], answer: bytes) -> None:
        """An INTERACTION_CREATE from the Gateway is answered by the callback endpoint
        with what the webhook would have answered in its body (deferred)."""
        interaction_id = quote(str(interaction.get("id", "")), safe="")
        token = quote(str(interaction.get("token", "")), safe="")
        await self._call(
            "POST",
            f"/interactions/{interaction_id}/{token}/callback",
            "interaction callback",
            json=json.loads(answer),
        )

    async def probe(self) -> str:
        me = require_object(
            "discord get current user", await self._call("GET", "/users/@me", "get current user")
        )
        return f"discord bot {me.get('username', '?')} (id {me.get('id', '?')})"


def _string_options(body: dict[str, Any]) -> list[str]:
    """The string option values of a command, as typed, in order (sub-commands
    flattened)."""
    values: list[str] = []
    pending = list(p.items(body, "options"))
    while pending and len(values) < 64:
        option = pending.pop(0)
        if not isinstance(option, dict):
            raise BadRequest("payload.invalid", "a command option is not an object")
        if p.integer(option, "type") == _STRING_OPTION:
            values.append(p.text(option, "value", required=True, max_length=4096))
        pending[:0] = p.items(option, "options")
    return values[:64]


def _answer(kind: int, message=None) -> WebhookResult:
    return WebhookResult(
        messages=[message] if message else [],
        status=200,
        body=json.dumps({"type": kind}).encode(),
        content_type="application/json",
    )


def _sent(body: Any) -> SendResult:
    if isinstance(body, dict) and isinstance(body.get("id"), str):
        return SendResult(body["id"])
    raise DeliveryFailed("discord: the answer has no message id", code="platform.bad_response")
