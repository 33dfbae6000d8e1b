"""The one interface every channel provider implements, and what it declares.

A provider is pure platform knowledge: how a platform signs and shapes its
inbound requests, and how to call its API to send, edit, answer and type. It
does no bus or database I/O; the runtime (channels/runtime/_runtime.py) verifies,
publishes, queues and retries around it, so every provider gets the same
limits, dedupe, ordering and dead-lettering, and one conformance suite
(tests/channels/test_channel_conformance.py) checks all of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from schemas import ChannelInbound, ChannelOutbound

if TYPE_CHECKING:
    from ._ssrf import UrlPolicy

InteractionAck = Literal["none", "optional", "required"]
RateLimitStrategy = Literal["none", "retry_after", "fixed_backoff"]
ParseMode = Literal["plain", "markdown", "html"]


@dataclass(frozen=True)
class ButtonLimits:
    max_count: int
    max_rows: int
    max_token_bytes: int


@dataclass(frozen=True)
class Capabilities:
    """What a platform can do; the conformance suite checks each claim."""

    threads: bool
    edit: bool
    buttons: ButtonLimits | None
    file_upload: bool
    file_download: bool
    typing: bool
    reactions: bool
    max_text_length: int
    parse_modes: frozenset[str]
    max_file_bytes: int
    interaction_ack: InteractionAck
    rate_limit: RateLimitStrategy
    ephemeral: bool
    # How traffic arrives: webhooks (an outbound transport may be chosen per instance),
    # a local stdin, or only an outbound transport (Matrix: no webhook for bots).
    inbound: Literal["webhook", "stdin", "outbound"] = "webhook"
    verification: str = ""  # one line: how inbound requests are authenticated


class ProviderSettings(BaseModel):
    """Base of each provider's settings and secrets models: camelCase, strict."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# A signed request older or newer than this is refused (replays of captured requests).
MAX_SKEW_SECONDS = 300


def check_timestamp(
    now: float, timestamp: str, platform: str, code: str = "signature.stale"
) -> int:
    """The signed request timestamp (Unix seconds) as an int, or VerificationFailed
    when it is missing, malformed or more than MAX_SKEW_SECONDS off `now`."""
    if not timestamp.isdigit() or len(timestamp) > 12:
        raise VerificationFailed(
            "signature.invalid", f"the {platform} request timestamp is missing"
        )
    if abs(now - int(timestamp)) > MAX_SKEW_SECONDS:
        raise VerificationFailed(
            code,
            f"the {platform} request timestamp is more than {MAX_SKEW_SECONDS // 60} minutes off",
        )
    return int(timestamp)


class ApiBaseSettings(ProviderSettings):
    """Settings of a provider that calls its platform's API (with the bot's secret, in
    a header or the URL path) at `api_base`: the same SSRF rules as the generic
    webhook's delivery URL (channels/_ssrf.py), https only unless `allow_loopback_http`
    (local fakes and tests). Changing any of these fields requires re-entering the
    instance's secrets (`destination_changed`). A host name is checked here for its
    scheme and name only; its addresses are resolved, checked and pinned on every
    call (`api_policy`, channels/providers/_platform_http.py)."""

    # The platform's real API (a subclass sets it): an `api_base` equal to it is
    # the platform, not an operator-chosen destination.
    DEFAULT_API_BASE: ClassVar[str | None] = None
    api_base: str | None = Field(default=None, max_length=512)  # None: the real API
    allow_loopback_http: bool = False
    allow_private_networks: bool = False

    @model_validator(mode="after")
    def _safe_api_base(self) -> ApiBaseSettings:
        from . import _ssrf

        if self.api_base:  # None or "": the real API
            try:
                _ssrf.check_url(
                    self.api_base,
                    _ssrf.UrlPolicy(self.allow_loopback_http, self.allow_private_networks),
                )
            except _ssrf.UnsafeUrl as exc:
                raise ValueError(f"apiBase: {exc}") from None
        return self

    @property
    def api_policy(self) -> UrlPolicy | None:
        """The SSRF policy every API call must pass when the operator chose where the
        calls go (`api_base` set and not the platform's real API): resolved, checked
        and pinned per call. None for the real API, which is called as it is."""
        from . import _ssrf

        base = (self.api_base or "").rstrip("/")
        if not base or base == (self.DEFAULT_API_BASE or "").rstrip("/"):
            return None
        return _ssrf.UrlPolicy(self.allow_loopback_http, self.allow_private_networks)


# Where an instance's secrets go: changing one of these without re-entering the
# secrets would send them to an address of the changer's choosing.
DESTINATION_FIELDS = ("api_base", "allow_loopback_http", "allow_private_networks")


def destination_changed(before: BaseModel, after: BaseModel) -> bool:
    """True when `after` would send the instance's secrets somewhere `before` would not."""
    return any(getattr(before, f, None) != getattr(after, f, None) for f in DESTINATION_FIELDS)


@dataclass(frozen=True)
class InstanceConfig:
    """Everything an instance needs, handed in by whoever hosts the runtime.
    `settings` and `secrets` are already validated against the provider's
    models; secrets are plaintext only in memory."""

    tenant: str
    instance_id: str
    kind: str
    workspace_id: str
    settings: Any  # the provider's settings model instance
    secrets: Any  # the provider's secrets model instance
    default_agent: str | None = None
    revision: int = 1


@dataclass
class WebhookRequest:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # case-insensitive (aiohttp CIMultiDictProxy)
    body: bytes
    remote: str
    received_at: datetime
    now: float  # unix time, for timestamp-skew checks (injectable in tests)


@dataclass
class WebhookResult:
    """What a verified request became: messages to publish (durably, before the
    platform gets its answer) and the answer itself."""

    messages: list[ChannelInbound] = field(default_factory=list)
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"


class ChannelError(Exception):
    """Base: carries a stable code and an HTTP status for the webhook answer."""

    status = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class VerificationFailed(ChannelError):
    """Signature, secret or timestamp check failed (counts toward the lockout)."""

    status = 401


class BadRequest(ChannelError):
    """Verified, but not something the platform sends (malformed, unsupported)."""

    status = 400


class DeliveryFailed(Exception):
    """A send failed. `retry_after` when the platform said how long to wait;
    `permanent` when retrying cannot help (4xx other than 429, bad chat, ...)."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "delivery.failed",
        retry_after: float | None = None,
        permanent: bool = False,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.retry_after, self.permanent, self.status = (
            code,
            retry_after,
            permanent,
            status,
        )


@dataclass
class SendResult:
    provider_message_id: str | None = None


class Provider(Protocol):
    """One platform. Instances are built per channel instance by the runtime."""

    kind: ClassVar[str]
    capabilities: ClassVar[Capabilities]
    settings_model: ClassVar[type[ProviderSettings]]
    secrets_model: ClassVar[type[ProviderSettings]]

    def __init__(self, config: InstanceConfig, http: httpx.AsyncClient) -> None: ...

    def handshake(self, request: WebhookRequest) -> WebhookResult | None:
        """Answer an unauthenticated GET verification handshake (WhatsApp's
        subscribe check), or None when the request is not one."""

    def verify(self, request: WebhookRequest) -> None:
        """Raise VerificationFailed unless the request is authentic. Constant-time."""

    def parse(self, request: WebhookRequest) -> WebhookResult:
        """A verified request as normalised messages plus the platform's answer
        (Slack url_verification challenge, Discord PONG/deferred response).
        Raise BadRequest for anything else; never any other exception."""

    async def send(self, delivery: ChannelOutbound) -> SendResult:
        """Make one delivery whose text fits `max_text_length` (the runtime
        chunks). Raise DeliveryFailed on failure."""

    async def probe(self) -> str:
        """A cheap authenticated call (getMe, auth.test, ...) for health; returns a
        one-line detail, raises DeliveryFailed when the platform refuses."""


def message_id(tenant: str, instance_id: str, event_type: str, provider_event_id: str) -> str:
    """The inbound message id (and JetStream Nats-Msg-Id) for one provider event:
    a platform's retry of the same event maps to the same id."""
    raw = "\x1f".join((tenant, instance_id, event_type, provider_event_id)).encode()
    return "in-" + hashlib.sha256(raw).hexdigest()[:40]
