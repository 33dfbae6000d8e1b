"""Generic signed webhook provider: any system that can sign an HTTP POST.

Both directions use one scheme: `X-Cowork-Timestamp: <unix seconds>` and
`X-Cowork-Signature: v1=<hex HMAC-SHA256 of "v1:{timestamp}:{raw body}">`,
inbound with the instance's inbound secret, outbound with its outbound secret.
Requests more than five minutes off are refused, so a captured request cannot
be replayed later; within the window a replay maps to the same message id and
is deduplicated by the hub. Every outbound request goes through the SSRF policy
(channels/_ssrf.py): the configured URL is re-checked and its host resolved and
pinned per send, and redirects are never followed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any, ClassVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic.alias_generators import to_camel

from schemas import (
    ChannelEventType,
    ChannelInteraction,
    ChannelOutbound,
    ChannelSender,
    ChannelTarget,
    DeliveryType,
)

from .. import _ssrf
from .._provider import (
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
from ._payload import body_invalid, command_fields, contract_errors, inbound
from ._platform_http import send_request

TIMESTAMP_HEADER = "X-Cowork-Timestamp"
SIGNATURE_HEADER = "X-Cowork-Signature"
MAX_SKEW_SECONDS = 300


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"v1:{timestamp}:".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


class WebhookSettings(ProviderSettings):
    delivery_url: str = Field(max_length=2048)
    allow_loopback_http: bool = False
    allow_private_networks: bool = False
    timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    @model_validator(mode="after")
    def _safe_delivery_url(self) -> WebhookSettings:
        try:
            _ssrf.check_url(self.delivery_url, self.policy)
        except _ssrf.UnsafeUrl as exc:
            raise ValueError(f"deliveryUrl: {exc}") from None
        return self

    @property
    def policy(self) -> _ssrf.UrlPolicy:
        return _ssrf.UrlPolicy(self.allow_loopback_http, self.allow_private_networks)


class WebhookSecrets(ProviderSettings):
    inbound_secret: SecretStr = Field(min_length=16, max_length=512)
    outbound_secret: SecretStr = Field(min_length=16, max_length=512)


class _Body(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class _Interaction(_Body):
    id: str = Field(min_length=1, max_length=256)
    token: str = Field(min_length=1, max_length=2048)


class _InboundBody(_Body):
    id: str = Field(min_length=1, max_length=256)
    chat_id: str = Field(min_length=1, max_length=256)
    user_id: str = Field(min_length=1, max_length=256)
    text: str = Field(default="", max_length=16_384)
    thread_id: str | None = Field(default=None, max_length=256)
    username: str | None = Field(default=None, max_length=256)
    is_direct: bool = False
    interaction: _Interaction | None = None


class WebhookProvider:
    kind: ClassVar[str] = "webhook"
    capabilities: ClassVar[Capabilities] = Capabilities(
        threads=True,
        edit=True,
        buttons=ButtonLimits(max_count=25, max_rows=5, max_token_bytes=256),
        file_upload=True,
        file_download=False,
        typing=True,
        reactions=True,
        max_text_length=4096,
        parse_modes=frozenset({"plain", "markdown", "html"}),
        max_file_bytes=1024 * 1024,
        interaction_ack="optional",
        rate_limit="retry_after",
        ephemeral=False,
        verification="X-Cowork-Signature v1= HMAC-SHA256 of v1:{timestamp}:{body}, 5 min skew",
    )
    settings_model: ClassVar[type[ProviderSettings]] = WebhookSettings
    secrets_model: ClassVar[type[ProviderSettings]] = WebhookSecrets
    # Replaced in tests to answer DNS for made-up names; None means the system resolver.
    resolve: ClassVar[_ssrf.Resolver | None] = None

    def __init__(self, config: InstanceConfig, http: httpx.AsyncClient) -> None:
        self.config = config
        self.settings: WebhookSettings = config.settings
        self.secrets: WebhookSecrets = config.secrets
        self.http = http

    # --- inbound ---------------------------------------------------------------------
    def handshake(self, request: WebhookRequest) -> WebhookResult | None:
        return None

    def verify(self, request: WebhookRequest) -> None:
        timestamp = request.headers.get(TIMESTAMP_HEADER, "")
        given = request.headers.get(SIGNATURE_HEADER, "")
        if not timestamp or not given:
            raise VerificationFailed(
                "webhook.signature_missing",
                f"{TIMESTAMP_HEADER} and {SIGNATURE_HEADER} are required",
            )
        try:
            sent_at = int(timestamp)
        except ValueError:
            raise VerificationFailed(
                "webhook.timestamp_invalid", f"{TIMESTAMP_HEADER} must be unix seconds"
            ) from None
        if abs(request.now - sent_at) > MAX_SKEW_SECONDS:
            raise VerificationFailed(
                "webhook.timestamp_skew", f"the timestamp is more than {MAX_SKEW_SECONDS} s off"
            )
        expected = signature(
            self.secrets.inbound_secret.get_secret_value(), timestamp, request.body
        )
        if not hmac.compare_digest(expected.encode(), given.encode()):
            raise VerificationFailed("webhook.signature_invalid", "the signature does not match")

    @contract_errors
    def parse(self, request: WebhookRequest) -> WebhookResult:
        try:
            body = _InboundBody.model_validate_json(request.body)
        except ValidationError as exc:
            raise body_invalid("webhook.body_invalid", exc) from None
        event_type = ChannelEventType.INTERACTION if body.interaction else ChannelEventType.MESSAGE
        interaction = (
            ChannelInteraction(id=body.interaction.id, token=body.interaction.token, kind="button")
            if body.interaction
            else None
        )
        message = inbound(
            self.config,
            request,
            event_type=event_type.value,
            provider_event_id=body.id,
            provider_message_id=body.id,
            **command_fields(body.text),
            target=ChannelTarget(
                chat_id=body.chat_id,
                is_direct=body.is_direct,
                thread_id=body.thread_id,
                user_id=body.user_id,
                message_id=body.id,
            ),
            sender=ChannelSender(provider_user_id=body.user_id, username=body.username),
            text=body.text,
            raw_text=body.text,
            interaction=interaction,
        )
        return WebhookResult(
            messages=[message], status=200, body=b'{"ok":true}', content_type="application/json"
        )

    # --- outbound --------------------------------------------------------------------
    def delivery_body(self, delivery: ChannelOutbound) -> dict[str, Any]:
        return {
            "deliveryId": delivery.delivery_id,
            "idempotencyKey": delivery.idempotency_key,
            "provider": self.config.instance_id,
            "type": delivery.type.value,
            "target": delivery.target.model_dump(mode="json", by_alias=True),
            "text": delivery.text,
            "parseMode": delivery.parse_mode,
            "buttons": (
                [
                    [b.model_dump(mode="json", by_alias=True) for b in row]
                    for row in delivery.buttons
                ]
                if delivery.buttons
                else None
            ),
            "editMessageId": delivery.edit_message_id,
            "replyToMessageId": delivery.reply_to_message_id,
            "interaction": (
                delivery.interaction.model_dump(mode="json", by_alias=True)
                if delivery.interaction
                else None
            ),
            "file": delivery.file.model_dump(mode="json", by_alias=True) if delivery.file else None,
            "reaction": delivery.reaction,  # type reaction: emoji for target.messageId
            "silent": delivery.silent,
        }

    async def send(self, delivery: ChannelOutbound) -> SendResult:
        self._check(delivery)
        raw = json.dumps(self.delivery_body(delivery), separators=(",", ":")).encode()
        body = await self._post("deliver", raw)
        message = body.get("messageId") if isinstance(body, dict) else None
        if message is not None and (
            isinstance(message, bool)
            or not isinstance(message, (str, int))
            or not 0 < len(str(message)) <= 256
        ):
            raise DeliveryFailed(
                "deliver: messageId must be a string of 1-256 characters",
                code="platform.bad_response",
                permanent=True,
            )
        if message is None and delivery.type == DeliveryType.EDIT:
            message = delivery.edit_message_id
        return SendResult(provider_message_id=str(message) if message is not None else None)

    def _check(self, delivery: ChannelOutbound) -> None:
        """What the declared capabilities promise a receiver, enforced before sending."""
        caps = self.capabilities
        problem = None
        if delivery.type == DeliveryType.EDIT and not delivery.edit_message_id:
            problem = "an edit needs the id of the message to edit"
        elif delivery.text and len(delivery.text) > caps.max_text_length:
            problem = f"the text is longer than {caps.max_text_length}"
        elif delivery.buttons and caps.buttons:
            flat = [b for row in delivery.buttons for b in row]
            if (
                len(flat) > caps.buttons.max_count
                or len(delivery.buttons) > caps.buttons.max_rows
                or any(len(b.token.encode()) > caps.buttons.max_token_bytes for b in flat)
            ):
                problem = "the buttons exceed the declared limits"
        elif delivery.type == DeliveryType.ANSWER_INTERACTION and not delivery.interaction:
            problem = "an answer needs the interaction it answers"
        elif delivery.type == DeliveryType.REACTION and not (
            delivery.reaction and delivery.target.message_id
        ):
            problem = "a reaction needs its emoji and the message id it reacts to"
        if problem:
            raise DeliveryFailed(f"webhook: {problem}", code="delivery.invalid", permanent=True)

    async def probe(self) -> str:
        raw = json.dumps({"type": "probe", "provider": self.config.instance_id}).encode()
        await self._post("probe", raw)
        host = httpx.URL(self.settings.delivery_url).host
        return f"receiver at {host} answered"

    async def _post(self, operation: str, raw: bytes) -> Any:
        try:
            target = await _ssrf.pin(
                self.settings.delivery_url, self.settings.policy, type(self).resolve
            )
        except _ssrf.UnsafeUrl as exc:
            raise DeliveryFailed(f"{operation}: {exc}", code=exc.code, permanent=True) from None
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            TIMESTAMP_HEADER: timestamp,
            SIGNATURE_HEADER: signature(
                self.secrets.outbound_secret.get_secret_value(), timestamp, raw
            ),
        }
        request = _ssrf.pinned_request(target, "POST", content=raw, headers=headers)
        request.extensions["timeout"] = httpx.Timeout(self.settings.timeout_seconds).as_dict()
        _, decoded = await send_request(
            self.http, request, operation=operation, redirect_code="ssrf.redirect"
        )
        # A receiver may answer 2xx with no body or plain text: the delivery was taken.
        return decoded if isinstance(decoded, dict) else {}
