"""The Gateway agent's connection to the hub: connecting, reconnecting, requests.

`GatewayConnection` is one part of `GatewayAgent` (edges/gateway/_agent.py): it
dials Cloud's NATS with the Gateway's credential (retrying while the hub is
away), tells a dead credential (revoked or rotated) from a passing failure,
connects again from scratch when nats-py gives up, and sends requests whose
replies come back as the expected model, a `Refused`, or a `TransientBusError`.

It relies on the agent for `gateway`, `creds`, `nats_urls`, `nc`, `connected`,
`_tasks`, `_stopped`, `_stopping`, `_auth_failures`, and for `_bus()` (the
whole session on one connection), `_announce()` and `_fail()` (declared on
`AgentParts`, edges/gateway/_parts.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, cast

import nats.errors
from nats.aio.client import Client as NATS

from schemas import (
    AckReply,
    ContractError,
    EnvelopeTemplate,
    ExecutionAuthority,
    Message,
    PrincipalKind,
    Source,
    decode,
    subjects,
)

from ..common import ask, dial, not_refused_as
from ._parts import AgentParts, M
from ._work import TransientBusError

log = logging.getLogger("cowork.edge.gateway")

REQUEST_TIMEOUT = 5.0
# Refusals worth retrying: the hub is busy or briefly broken, the lease still stands.
TRANSIENT_CODES = frozenset({"rate_limited", "hub.unavailable", "hub.error"})
# Refusals that end the registration: the agent stops for good.
TERMINAL_CODES = frozenset({"gateway.revoked", "gateway.retired"})
# How many authorization failures in a row mean the credential is dead (revoked/rotated).
AUTH_FAILURES_FATAL = 3


class Refused(Exception):
    """The hub answered a request with a refusal (AckReply ok=false)."""

    def __init__(self, code: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason, self.retry_after = code, reason, retry_after


class GatewayConnection(AgentParts):
    """Who this Gateway is on the bus, and its one connection there."""

    @property
    def tenant(self) -> str:
        return self.gateway.tenant

    @property
    def registration_id(self) -> str:
        return self.gateway.registration_id

    async def _connect(self) -> NATS | None:
        failures = 0
        while not self._stopped.is_set():
            try:
                return await dial(
                    self.nats_urls,
                    self.reconnect,
                    failures=failures,
                    name=f"cowork-gateway-{self.registration_id}",
                    inbox_prefix=subjects.inbox_prefix(
                        self.tenant, "gateway", self.registration_id
                    ),
                    error_cb=self._on_error,
                    closed_cb=self._on_closed,
                    reconnected_cb=self._on_reconnect,
                    **self.creds.connect_options(),
                )
            except Exception as exc:  # hub away at start: outputs wait in the outbox
                # (nats-py handed the failure to _on_error, which counts a refused
                # credential and gives up for good after a few in a row)
                if self.fatal is not None:
                    return None
                log.info("gateway.connect_retry: %s", exc)
                await asyncio.sleep(self.reconnect.wait_before(failures))
                failures += 1
        return None

    def _credential_refused(self, exc: BaseException | None, *, at_once: bool = False) -> bool:
        """Count authorization failures; after a few in a row the credential is dead."""
        text = str(exc or "").lower()
        if not any(word in text for word in ("authorization", "authentication", "revoked")):
            return False
        self._auth_failures += 1
        if at_once or self._auth_failures >= AUTH_FAILURES_FATAL:
            self._fail(
                "the hub's NATS refuses this Gateway's credential (revoked, expired, or "
                f"replaced by a rotation or by registering again: {str(exc).removeprefix('nats: ')}); run "
                "`cowork gateway register` with a current credential"
            )
            return True
        return False

    async def _on_closed(self) -> None:
        """nats-py closes for good when the server ends the session over its credential
        (revocation disconnects it); anything else: connect again from scratch."""
        if self._stopped.is_set() or self._stopping:
            return
        error = self.nc.last_error if self.nc is not None else None
        if self._credential_refused(error, at_once=True):
            return
        log.warning("gateway.connection_closed: %s; connecting again", error)
        self.connected.clear()
        self._spawn("gateway-bus", self._bus())

    async def _on_error(self, exc: Exception) -> None:
        log.info("gateway.nats_error: %s", exc)
        self._credential_refused(exc)

    async def _on_reconnect(self) -> None:
        self._auth_failures = 0
        self._spawn("gateway-announce", self._announce())

    def _spawn(self, name: str, coro: Any) -> None:
        old = self._tasks.get(name)
        if old is not None and not old.done():
            old.cancel()
        self._tasks[name] = asyncio.create_task(coro, name=name)

    async def request(
        self,
        subject: str,
        message: Message,
        reply_model: type[M],
        timeout: float = REQUEST_TIMEOUT,
        *,
        again: bool = False,
        repeat_codes: frozenset[str] = frozenset(),
    ) -> M:
        """One request to the hub. Raises Refused for a refusal, TransientBusError when
        there is no answer (or a refusal that is worth retrying). With `again` (a
        request the hub answers alike when repeated: claims under their claim id,
        renewals, outputs, heartbeats), a copy left unanswered for twice the hub's
        usual answer time (at least 0.5 s) is sent again, then every second within
        `timeout` in all, and the first answer to any copy counts (`edges.common.ask`):
        a hub replica that dies or freezes holding it costs about half a second, not
        the whole timeout. `repeat_codes`: refusals a copy gets for being one (a
        heartbeat's stale sequence, or one request too many for its rate): the other
        copy's answer is awaited."""
        nc = self.nc
        if nc is None or not nc.is_connected:
            raise TransientBusError("not connected to the hub")
        data = self._envelope(type(message)).encode(message)
        try:
            if again:
                final = not_refused_as(repeat_codes) if repeat_codes else None
                msg = await ask(nc, subject, data, timeout, self._answer_times, final)
            else:
                msg = await nc.request(subject, data, timeout=timeout)
        except TimeoutError as exc:  # (nats-py's timeout is one too)
            raise TransientBusError(type(exc).__name__) from None
        except nats.errors.Error as exc:  # no responders, disconnected, draining
            raise TransientBusError(type(exc).__name__) from None
        return decode_reply(msg.data, reply_model)

    def _envelope(self, message: type[Message]) -> EnvelopeTemplate:
        """The envelope of this Gateway's requests of one type (built once: the source
        and tenant never change for an agent)."""
        template = self._envelopes.get(message)
        if template is None:
            template = EnvelopeTemplate(message, source=self._source(), tenant=self.tenant)
            self._envelopes[message] = template
        return template

    def _source(self) -> Source:
        return Source(
            principal_kind=PrincipalKind.GATEWAY,
            principal_id=self.registration_id,
            authority=ExecutionAuthority.GATEWAY_STANDALONE,
        )


def decode_reply(raw: bytes, model: type[M]) -> M:
    """Decode a reply that is either `model` or an AckReply (a refusal, or ok)."""
    try:
        kind = json.loads(raw).get("type")
    except (ValueError, AttributeError):
        raise TransientBusError("the hub's reply is not JSON") from None
    try:
        if kind == AckReply.message_type:
            ack = decode(raw, AckReply).data
            if ack.ok and model is AckReply:
                return cast(M, ack)  # `model is AckReply` does not narrow M for mypy
            if ack.ok:
                raise TransientBusError(f"an ack where {model.message_type} was expected")
            code = ack.code or "refused"
            if code in TRANSIENT_CODES:
                raise TransientBusError(f"{code}: {ack.reason}", ack.retry_after_seconds)
            raise Refused(code, ack.reason or code, ack.retry_after_seconds)
        return decode(raw, model).data
    except ContractError as exc:
        raise TransientBusError(f"unreadable reply: {exc.reason}") from None
