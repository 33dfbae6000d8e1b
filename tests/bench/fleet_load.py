"""One share of the fleet in tests/bench/test_bench_fleet.py, run as its own process.

The fleet must not share the measured hub's event loop (nor its GIL), and one
Python process cannot run 10,000 edges on one core, so the benchmark starts a
few of these (`python tests/bench/fleet_load.py`), each with a JSON spec on
stdin, and talks to it in JSON lines (a command on stdin, one answer line on
stdout).

Every edge is the product's own agent code: Desktops are paired with
`edges.desktop.pair` (the public bootstrap exchange) and run as `DesktopAgent`;
Gateways are registered with `edges.gateway.register` and run as `GatewayAgent`.
Each has its own NATS connection, credential and state directory. All of them
talk to one minimal fake OpenCode served by this process (health, session
status and list, pending permissions and questions, and an event stream that
sends nothing but the connected event): enough for the status commands and the Gateways' health. The OpenCode
event relay is on for the Desktops marked `relay` in the spec and idle for the
rest (their relay task is replaced by a wait: the bus, heartbeats, commands and
credential refresh are untouched), so a 2-core machine can run 10,000.

Spec (camelCase JSON): natsUrl, stateDir, desktops [{code, relay}], gateways
[{credential}], desktopHeartbeat, gatewayHeartbeat, pairAtOnce.

Commands, each answered by one JSON line:
- `pair`: redeem every code and register every Gateway; answers
  {desktops: [pairingId], gateways: [registrationId], seconds, failures}.
- `run`: start every agent, answer once each is connected {seconds, connected}.
- `status`: {connected: agents whose bus is up, desktops, gateways, ended, cpuSeconds,
  lagMax: the event loop's worst lateness since the last status, gcMax: its longest
  full garbage collection since the last status, events: warnings
  and failures the agents logged, by key, since the start}.
- `stop`: stop every agent, answer {cpuSeconds, failed: agents that ended on their own}.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

from aiohttp import web

from edges.desktop._agent import DesktopAgent, pair
from edges.desktop._store import DesktopStore
from edges.gateway._agent import GatewayAgent
from edges.gateway._registration import register, version_set
from edges.gateway._store import GatewayStore

OPENCODE_VERSION = "1.18.33"  # what the fake OpenCode says it is (tests/kits/opencode_env.py)


def _share_tls_context() -> None:
    """Every OpenCodeClient builds an httpx client, and httpx builds a TLS context for
    each (about 10 ms of CPU; the fake OpenCode is plain HTTP). One context shared
    by all keeps 10,000 agents from costing minutes of CPU before they start."""
    import httpx._transports.default as transports

    transports.create_ssl_context = cache(transports.create_ssl_context)  # type: ignore[assignment]


async def fake_opencode() -> tuple[web.AppRunner, str]:
    """The smallest OpenCode the agents need: health, sessions, pending permissions and
    questions (none), an idle event stream."""

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"healthy": True, "version": OPENCODE_VERSION})

    async def session_status(_: web.Request) -> web.Response:
        return web.json_response({})

    async def empty_list(_: web.Request) -> web.Response:
        return web.json_response([])

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        connected = {"type": "server.connected", "properties": {}}
        await response.write(f"data: {json.dumps(connected)}\n\n".encode())
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while True:  # a heartbeat comment now and then, as OpenCode sends
                await asyncio.sleep(10)
                await response.write(b": keep-alive\n\n")
        return response

    app = web.Application()
    app.router.add_get("/global/health", health)
    app.router.add_get("/session/status", session_status)
    for path in ("/session", "/permission", "/question"):  # (the event stream's resync)
        app.router.add_get(path, empty_list)
    app.router.add_get("/event", events)
    app.router.add_get("/global/event", events)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


class EdgeLog(logging.Handler):
    """Counts what the agents log that says something went wrong: failed first-connect
    attempts (`*.connect_retry`) by what failed, so a slow start says whether
    connections were given up; and every warning or `*_failed` line by its key, so a
    soak that flaps says what the edges saw meanwhile."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.counts: dict[str, int] = {}
        self.events: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.endswith("connect_retry: %s"):
            reason = type(record.args[0]).__name__ if record.args else "?"  # type: ignore[index]
            self.counts[reason] = self.counts.get(reason, 0) + 1
            return
        key = str(record.msg).split(":", 1)[0].split(" ", 1)[0]
        if record.levelno >= logging.WARNING or key.endswith(("_failed", "_broke")):
            self.events[key] = self.events.get(key, 0) + 1

    def install(self) -> None:
        for name in ("cowork.edge.desktop", "cowork.edge.gateway"):
            logger = logging.getLogger(name)
            logger.setLevel(logging.INFO)
            logger.propagate = False  # (the rest of their INFO lines: not printed)
            logger.addHandler(self)


class GcPauses:
    """The longest full (generation 2) garbage collection of this process since last
    asked: with thousands of agents' objects alive, one can hold the event loop for
    seconds, which `LoopLag` would show without saying why."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._started: float | None = None
        gc.callbacks.append(self._phase)

    def _phase(self, phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.worst = max(self.worst, time.perf_counter() - self._started)
            self._started = None

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return round(worst, 2)


class LoopLag:
    """The longest this process's event loop ran a 0.1 s timer late since last asked: a
    load process too starved to send its agents' beats on time shows here."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            asked = time.monotonic()
            await asyncio.sleep(0.1)
            self.worst = max(self.worst, time.monotonic() - asked - 0.1)

    def take(self) -> float:
        worst, self.worst = self.worst, 0.0
        return round(worst, 2)


class Fleet:
    def __init__(self, spec: dict, opencode_url: str) -> None:
        self.spec, self.opencode_url = spec, opencode_url
        self.root = Path(spec["stateDir"])
        self.desktop_dirs: list[tuple[Path, bool]] = []
        self.gateway_dirs: list[Path] = []
        self.agents: list[Any] = []
        self.tasks: list[asyncio.Task] = []
        self.edge_log = EdgeLog()
        self.lag = LoopLag()
        self.gc_pauses = GcPauses()
        self.connect_times: list[float] = []
        self._timers: list[asyncio.Task] = []  # (not agents: kept out of `tasks`)

    async def pair(self) -> dict:
        url, gate = self.spec["natsUrl"], asyncio.Semaphore(int(self.spec["pairAtOnce"]))
        failures: list[str] = []
        pairing_ids: list[str] = []
        registration_ids: list[str] = []

        async def enrol(label: str, store: Any, exchange: Any) -> Any:
            """Pair or register one edge into `store`; None (and a failure noted) if refused."""
            async with gate:
                try:
                    return await exchange
                except Exception as exc:
                    failures.append(f"{label}: {exc}"[:300])
                    return None
                finally:
                    store.close()

        async def desktop(i: int, item: dict) -> None:
            store = DesktopStore(self.root / f"d{i}")
            paired = await enrol(
                f"desktop {i}", store, pair(item["code"], [url], store, device_name=f"fleet-{i}")
            )
            if paired is not None:
                pairing_ids.append(paired.pairing_id)
                self.desktop_dirs.append((store.directory, bool(item.get("relay"))))

        async def gateway(i: int, item: dict) -> None:
            store = GatewayStore(self.root / f"g{i}")
            exchange = register(item["credential"], [url], store, version_set(OPENCODE_VERSION))
            registered = await enrol(f"gateway {i}", store, exchange)
            if registered is not None:
                registration_ids.append(registered.registration_id)
                self.gateway_dirs.append(store.directory)

        started = time.monotonic()
        await asyncio.gather(
            *(desktop(i, d) for i, d in enumerate(self.spec["desktops"])),
            *(gateway(i, g) for i, g in enumerate(self.spec["gateways"])),
        )
        return {
            "desktops": pairing_ids,
            "gateways": registration_ids,
            "seconds": time.monotonic() - started,
            "failures": failures[:20],
            "failed": len(failures),
        }

    async def run(self) -> dict:
        started = time.monotonic()
        for directory, relay in self.desktop_dirs:
            agent = DesktopAgent(
                DesktopStore(directory),
                self.opencode_url,
                heartbeat_interval=float(self.spec["desktopHeartbeat"]),
            )
            if not relay:  # the relay idles; everything else is the agent's own
                agent.relay.run = asyncio.Event().wait  # type: ignore[method-assign]
            self._start(agent)
        for directory in self.gateway_dirs:
            agent = GatewayAgent(
                GatewayStore(directory),
                self.opencode_url,
                heartbeat_interval=float(self.spec["gatewayHeartbeat"]),
            )
            self._start(agent)
        while self.connected() < len(self.agents):
            if all(t.done() for t in self.tasks):
                break
            await asyncio.sleep(0.2)
        # Thousands of agents' objects live as long as the process: a full collection
        # walking them all held the loop 1.3 to 3.4 s in the 10,000-edge soak (gcMax),
        # delaying every agent's beat. Frozen, they are left out of the walk (one
        # product agent per process has no such heap).
        gc.collect()
        gc.freeze()
        times = sorted(self.connect_times)
        return {
            "seconds": time.monotonic() - started,
            "connected": self.connected(),
            # per agent, from the start of `run` to its bus connected: p50/p90/max
            "agentSeconds": [times[int(q * (len(times) - 1))] for q in (0.5, 0.9, 1.0)]
            if times
            else [],
            "retries": dict(self.edge_log.counts),
            "cpuSeconds": time.process_time(),
        }

    def _start(self, agent: Any) -> None:
        self.agents.append(agent)
        self.tasks.append(asyncio.create_task(agent.run()))
        self._timers.append(asyncio.create_task(self._timed(agent, time.monotonic())))

    async def _timed(self, agent: Any, started: float) -> None:
        await agent.connected.wait()
        self.connect_times.append(time.monotonic() - started)

    def connected(self) -> int:
        return sum(
            1
            for a in self.agents
            if a.connected.is_set() and a.nc is not None and a.nc.is_connected
        )

    def status(self) -> dict:
        return {
            "connected": self.connected(),
            "desktops": len(self.desktop_dirs),
            "gateways": len(self.gateway_dirs),
            "ended": sum(t.done() for t in self.tasks),
            "cpuSeconds": time.process_time(),
            "lagMax": self.lag.take(),
            "gcMax": self.gc_pauses.take(),
            "events": dict(self.edge_log.events),
        }

    async def stop(self) -> dict:
        ended = sum(t.done() for t in self.tasks)
        for agent in self.agents:
            agent.stop()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=30)
        for task in (*self.tasks, *self._timers):
            task.cancel()
        return {"cpuSeconds": time.process_time(), "failed": ended}


async def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    _share_tls_context()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**26)  # the spec is one line
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    runner, opencode_url = await fake_opencode()
    fleet = Fleet(spec, opencode_url)
    fleet.edge_log.install()
    handlers = {"pair": fleet.pair, "run": fleet.run, "stop": fleet.stop}

    def answer(body: dict) -> None:
        sys.stdout.write(json.dumps(body) + "\n")
        sys.stdout.flush()

    answer({"ready": True})
    try:
        while line := (await reader.readline()).decode().strip():
            if line == "status":
                answer(fleet.status())
            elif line in handlers:
                answer(await handlers[line]())
            if line == "stop":
                break
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
