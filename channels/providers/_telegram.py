"""Telegram provider: Bot API webhooks in, Bot API methods out.

Inbound requests carry the webhook secret in `X-Telegram-Bot-Api-Secret-Token`
(set with setWebhook); it is compared in constant time. Outbound calls put the
bot token in the URL path, so no URL ever reaches an error message.
"""

from __future__ import annotations

import hmac
from typing import Any, ClassVar

import httpx
from pydantic import Field

from schemas import ChannelOutbound, DeliveryType

from .. import _ssrf
from .._provider import (
    ApiBaseSettings,
    ButtonLimits,
    Capabilities,
    DeliveryFailed,
    InstanceConfig,
    ProviderSettings,
    SendResult,
    VerificationFailed,
    WebhookRequest,
    WebhookResult,
)
from .._transport import TransportSettings
from . import _payload as p
from ._platform_http import (
    call_json,
    check_buttons,
    failure_for_status,
    file_bytes,
    invalid,
    require_object,
    require_reaction,
    require_text,
    unsupported,
)

DEFAULT_API_BASE = "https://api.telegram.org"
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
_PARSE_MODES = {"markdown": "Markdown", "html": "HTML"}
_CAPTION_LIMIT = 1024
ALLOWED_UPDATES = ["message", "edited_message", "callback_query"]
_ATTACHMENT_KEYS = frozenset({"photo", "document", "audio", "video", "voice"})
# setMessageReaction accepts only these emoji (Bot API ReactionTypeEmoji); anything
# else is refused up front rather than by a 400 from Telegram.
REACTION_EMOJI = frozenset(
    "👍 👎 ❤ 🔥 🥰 👏 😁 🤔 🤯 😱 🤬 😢 🎉 🤩 🤮 💩 🙏 👌 🕊 🤡 🥱 🥴 😍 🐳 ❤\u200d🔥 🌚 🌭 💯 "
    "🤣 ⚡ 🍌 🏆 💔 🤨 😐 🍓 🍾 💋 🖕 😈 😴 😭 🤓 👻 👨\u200d💻 👀 🎃 🙈 😇 😨 🤝 ✍ 🤗 🫡 🎅 "
    "🎄 ☃ 💅 🤪 🗿 🆒 💘 🙉 🦄 😘 💊 🙊 😎 👾 🤷\u200d♂ 🤷 🤷\u200d♀ 😡".split()
)


class TelegramSettings(ApiBaseSettings, TransportSettings):  # apiBase None: the real API
    DEFAULT_API_BASE: ClassVar[str | None] = DEFAULT_API_BASE
    # The bot's @username: `/cmd@otherbot` in a group is for another bot.
    bot_username: str | None = Field(default=None, max_length=64)


class TelegramSecrets(ProviderSettings):
    WEBHOOK_SECRETS: ClassVar[tuple[str, ...]] = ("webhook_secret",)
    bot_token: str = Field(min_length=1, max_length=256, repr=False)
    # setWebhook's secret_token: 1-256 characters of A-Z a-z 0-9 _ -, chosen by the
    # operator: at least 16 (MIN_CHOSEN_SECRET), so it cannot be guessed. None: the
    # instance polls (`transport: outbound`) and refuses every webhook.
    webhook_secret: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{16,256}$", repr=False)


class TelegramProvider:
    kind: ClassVar[str] = "telegram"
    capabilities: ClassVar[Capabilities] = Capabilities(
        threads=True,
        edit=True,
        buttons=ButtonLimits(8, 4, 64),
        file_upload=True,
        file_download=False,
        typing=True,
        reactions=True,
        max_text_length=4096,
        parse_modes=frozenset({"plain", "markdown", "html"}),
        max_file_bytes=50 * 1024 * 1024,
        interaction_ack="optional",
        rate_limit="retry_after",
        ephemeral=False,
        verification=f"header {SECRET_HEADER} equals the webhook secret (constant time)",
    )
    settings_model: ClassVar[type[ProviderSettings]] = TelegramSettings
    secrets_model: ClassVar[type[ProviderSettings]] = TelegramSecrets
    # Replaced in tests to answer DNS for made-up names; None means the system resolver
    # (used only for an operator-set apiBase, whose calls are resolved and pinned).
    resolve: ClassVar[_ssrf.Resolver | None] = None

    def __init__(self, config: InstanceConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.settings: TelegramSettings = config.settings
        self.secrets: TelegramSecrets = config.secrets
        self.http = http
        self._api = (self.settings.api_base or DEFAULT_API_BASE).rstrip("/")

    # --- inbound -----------------------------------------------------------------------
    def handshake(self, request: WebhookRequest) -> WebhookResult | None:
        return None

    def verify(self, request: WebhookRequest) -> None:
        given = request.headers.get(SECRET_HEADER, "")
        expected = self.secrets.webhook_secret
        if expected is None:
            raise VerificationFailed(
                "signature.invalid", "this Telegram instance has no webhook secret"
            )
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise VerificationFailed(
                "signature.invalid", "the Telegram secret token header is missing or wrong"
            )

    @p.contract_errors
    def parse(self, request: WebhookRequest) -> WebhookResult:
        update = p.json_object(request.body, "update")
        update_id = p.integer(update, "update_id")
        if update_id is None:
            raise p.BadRequest("payload.invalid", "'update_id' is missing")
        for key in ("message", "edited_message"):
            message = p.obj(update, key)
            if message is not None:
                parsed = self._message(request, str(update_id), message)
                return WebhookResult(messages=[parsed] if parsed else [])
        callback = p.obj(update, "callback_query")
        if callback is not None:
            return WebhookResult(messages=[self._callback(request, str(update_id), callback)])
        # Other update kinds (polls, member changes...): acknowledged so Telegram
        # does not redeliver them, but nothing for a workspace.
        return WebhookResult()

    # The parts below are plain dicts of ChannelInbound field names: p.inbound
    # validates the whole message once (one pydantic pass per update, not four).
    def _sender(self, data: dict[str, Any]) -> dict[str, Any]:
        user = (
            p.obj(data, "from") or p.obj(data, "sender_chat") or p.obj(data, "chat", required=True)
        )
        first, last = p.text(user, "first_name"), p.text(user, "last_name")
        name = " ".join(part for part in (first, last) if part) or p.text(user, "title")
        return {
            "provider_user_id": p.ident(user, "id", required=True),
            "username": p.text(user, "username", max_length=256),
            "display_name": (name or None) and name[:512],
            "is_bot": p.flag(user, "is_bot"),
        }

    def _message(self, request: WebhookRequest, event_id: str, message: dict[str, Any]):
        chat = p.obj(message, "chat", required=True)
        raw = p.text(message, "text") or p.text(message, "caption") or ""
        thread_id = (
            p.ident(message, "message_thread_id") if p.flag(message, "is_topic_message") else None
        )
        sender = self._sender(message)
        fields: dict[str, Any] = {"text": raw, "raw_text": raw}
        command = p.split_command(raw)
        if command is not None:
            name, mention, args = command
            bot = self.settings.bot_username
            if mention and bot and mention.lower() != bot.lstrip("@").lower():
                return None  # `/cmd@otherbot`: addressed to another bot in the group
            fields.update(
                is_command=True,
                command=name,
                command_args=args,
                text=" ".join([f"/{name}", *args]) if mention else raw,
            )
        message_id = p.ident(message, "message_id", required=True)
        return p.inbound(
            self.config,
            request,
            event_type="message",
            provider_event_id=event_id,
            provider_message_id=message_id,
            target={
                "chat_id": p.ident(chat, "id", required=True),
                "is_direct": p.text(chat, "type") == "private",
                "thread_id": thread_id,
                "user_id": sender["provider_user_id"],
                "message_id": message_id,
            },
            sender=sender,
            attachments=self._attachments(message),
            **fields,
        )

    def _attachments(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        if _ATTACHMENT_KEYS.isdisjoint(message):  # most updates: text only
            return found
        photos = [ph for ph in p.items(message, "photo") if isinstance(ph, dict)]
        if photos:  # sizes of one photo, smallest first: keep the largest
            largest = photos[-1]
            found.append(
                {
                    "provider_file_id": p.ident(largest, "file_id", required=True),
                    "mime_type": "image/jpeg",
                    "size_bytes": _size(largest),
                }
            )
        for key in ("document", "audio", "video", "voice"):
            item = p.obj(message, key)
            if item is not None:
                found.append(
                    {
                        "provider_file_id": p.ident(item, "file_id", required=True),
                        "filename": p.text(item, "file_name", max_length=512),
                        "mime_type": p.text(item, "mime_type", max_length=128),
                        "size_bytes": _size(item),
                    }
                )
        return found

    def _callback(self, request: WebhookRequest, event_id: str, callback: dict[str, Any]):
        query_id = p.ident(callback, "id", required=True)
        data = p.text(callback, "data", required=True, max_length=64)
        sender = self._sender(callback)
        message = p.obj(callback, "message") or {}
        chat = p.obj(message, "chat") or {}
        chat_id = p.ident(chat, "id") or sender["provider_user_id"]
        message_id = p.ident(message, "message_id")
        thread_id = (
            p.ident(message, "message_thread_id") if p.flag(message, "is_topic_message") else None
        )
        return p.inbound(
            self.config,
            request,
            event_type="interaction",
            provider_event_id=event_id,
            provider_message_id=message_id,
            target={
                "chat_id": chat_id,
                "is_direct": p.text(chat, "type") == "private",
                "thread_id": thread_id,
                "user_id": sender["provider_user_id"],
                "message_id": message_id,
            },
            sender=sender,
            interaction={
                "id": query_id,
                "token": data,
                "kind": "button",
                "response_token": query_id,
            },
        )

    # --- outbound ----------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        *,
        json: dict[str, Any] | None = None,
        data: dict[str, Any] | None = None,
        files: Any = None,
        timeout: float = 30.0,
    ) -> Any:
        operation = f"telegram {method}"
        _, body = await call_json(
            self.http,
            "POST",
            f"{self._api}/bot{self.secrets.bot_token}/{method}",
            operation=operation,
            json=json,
            data=data,
            files=files,
            timeout=timeout,
            pin=self.settings.api_policy,
            resolve=type(self).resolve,
        )
        body = require_object(operation, body)
        if body.get("ok") is not True:  # an error answered with a 2xx status
            code = body.get("error_code")
            status = code if isinstance(code, int) and not isinstance(code, bool) else 400
            raise failure_for_status(operation, status, {}, body)
        return body.get("result")

    async def send(self, delivery: ChannelOutbound) -> SendResult:
        target = delivery.target
        base: dict[str, Any] = {"chat_id": _chat(target.chat_id)}
        if target.thread_id:
            base["message_thread_id"] = _chat(target.thread_id)
        kind = delivery.type
        if kind in (DeliveryType.TEXT, DeliveryType.BUTTONS):
            payload = {
                **base,
                "text": require_text(delivery, 4096),
                "disable_notification": delivery.silent,
                **self._markup(delivery),
            }
            if delivery.reply_to_message_id:
                payload["reply_parameters"] = {
                    "message_id": _chat(delivery.reply_to_message_id),
                    "allow_sending_without_reply": True,
                }
            return _sent(await self._with_parse_mode("sendMessage", payload, delivery))
        if kind == DeliveryType.EDIT:
            if not delivery.edit_message_id:
                raise DeliveryFailed(
                    "an edit needs the Telegram message id", code="delivery.invalid", permanent=True
                )
            payload = {
                "chat_id": base["chat_id"],
                "message_id": _chat(delivery.edit_message_id),
                "text": require_text(delivery, 4096),
                **self._markup(delivery),
            }
            try:
                result = await self._with_parse_mode("editMessageText", payload, delivery)
            except DeliveryFailed as exc:
                if exc.status == 400 and "not modified" in str(exc):
                    return SendResult(delivery.edit_message_id)  # same text: already done
                raise
            return SendResult(delivery.edit_message_id) if result is True else _sent(result)
        if kind == DeliveryType.TYPING:
            await self._call("sendChatAction", json={**base, "action": "typing"})
            return SendResult()
        if kind == DeliveryType.REACTION:
            emoji, message = require_reaction(delivery)
            if emoji.replace("\ufe0f", "") not in REACTION_EMOJI:  # ❤️ is sent as ❤
                raise invalid(
                    f"telegram allows only its fixed set of reaction emoji, not {emoji!r}"
                )
            await self._call(
                "setMessageReaction",
                json={
                    "chat_id": base["chat_id"],
                    "message_id": _chat(message),
                    "reaction": [{"type": "emoji", "emoji": emoji.replace("\ufe0f", "")}],
                },
            )
            return SendResult()
        if kind == DeliveryType.ANSWER_INTERACTION:
            interaction = delivery.interaction
            if interaction is None or not interaction.response_token:
                raise DeliveryFailed(
                    "answering needs the callback query id", code="delivery.invalid", permanent=True
                )
            payload = {"callback_query_id": interaction.response_token}
            if delivery.text:
                payload["text"] = delivery.text[:200]
            await self._call("answerCallbackQuery", json=payload)
            return SendResult()
        if kind == DeliveryType.FILE:
            file, content = file_bytes(delivery, self.capabilities.max_file_bytes)
            form = {key: str(value) for key, value in base.items()}
            if delivery.text:
                form["caption"] = delivery.text[:_CAPTION_LIMIT]
            form["disable_notification"] = "true" if delivery.silent else "false"
            return _sent(
                await self._call(
                    "sendDocument",
                    data=form,
                    files={"document": (file.filename, content, file.mime_type)},
                )
            )
        raise unsupported("telegram", f"{kind} deliveries")

    async def poll(self, offset: int | None, timeout: int) -> list[Any]:
        """One long poll of `getUpdates` (channels/providers/_telegram_polling.py)."""
        params: dict[str, Any] = {"timeout": timeout, "allowed_updates": ALLOWED_UPDATES}
        if offset is not None:
            params["offset"] = offset
        updates = await self._call("getUpdates", json=params, timeout=timeout + 10.0)
        if not isinstance(updates, list):
            raise DeliveryFailed(
                "telegram getUpdates: unexpected answer", code="platform.bad_response"
            )
        return updates

    async def stop_webhook(self) -> None:
        """Telegram refuses getUpdates while a webhook is set (409): unset it, keeping
        the updates it holds (they come by polling instead)."""
        await self._call("deleteWebhook", json={"drop_pending_updates": False})

    def _markup(self, delivery: ChannelOutbound) -> dict[str, Any]:
        rows = check_buttons(delivery, self.capabilities.buttons)
        if not rows:
            return {}
        return {
            "reply_markup": {
                "inline_keyboard": [
                    [{"text": b.label, "callback_data": b.token} for b in row] for row in rows
                ]
            }
        }

    async def _with_parse_mode(
        self, method: str, payload: dict[str, Any], delivery: ChannelOutbound
    ) -> Any:
        mode = _PARSE_MODES.get(delivery.parse_mode)
        if mode is None:
            return await self._call(method, json=payload)
        try:
            return await self._call(method, json={**payload, "parse_mode": mode})
        except DeliveryFailed as exc:
            # Agent markdown is often not valid Telegram markup; plain text beats
            # a dead letter.
            if exc.status == 400 and "parse entities" in str(exc):
                return await self._call(method, json=payload)
            raise

    async def probe(self) -> str:
        me = await self._call("getMe")
        if not isinstance(me, dict):
            raise DeliveryFailed("telegram getMe: unexpected answer", code="platform.bad_response")
        return f"telegram bot @{me.get('username', '?')} (id {me.get('id', '?')})"


def _chat(value: str) -> int | str:
    """Telegram ids are integers; `@channelname` stays a string."""
    try:
        return int(value)
    except ValueError:
        return value


def _size(item: dict[str, Any]) -> int | None:
    size = p.integer(item, "file_size")
    return size if size is not None and size >= 0 else None


def _sent(result: Any) -> SendResult:
    if isinstance(result, dict) and "message_id" in result:
        return SendResult(str(result["message_id"]))
    raise DeliveryFailed("telegram: the answer has no message id", code="platform.bad_response")
