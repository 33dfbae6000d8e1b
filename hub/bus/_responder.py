"""The one bus request/reply pipeline every hub responder runs through.

A request arrives on a subject the server only lets its caller publish on, so
the subject names the caller (tenant, principal kind, principal id). For every
route the pipeline does the same, in this order:

1. parse the subject (`subject.invalid` otherwise);
2. answer only on the caller's own reply inbox (`_INBOX.<tenant>.<kind>.<id>.`):
   the hub may publish anywhere, so a reply subject naming another principal's
   subject is dropped and audited, never answered (a confused-deputy guard);
3. decode the envelope against the route's model and check that its tenant and
   source are the subject's (`contract.principal_mismatch`);
4. take one token from the route's rate limit for this caller (`rate_limited`);
5. run the handler; a `Refusal` is answered with its code (and passed to the
   route's `on_refusal`, e.g. to audit it), anything unexpected as the transient
   `hub.unavailable` so the caller retries rather than waits;
6. answer, then run what the handler asked to run after the answer (a step that
   revokes the caller's credential must come after the reply that reaches it).

Requests run concurrently, bounded (`max_in_flight`): nats-py runs one
subscription's callbacks one after another, so a slow database round trip would
otherwise queue every other caller behind it. Each message is counted once in
`cowork_hub_bus_messages_total{family, outcome}`, outcome one of
`accepted | refused | failed | dropped | copy`.

An edge sends a request again, on the same reply inbox, when its answer is slow
(`edges.common.ask`), so that another replica may answer it. A copy that reaches
the replica still working on the first is set aside (`copy`): it could only
repeat the work, and its answer could not be sent anyway (the server lets the
hub answer a reply inbox once per request it delivered, and refused each second
answer with a permissions violation: 799 warnings in ten minutes at 11,000 edges).

What repeats per caller is worked out once, not per request (a Gateway claims or
renews on the same subject all day): the parsed subject and the caller's inbox
prefix (kept per subject, a bounded cache), the counters' label children, and
each answer's envelope: everything but its id, time and data is spliced from an
`EnvelopeTemplate` per (message type, tenant), so an answer is one serialisation
of the reply, not an envelope model built and validated around it.

Bootstrap routes (`Route.bootstrap`) serve the public bootstrap identity: the
caller holds no credential yet, so there is no principal to check; the reply of a
success is sealed to the requester's `reply_key` and a refusal is a plain ack.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from schemas import (
    AckReply,
    ContractError,
    Envelope,
    EnvelopeTemplate,
    Message,
    SealedReply,
    SealError,
    Source,
    decode,
    seal,
    subjects,
)

from ..core import HubMetrics, RateLimiter, Refusal, ack_refusal, flushed, kv

log = logging.getLogger("cowork.hub.bus")

MAX_IN_FLIGHT = 64  # requests served at once; the pool bounds the real DB concurrency
UNAVAILABLE = "the hub could not handle the request; try again shortly"
# Subjects (callers) and answer templates kept per responder: a fleet's worth of
# callers; beyond it the least recently seen are worked out again.
CALLERS_CACHED = 65_536
TEMPLATES_CACHED = 4_096


@dataclass(frozen=True)
class Caller:
    """Who sent the request, as its subject names it (`where` is the parsed subject).
    For a bootstrap route `kind` is "bootstrap" and `id` the client's address."""

    tenant: str
    kind: str
    id: str
    where: dict[str, str]
    family: str  # the route's family name, e.g. "gateway.heartbeat"
    sent_at: datetime | None = None  # the envelope's time: when the caller sent it

    def sent(self, at: datetime) -> Caller:
        """This caller with the time its request was sent (`dataclasses.replace`
        inspects the fields on every call: a few microseconds a request)."""
        return Caller(self.tenant, self.kind, self.id, self.where, self.family, at)


@dataclass(frozen=True)
class Answer:
    """A reply plus work to do once it is sent (e.g. revoke the caller's credential)."""

    reply: Message
    after: Callable[[], Awaitable[None]] | None = None
    # Wait, before `after`, until the server has the answer (a PING round trip): for
    # a step that may cut the caller's route (revoke its credential). Without it the
    # answer still leaves before anything `after` publishes on this connection.
    flush: bool = True


Handler = Callable[[Caller, Any], Awaitable["Message | Answer"]]
OnRefusal = Callable[[Caller, Any, Refusal], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    """One hub-consumed request family: its subject, request model and handler."""

    family: subjects.SubjectFamily
    request: type[Message]
    handle: Handler
    kind: str | None = None  # the caller's principal kind, when the subject has none
    id_field: str = "principal_id"  # the subject field that names the caller
    rate: RateLimiter | None = None  # per caller
    on_refusal: OnRefusal | None = None  # e.g. audit (it decides about rate limits)
    bootstrap: bool = False
    expects_reply: bool = True  # False: a notice (presence); nothing is answered
    unavailable: str = UNAVAILABLE  # what people read when the hub fails the request
    # Run once every answer of this route has left, refused or not (e.g. push the key
    # revocations a registration made: the push would cut the reply's route).
    after_answer: Callable[[], Awaitable[None]] | None = None
    # A route whose handler mostly waits (for a batched write) gets its own bound on
    # requests in flight, so that its waiting never holds the slots other routes need.
    max_in_flight: int | None = None

    @property
    def name(self) -> str:
        return self.family.name


@dataclass
class _Outcome:
    reply: Message
    tenant: str | None = None
    after: Callable[[], Awaitable[None]] | None = None
    label: str = "accepted"
    flush: bool = True


@dataclass
class BusResponder:
    """Serves routes on queue-group subscriptions (any one replica answers each)."""

    nc: NATS
    metrics: HubMetrics
    source: Source
    audit_drop: Callable[[Caller, str, str], Awaitable[None]] | None = None
    max_in_flight: int = MAX_IN_FLIGHT
    _slots: asyncio.Semaphore = field(init=False)
    # At most one drop audit per second and caller (burst 5): a prober cannot flood it.
    _drop_audits: RateLimiter = field(init=False, default_factory=lambda: RateLimiter(1.0, 5))
    routes: dict[str, Route] = field(init=False, default_factory=dict)
    _in_flight: set[asyncio.Task] = field(init=False, default_factory=set)
    _answering: set[str] = field(init=False, default_factory=set)  # reply inboxes in flight
    # (route name, subject) -> (Caller, its own inbox prefix), or the SubjectError.
    _callers: Any = field(init=False)
    _templates: Any = field(init=False)
    _counters: dict[tuple[str, str], Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._callers = functools.lru_cache(CALLERS_CACHED)(self._parse_caller)
        self._templates = functools.lru_cache(TEMPLATES_CACHED)(self._template)

    async def serve(self, routes: Iterable[Route], *, queue: str) -> None:
        """Subscribe each route; a family is served by exactly one route."""
        for route in routes:
            if route.name in self.routes:
                raise ValueError(f"{route.name} already has a route")
            self.routes[route.name] = route
            await self.nc.subscribe(route.family.filter(), queue=queue, cb=self._dispatcher(route))

    async def stop(self) -> None:
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)

    def _dispatcher(self, route: Route) -> Callable[[Msg], Awaitable[None]]:
        slots = (
            self._slots if route.max_in_flight is None else asyncio.Semaphore(route.max_in_flight)
        )

        def done(task: asyncio.Task) -> None:
            self._in_flight.discard(task)
            slots.release()

        async def dispatch(msg: Msg) -> None:
            await slots.acquire()  # back-pressure: stop reading when saturated
            task = asyncio.create_task(self.handle(route, msg))
            self._in_flight.add(task)
            task.add_done_callback(done)

        return dispatch

    async def handle(self, route: Route, msg: Msg) -> None:
        """Run one request through the pipeline and answer it."""
        if route.bootstrap:
            try:
                caller, inbox = self._caller(route, msg), None
            except subjects.SubjectError as exc:
                caller, inbox = exc, None  # type: ignore[assignment]
        else:
            caller, inbox = self._callers(route.name, msg.subject)
        if isinstance(caller, subjects.SubjectError):
            await self._answer(
                route, msg, _Outcome(_refused("subject.invalid", str(caller)), label="refused")
            )
            return
        if route.expects_reply and inbox is not None and not _own_inbox(inbox, msg):
            await self._drop(route, caller, msg)
            return
        reply = msg.reply
        if reply:
            if reply in self._answering:  # a copy of a request this replica is on
                self._count(route.name, "copy")
                return
            self._answering.add(reply)
        try:
            outcome = await self._run(route, caller, msg)
            await self._answer(route, msg, outcome)
        finally:
            self._answering.discard(reply)
        for after in (outcome.after, route.after_answer):
            if after is None:
                continue
            try:
                await after()
            except Exception as exc:
                log.warning("bus.after_answer_failed", **kv(family=route.name, error=str(exc)))

    def _caller(self, route: Route, msg: Msg) -> Caller:
        where = route.family.parse(msg.subject)
        if route.bootstrap:
            return Caller("", "bootstrap", request_source(msg), where, route.name)
        kind = route.kind or where["principal_kind"]
        return Caller(where["tenant"], kind, where[route.id_field], where, route.name)

    def _parse_caller(
        self, name: str, subject: str
    ) -> tuple[Caller | subjects.SubjectError, str | None]:
        """The caller a (non-bootstrap) route's subject names and the prefix its reply
        inbox must have; a subject that is not the route's gives its SubjectError."""
        route = self.routes[name]
        try:
            where = route.family.parse(subject)
            kind = route.kind or where["principal_kind"]
            caller = Caller(where["tenant"], kind, where[route.id_field], where, route.name)
            inbox = subjects.inbox_prefix(caller.tenant, caller.kind, caller.id) + "."
        except subjects.SubjectError as exc:
            return exc, None
        return caller, inbox

    def _template(self, message: type[Message], tenant: str | None) -> EnvelopeTemplate:
        return EnvelopeTemplate(message, source=self.source, tenant=tenant)

    def _count(self, family: str, outcome: str) -> None:
        counter = self._counters.get((family, outcome))
        if counter is None:
            counter = self._counters[family, outcome] = self.metrics.bus_messages.labels(
                family, outcome
            )
        counter.inc()

    async def _drop(self, route: Route, caller: Caller, msg: Msg) -> None:
        self._count(route.name, "dropped")
        log.warning(
            "bus.reply_subject_refused",
            **kv(
                family=route.name, tenant=caller.tenant, principal=caller.id, reply=msg.reply[:200]
            ),
        )
        wait = self._drop_audits.take((caller.tenant, caller.kind, caller.id))
        if self.audit_drop is not None and not wait:
            try:
                await self.audit_drop(caller, route.name, msg.reply[:200])
            except Exception as exc:
                log.warning("bus.audit_failed", **kv(family=route.name, error=str(exc)))

    async def _run(self, route: Route, caller: Caller, msg: Msg) -> _Outcome:
        request: Any = None
        try:
            env = self._decode(route, caller, msg)
            request, caller = env.data, caller.sent(env.time)
            self._take(route, caller)
            result = await route.handle(caller, request)
        except Refusal as exc:
            if route.on_refusal is not None:
                await self._report(route, caller, request, exc)
            return _Outcome(exc.ack(), label="refused")
        except (ContractError, SealError) as exc:
            return _Outcome(ack_refusal(exc), label="refused")
        except Exception as exc:  # the database away, say: answer, the caller retries
            log.warning(
                "bus.request_failed", **kv(family=route.name, tenant=caller.tenant, error=str(exc))
            )
            return _Outcome(
                _refused("hub.unavailable", route.unavailable, retry_after=1.0), label="failed"
            )
        answer = result if isinstance(result, Answer) else Answer(result)
        if not route.bootstrap:
            return _Outcome(answer.reply, caller.tenant, answer.after, flush=answer.flush)
        try:  # only the requester can open it: the bootstrap identity is shared
            body = Envelope.wrap(
                answer.reply, source=self.source, tenant=getattr(answer.reply, "tenant", None)
            ).encode()
            return _Outcome(SealedReply(sealed=seal(body, request.reply_key)), None, answer.after)
        except SealError as exc:
            return _Outcome(ack_refusal(exc), label="refused")

    def _decode(self, route: Route, caller: Caller, msg: Msg) -> Envelope:
        env = decode(msg.data, route.request)
        if not route.bootstrap and (
            env.tenant not in (None, caller.tenant)
            or (str(env.source.principal_kind), env.source.principal_id) != (caller.kind, caller.id)
        ):
            raise Refusal(
                "contract.principal_mismatch",
                "the envelope's tenant or source differs from the subject",
            )
        return env

    @staticmethod
    def _take(route: Route, caller: Caller) -> None:
        if route.rate is None:
            return
        wait = route.rate.take((caller.tenant, caller.kind, caller.id, route.name))
        if wait:
            raise Refusal(
                "rate_limited",
                f"more than {route.rate.rate:g} {route.name} requests per second",
                status=429,
                retry_after=wait,
            )

    async def _report(self, route: Route, caller: Caller, request: Any, exc: Refusal) -> None:
        assert route.on_refusal is not None
        try:
            await route.on_refusal(caller, request, exc)
        except Exception as err:
            log.warning("bus.audit_failed", **kv(family=route.name, error=str(err)))

    async def _answer(self, route: Route, msg: Msg, outcome: _Outcome) -> None:
        self._count(route.name, outcome.label)
        if not msg.reply or not route.expects_reply:
            return
        try:
            template = self._templates(type(outcome.reply), outcome.tenant)
            await msg.respond(template.encode(outcome.reply))
            if (outcome.after is not None and outcome.flush) or route.after_answer is not None:
                # The server has the answer before what follows (e.g. a revocation
                # pushed on another connection); flush()'s PONG alone does not prove it.
                await flushed(self.nc, timeout=5)
        except Exception as exc:  # the caller asks again; state is in PostgreSQL
            log.warning("bus.reply_failed", **kv(family=route.name, error=str(exc)))


def _own_inbox(prefix: str, msg: Msg) -> bool:
    """Whether the reply subject is under the caller's own inbox `prefix` (with its
    dot); no reply subject: nothing will be published, nothing to misdirect."""
    return not msg.reply or msg.reply.startswith(prefix)


def request_source(msg: Msg) -> str:
    """The client's address from the server's shared client info, else 'unknown'."""
    info = (msg.headers or {}).get("Nats-Request-Info")
    if not info:
        return "unknown"
    try:
        return str(json.loads(info).get("host") or "unknown")[:128]
    except (ValueError, AttributeError):
        return "unknown"


def _refused(code: str, reason: str, *, retry_after: float | None = None) -> AckReply:
    return AckReply(ok=False, code=code, reason=reason[:16_000], retry_after_seconds=retry_after)
