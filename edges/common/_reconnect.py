"""How an edge dials the hub's NATS, and comes back after the server went away.

When a nats-server restarts, every edge connected to it loses its connection in
the same instant. nats-py's own schedule (a fixed `reconnect_time_wait`, a
2 s connect timeout) brings them all back in the same instant too, and a client
whose event loop is busy (thousands of agents in one process, a laptop waking
up) misses a 2 s deadline it would have met a moment later, gives up a
connection the server had already accepted, and starts over: a retry storm
against a server that is doing nothing wrong.

`ReconnectPolicy` is the schedule instead, the same for the first connection
and for every reconnection, for the Desktop and the Gateway:

- the wait before an attempt is random (full jitter) under a ceiling that
  doubles from `wait` to `max_wait` with each failure in a row
  (`jittered_backoff`, the same backoff as OpenCode's event stream), so a
  herd of edges spreads out and spreads further the longer the server is away;
  the first attempt after a drop waits between `wait / 2` and `wait` too;
- the connect timeout (TCP connect, the server's INFO, the CONNECT's PONG)
  starts at `connect_timeout` and doubles with each failure in a row up to
  `max_connect_timeout`: a black-holed server is left quickly, and an attempt
  that timed out only because the client was busy gets longer next time
  instead of being repeated as it was;
- with several servers (a NATS cluster), the one with the fewest failures in a
  row is tried next, so a dead node is left for a live one at the first wait;
- the connection attempts of one event loop, first connects and reconnects
  alike, go `at_once` at a time (`GatedClient`): every attempt in flight shares
  the loop, so a process running thousands of agents (a fleet host, the fleet
  benchmark's load processes) made every attempt as slow as all of them
  together. nats-server gives a client 2 s from its greeting to authenticate;
  on a starved machine no CONNECT came in time, each attempt was reset and
  tried again, and the retries kept the loop as busy as before: a fleet that
  should have taken a minute to start took ten, and after a nats-server restart
  2,750 agents a process never came back (backoff spreads a herd over at most
  `max_wait`, which is not enough when the loop can finish 30 attempts a second).
  An attempt's timeout runs from when it goes, not from when it queued, and
  the turn is held from the TCP connect to the server's answer to CONNECT.

Read from the environment by `ReconnectPolicy.from_env()` (documented in
docs/operations.md): `COWORK_EDGE_RECONNECT_WAIT` (0.5 s),
`COWORK_EDGE_RECONNECT_MAX_WAIT` (10 s), `COWORK_EDGE_CONNECT_TIMEOUT` (5 s),
`COWORK_EDGE_CONNECT_TIMEOUT_MAX` (30 s), `COWORK_EDGE_CONNECTS_AT_ONCE` (16).

`dial()` makes one connection attempt with the policy's timeout (nats-py's first
connect would otherwise retry on its own fixed schedule); once connected, nats-py
reconnects forever on the policy's schedule (its `reconnect_to_server_handler`).
nats-py has no hook around one attempt, so `GatedClient` takes its turn in the
two private steps every attempt goes through (`_connect_to_server`, then
`_process_connect_init`); tests/edges/common/test_reconnect.py holds it to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.client import Server

from ._retry import jittered_backoff

ENV = {
    "wait": "COWORK_EDGE_RECONNECT_WAIT",
    "max_wait": "COWORK_EDGE_RECONNECT_MAX_WAIT",
    "connect_timeout": "COWORK_EDGE_CONNECT_TIMEOUT",
    "max_connect_timeout": "COWORK_EDGE_CONNECT_TIMEOUT_MAX",
    "at_once": "COWORK_EDGE_CONNECTS_AT_ONCE",
}


@dataclass(frozen=True)
class ReconnectPolicy:
    """When an edge tries its hub's NATS again, and how long it waits for an answer."""

    wait: float = 0.5
    max_wait: float = 10.0
    connect_timeout: float = 5.0
    max_connect_timeout: float = 30.0
    at_once: int = 16  # connection attempts in flight in one event loop (first and re-)

    def __post_init__(self) -> None:
        for name in ENV:
            value = getattr(self, name)
            if not 0 < value <= 3600:
                raise ValueError(f"{ENV[name]} must be between 0 and 3600, not {value}")
        if self.at_once != int(self.at_once):
            raise ValueError(f"{ENV['at_once']} must be a whole number, not {self.at_once}")
        if self.max_wait < self.wait:
            raise ValueError(
                f"{ENV['max_wait']} ({self.max_wait}) is shorter than {ENV['wait']} ({self.wait})"
            )
        if self.max_connect_timeout < self.connect_timeout:
            raise ValueError(
                f"{ENV['max_connect_timeout']} ({self.max_connect_timeout}) is shorter than "
                f"{ENV['connect_timeout']} ({self.connect_timeout})"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ReconnectPolicy:
        """The policy the COWORK_EDGE_* variables set; ValueError names a bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, var in ENV.items():
            text = env.get(var, "").strip()
            if not text:
                continue
            try:
                values[name] = int(text) if name == "at_once" else float(text)
            except ValueError:
                what = "a whole number" if name == "at_once" else "a number of seconds"
                raise ValueError(f"{var} must be {what}, not {text!r}") from None
        return cls(**values)

    def wait_before(self, failures: int, first: float | None = None) -> float:
        """The wait before the next attempt after `failures` failed ones in a row (0
        after a drop: the first attempt waits too, so a herd does not land at once);
        `first` in place of `wait` (a connection's own `reconnect_time_wait`)."""
        first = self.wait if first is None else first
        return jittered_backoff(failures + 1, first, max(self.max_wait, first))

    def timeout_for(self, failures: int) -> float:
        """The connect timeout of an attempt after `failures` failed ones in a row."""
        return min(self.max_connect_timeout, self.connect_timeout * 2 ** min(failures, 30))


# One gate per event loop and limit: the attempts that share a loop share its time.
_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary()
)


def _gate(at_once: int) -> asyncio.Semaphore:
    by_limit = _gates.setdefault(asyncio.get_running_loop(), {})
    return by_limit.setdefault(at_once, asyncio.Semaphore(at_once))


class GatedClient(NATS):
    """nats-py's client, each of whose connection attempts (the first and every
    reconnect) waits for one of its event loop's `at_once` turns, and holds it from
    the TCP connect until the server has answered the CONNECT or the attempt failed."""

    def __init__(self, at_once: int) -> None:
        super().__init__()
        self._at_once = at_once
        self._turn: asyncio.Semaphore | None = None  # the gate whose turn this holds

    async def _connect_to_server(self, s: Any) -> None:
        if self._turn is None:
            gate = _gate(self._at_once)
            await gate.acquire()
            self._turn = gate
        try:
            await super()._connect_to_server(s)
        except BaseException:
            self._end_turn()
            raise

    async def _process_connect_init(self) -> None:
        try:
            await super()._process_connect_init()
        finally:
            self._end_turn()

    def _end_turn(self) -> None:
        if self._turn is not None:
            self._turn.release()
            self._turn = None

    async def close(self) -> None:
        self._end_turn()  # (closed between the two steps: never, but never a lost turn)
        await super().close()


async def dial(
    servers: list[str], policy: ReconnectPolicy, *, failures: int = 0, **options: Any
) -> NATS:
    """One attempt to connect (each server at most twice, with the timeout for an
    attempt after `failures` failures), each once fewer than `policy.at_once` other
    attempts of this event loop are in flight; raises what nats-py raised. The
    connection it returns reconnects forever on `policy`'s schedule, through the
    same turns."""
    nc = GatedClient(policy.at_once)

    def choose(pool: list[Server], _info: dict[str, Any]) -> tuple[Server, float]:
        server = min(pool, key=lambda s: s.reconnects)  # (nats-py shuffled the pool)
        nc.options["connect_timeout"] = policy.timeout_for(server.reconnects)
        # (nats-py's reconnect_time_wait, set to the policy's `wait` once connected,
        # stays the connection's first wait: a caller may change it on a live one)
        first = float(nc.options["reconnect_time_wait"]) or policy.wait
        return server, policy.wait_before(server.reconnects, first)

    try:
        await nc.connect(
            servers,
            # The first connect: nats-py would retry on its own (fixed) schedule,
            # with reconnects allowed; one attempt here, the caller waits by the policy.
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            connect_timeout=policy.timeout_for(failures),  # type: ignore[arg-type]  # (a float works)
            reconnect_to_server_handler=choose,
            **options,
        )
    except BaseException:
        # An attempt that failed is not a connection that closed: the caller's
        # callbacks (a Gateway connects again from scratch on close) must not run.
        nc._disconnected_cb = nc._closed_cb = None
        with contextlib.suppress(Exception):
            await nc.close()
        raise
    nc.options["allow_reconnect"] = True
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = policy.wait
    return nc
