"""The one interface of an outbound inbound transport: platform traffic fetched by
dialing out (long polling, a websocket) instead of received on a webhook.

A transport is, like a provider, pure platform knowledge: how to open the
connection, keep it alive, resume it from a cursor, and turn what arrives into
the same `WebhookResult`s the provider's webhook parser makes (most transports
hand the platform's payload to `provider.parse` unchanged). It never publishes
itself: it hands each batch to its `TransportSink`, which stores the messages
durably (the webhook ingress's publisher, with the same keyed dedupe ids, so a
message redelivered after a resume is stored once) and only then the cursor
that moves past them. The runtime (channels/runtime/_transports.py) runs it
under the instance's single-connection lease, reconnects it with the one
backoff, and reports its state in the instance's health.

Errors: a platform refusal or outage is raised as `DeliveryFailed` (as the
providers' API calls raise it): `retry_after` is honoured exactly, `permanent`
(bad token, intents not allowed) backs off to the cap. Returning normally means
"the connection ended; resume from the cursor" (a platform asked us to
reconnect).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, Protocol

import httpx
from multidict import CIMultiDict, CIMultiDictProxy
from pydantic import Field, model_validator

from ._provider import ProviderSettings, VerificationFailed, WebhookRequest, WebhookResult

TransportMode = Literal["webhook", "outbound"]
TransportHost = Literal["any", "edge"]


class TransportSettings(ProviderSettings):
    """The settings every provider with an outbound transport adds: `transport`
    chooses how inbound traffic arrives, `transportHost` who may hold the
    connection (`any`: a hub replica or a `cowork channel run` process, whichever
    takes the lease; `edge`: only `cowork channel run`, for a hub with no route to
    the platform)."""

    transport: TransportMode = "webhook"
    transport_host: TransportHost = "any"
    # How long one long poll waits for traffic (Telegram getUpdates `timeout`).
    poll_timeout_seconds: int = Field(default=25, ge=0, le=50)

    @model_validator(mode="after")
    def _host_needs_outbound(self) -> TransportSettings:
        if self.transport_host == "edge" and self.transport != "outbound":
            raise ValueError("transportHost 'edge' needs transport 'outbound'")
        return self


class TransportSink(Protocol):
    """Where a transport hands what arrived; one per connection attempt."""

    @property
    def cursor(self) -> str | None:
        """The durable cursor to resume from (None: start fresh)."""

    @property
    def body_limit(self) -> int:
        """The largest payload accepted, as the webhook's body cap."""

    async def accept(self, result: WebhookResult, cursor: str | None) -> None:
        """Store `result.messages` durably, in order, then `cursor` (None: unchanged).
        Raises when they could not be stored: the transport must not confirm the
        traffic to the platform then (it is fetched again after the reconnect)."""

    async def save_cursor(self, cursor: str | None) -> None:
        """Store a cursor that moved without messages (a session resumed, a batch
        of updates that were nothing for a workspace)."""

    def refused(self, reason: str) -> None:
        """A payload that was not accepted (too large, malformed): counted, skipped."""

    def report(self, detail: str, *, connected: bool = False) -> None:
        """The connection's state in words (health `transport.detail`); `connected`
        once the platform accepted the connection (a session ready, a poll answered)."""


class InboundTransport(Protocol):
    """One platform's outbound connection for one instance."""

    name: ClassVar[str]  # e.g. "telegram-polling": the cursor key and the health label

    def __init__(self, provider: Any, http: httpx.AsyncClient) -> None: ...

    async def run(self, sink: TransportSink) -> None:
        """Connect, resume from `sink.cursor`, hand traffic to the sink until the
        connection ends (return) or fails (raise DeliveryFailed). Cancelled to stop."""


def transport_request(body: bytes, content_type: str = "application/json") -> WebhookRequest:
    """A payload fetched over an outbound connection, shaped as the webhook request
    the provider's parser reads. Nothing to verify: the connection itself was
    authenticated (TLS to the platform, with the bot's credential)."""
    return WebhookRequest(
        method="POST",
        path="",
        query={},
        headers=CIMultiDictProxy(CIMultiDict({"Content-Type": content_type})),
        body=body,
        remote="outbound",
        received_at=datetime.now(UTC),
        now=time.time(),
    )


def webhook_secrets_missing(settings: Any, secrets: Any) -> list[str]:
    """The secrets a webhook instance needs that `secrets` lacks (their wire names):
    a provider's secrets model names them in WEBHOOK_SECRETS, optional only because
    an instance receiving over its outbound transport has no webhook to verify."""
    if getattr(settings, "transport", "webhook") != "webhook":
        return []
    model = type(secrets)
    return [
        (model.model_fields[name].alias or name)
        for name in getattr(model, "WEBHOOK_SECRETS", ())
        if getattr(secrets, name, None) is None
    ]


class OutboundOnly:
    """The webhook half of a provider whose traffic only arrives over its outbound
    transport (Matrix, Signal): no handshake, and every webhook refused."""

    kind: ClassVar[str]

    def handshake(self, request: WebhookRequest) -> WebhookResult | None:
        return None

    def verify(self, request: WebhookRequest) -> None:
        raise VerificationFailed(
            "signature.invalid", f"a {self.kind} instance receives no webhooks"
        )
