"""The fleet benchmark (issue 17): thousands of Desktops and Gateways on one hub.

Run with `make bench-fleet DESKTOPS=N GATEWAYS=M` (SOAK_MINUTES=60 adds the soak),
or `FLEET_DESKTOPS=N FLEET_GATEWAYS=M .venv/bin/python -m pytest -m bench
-o addopts="-p no:cacheprovider" -s tests/bench/test_bench_fleet.py`.
docs/performance.md ("Fleet") and docs/scale.md record the results.

Everything is real: an operator-mode nats-server (on a fixed port, so it can be
restarted under the fleet), PostgreSQL, one `cowork hub serve` process, and
FLEET_LOADS load processes (tests/bench/fleet_load.py) running the product's own
Desktop and Gateway agents, each with its own NATS connection and credential. A
sample of the Desktops (FLEET_RELAY_SAMPLE) relays OpenCode's event stream from a
minimal fake OpenCode and takes the commands; the rest have the relay idle.

In order: pairing codes and registrations through the admin API, redeemed and
registered over the bootstrap bus (the pairing rate); the sample alone, and its
command round trip (idle); the whole fleet started and the time until the hub
shows it online; a steady window (FLEET_HOLD_SECONDS) in which the fleet is
listed through the paginated API, commands are sent (round trip under load) and
presence is sampled (online counts, the age of the newest heartbeat stamp), with
the CPU and memory of the hub, NATS and PostgreSQL; the nats-server restarted
(the time until every edge is heard from again); the soak (SOAK_MINUTES), which
lists the whole fleet and sends commands every FLEET_SOAK_EVERY seconds and asserts
that no Desktop went offline and no Gateway unhealthy while connected, that no
heartbeat arrived late and that the hub's NATS client dropped nothing.

Asserted: every Desktop paired and online, every Gateway active, every command
completed, no flap in the steady window, after the restart (which opens the soak)
or in the soak. CPU is printed, not
asserted (the machine is shared), except with BENCH_STRICT=1: hub and
PostgreSQL each under 50% of one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest
from desktopkit import TENANT, all_pages
from hubkit import operator_nats
from replicakit import free_port, replicas
from test_bench_floods import Load
from test_bench_replicas import _cpu, _postmaster, _tree_cpu

from hub.auth import BusKeys
from hub.bus._bootstrap_limits import SOURCE_PENDING

DESKTOPS = int(os.environ.get("FLEET_DESKTOPS", "2000"))
GATEWAYS = int(os.environ.get("FLEET_GATEWAYS", "200"))
LOADS = int(os.environ.get("FLEET_LOADS", "4"))  # load processes besides the sample's
RELAY_SAMPLE = int(os.environ.get("FLEET_RELAY_SAMPLE", "20"))
HOLD_SECONDS = float(os.environ.get("FLEET_HOLD_SECONDS", "60"))
SOAK_MINUTES = float(os.environ.get("SOAK_MINUTES", "0"))
COMMANDS = int(os.environ.get("FLEET_COMMANDS", "50"))
SOAK_EVERY = float(os.environ.get("FLEET_SOAK_EVERY", "300"))  # seconds between soak rounds
# 0 skips the nats-server restart (on 2 vCPUs the load processes cannot reconnect
# 11,000 agents in time: docs/performance.md, "Fleet")
RESTART = os.environ.get("FLEET_RESTART", "1") != "0"
DESKTOP_HEARTBEAT = float(os.environ.get("FLEET_DESKTOP_HEARTBEAT", "5"))  # the agent's default
GATEWAY_HEARTBEAT = float(os.environ.get("FLEET_GATEWAY_HEARTBEAT", "5"))  # the hub's default
STRICT = os.environ.get("BENCH_STRICT") == "1"
pytestmark = [pytest.mark.bench, pytest.mark.timeout(int(1800 + 60 * SOAK_MINUTES))]
FLEET_LOAD = Path(__file__).with_name("fleet_load.py")
BASE = f"/api/v1/tenants/{TENANT}"
FLAPS = ("pairing.offline", "gateway.registration.unhealthy")
_DROPS = re.compile(r"^cowork_nats_slow_consumer_drops_total\{[^}]*\} ([\d.e+]+)$", re.M)
_LOOP_LAG_COUNT = re.compile(r"^cowork_event_loop_lag_seconds_count ([\d.e+]+)$", re.M)
_LOOP_LAG_1S = re.compile(r'^cowork_event_loop_lag_seconds_bucket\{le="1.0"\} ([\d.e+]+)$', re.M)
_LATE = re.compile(r'^cowork_presence_heartbeats_late_total\{principal="(\w+)"\} ([\d.e+]+)$', re.M)


class FleetLoad(Load):
    """tests/bench/fleet_load.py (`script`) as a child process of this test (ours to
    stop), spoken to in JSON lines: a spec first, answered once it is ready."""

    script = FLEET_LOAD

    @classmethod
    async def start(cls, spec: dict) -> FleetLoad:  # type: ignore[override]
        load = cls(
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(cls.script),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=2**24,  # a pairing answer lists thousands of ids
            )
        )
        assert (await load.ask(json.dumps(spec), 60)).get("ready")
        return load

    async def ask(self, line: str, timeout: float = 600) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()
        answer = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        assert answer, f"the fleet load process ended (exit {self.process.returncode})"
        return json.loads(answer)


class Usage:
    """CPU seconds and memory of the hub, NATS and PostgreSQL (its server processes)."""

    def __init__(self, hub_pid: int, nats_pid: int, postmaster: psutil.Process) -> None:
        self.hub, self.nats = psutil.Process(hub_pid), psutil.Process(nats_pid)
        self.postmaster = postmaster

    def cpu(self) -> dict[str, float]:
        return {"hub": _cpu(self.hub), "nats": _cpu(self.nats), "pg": _tree_cpu(self.postmaster)}

    def rss_mib(self) -> dict[str, float]:
        pg = [self.postmaster, *self.postmaster.children()]
        return {
            "hub": self.hub.memory_info().rss / 2**20,
            "nats": self.nats.memory_info().rss / 2**20,
            # summed RSS counts shared buffers once per backend: an upper bound
            "pg": sum(_rss(p) for p in pg) / 2**20,
        }


def _rss(p: psutil.Process) -> int:
    with contextlib.suppress(psutil.Error):
        return p.memory_info().rss
    return 0


def _pct(q: float, values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


async def _gather_limited(n: int, coros) -> list:
    gate = asyncio.Semaphore(n)

    async def one(coro):
        async with gate:
            return await coro

    return await asyncio.gather(*(one(c) for c in coros))


async def _codes(http: httpx.AsyncClient, count: int) -> list[str]:
    async def one(i: int) -> str:
        r = await http.post(f"{BASE}/pairings", json={"label": f"fleet {i}"})
        assert r.status_code == 201, r.text
        return r.json()["code"]

    return await _gather_limited(8, (one(i) for i in range(count)))


async def _credentials(http: httpx.AsyncClient, count: int) -> list[str]:
    async def one(i: int) -> str:
        r = await http.post(
            f"{BASE}/gateway-registrations",
            json={
                "displayName": f"fleet {i}",
                "kind": "edge_worker",
                "trustModel": "self_hosted_same_operator",
            },
        )
        assert r.status_code == 201, r.text
        return r.json()["credential"]

    return await _gather_limited(8, (one(i) for i in range(count)))


async def _presence(pool: asyncpg.Pool, since: float | None = None) -> dict:
    """Desktops online and Gateways active now; with `since` (epoch), how many have
    been heard from since; the age of the Desktops' newest stamps."""
    row = await pool.fetchrow(
        """SELECT
             (SELECT count(*) FROM pairings WHERE status = 'paired_online') AS online,
             (SELECT count(*) FROM pairings WHERE last_heartbeat_at >= to_timestamp($1))
                 AS desktops_heard,
             (SELECT count(*) FROM gateway_registrations WHERE status = 'active') AS active,
             (SELECT count(*) FROM gateway_registrations
               WHERE last_heartbeat_at >= to_timestamp($1)) AS gateways_heard,
             (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY
                 extract(epoch FROM now() - last_heartbeat_at))
               FROM pairings WHERE status = 'paired_online') AS age_p99""",
        since or 0.0,
    )
    return dict(row)


async def _flaps(pool: asyncpg.Pool, since_id: int) -> int:
    return await pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE id > $1 AND action = ANY($2)", since_id, list(FLAPS)
    )


async def _audit_mark(pool: asyncpg.Pool) -> int:
    return await pool.fetchval("SELECT coalesce(max(id), 0) FROM audit_log")


async def _commands(http: httpx.AsyncClient, pids: list[str], n: int) -> list[float]:
    """n sequential `status` commands, round robin over `pids`, each POST ?wait until done."""
    samples = []
    for i in range(n):
        pid = pids[i % len(pids)]
        started = time.perf_counter()
        r = await http.post(
            f"{BASE}/pairings/{pid}/commands", params={"wait": 20}, json={"kind": "status"}
        )
        assert r.status_code == 201, r.text
        view = r.json()
        assert view["state"] == "done" and view["status"] == "completed", view
        samples.append(time.perf_counter() - started)
    return samples


async def _until(check, timeout: float, what: str, every: float = 0.5) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(every)
    return time.monotonic() - started


def _late(metrics_text: str) -> dict[str, float]:
    return {kind: float(value) for kind, value in _LATE.findall(metrics_text)}


def _drops(metrics_text: str) -> float:
    """Messages the hub's NATS client dropped as a slow consumer, all subscriptions."""
    return sum(float(v) for v in _DROPS.findall(metrics_text))


async def _list_fleet(http: httpx.AsyncClient) -> dict:
    started = time.perf_counter()
    pairings, pages = await all_pages(http, f"{BASE}/pairings", 500)
    gateways, gpages = await all_pages(http, f"{BASE}/gateway-registrations", 500)
    return {
        "pairings": len(pairings),
        "gateways": len(gateways),
        "pairings_online": sum(p["online"] for p in pairings),
        "gateways_online": sum(g["online"] for g in gateways),
        "pages": pages + gpages,
        "seconds": time.perf_counter() - started,
    }


def _whole_and_online(listing: dict) -> bool:
    """Every Desktop and Gateway listed, each shown online (the view's `online`)."""
    return (
        listing["pairings"] == listing["pairings_online"] == DESKTOPS
        and listing["gateways"] == listing["gateways_online"] == GATEWAYS
    )


@pytest.fixture
async def bus(tmp_path_factory):
    keys_dir = tmp_path_factory.mktemp("fleet-keys")
    keys = BusKeys.load_or_create(keys_dir)
    async with operator_nats(
        tmp_path_factory.mktemp("fleet-nats"), keys, port=free_port()
    ) as server:
        yield server, keys_dir


def _specs(url: str, root: Path, codes: list[str], credentials: list[str]) -> list[dict]:
    """The sample's load (relay on, takes the commands), then LOADS shares of the rest."""
    common = {
        "natsUrl": url,
        "desktopHeartbeat": DESKTOP_HEARTBEAT,
        "gatewayHeartbeat": GATEWAY_HEARTBEAT,
    }
    # The hub lets one address hold SOURCE_PENDING bootstrap requests in flight: the
    # sample's load takes one, the others share the rest.
    at_once = max(1, (SOURCE_PENDING - 1) // LOADS)
    sample, rest = codes[:RELAY_SAMPLE], codes[RELAY_SAMPLE:]
    specs = [
        {
            **common,
            "stateDir": str(root / "sample"),
            "desktops": [{"code": c, "relay": True} for c in sample],
            "gateways": [],
            "pairAtOnce": 1,
        }
    ]
    for n in range(LOADS):
        specs.append(
            {
                **common,
                "stateDir": str(root / f"load{n}"),
                "desktops": [{"code": c, "relay": False} for c in rest[n::LOADS]],
                "gateways": [{"credential": c} for c in credentials[n::LOADS]],
                "pairAtOnce": at_once,
            }
        )
    return specs


async def test_fleet(bus, database_url_module, tmp_path):
    server, keys_dir = bus
    loads: list[FleetLoad] = []
    report: dict = {"desktops": DESKTOPS, "gateways": GATEWAYS}
    async with replicas(
        1,
        tmp_path / "hub",
        nats_url=server.url,
        database_url=database_url_module,
        keys_dir=keys_dir,
        log_level="warning",
        bootstrap_source_rate="10000",
        bootstrap_connections_per_source="1024",
    ) as (hub,):
        pool = await asyncpg.create_pool(database_url_module, min_size=1, max_size=3)
        try:
            async with hub.client() as http:
                http.timeout = httpx.Timeout(30)
                await _run(hub, http, pool, server, loads, report, tmp_path)
        finally:
            for load in loads:
                with contextlib.suppress(Exception):
                    await load.ask("stop", 60)
                await load.kill()
            await pool.close()
            _print(report)


async def _run(hub, http, pool, server, loads, report, tmp_path) -> None:
    # --- pairing ---------------------------------------------------------------------
    _phase("creating pairing codes and registrations")
    started = time.monotonic()
    codes = await _codes(http, DESKTOPS)
    credentials = await _credentials(http, GATEWAYS)
    report["create_s"] = time.monotonic() - started
    for spec in _specs(server.url, tmp_path / "edges", codes, credentials):
        loads.append(await FleetLoad.start(spec))
    _phase("redeeming and registering")
    started = time.monotonic()
    paired = await asyncio.gather(*(load.ask("pair") for load in loads))
    report["redeem_s"] = time.monotonic() - started
    failed = sum(p["failed"] for p in paired)
    assert failed == 0, [p["failures"] for p in paired]
    sample = paired[0]["desktops"]
    report["pairing_rate"] = (DESKTOPS + GATEWAYS) / (report["create_s"] + report["redeem_s"])
    # --- the sample alone: the command round trip with the hub idle ---------------------
    assert (await loads[0].ask("run"))["connected"] == len(sample)
    online_sample = (
        "SELECT count(*) FROM pairings WHERE status = 'paired_online' AND pairing_id = ANY($1)"
    )
    await _until(
        lambda: _eq(pool.fetchval(online_sample, sample), len(sample)), 60, "the sample online"
    )
    await _commands(http, sample, 5)  # warm-up
    report["cmd_idle"] = await _commands(http, sample, COMMANDS)
    # --- the whole fleet -------------------------------------------------------------------
    _phase(f"starting the fleet in {len(loads) - 1} load processes")
    started = time.monotonic()
    ran = await asyncio.gather(*(load.ask("run") for load in loads[1:]))
    report["connect_s"] = time.monotonic() - started
    report["connect_loads"] = ran
    report["load_avg_connect"] = os.getloadavg()[0]
    assert sum(r["connected"] for r in ran) == DESKTOPS - len(sample) + GATEWAYS, ran
    await _until(lambda: _all_online(pool), 300, "the fleet online")
    report["online_s"] = time.monotonic() - started
    await asyncio.sleep(2 * max(DESKTOP_HEARTBEAT, GATEWAY_HEARTBEAT))  # settle
    # --- the steady window -----------------------------------------------------------------
    _phase("steady window")
    usage = Usage(hub.proc.pid, server.pid, await _postmaster(pool))
    mark, late_before = await _audit_mark(pool), _late((await http.get("/metrics")).text)
    cpu_before, wall_before = usage.cpu(), time.monotonic()
    loads_cpu_before = await _loads_cpu(loads)
    samples: list[dict] = []

    async def sample_presence() -> None:
        while True:
            samples.append(await _presence(pool))
            await asyncio.sleep(2)

    sampler = asyncio.create_task(sample_presence())
    try:
        listing = await _list_fleet(http)
        report["cmd_load"] = await _commands(http, sample, COMMANDS)
        listing_again = await _list_fleet(http)
        remaining = HOLD_SECONDS - (time.monotonic() - wall_before)
        await asyncio.sleep(max(remaining, 0))
    finally:
        sampler.cancel()
    wall = time.monotonic() - wall_before
    cpu_after = usage.cpu()
    report["cpu_pct"] = {k: 100 * (cpu_after[k] - cpu_before[k]) / wall for k in cpu_after}
    loads_cpu = await _loads_cpu(loads)
    report["loads_cpu_pct"] = 100 * (loads_cpu - loads_cpu_before) / wall
    report["rss_mib"] = usage.rss_mib()
    report["window_s"] = wall
    report["load_avg_window"] = os.getloadavg()[0]  # the machine is shared: say how busy
    report["listing"] = [listing, listing_again]
    report["presence"] = samples
    report["late"] = {
        k: v - late_before.get(k, 0.0) for k, v in _late((await http.get("/metrics")).text).items()
    }
    report["flaps"] = await _flaps(pool, mark)
    # (asserted at the end: a failed window still gets its restart measured and printed)
    # --- nats-server restarted under the fleet -----------------------------------------------
    if RESTART:
        _phase("restarting nats-server")
        restart_mark = await _audit_mark(pool)
        await server.stop()
        restarted_at = time.time()
        await server.start()
        report["restart"] = await _reconnect_timeline(hub, pool, loads, restarted_at)
        report["restart"]["load_avg"] = os.getloadavg()[0]
        await _until(lambda: _all_online(pool), 120, "the fleet online after the restart")
        report["restart_flaps"] = await _flaps(pool, restart_mark)
    # --- the soak ----------------------------------------------------------------------------
    if SOAK_MINUTES > 0:
        report["soak"] = await _soak(http, pool, loads, sample)
        assert report["soak"]["flaps"] == 0, report["soak"]
        assert not any(report["soak"]["late"].values()), report["soak"]
        assert report["soak"]["drops"] == 0, report["soak"]
    for listed in report["listing"]:
        assert _whole_and_online(listed), listed
    assert min(s["online"] for s in samples) == DESKTOPS, "a Desktop was not shown online"
    assert min(s["active"] for s in samples) == GATEWAYS, "a Gateway was not shown active"
    assert report["flaps"] == 0, f"{report['flaps']} flaps in the steady window"
    assert report.get("restart_flaps", 0) == 0, (
        f"{report['restart_flaps']} flaps after the nats-server restart"
    )
    if STRICT:
        assert report["cpu_pct"]["hub"] < 50 and report["cpu_pct"]["pg"] < 50, report["cpu_pct"]


async def _soak(http, pool: asyncpg.Pool, loads: list[FleetLoad], sample: list[str]) -> dict:
    """SOAK_MINUTES of the fleet: presence checked every 10 s; every SOAK_EVERY seconds the
    whole fleet is listed through the API and commands are sent. Counts the flaps, the
    late beats and the slow-consumer drops of the whole soak."""
    await asyncio.sleep(2 * max(DESKTOP_HEARTBEAT, GATEWAY_HEARTBEAT))
    mark, metrics = await _audit_mark(pool), (await http.get("/metrics")).text
    late_before, drops_before = _late(metrics), _drops(metrics)
    soak_end = time.monotonic() + 60 * SOAK_MINUTES
    lowest, listed, commands, next_round = DESKTOPS, 0, [], 0.0
    timeline = SoakTimeline(_stalls(metrics))
    while time.monotonic() < soak_end:
        presence = await _presence(pool)
        lowest = min(lowest, presence["online"])
        status = await asyncio.gather(*(load.ask("status") for load in loads))
        assert sum(s["ended"] for s in status) == 0, "an agent ended during the soak"
        timeline.look(
            await _flaps(pool, mark), presence, status, _stalls((await http.get("/metrics")).text)
        )
        if time.monotonic() >= next_round:
            listing = await _list_fleet(http)
            assert _whole_and_online(listing), listing
            listed += 1
            commands += await _commands(http, sample, 10)
            next_round = time.monotonic() + SOAK_EVERY
        await asyncio.sleep(10)
    metrics = (await http.get("/metrics")).text
    return {
        "minutes": SOAK_MINUTES,
        "flaps": await _flaps(pool, mark),
        "lowest_online": lowest,
        "listings": listed,
        "commands": len(commands),
        "cmd_p99_ms": round(1000 * _pct(0.99, commands), 1),
        "late": {k: v - late_before.get(k, 0.0) for k, v in _late(metrics).items()},
        "drops": _drops(metrics) - drops_before,
        "worst_load_lag_s": timeline.worst_lag,
        "worst_load_gc_s": timeline.worst_gc,
        "hub_stalls": _stalls(metrics) - timeline.stalls_before,
    }


class SoakTimeline:
    """A line for every 10 s of the soak in which an edge flapped or a process stalled:
    what the hub did (flaps, its loop stalls) beside what the load processes saw (their
    loops' worst lateness, what their agents logged), so a failed soak says why."""

    def __init__(self, stalls: float) -> None:
        self.flaps, self.stalls_before, self._stalls = 0, stalls, stalls
        self.worst_lag = self.worst_gc = 0.0
        self._events: list[dict[str, int]] = []

    def look(self, flaps: int, presence: dict, status: list[dict], stalls: float) -> None:
        lags = [s["lagMax"] for s in status]
        gcs = [s["gcMax"] for s in status]
        self.worst_gc = max(self.worst_gc, *gcs)
        self.worst_lag = max(self.worst_lag, *lags)
        events = [s["events"] for s in status]
        new_events = [
            {k: v - (self._events[i].get(k, 0) if self._events else 0) for k, v in e.items()}
            for i, e in enumerate(events)
        ]
        new_events = [{k: v for k, v in e.items() if v} for e in new_events]
        if flaps > self.flaps or stalls > self._stalls or max(lags) > 2 or any(new_events):
            print(
                f"  [{time.strftime('%H:%M:%S')}] flaps +{flaps - self.flaps} "
                f"(online {presence['online']}, active {presence['active']}); hub loop "
                f"stalls +{stalls - self._stalls:.0f}; load loops late at worst {lags} s "
                f"(longest full GC {gcs} s); "
                f"edges logged {new_events}",
                flush=True,
            )
        self.flaps, self._stalls, self._events = flaps, stalls, events


def _stalls(metrics_text: str) -> float:
    """Ticks the hub's event loop ran more than a second late (cowork_event_loop_lag_seconds)."""
    count = _LOOP_LAG_COUNT.search(metrics_text)
    within = _LOOP_LAG_1S.search(metrics_text)
    return float(count.group(1)) - float(within.group(1)) if count and within else 0.0


async def _reconnect_timeline(
    hub, pool: asyncpg.Pool, loads: list[FleetLoad], since: float
) -> dict:
    """After the nats-server restart: when the hub was ready again, and when 50%, 90%
    and 100% of the edges were connected (their side) and heard from (the hub's)."""
    started, total = time.monotonic(), DESKTOPS + GATEWAYS
    marks: dict[str, list[float]] = {"connected": [], "heard": []}
    hub_ready = None
    async with httpx.AsyncClient(base_url=hub.url, timeout=2) as probe:
        while len(marks["heard"]) < 3:
            now = time.monotonic() - started
            if now > 120:  # printed as it is; the wait for all online below fails
                break
            if hub_ready is None:
                with contextlib.suppress(httpx.HTTPError):
                    if (await probe.get("/readyz")).status_code == 200:
                        hub_ready = now
            heard = await _presence(pool, since)
            counts = {
                "connected": sum(s["connected"] for s in await _statuses(loads)),
                "heard": heard["desktops_heard"] + heard["gateways_heard"],
            }
            for what, count in counts.items():
                while len(marks[what]) < 3 and count >= (0.5, 0.9, 1.0)[len(marks[what])] * total:
                    marks[what].append(now)
            await asyncio.sleep(0.25)
    heard = await _presence(pool, since)
    return {
        "hub_ready": hub_ready,
        **marks,
        "heard_at_end": f"{heard['desktops_heard']}/{DESKTOPS} Desktops, "
        f"{heard['gateways_heard']}/{GATEWAYS} Gateways",
    }


async def _statuses(loads: list[FleetLoad]) -> list[dict]:
    return await asyncio.gather(*(x.ask("status") for x in loads))


async def _loads_cpu(loads: list[FleetLoad]) -> float:
    return sum(s["cpuSeconds"] for s in await asyncio.gather(*(x.ask("status") for x in loads)))


async def _eq(value, expected) -> bool:
    return await value == expected


async def _all_online(pool: asyncpg.Pool) -> bool:
    now = await _presence(pool)
    return now["online"] == DESKTOPS and now["active"] == GATEWAYS


async def _heard_since(pool: asyncpg.Pool, since: float) -> bool:
    now = await _presence(pool, since)
    return now["desktops_heard"] == DESKTOPS and now["gateways_heard"] == GATEWAYS


def _phase(what: str) -> None:
    """A progress line as each phase starts (a 10,000-edge run takes minutes per phase),
    with the machine's load then."""
    print(
        f"\n[{time.strftime('%H:%M:%S')}] {what}; 1-minute load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def _ms(samples: list[float]) -> str:
    return (
        f"p50 {1000 * statistics.median(samples):.1f} ms, "
        f"p99 {1000 * _pct(0.99, samples):.1f} ms, max {1000 * max(samples):.1f} ms"
    )


def _print_restart(restart: dict, flaps: int | None) -> None:
    def marks(times: list[float]) -> str:
        reached = "/".join(f"{t:.1f}" for t in times)
        return f"{reached} s" if len(times) == 3 else f"{reached or 'none'} (not all in 120 s)"

    ready = restart["hub_ready"]
    print(
        f"  nats-server restart: hub ready in {ready if ready is not None else float('nan'):.1f} s;"
        f" edges connected 50/90/100% at {marks(restart['connected'])}; heard from at the hub"
        f" 50/90/100% at {marks(restart['heard'])}; flaps meanwhile {flaps}; 1-minute load"
        f" average {restart.get('load_avg', float('nan')):.1f}; heard at the end of the timeline"
        f" {restart.get('heard_at_end')}"
    )


def _print(r: dict) -> None:
    if "cpu_pct" not in r:
        print(f"\nFleet: stopped before the steady window: {r}")
        return
    ages = [s["age_p99"] or 0.0 for s in r["presence"]]
    cpu, rss = r["cpu_pct"], r["rss_mib"]
    print(
        f"\nFleet: {r['desktops']} Desktops + {r['gateways']} Gateways, {psutil.cpu_count()} CPUs"
    )
    print(
        f"  pairing: {r['create_s']:.1f} s creating codes/registrations, {r['redeem_s']:.1f} s "
        f"redeeming/registering: {r['pairing_rate']:.0f} edges per second end to end"
    )
    print(
        f"  fleet connected in {r['connect_s']:.1f} s, all online at the hub in {r['online_s']:.1f} s"
        f" (1-minute load average {r['load_avg_connect']:.1f})"
    )
    for n, ran in enumerate(r["connect_loads"], 1):
        timings = "/".join(f"{t:.1f}" for t in ran["agentSeconds"])
        print(
            f"    load {n}: {ran['connected']} agents, each connected at p50/p90/max {timings} s,"
            f" failed first-connect attempts {ran['retries'] or 0}, CPU {ran['cpuSeconds']:.0f} s"
        )
    print(
        f"  steady window {r['window_s']:.0f} s: CPU (% of one core) hub {cpu['hub']:.1f}, "
        f"PostgreSQL {cpu['pg']:.1f}, NATS {cpu['nats']:.1f}, load processes "
        f"{r['loads_cpu_pct']:.1f}; RSS MiB hub {rss['hub']:.0f}, NATS {rss['nats']:.0f}, "
        f"PostgreSQL {rss['pg']:.0f} (summed over backends); load processes per 1,000 agents "
        f"{1000 * r['loads_cpu_pct'] / (r['desktops'] + r['gateways']):.2f}% of a core; "
        f"1-minute load average {r['load_avg_window']:.1f}"
    )
    print(
        f"  presence: online min {min(s['online'] for s in r['presence'])}/{r['desktops']}, "
        f"Gateways active min {min(s['active'] for s in r['presence'])}/{r['gateways']}, "
        f"newest-stamp age p99 {max(ages):.2f} s (interval {DESKTOP_HEARTBEAT:g} s), "
        f"late beats {r['late']}, flaps {r['flaps']}"
    )
    print(f"  command round trip idle: {_ms(r['cmd_idle'])}")
    print(f"  command round trip under the fleet: {_ms(r['cmd_load'])}")
    for listing in r["listing"]:
        print(
            f"  listing the fleet: {listing['pairings']} pairings + {listing['gateways']} "
            f"Gateways in {listing['pages']} pages, {listing['seconds']:.2f} s; shown online "
            f"{listing['pairings_online']} + {listing['gateways_online']}"
        )
    restart = r.get("restart")
    if restart is None:
        print("  nats-server restart: not run")
    else:
        _print_restart(restart, r.get("restart_flaps"))
    if "soak" in r:
        print(f"  soak: {r['soak']}")
    online = min(s["online"] for s in r["presence"])
    print(
        f"fleet: desktops={r['desktops']} gateways={r['gateways']} "
        f"hub_cpu_pct={cpu['hub']:.1f} pg_cpu_pct={cpu['pg']:.1f} "
        f"cmd_p99_ms={1000 * _pct(0.99, r['cmd_load']):.1f} online={online}/{r['desktops']}"
    )
