"""Webhook ingress: limits -> body cap -> verify -> parse -> durable publish -> answer.

Every message a request carries is in JetStream (acknowledged by the stream)
before the platform gets its 2xx; when the publish fails the platform gets a
503 and retries, so an accepted chat message is never lost. `Nats-Msg-Id` is
the message id derived from the platform's event id, keyed with a secret only the
hub holds (`dedupe_id`), so JetStream drops the platform's retries within its
duplicate window (the hub dedupes durably after), and a `duplicate` publish ack
can only mean this instance already stored this event: JetStream's window is per
stream, and no other tenant's edge can compute a keyed id to pre-empt it.

This is the hot path: nothing here logs at info per request, and what can be
computed once per instance is (subject, the envelope's fixed part, the publisher
with its reply subscription: `_Route`). Measured in docs/performance.md
("Webhook ingress").
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from schemas import ChannelInbound, EnvelopeTemplate, Message, Source

from .._provider import ChannelError, VerificationFailed, WebhookRequest, WebhookResult
from ._jetstream import JetStreamPublisher
from ._limits import Lockout, TokenBuckets, retry_after_header

if TYPE_CHECKING:
    from ._runtime import Instance, RuntimeOptions

log = logging.getLogger("cowork.channels")

SourceResolver = Callable[[web.Request], str]


def kv(**fields: Any) -> dict[str, Any]:
    """`log.warning("x", **kv(a=1))`: structured fields, as the hub's logging expects."""
    return {"extra": {"fields": fields}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


_TEMPLATES: dict[tuple, EnvelopeTemplate] = {}
_TEMPLATES_MAX = 1024  # senders x message types; cleared when exceeded (rebuilt on use)


def envelope_bytes(msg: Message, source: Source, tenant: str, workspace: str) -> bytes:
    """`Envelope.wrap(msg, source=..., tenant=..., workspace=...).encode()`, the same
    bytes, from a template kept per (message type, sender): see EnvelopeTemplate."""
    key = (
        type(msg),
        tenant,
        workspace,
        source.principal_kind,
        source.principal_id,
        source.authority,
    )
    template = _TEMPLATES.get(key)
    if template is None:
        if len(_TEMPLATES) >= _TEMPLATES_MAX:
            _TEMPLATES.clear()
        template = _TEMPLATES[key] = EnvelopeTemplate(
            type(msg), source=source, tenant=tenant, workspace=workspace
        )
    return template.encode(msg)


class _Route:
    """What ingress keeps for one running instance on one connection: the
    envelope template of its inbound messages and its JetStream publisher."""

    def __init__(
        self, instance: Instance, timeout: float, on_closed: Callable[[JetStreamPublisher], None]
    ) -> None:
        config = instance.config
        self.instance, self.nc = instance, instance.nc
        self.template = EnvelopeTemplate(
            ChannelInbound,
            source=instance.source,
            tenant=config.tenant,
            workspace=config.workspace_id,
        )
        self.publisher = JetStreamPublisher(instance.nc, timeout=timeout, on_closed=on_closed)

    def encode(self, msg: Message) -> bytes:
        if type(msg) is ChannelInbound:
            return self.template.encode(msg)
        config = self.instance.config
        return envelope_bytes(msg, self.instance.source, config.tenant, config.workspace_id)


class BodyTooLarge(Exception):
    pass


async def read_capped(request: web.Request, limit: int) -> bytes:
    """The body, refusing (without buffering further) once it passes `limit`."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge
    parts: list[bytes] = []
    total = 0
    while total != length:  # a declared length, once read, needs no read of the end
        chunk = await request.content.readany()
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def dedupe_id(key: bytes, message_id: str) -> str:
    """The Nats-Msg-Id of an inbound message: unforgeable without `key`."""
    return "in-" + hmac.new(key, message_id.encode(), hashlib.sha256).hexdigest()[:40]


class Ingress:
    """Answers `GET|POST /webhooks/{instance_id}` for every instance of a runtime."""

    def __init__(
        self,
        lookup: Callable[[str], Instance | None],
        options: RuntimeOptions,
        source_of: SourceResolver | None = None,
    ) -> None:
        self._lookup = lookup
        self._options = options
        self._source_of = source_of
        self._rate = TokenBuckets(options.source_rate, options.source_burst)
        self._lockout = Lockout(options.lockout_failures, options.lockout_window_seconds)
        self._routes: dict[str, _Route] = {}

    async def handle(self, request: web.Request) -> web.Response:
        instance_id = request.match_info.get("instance_id", "")
        instance = self._lookup(instance_id)
        if instance is None:
            return error_response(
                404,
                "channel.unknown_instance",
                "no channel instance accepts webhooks at this address",
            )
        response = await self._handle(request, instance)
        if response.status < 300:
            instance.inbound_accepted += 1
        else:
            instance.inbound_rejected += 1
        return response

    async def _handle(self, request: web.Request, instance: Instance) -> web.Response:
        source = self._source_of(request) if self._source_of else (request.remote or "unknown")
        key = (instance.instance_id, source)
        now = time.monotonic()
        locked = self._lockout.retry_after(key, now)
        if locked:
            return error_response(
                429,
                "channel.locked_out",
                "too many failed authentications from this source; try again later",
                {"Retry-After": retry_after_header(locked)},
            )
        wait = self._rate.take(key, now)
        if wait:
            return error_response(
                429,
                "channel.rate_limited",
                "too many requests from this source",
                {"Retry-After": retry_after_header(wait)},
            )
        method = request.method
        if method not in ("GET", "POST"):
            return error_response(405, "channel.method_not_allowed", "use GET or POST")
        if instance.js is None:  # configured, but not (yet) connected to the bus
            return error_response(
                503,
                "channel.unavailable",
                "the channel instance is not connected; retry later",
                {"Retry-After": "5"},
            )
        try:
            body = await read_capped(request, self._options.body_limit_bytes)
        except BodyTooLarge:
            return error_response(
                413,
                "channel.body_too_large",
                f"request body exceeds {self._options.body_limit_bytes} bytes",
            )
        webhook = WebhookRequest(
            method=method,
            path=request.path,
            query=request.query,
            headers=request.headers,
            body=body,
            remote=source,
            received_at=datetime.now(UTC),
            now=time.time(),
        )
        provider = instance.provider
        try:
            if method == "GET":
                result = provider.handshake(webhook)
                if result is None:
                    return error_response(
                        405,
                        "channel.method_not_allowed",
                        "this endpoint accepts the platform's POSTs only",
                    )
            else:
                provider.verify(webhook)
                result = provider.parse(webhook)
        except VerificationFailed as exc:
            if self._lockout.fail(key):
                log.warning(
                    "channel.webhook.locked_out",
                    **kv(
                        instance=instance.instance_id,
                        source=source,
                        failures=self._options.lockout_failures,
                    ),
                )
            return error_response(exc.status, exc.code, exc.message)
        except ChannelError as exc:
            return error_response(exc.status, exc.code, exc.message)
        except Exception as exc:  # a provider bug must not become a traceback to the platform
            log.error(
                "channel.webhook.provider_error",
                exc_info=True,
                **kv(instance=instance.instance_id, error=type(exc).__name__),
            )
            return error_response(500, "channel.internal", "the request could not be processed")
        if result.messages:
            failed = await self._publish(instance, result)
            if failed:
                return failed
        return web.Response(
            status=result.status, body=result.body, headers={"Content-Type": result.content_type}
        )

    async def _route(self, instance: Instance) -> _Route:
        """A new route for this instance: it is new, was replaced or reconnected
        (a new connection needs its own reply subscription)."""
        route = self._routes.get(instance.instance_id)
        fresh = self._routes[instance.instance_id] = _Route(
            instance, self._options.publish_timeout_seconds, self._forget
        )
        if route is not None:
            await route.publisher.close()
        return fresh

    def _forget(self, publisher: JetStreamPublisher) -> None:
        """The publisher found its connection closed: drop its route (removed or
        reconnected instances must not pin their routes)."""
        for instance_id, route in list(self._routes.items()):
            if route.publisher is publisher:
                del self._routes[instance_id]

    async def publish(self, instance: Instance, messages: list[ChannelInbound]) -> None:
        """Store `messages` in JetStream (acknowledged by the stream), each with its
        keyed dedupe id; raises when they could not be. Outbound transports hand
        their traffic here too, so both ways in dedupe alike."""
        route = self._routes.get(instance.instance_id)
        if (
            route is None
            or route.instance is not instance
            or route.nc is not instance.nc
            or route.publisher.closed
        ):
            route = await self._route(instance)
        publisher, subject = route.publisher, instance.inbound_subject
        key = self._options.msg_id_key
        if len(messages) == 1:
            msg = messages[0]
            await publisher.publish(subject, route.encode(msg), dedupe_id(key, msg.id))
        else:
            await asyncio.gather(
                *(
                    publisher.publish(subject, route.encode(msg), dedupe_id(key, msg.id))
                    for msg in messages
                )
            )

    async def _publish(self, instance: Instance, result: WebhookResult) -> web.Response | None:
        try:
            await self.publish(instance, result.messages)
        except Exception as exc:  # no stream, no connection, timeout: the platform retries
            log.warning(
                "channel.webhook.publish_failed",
                **kv(
                    instance=instance.instance_id,
                    error=type(exc).__name__,
                    reason=getattr(exc, "reason", None),
                    messages=len(result.messages),
                ),
            )
            return error_response(
                503,
                "channel.publish_failed",
                "the message could not be stored; retry later",
                {"Retry-After": "1"},
            )
        return None
