"""Heartbeats taken at once and written in batches: the one presence writer that
Desktop presence and Gateway heartbeats both run on.

A heartbeat costs no database round trip of its own. `note()` keeps the latest
beat per sender and returns; `beat()` does the same and waits for the result
of the write that carries it (a Gateway's heartbeat is a request: its answer is
the registration's state). A writer hands every noted beat to the room's
`write` in one call per flush (every FLUSH_SECONDS, or at once past FLUSH_SIZE
beats), so thousands of senders cost a few statements a second, and two beats
from one sender inside one flush are coalesced into one write: the later one's.
The earlier one's waiters get the later one's refusal if it is refused, else
`Superseded` (it was never written, a later one was).

A beat is late, and dropped unwritten, when its flush comes more than two of
its intervals after the hub took it, or after the sender sent it (its envelope
time, allowing CLOCK_SKEW between the two clocks): a late beat proves nothing
about now and never revives a sender that has gone. Its waiters get `LateBeat`.
Overload therefore costs freshness (beats are written later, or dropped and
counted), never correctness.

A write that fails (the database away) keeps its beats for the next flush,
unless a newer one from the same sender has been noted since; the late rule
bounds how long they wait.

While beats wait longer than BEHIND_SECONDS for a write (a slow statement, a
failing database), the writer is `behind()`: a sender whose beat the hub holds
unwritten is not silent (the 10,000-edge soak flapped edges in bursts of
hundreds). The sweeps that mark senders gone for missing beats ask the writer
`silence_is_evidence()`: that, and whether this replica hears the bus at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from ._background import BackgroundTask
from ._bus_uptime import BusUptime
from ._logging import LogBudget, kv

log = logging.getLogger("cowork.hub.presence")

FLUSH_SECONDS = 0.1  # how stale a beat's write may be: well under any interval
FLUSH_SIZE = 1000  # beats in one write
CLOCK_SKEW = 10.0  # seconds a sender's clock may be ahead of or behind the hub's
LATE_AFTER_INTERVALS = 2  # a beat older than this many of its intervals is late
BEHIND_SECONDS = 1.0  # beats waiting longer than this for a write: the writer is behind

K = TypeVar("K", bound=Hashable)
B = TypeVar("B")

# The room's write: every beat of one flush (key order) -> a result per key (a
# value for its waiters, or an exception to raise in them; absent: None).
Write = Callable[[list[tuple[K, B]]], Awaitable[Mapping[K, Any]]]


class LateBeat(Exception):
    """The beat was not written: it arrived, or was written, too late to prove the
    sender is still there."""


class Superseded(Exception):
    """The beat was not written: a later one from the same sender replaced it."""


@dataclass
class _Noted(Generic[B]):
    beat: B
    interval: float
    taken_at: float  # the hub's monotonic clock
    sent_at: float | None  # the sender's wall clock (epoch seconds), if it said
    waiters: list[asyncio.Future] = field(default_factory=list)
    superseded: list[asyncio.Future] = field(default_factory=list)  # earlier beats' waiters

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        _settle(self.waiters, value=value, error=error)
        _settle(self.superseded, error=error or Superseded())

    def supersede(self, earlier: _Noted) -> None:
        self.superseded[:0] = earlier.waiters + earlier.superseded

    def late(self, mono_now: float, wall_now: float) -> bool:
        limit = LATE_AFTER_INTERVALS * self.interval
        if mono_now - self.taken_at > limit:
            return True
        return self.sent_at is not None and wall_now - self.sent_at > limit + CLOCK_SKEW


class BeatWriter(Generic[K, B]):
    """The latest beat per key, written by `write` in batches (`start()`, `stop()`)."""

    def __init__(
        self,
        name: str,
        write: Write,
        *,
        on_late: Callable[[int], None],
        bus: BusUptime | None = None,
        flush_seconds: float = FLUSH_SECONDS,
        flush_size: int = FLUSH_SIZE,
    ) -> None:
        self._name, self._write, self._on_late = name, write, on_late
        self._bus = bus  # whether this replica hears the bus (see silence_is_evidence)
        # told every key heard: the bus uptime counts edges coming back after an outage
        self._on_note: Callable[[K], None] | None = bus.returns() if bus else None
        self._flush_seconds, self._flush_size = flush_seconds, flush_size
        self._noted: dict[K, _Noted[B]] = {}
        self._writing: dict[K, asyncio.Event] = {}  # keys whose write is in flight
        self._wake = asyncio.Event()
        self._task = BackgroundTask(name, self._write_forever)
        self._log_budget = LogBudget(rate=0.1, burst=1)
        self._caught_up = time.monotonic()  # when nothing noted last waited for a write
        self._evidence_at = time.monotonic()  # when silence was last found to be evidence

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()
        noted, self._noted = self._noted, {}
        for entry in noted.values():  # their requests are answered "try again"
            entry.settle(error=ConnectionError("the hub is stopping"))

    def note(
        self, key: K, beat: B, *, interval: float, sent_at: datetime | None = None
    ) -> _Noted[B]:
        """Keep `beat` as `key`'s latest (an earlier unwritten one is superseded)."""
        entry = _Noted(beat, interval, time.monotonic(), sent_at.timestamp() if sent_at else None)
        earlier = self._noted.get(key)
        if earlier is not None:
            entry.supersede(earlier)
        self._noted[key] = entry
        if self._on_note is not None:
            self._on_note(key)
        if len(self._noted) >= self._flush_size:
            self._wake.set()
        return entry

    async def beat(
        self, key: K, beat: B, *, interval: float, sent_at: datetime | None = None
    ) -> Any:
        """Note `beat` and wait for the result of the write that carries it."""
        waiter = asyncio.get_running_loop().create_future()
        self.note(key, beat, interval=interval, sent_at=sent_at).waiters.append(waiter)
        return await waiter

    def behind(self) -> bool:
        """True while beats have waited more than BEHIND_SECONDS for a write."""
        if not self._noted and not self._writing:
            self._caught_up = time.monotonic()
            return False
        return time.monotonic() - self._caught_up > BEHIND_SECONDS

    def silence_is_evidence(self) -> bool:
        """The one question a sweep that marks senders gone for missing beats asks: a
        sender not stamped lately is silent only if this replica hears the bus
        (`BusUptime.heard`) and has written what it heard (not `behind()`)."""
        if self._heard_and_written():
            self._evidence_at = time.monotonic()
            return True
        return False

    def _heard_and_written(self) -> bool:
        return (self._bus is None or self._bus.heard()) and not self.behind()

    def deaf_seconds(self) -> float:
        """0 while silence is evidence; else for how long it has not been (as far as
        this writer was asked). A reader that judges a sender by the age of its last
        stamp allows this much more, so that what it says stays what it said when
        this replica last heard: staler while deaf, never wrong the other way."""
        if self.silence_is_evidence():
            return 0.0
        return time.monotonic() - self._evidence_at

    def pending(self, key: K) -> B | None:
        """The beat noted for `key` and not yet written, if any."""
        entry = self._noted.get(key)
        return entry.beat if entry is not None else None

    async def forget(self, key: K) -> None:
        """Drop `key`'s unwritten beat (its sender said goodbye); its waiters get LateBeat.
        Returns once a write of an earlier beat of `key` already in flight is done, so
        the goodbye's own write comes after it and a beat never outlives its goodbye."""
        entry = self._noted.pop(key, None)
        if entry is not None:
            entry.settle(error=LateBeat("superseded by a goodbye"))
        writing = self._writing.get(key)
        if writing is not None:
            await writing.wait()

    async def _write_forever(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._flush_seconds):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database away: the beats wait for the next flush
                suppressed = self._log_budget.allow(f"{self._name}.write_failed")
                if suppressed is not None:  # (a flush every 0.1 s: one line in 10 s)
                    log.warning(
                        "presence.write_failed",
                        **kv(writer=self._name, error=str(exc), suppressed=suppressed),
                    )

    async def flush(self) -> int:
        """Write every beat noted since the last flush; returns how many were written."""
        noted, self._noted = self._noted, {}
        mono_now, wall_now = time.monotonic(), time.time()
        started = mono_now
        fresh: list[tuple[K, _Noted[B]]] = []
        for key, entry in sorted(noted.items()):  # key order: replicas lock rows alike
            if entry.late(mono_now, wall_now):
                entry.settle(error=LateBeat("the beat was too old to write"))
            else:
                fresh.append((key, entry))
        if dropped := len(noted) - len(fresh):
            self._on_late(dropped)
        for start in range(0, len(fresh), self._flush_size):
            chunk = fresh[start : start + self._flush_size]
            written = asyncio.Event()
            self._writing.update((key, written) for key, _ in chunk)
            try:
                results = await self._write([(key, entry.beat) for key, entry in chunk])
            except Exception:
                self._keep(chunk)
                raise
            finally:
                written.set()
                for key, _ in chunk:
                    if self._writing.get(key) is written:
                        del self._writing[key]
            for key, entry in chunk:
                result = results.get(key)
                if isinstance(result, BaseException):
                    entry.settle(error=result)
                else:
                    entry.settle(value=result)
        self._caught_up = started  # everything noted before this flush is written
        return len(fresh)

    def _keep(self, chunk: list[tuple[K, _Noted[B]]]) -> None:
        """Beats a failed write did not write wait for the next flush (unless a newer
        one from the same sender has been noted since: it supersedes them)."""
        for key, entry in chunk:
            newer = self._noted.get(key)
            if newer is not None:
                newer.supersede(entry)
            else:
                self._noted[key] = entry


def _settle(
    waiters: list[asyncio.Future], *, value: Any = None, error: BaseException | None = None
) -> None:
    for waiter in waiters:
        if waiter.done():  # its request gave up (cancelled)
            continue
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(value)
