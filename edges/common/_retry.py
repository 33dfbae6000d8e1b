"""Requests the hub answers in milliseconds, to a queue group of hub replicas.

A request that reached a hub replica which then died, or froze (SIGSTOP, a VM
paused, a GC stall), is never answered, and nothing tells the edge: NATS keeps
handing a frozen member its share of the queue group until the server drops its
connection, and a single long timeout makes every such request wait it out in
full (the failure Happy's relay postmortem lists first).

`attempt_timeouts` is the schedule: short first attempts that grow, so a live
replica is found quickly while a hub that is merely slow still gets the full
timeout on later attempts. `ask` sends a request again when it is not answered
in twice the hub's usual answer time (`AnswerTimes`, at least 0.5 s), then every
second, every copy to the same reply inbox, so an answer to any copy counts: a
slow replica's late answer is not thrown away (each copy has the whole timeout to
be answered), a copy NATS gave a dead or frozen replica costs about half a
second, not the timeout, and a hub slowed by load is not sent copies it would only
have to answer again. Only for requests that are safe to repeat (the
hub takes a repeat as a no-op, or answers it as it answered the first).

Every `ask` on one connection shares one reply subscription (`ReplyInbox`: a
wildcard under one inbox, each request its own token under it), as nats-py's own
`request` does: a request costs one publish, not a subscribe and an unsubscribe
the server must apply (and check against the credential's permissions) each time."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import weakref
from collections.abc import Callable, Iterator

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from schemas import AckReply, ContractError, decode

FIRST_ATTEMPT_SECONDS = 1.0
# `ask` sends the same request again after twice the usual answer time, at least
# HEDGE_SECONDS and at most HEDGE_MAX_SECONDS, then every HEDGE_MAX_SECONDS.
HEDGE_SECONDS = 0.5
HEDGE_MAX_SECONDS = 1.0
_EVERY_SECONDS = 1.0
_NO_RESPONDERS = "503"


def jittered_backoff(failures: int, first: float, longest: float) -> float:
    """How long to wait after `failures` failures in a row (1 for the first): full
    jitter under a ceiling that doubles from `first` up to `longest`, never under
    half of `first`. Random, so that many clients that failed together (a server
    restart under thousands of edges) do not come back together."""
    ceiling = min(longest, first * 2 ** min(max(failures, 1) - 1, 30))
    return random.uniform(first / 2, max(ceiling, first / 2))


def attempt_timeouts(longest: float, first: float = FIRST_ATTEMPT_SECONDS) -> Iterator[float]:
    """first, 2*first, 4*first, ... capped at `longest`, without end."""
    timeout = min(first, longest)
    while True:
        yield timeout
        timeout = min(timeout * 2, longest)


class AnswerTimes:
    """How long the hub usually takes to answer: a moving average of the answers to
    a request's first copy (one per edge agent, shared by its requests)."""

    def __init__(self) -> None:
        self.mean: float | None = None

    def first_wait(self) -> float:
        """How long `ask` waits before it sends a copy."""
        usual = 2 * self.mean if self.mean is not None else HEDGE_SECONDS
        return min(HEDGE_MAX_SECONDS, max(HEDGE_SECONDS, usual))

    def observe(self, seconds: float) -> None:
        self.mean = seconds if self.mean is None else 0.8 * self.mean + 0.2 * seconds


class ReplyInbox:
    """The one reply subscription of a connection: `<inbox>.*`. Each `ask` waits on
    its own token's queue (every copy of a request is answered there); a route
    (`route`) hands every answer under `<inbox>.<key>_` to one callback, as the
    Desktop relay's stored acks are numbered under one key a batch."""

    def __init__(self, nc: NATS) -> None:
        self.prefix = nc.new_inbox() + "."
        self._waiting: dict[str, Callable[[Msg], object]] = {}
        self._tokens = itertools.count()
        self._subscribed: asyncio.Task[object] | None = None
        self._nc = weakref.ref(nc)

    async def ready(self) -> None:
        """Subscribed (once per connection; nats-py subscribes again on reconnect)."""
        if self._subscribed is None:
            nc = self._nc()
            assert nc is not None
            self._subscribed = asyncio.ensure_future(
                nc.subscribe(self.prefix + "*", cb=self._on_reply)
            )
        try:
            await asyncio.shield(self._subscribed)
        except BaseException:
            if self._subscribed.done() and (
                self._subscribed.cancelled() or self._subscribed.exception() is not None
            ):
                self._subscribed = None  # try again next time
            raise

    def open(self) -> tuple[str, asyncio.Queue[Msg]]:
        """A reply subject of its own, and the queue its answers arrive on."""
        queue: asyncio.Queue[Msg] = asyncio.Queue()
        return self.route(queue.put_nowait)[:-1], queue

    def route(self, on_answer: Callable[[Msg], object]) -> str:
        """A reply-subject prefix (`<inbox>.<key>_`): every answer to a subject that
        starts with it goes to `on_answer`, called in the subscription's callback."""
        token = str(next(self._tokens))
        self._waiting[token] = on_answer
        return f"{self.prefix}{token}_"

    def close(self, subject: str) -> None:
        """No more answers to `subject` (from `open`, or a `route` prefix)."""
        self._waiting.pop(subject[len(self.prefix) :].partition("_")[0], None)

    async def _on_reply(self, msg: Msg) -> None:
        on_answer = self._waiting.get(msg.subject[len(self.prefix) :].partition("_")[0])
        if on_answer is not None:  # (an answer after its request gave up is dropped)
            on_answer(msg)


_REPLIES: weakref.WeakKeyDictionary[NATS, ReplyInbox] = weakref.WeakKeyDictionary()


async def reply_inbox(nc: NATS) -> ReplyInbox:
    """The connection's one reply inbox, subscribed."""
    replies = _REPLIES.get(nc)
    if replies is None:
        replies = _REPLIES[nc] = ReplyInbox(nc)
    await replies.ready()
    return replies


async def ask(
    nc: NATS,
    subject: str,
    data: bytes,
    timeout: float,
    times: AnswerTimes | None = None,
    final: Callable[[Msg], bool] | None = None,
) -> Msg:
    """The first answer to `data` on `subject`, sent again after `times.first_wait()`
    and then every second without one, within `timeout` in all. An answer `final`
    rejects (a copy answered as a repeat of another) is returned only if no other
    comes by the deadline. Raises nats.errors.TimeoutError (no answer in time),
    NoRespondersError (nobody subscribed), or what publishing raises
    (disconnected, closed)."""
    times = times or AnswerTimes()
    first = min(times.first_wait(), timeout)
    replies = await reply_inbox(nc)
    inbox, answers = replies.open()
    started = time.monotonic()
    deadline = started + timeout
    kept: Msg | None = None
    try:
        for copy, wait in enumerate(attempt_timeouts(max(first, _EVERY_SECONDS), first)):
            if deadline - time.monotonic() <= 0.01:
                break
            await nc.publish(subject, data, reply=inbox)
            until = min(time.monotonic() + wait, deadline)
            while (left := until - time.monotonic()) > 0:
                try:
                    async with asyncio.timeout(left):
                        msg = await answers.get()
                except TimeoutError:
                    break
                if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS and not msg.data:
                    raise nats.errors.NoRespondersError
                if final is not None and copy > 0 and not final(msg):
                    kept = msg  # another copy's answer may still come
                    continue
                if copy == 0:  # (an answer after a copy says nothing of the usual time)
                    times.observe(time.monotonic() - started)
                return msg
    finally:
        replies.close(inbox)
    if kept is not None:
        return kept
    raise nats.errors.TimeoutError


def not_refused_as(codes: frozenset[str]) -> Callable[[Msg], bool]:
    """For `ask`'s `final`: whether an answer is anything but a refusal with one of
    `codes` (refusals a copy gets for being one, or from a replica that cannot
    answer now, while another copy may yet be answered)."""

    def final(msg: Msg) -> bool:
        try:
            ack = decode(msg.data, AckReply).data
        except ContractError:
            return True
        return ack.ok or ack.code not in codes

    return final
