"""WhatsApp Cloud API provider (Meta Graph API), natively verified.

Inbound: Meta first checks the webhook with a GET (`hub.mode=subscribe`,
`hub.verify_token`, echo `hub.challenge`), then POSTs events signed with
`X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body>` keyed with the
app secret. Events arrive as `entry[].changes[].value.messages[]` (user
messages, button and list replies) and `statuses[]` (sent/delivered/read
receipts, acknowledged and dropped). Chats are direct only: the chat is the
sender's wa_id. Outbound: `POST {apiBase}/{phoneNumberId}/messages` with the
access token; at most 3 reply buttons (titles up to 20 characters), or a list
of up to 10 rows when more are needed. No edits, no typing indicator.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, ClassVar, TypeGuard

import httpx
from pydantic import Field, SecretStr

from schemas import (
    ChannelEventType,
    ChannelInbound,
    ChannelInteraction,
    ChannelOutbound,
    ChannelSender,
    ChannelTarget,
    DeliveryType,
)

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
)
from ._payload import command_fields, contract_errors, inbound
from ._platform_http import call_json, require_object, require_reaction

SIGNATURE_HEADER = "X-Hub-Signature-256"
MAX_REPLY_BUTTONS = 3
MAX_LIST_ROWS = 10
BUTTON_TITLE_LIMIT = 20
LIST_ROW_TITLE_LIMIT = 24
TOKEN_BYTES = 200  # a list row id's limit (reply button ids allow 256)
BODY_LIMIT = 1024  # interactive message body text


DEFAULT_API_BASE = "https://graph.facebook.com/v20.0"


class WhatsAppSettings(ApiBaseSettings):
    phone_number_id: str = Field(pattern=r"^[0-9]{1,32}$")
    api_base: str = Field(default=DEFAULT_API_BASE, max_length=512)  # the real API
    DEFAULT_API_BASE: ClassVar[str | None] = DEFAULT_API_BASE


class WhatsAppSecrets(ProviderSettings):
    access_token: SecretStr = Field(min_length=1, max_length=1024)
    app_secret: SecretStr = Field(min_length=16, max_length=256)  # Meta's: 32 hex
    # chosen by the operator (the subscription handshake's hub.verify_token)
    verify_token: SecretStr = Field(min_length=16, max_length=256)


class WhatsAppProvider:
    kind: ClassVar[str] = "whatsapp"
    capabilities: ClassVar[Capabilities] = Capabilities(
        threads=False,
        edit=False,
        buttons=ButtonLimits(
            max_count=MAX_LIST_ROWS, max_rows=MAX_LIST_ROWS, max_token_bytes=TOKEN_BYTES
        ),
        file_upload=False,
        file_download=False,
        typing=False,
        reactions=True,
        max_text_length=4096,
        parse_modes=frozenset({"plain"}),
        max_file_bytes=0,
        interaction_ack="none",
        rate_limit="retry_after",
        ephemeral=False,
        verification="X-Hub-Signature-256 sha256= HMAC-SHA256 of the body with the app secret; "
        "GET subscribe check with the verify token",
    )
    settings_model: ClassVar[type[ProviderSettings]] = WhatsAppSettings
    secrets_model: ClassVar[type[ProviderSettings]] = WhatsAppSecrets
    # Replaced in tests to answer DNS for made-up names; None means the system resolver
    # (used only for an operator-set apiBase, whose calls are resolved and pinned).
    resolve: ClassVar[_ssrf.Resolver | None] = None

    def __init__(self, config: InstanceConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.settings: WhatsAppSettings = config.settings
        self.secrets: WhatsAppSecrets = config.secrets
        self.http = http

    # --- inbound ---------------------------------------------------------------------
    def handshake(self, request: WebhookRequest) -> WebhookResult | None:
        if request.method != "GET" or request.query.get("hub.mode") is None:
            return None
        if request.query.get("hub.mode") != "subscribe":
            raise BadRequest("whatsapp.handshake_invalid", "hub.mode must be subscribe")
        given = request.query.get("hub.verify_token", "")
        expected = self.secrets.verify_token.get_secret_value()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise VerificationFailed(
                "whatsapp.verify_token_invalid",
                "hub.verify_token does not match",
            )
        challenge = request.query.get("hub.challenge", "")
        if not challenge or len(challenge) > 256:
            raise BadRequest("whatsapp.handshake_invalid", "hub.challenge is missing")
        return WebhookResult(status=200, body=challenge.encode(), content_type="text/plain")

    def verify(self, request: WebhookRequest) -> None:
        given = request.headers.get(SIGNATURE_HEADER, "")
        if not given.startswith("sha256="):
            raise VerificationFailed(
                "whatsapp.signature_missing", f"{SIGNATURE_HEADER}: sha256=<hex> is required"
            )
        mac = hmac.new(
            self.secrets.app_secret.get_secret_value().encode(), request.body, hashlib.sha256
        )
        if not hmac.compare_digest(("sha256=" + mac.hexdigest()).encode(), given.encode()):
            raise VerificationFailed("whatsapp.signature_invalid", "the signature does not match")

    @contract_errors
    def parse(self, request: WebhookRequest) -> WebhookResult:
        try:
            payload = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("whatsapp.body_invalid", "the body is not JSON") from None
        if not isinstance(payload, dict) or payload.get("object") != "whatsapp_business_account":
            raise BadRequest("whatsapp.body_invalid", "not a whatsapp_business_account event")
        messages = []
        for value in _values(payload):
            contacts = {
                c["wa_id"]: c
                for c in _list(value.get("contacts"))
                if isinstance(c, dict) and isinstance(c.get("wa_id"), str)
            }
            for raw in _list(value.get("messages")):
                message = self._message(raw, contacts, request)
                if message is not None:
                    messages.append(message)
            # statuses[] (sent/delivered/read) need no action: acknowledged below.
        return WebhookResult(messages=messages, status=200, body=b"", content_type="text/plain")

    def _message(
        self, raw: Any, contacts: dict[Any, Any], request: WebhookRequest
    ) -> ChannelInbound | None:
        if not isinstance(raw, dict):
            raise BadRequest("whatsapp.body_invalid", "a message is not an object")
        wamid, sender = raw.get("id"), raw.get("from")
        if not _text_field(wamid) or not _text_field(sender):
            raise BadRequest("whatsapp.body_invalid", "a message lacks id or from")
        kind = raw.get("type")
        text, interaction = "", None
        if kind == "text":
            text = _dig(raw, "text", "body") or ""
        elif kind == "interactive":
            interactive = raw.get("interactive") or {}
            reply = (
                interactive.get("button_reply") or interactive.get("list_reply")
                if isinstance(interactive, dict)
                else None
            )
            if not isinstance(reply, dict) or not _text_field(reply.get("id")):
                raise BadRequest("whatsapp.body_invalid", "an interactive reply lacks its id")
            interaction = ChannelInteraction(id=wamid, token=reply["id"], kind="button")
            text = str(reply.get("title") or "")
        elif kind == "button":  # a template's quick-reply button
            payload = _dig(raw, "button", "payload")
            if not payload:
                raise BadRequest("whatsapp.body_invalid", "a button reply lacks its payload")
            interaction = ChannelInteraction(id=wamid, token=payload, kind="button")
            text = _dig(raw, "button", "text") or ""
        else:
            return None  # media, location, reactions...: not workspace input (yet)
        if len(text) > 16_384:
            raise BadRequest("whatsapp.body_invalid", "the message text is too long")
        event_type = ChannelEventType.INTERACTION if interaction else ChannelEventType.MESSAGE
        name = _dig(contacts.get(sender) or {}, "profile", "name")
        return inbound(
            self.config,
            request,
            event_type=event_type.value,
            provider_event_id=wamid,
            provider_message_id=wamid,
            **(command_fields(text) if not interaction else {}),
            target=ChannelTarget(chat_id=sender, is_direct=True, user_id=sender, message_id=wamid),
            sender=ChannelSender(provider_user_id=sender, display_name=name),
            text=text,
            raw_text=text,
            interaction=interaction,
        )

    # --- outbound --------------------------------------------------------------------
    async def send(self, delivery: ChannelOutbound) -> SendResult:
        if delivery.type in (
            DeliveryType.EDIT,
            DeliveryType.TYPING,
            DeliveryType.FILE,
            DeliveryType.ANSWER_INTERACTION,
        ):
            raise DeliveryFailed(
                f"whatsapp cannot {delivery.type.value}",
                code="delivery.unsupported",
                permanent=True,
            )
        if delivery.type == DeliveryType.REACTION:
            emoji, message = require_reaction(delivery)
            await self._post(
                {"type": "reaction", "reaction": {"message_id": message, "emoji": emoji}}, delivery
            )
            return SendResult()  # a reaction is not a message of the chat
        text = delivery.text or ""
        if not text.strip() or len(text) > self.capabilities.max_text_length:
            raise DeliveryFailed(
                f"whatsapp: the text is empty or longer than {self.capabilities.max_text_length}",
                code="delivery.invalid",
                permanent=True,
            )
        buttons = [b for row in delivery.buttons or [] for b in row]
        body: dict[str, Any] = (
            {"type": "interactive", "interactive": _interactive(text, buttons)}
            if buttons
            else {"type": "text", "text": {"body": text, "preview_url": False}}
        )
        if delivery.reply_to_message_id:
            body["context"] = {"message_id": delivery.reply_to_message_id}
        return await self._post(body, delivery)

    async def _post(self, message: dict[str, Any], delivery: ChannelOutbound) -> SendResult:
        """One message (text, interactive or reaction) to the chat's number."""
        body: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": delivery.target.chat_id,
            **message,
        }
        _, answer = await call_json(
            self.http,
            "POST",
            self._url("messages"),
            operation="whatsapp send",
            json=body,
            headers=self._auth(),
            pin=self.settings.api_policy,
            resolve=type(self).resolve,
        )
        answer = require_object("whatsapp send", answer)
        sent = answer.get("messages")
        wamid = (
            sent[0].get("id")
            if isinstance(sent, list) and sent and isinstance(sent[0], dict)
            else None
        )
        return SendResult(provider_message_id=str(wamid) if wamid else None)

    async def probe(self) -> str:
        _, answer = await call_json(
            self.http,
            "GET",
            self._url(),
            operation="whatsapp probe",
            headers=self._auth(),
            pin=self.settings.api_policy,
            resolve=type(self).resolve,
        )
        answer = require_object("whatsapp probe", answer)
        number = answer.get("display_phone_number") or self.settings.phone_number_id
        return f"phone number {number}"

    def _url(self, *path: str) -> str:
        return "/".join([self.settings.api_base.rstrip("/"), self.settings.phone_number_id, *path])

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets.access_token.get_secret_value()}"}


def _interactive(text: str, buttons: list[Any]) -> dict[str, Any]:
    body = {"text": text[:BODY_LIMIT]}
    if len(buttons) > MAX_LIST_ROWS:
        raise DeliveryFailed(
            f"whatsapp: at most {MAX_LIST_ROWS} choices", code="delivery.invalid", permanent=True
        )
    if any(len(b.token.encode()) > TOKEN_BYTES for b in buttons):
        raise DeliveryFailed(
            f"whatsapp: a button token is longer than {TOKEN_BYTES} bytes",
            code="delivery.invalid",
            permanent=True,
        )
    if len(buttons) <= MAX_REPLY_BUTTONS:
        return {
            "type": "button",
            "body": body,
            "action": {
                "buttons": [
                    {
                        "type": "reply",
                        "reply": {"id": b.token, "title": b.label[:BUTTON_TITLE_LIMIT]},
                    }
                    for b in buttons
                ]
            },
        }
    return {
        "type": "list",
        "body": body,
        "action": {
            "button": "Choose",
            "sections": [
                {
                    "title": "Options",
                    "rows": [
                        {"id": b.token, "title": b.label[:LIST_ROW_TITLE_LIMIT]} for b in buttons
                    ],
                }
            ],
        },
    }


def _values(payload: dict[str, Any]) -> list[dict[str, Any]]:
    values = []
    for entry in _list(payload.get("entry")):
        for change in _list(entry.get("changes") if isinstance(entry, dict) else None):
            value = change.get("value") if isinstance(change, dict) else None
            if isinstance(value, dict):
                values.append(value)
    return values


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dig(value: Any, *keys: str) -> str | None:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value if isinstance(value, str) else None


def _text_field(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= 256
