"""How long this replica has heard the bus: the one answer every sweep that concludes
something from missing heartbeats asks before it concludes it.

While the hub's own NATS connection is down it hears no heartbeat, and right after
it is back the edges are still reconnecting: their silence then says nothing about
them. Marking them offline would be a flap caused by the hub's own outage, so those
sweeps pause until the fleet has settled: the bus up for the grace period, and no
edge heard for the first time since it came back for the grace period either.

The second half is what makes the pause fit the fleet rather than a guess. A lone
Desktop reconnects within its jittered wait (at most 10 s by default); a fleet host
running thousands of agents in one process brings them back a few dozen a second
(edges/common/_reconnect.py, one process's attempts go a few at a time), so 11,000
edges on the fleet benchmark's 2-core machine took 81 s to come back, and a fixed
30 s grace marked 5,959 of them offline on the way. Edges coming back is evidence
that the others may still be on their way; once none has come back for the grace,
an edge still silent is marked as before. The pause never outlasts `MAX_PAUSE_GRACES`
graces, so a trickle of returns cannot keep a replica from concluding anything.

A replica whose event loop stalls (a long GC pause, a starved CPU) is as deaf as one
whose connection is down: what the edges sent meanwhile waits unread in its socket,
and a sweep's timer, due during the stall, may be the first thing the loop runs
after it. `watch_loop` measures how late the loop runs a timer
(`cowork_event_loop_lag_seconds`); a stall longer than LOOP_STALL deafens the replica
for as long again after it, time for the backlog to be read and handed to the
heartbeat writer (whose own `behind()` then covers its writing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable

from ._logging import LogBudget, kv
from ._metrics import HubMetrics

log = logging.getLogger("cowork.hub.presence")
MAX_PAUSE_GRACES = 10  # the longest pause after the bus is back, in grace periods
LOOP_TICK = 0.25  # how often the loop watch asks the loop for a timer
LOOP_STALL = 1.0  # a timer this many seconds late: the loop stalled


class _Returns:
    """One kind of edge's heartbeat hook: while the bus is settling, the keys heard
    since it came back (a key's first beat is a return); otherwise one attribute test."""

    def __init__(self, uptime: BusUptime) -> None:
        self._uptime = uptime
        self.back: set[Hashable] | None = None

    def __call__(self, key: Hashable) -> None:
        back = self.back
        if back is not None and key not in back:
            back.add(key)
            self._uptime.last_back = time.monotonic()


class BusUptime:
    """The bus is taken as heard from the start (a replica that starts has no outage
    of its own to forgive); `lost()` and `restored()` follow the connection, and each
    kind of edge's heartbeats tell the hook `returns()` gave it."""

    def __init__(self, grace: float, metrics: HubMetrics | None = None) -> None:
        self._grace, self._metrics = grace, metrics
        self._up_since: float | None = time.monotonic() - grace
        self._kinds: list[_Returns] = []
        self.last_back = 0.0  # when an edge was last heard for the first time since
        self._paused = False  # a pause is logged and counted once per outage
        self._why = "this replica could not hear the bus"
        self._ticked: float | None = None  # the loop watch's last tick (None: not watching)
        self._deaf_until = 0.0  # after a stall of the event loop
        self._stall_log = LogBudget(rate=0.1, burst=1)

    def returns(self) -> Callable[[Hashable], None]:
        """The heartbeat hook of one kind of edge (its keys are counted apart)."""
        kind = _Returns(self)
        self._kinds.append(kind)
        return kind

    def lost(self) -> None:
        self._up_since = None
        self._why = "this replica could not hear the bus"
        for kind in self._kinds:
            kind.back = set()

    def restored(self) -> None:
        self._up_since = self.last_back = time.monotonic()
        for kind in self._kinds:
            if kind.back is None:
                kind.back = set()

    def heard(self) -> bool:
        """True when silence is evidence: the bus up, and no edge come back, for at
        least the grace period (or the bus up for MAX_PAUSE_GRACES graces)."""
        up = self._settled(time.monotonic())
        if up and self._paused:
            self._paused = False
            log.info(
                "presence.sweep_resumed",
                **kv(
                    grace_seconds=self._grace,
                    edges_back=sum(len(k.back or ()) for k in self._kinds),
                ),
            )
        elif not up and not self._paused:
            self._paused = True
            if self._metrics is not None:
                self._metrics.presence_sweep_paused.inc()
            log.warning("presence.sweep_paused", **kv(grace_seconds=self._grace, reason=self._why))
        if up:
            for kind in self._kinds:  # settled: nothing to track until the next outage
                kind.back = None
        return up

    def _settled(self, now: float) -> bool:
        if self._up_since is None or now < self._deaf_until:
            return False
        if self._ticked is not None and now - self._ticked > LOOP_TICK + LOOP_STALL:
            # the loop is only now back from a stall its watch has not yet measured
            self._why = "this replica's event loop stalled"
            return False
        up_for = now - self._up_since
        if up_for >= self._grace * MAX_PAUSE_GRACES:
            return True
        return up_for >= self._grace and now - self.last_back >= self._grace

    def stalled(self, seconds: float) -> None:
        """The event loop ran nothing for `seconds`: deaf for as long again."""
        now = time.monotonic()
        self._deaf_until = max(self._deaf_until, now + seconds)
        self._why = "this replica's event loop stalled"
        suppressed = self._stall_log.allow("loop_stalled")
        if suppressed is not None:
            log.warning("loop.stalled", **kv(seconds=round(seconds, 2), suppressed=suppressed))

    async def watch_loop(self) -> None:
        """For the replica's life: how late the loop runs a LOOP_TICK timer."""
        lag_seconds = self._metrics.loop_lag if self._metrics is not None else None
        while True:
            asked = self._ticked = time.monotonic()
            await asyncio.sleep(LOOP_TICK)
            self._ticked = now = time.monotonic()
            lag = max(0.0, now - asked - LOOP_TICK)
            if lag_seconds is not None:
                lag_seconds.observe(lag)
            if lag > LOOP_STALL:
                self.stalled(lag)
