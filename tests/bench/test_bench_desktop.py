"""Benchmarks of the paired-Desktop paths, each against a raw nats-py baseline.

Run with `make bench` or `.venv/bin/pytest -m bench -s tests/bench/test_bench_desktop.py`
(the default test run deselects the `bench` marker, see pyproject addopts).
Results are printed as tables; see docs/performance.md for how to read them.

Everything is real: operator-mode nats-server with JetStream, PostgreSQL, the hub,
`opencode serve` (fake model) and the Desktop agent. The command round trip runs
its Desktop in its own process (tests/bench/command_desktop.py), which times
OpenCode's part of each command and reports it back per command id; the relay
throughput bench runs its Desktop in a process of its own too
(tests/bench/relay_load.py), so that its redaction and outbox do not share the hub
projector's event loop; the live latency bench drives its relay from this process.
Every baseline runs in the same pytest session against the same nats-server, so
the ratios compare like with like. Assertions check completeness (every command
done, every event projected once and in order, every live event seen); the ones
on timing are the command path overhead (issue 17: p50 <= 5 ms, p99 <= 15 ms) and
the relay end to end (at least 0.3x raw JetStream publishing), asserted only when
the run found the machine quiet, or with BENCH_STRICT=1.

Sizes can be changed through the environment:
    BENCH_COMMANDS (200), BENCH_COMMANDS_POLLED (50), BENCH_RR (1000),
    BENCH_RELAY_EVENTS (20000), BENCH_BACKLOG_EVENTS (5000), BENCH_LIVE_EVENTS (300)
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import psutil
import pytest
from desktopkit import (
    TENANT,
    eventually,
    pair_and_start,
    redeem,
    sse,
    submit,
    wait_online,
)
from hubkit import client
from nats.js.api import StorageType, StreamConfig
from relay_load import delta_event
from test_bench_fleet import FleetLoad
from test_bench_replicas import _cpu, _listener, _postmaster, _tree_cpu

pytestmark = [pytest.mark.bench, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def hub_options() -> dict:
    """One Desktop relays far above its default projection rate here (the bench
    measures the pipeline, not the per-Desktop quota): lift the rate."""
    return {"event_rate_per_desktop": 1e6, "event_burst_per_desktop": 1e6}


N_COMMANDS = int(os.environ.get("BENCH_COMMANDS", "200"))
N_COMMANDS_POLLED = int(os.environ.get("BENCH_COMMANDS_POLLED", "50"))
N_RR = int(os.environ.get("BENCH_RR", "1000"))
N_RELAY = int(os.environ.get("BENCH_RELAY_EVENTS", "20000"))
N_LIVE = int(os.environ.get("BENCH_LIVE_EVENTS", "300"))
N_BACKLOG = int(os.environ.get("BENCH_BACKLOG_EVENTS", "5000"))
RELAY_CHUNK = 100  # events queued per loop turn, as a busy OpenCode stream would
RAW_STREAM = "BENCH_RAW"
RAW_SUBJECT = "cw.bench.raw.{}"  # 4 tokens: overlaps none of the hub's stream subjects
RELAY_LOAD = Path(__file__).with_name("relay_load.py")


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def pct(samples: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of samples."""
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def ms(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50": pct(samples, 50) * 1e3,
        "p99": pct(samples, 99) * 1e3,
        "mean": statistics.fmean(samples) * 1e3,
        "max": max(samples) * 1e3,
    }


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    cells = [header] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(header))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    print(f"\n{title}\n{line}")
    for i, row in enumerate(cells):
        print(
            "| "
            + " | ".join(
                str(c).ljust(w) if j == 0 else str(c).rjust(w)
                for j, (c, w) in enumerate(zip(row, widths))
            )
            + " |"
        )
        if i == 0:
            print(line)
    print(line)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def latency_row(name: str, samples: list[float]) -> list[Any]:
    s = ms(samples)
    return [name, s["n"], s["p50"], s["p99"], s["mean"], s["max"]]


LATENCY_HEADER = ["path", "n", "p50 ms", "p99 ms", "mean ms", "max ms"]


# --------------------------------------------------------------------------
# Fixtures: one hub, one OpenCode, one paired Desktop for the whole module
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def http(hub):  # module-wide, for the module-wide Desktop
    async with client(hub, admin=True) as http:
        yield http


@pytest.fixture(scope="module")
async def desktop(hub, http, opencode, operator_nats_url, tmp_path_factory):
    state = tmp_path_factory.mktemp("bench-desktop")
    running = await pair_and_start(http, operator_nats_url, state, opencode.url)
    yield running
    if not running.task.done():
        await running.stop()


COMMAND_DESKTOP = Path(__file__).with_name("command_desktop.py")
COMMAND_CLIENT = Path(__file__).with_name("command_client.py")


class DesktopProcess:
    """tests/bench/command_desktop.py (or `script`, e.g. the bench's HTTP client,
    tests/bench/command_client.py) as a child process of this test (ours to stop)."""

    def __init__(self, process: asyncio.subprocess.Process, pairing_id: str) -> None:
        self.process, self.pairing_id = process, pairing_id
        self.hello: dict = {}  # its first answer (`ready`, and the Desktop's event loop)

    @classmethod
    async def start(
        cls, spec: dict, pairing_id: str, script: Path = COMMAND_DESKTOP
    ) -> DesktopProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**24,  # the marks of a whole run are one line
        )
        running = cls(process, pairing_id)
        try:
            running.hello = await running.ask(json.dumps(spec), 30)
            assert running.hello.get("ready"), running.hello
        except BaseException:
            await running.kill()
            raise
        return running

    async def ask(self, line: str, timeout: float = 30) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()
        answer = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        assert answer, f"the Desktop process ended (exit {self.process.returncode})"
        return json.loads(answer)

    async def stop(self) -> None:
        try:
            await self.ask("stop", 20)
            await asyncio.wait_for(self.process.wait(), 10)
        finally:
            await self.kill()

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture(scope="module")
async def desktop_process(hub, http, opencode, operator_nats_url, tmp_path_factory):
    """A paired Desktop in its own process, online at the hub."""
    state = tmp_path_factory.mktemp("bench-desktop-process")
    created, _ = await redeem(http, operator_nats_url, state)
    running = await DesktopProcess.start(
        {"stateDir": str(state), "opencodeUrl": opencode.url}, created["pairingId"]
    )
    try:
        await wait_online(http, running.pairing_id)
        yield running
    finally:
        await running.stop()


@pytest.fixture(scope="module")
async def peer(hub):
    """A second connection with the hub's own permissions (same account, same server):
    the other end of every raw baseline."""
    from hub.auth import _jwt
    from hub.auth._permissions import HUB_INBOX_PREFIX, HUB_PERMISSIONS

    seed = _jwt.new_seed("user")
    user_jwt, _ = hub.keys.mint_user(
        _jwt.public_key(seed),
        name="bench-peer",
        pub_allow=list(HUB_PERMISSIONS.pub_allow),
        sub_allow=list(HUB_PERMISSIONS.sub_allow),
        allow_responses=True,
        ttl_seconds=None,
    )
    nc = await nats.connect(
        hub.settings.nats_servers[0],
        name="bench-peer",
        inbox_prefix=HUB_INBOX_PREFIX,
        allow_reconnect=False,
        **_jwt.nats_auth_options(user_jwt, seed),
    )
    yield nc
    await nc.close()


# --------------------------------------------------------------------------
# 1. Command round trip
# --------------------------------------------------------------------------


def _timed(
    record: dict[str, dict[str, float]],
    key: str,
    fn: Callable[..., Awaitable[Any]],
    command_id: Callable[[tuple, Any], str],
) -> Callable[..., Awaitable[Any]]:
    """Wrap an instance's coroutine method; record[command id][key + ".start"/".end"]."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = await fn(*args, **kwargs)
        marks = record.setdefault(command_id(args, result), {})
        marks[key + ".start"], marks[key + ".end"] = start, time.perf_counter()
        return result

    return wrapper


async def _raw_request_reply(hub, peer, n: int) -> list[float]:
    """Plain nats-py request/reply: `peer` asks, the hub's own connection answers."""
    subject = "cw.bench.rr"

    async def respond(msg):
        await msg.respond(msg.data)

    sub = await hub.nc.subscribe(subject, cb=respond)
    await hub.nc.flush()
    body = b"x" * 512  # about a command envelope
    try:
        for _ in range(100):  # on a loaded machine the interest may reach `peer` late
            try:
                await peer.request(subject, body, timeout=5)
                break
            except nats.errors.NoRespondersError:
                await asyncio.sleep(0.05)
        for _ in range(50):  # warm-up
            await peer.request(subject, body, timeout=5)
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            reply = await peer.request(subject, body, timeout=5)
            samples.append(time.perf_counter() - t0)
            assert reply.data == body
        return samples
    finally:
        await sub.unsubscribe()


# Command path overhead (round trip minus OpenCode's own time), issue 17: asserted
# when the run's raw baselines say the machine was quiet (or with BENCH_STRICT=1).
OVERHEAD_P50_MS, OVERHEAD_P99_MS = 5.0, 15.0
# Quiet: the run's raw request/reply and commit are at their idle speed, and the
# machine's 1-minute load (this bench alone makes about 1.5) leaves a core free.
QUIET_RR_P50_MS, QUIET_PG_P50_MS = 0.6, 1.0
QUIET_LOAD_PER_CPU = 1.25


async def _commands(
    http, pid: str, n: int, path: str
) -> tuple[list[float], dict[str, tuple[float, float]]]:
    """n sequential `status` commands; `path`: "wait" (POST ?wait), "get-wait" (POST,
    then GET ?wait) or "poll" (POST, then GET without a pause until done)."""
    base = f"/api/v1/tenants/{TENANT}/pairings/{pid}/commands"
    samples: list[float] = []
    spans: dict[str, tuple[float, float]] = {}  # command id -> (sent, answered)
    for _ in range(n):
        t0 = time.perf_counter()
        if path == "wait":
            r = await http.post(base, params={"wait": 20}, json={"kind": "status"})
            assert r.status_code == 201, r.text
            view = r.json()
        else:
            cid = (await submit(http, pid, "status"))["commandId"]
            while True:
                params = {"wait": 20} if path == "get-wait" else {}
                view = (await http.get(f"{base}/{cid}", params=params)).json()
                if view["state"] == "done" or time.perf_counter() - t0 > 20:
                    break
        t1 = time.perf_counter()
        assert view["state"] == "done" and view["status"] == "completed", view
        samples.append(t1 - t0)
        spans[view["commandId"]] = (t0, t1)
    return samples, spans


async def test_bench_command_round_trip(hub, http, desktop_process, peer, opencode):
    pid = desktop_process.pairing_id
    marks: dict[str, dict[str, float]] = {}

    # Probes on the hub's instance (the class stays untouched), keyed by command id;
    # the Desktop's stages come from its own process (`marks`), on the same clock.
    hub.commands.submit = _timed(
        marks, "submit", hub.commands.submit, lambda args, result: result["command_id"]
    )
    hub.commands._announce_final = _timed(
        marks, "final", hub.commands._announce_final, lambda args, result: args[1]["command_id"]
    )
    hub.commands.record_ack = _timed(
        marks,
        "record",
        hub.commands.record_ack,
        lambda args, result: f"{args[2].command_id}.{args[2].outcome}",
    )
    # The client, a load generator like the Desktop, runs in its own process too: its
    # HTTP work is not the hub's (tests/bench/command_client.py).
    spec = {
        "url": hub.http_url,
        "token": hub.test_admin_token,
        "path": f"/api/v1/tenants/{TENANT}/pairings/{pid}/commands",
    }
    client_process = await DesktopProcess.start(spec, pid, COMMAND_CLIENT)
    try:
        warm = await client_process.ask(json.dumps({"n": 10}), 120)  # connections, caches
        assert "spans" in warm, warm
        await desktop_process.ask("marks")  # (the warm-up's, forgotten)
        idle = await _work_counts(hub)  # what the hub does with no command, per second
        await asyncio.sleep(IDLE_WINDOW)
        idle = _per(idle, await _work_counts(hub), IDLE_WINDOW)
        before = await _work_counts(hub)
        desktop_cpu = (await desktop_process.ask("cpu"))["cpuSeconds"]
        t_all, cpu_all = time.perf_counter(), time.process_time()
        run = await client_process.ask(json.dumps({"n": N_COMMANDS}), 600)
        wall, cpu = time.perf_counter() - t_all, time.process_time() - cpu_all
        work = await _work_counts(hub)
        desktop_cpu = (await desktop_process.ask("cpu"))["cpuSeconds"] - desktop_cpu
        # The client's bare HTTP round trip to the hub, from its own process and
        # connection: the part of each command's round trip no hub change can remove.
        raw_http = (await client_process.ask(json.dumps({"raw": N_COMMANDS}), 120))["samples"]
    finally:
        del hub.commands.submit, hub.commands._announce_final, hub.commands.record_ack
        await client_process.stop()
    assert "spans" in run, run
    assert all(status == "completed" for _, _, _, status in run["spans"]), run["spans"]
    spans = {cid: (t0, t1) for cid, t0, t1, _ in run["spans"]}
    total = [t1 - t0 for t0, t1 in spans.values()]
    client_cpu = run["cpuSeconds"]
    for cid, stages in (await desktop_process.ask("marks")).items():
        marks.setdefault(cid, {}).update(stages)
    posted = {cid: span[0] for cid, span in spans.items()}
    ends = {cid: span[1] for cid, span in spans.items()}
    get_waited, _ = await _commands(http, pid, N_COMMANDS_POLLED, "get-wait")
    polled, _ = await _commands(http, pid, N_COMMANDS_POLLED, "poll")

    rows = await hub.pool.fetch(
        "SELECT state, result_status FROM pairing_commands WHERE tenant = $1 AND pairing_id = $2",
        TENANT,
        pid,
    )
    assert len(rows) == 10 + N_COMMANDS + 2 * N_COMMANDS_POLLED
    assert all(r["state"] == "done" and r["result_status"] == "completed" for r in rows)
    probes = {"desktop.end", "execute.end", "submit.end", "final.end", "ack.completed.end"}
    assert all(probes <= marks[cid].keys() for cid in posted), "every probe saw every command"

    raw_rr = await _raw_request_reply(hub, peer, N_RR)
    raw_pg = await _raw_pg_commit(hub, N_COMMANDS)
    from edges.common._opencode import OpenCodeClient

    oc = OpenCodeClient(opencode.url)  # a fresh client on the same server
    raw_oc = []
    try:
        for _ in range(N_COMMANDS):
            t0 = time.perf_counter()
            await oc.health()
            await oc.session_status()
            await oc.list_sessions(limit=50)
            raw_oc.append(time.perf_counter() - t0)
    finally:
        await oc.aclose()

    ids = list(posted)
    m = {cid: marks[cid] for cid in ids}

    def seg(start: Callable[[str], float], end: Callable[[str], float]) -> list[float]:
        return [end(cid) - start(cid) for cid in ids]

    def at(key: str) -> Callable[[str], float]:
        return lambda c: m[c][key]

    execute = seg(at("execute.start"), at("execute.end"))
    overhead = [t - e for t, e in zip(seg(posted.get, ends.get), execute)]
    segments = {
        "POST sent -> submit starts (HTTP, validation)": seg(posted.get, at("submit.start")),
        "CommandService.submit (allowlists, insert, lease, push)": seg(
            at("submit.start"), at("submit.end")
        ),
        "push -> Desktop handles it (NATS, decode, queue)": seg(
            at("submit.end"), at("desktop.start")
        ),
        "handle -> execute (journal checks, journal 'started')": seg(
            at("desktop.start"), at("execute.start")
        ),
        "execute: status on OpenCode (3 HTTP calls) [not overhead]": execute,
        "execute done -> final ack sent (journal 'done', accept answered)": seg(
            at("execute.end"), at("ack.completed.start")
        ),
        "final ack sent -> committed at the hub": seg(at("ack.completed.start"), at("final.start")),
        "  of which on the bus (to the handler)": seg(
            at("ack.completed.start"), lambda c: marks[f"{c}.completed"]["record.start"]
        ),
        "  of which record_ack (PostgreSQL)": seg(
            lambda c: marks[f"{c}.completed"]["record.start"],
            lambda c: marks[f"{c}.completed"]["record.end"],
        ),
        "committed at the hub -> client has the answer": seg(at("final.start"), ends.get),
    }
    # A command done within ACCEPT_AFTER sends no `accepted` ack (its final implies it).
    accepts = [
        m[c]["ack.accepted.end"] - m[c]["ack.accepted.start"]
        for c in ids
        if "ack.accepted.start" in m[c]
    ]
    if accepts:
        segments["(beside the command) 'accepted' ack round trip"] = accepts
    print(f"commands that sent an 'accepted' ack of their own: {len(accepts)} of {len(ids)}")
    print(f"the Desktop process's event loop: {desktop_process.hello.get('loop', 'asyncio')}")
    table(
        f"1. Command round trip, kind=status, {N_COMMANDS} sequential commands",
        LATENCY_HEADER,
        [
            latency_row("POST ?wait -> done (client)", total),
            latency_row("OVERHEAD: round trip - OpenCode time", overhead),
            latency_row("POST, then GET ?wait -> done", get_waited),
            latency_row("POST, then polling GET -> done", polled),
        ]
        + [latency_row("  " + k, v) for k, v in segments.items()]
        + [
            latency_row("baseline: raw NATS request/reply", raw_rr),
            latency_row("baseline: raw OpenCode 3 calls", raw_oc),
            latency_row("baseline: raw PostgreSQL 1-row INSERT commit", raw_pg),
            latency_row("baseline: raw HTTP GET /healthz, the client's process", raw_http),
        ],
    )
    table(
        "1. Ratios",
        ["ratio", "p50", "p99"],
        [
            [
                "command round trip / raw OpenCode status",
                f"{pct(total, 50) / pct(raw_oc, 50):.1f}x",
                f"{pct(total, 99) / pct(raw_oc, 99):.1f}x",
            ],
            [
                "overhead / raw request-reply",
                f"{pct(overhead, 50) / pct(raw_rr, 50):.1f}x",
                f"{pct(overhead, 99) / pct(raw_rr, 99):.1f}x",
            ],
        ],
    )
    print(
        f"throughput: {N_COMMANDS / wall:.0f} commands/s sequential (one Desktop); CPU per "
        f"command: this process (the hub) {cpu / N_COMMANDS * 1e3:.2f} ms, the client's "
        f"{client_cpu / N_COMMANDS * 1e3:.2f} ms, the Desktop's "
        f"{desktop_cpu / N_COMMANDS * 1e3:.2f} ms; load average {os.getloadavg()[0]:.2f}"
    )
    # Durability before the ack: every commit on the path waits for its WAL flush.
    assert await hub.pool.fetchval("SHOW synchronous_commit") == "on"
    per = {k: (work[k] - before[k] - idle[k] * wall) / N_COMMANDS for k in work}
    print(
        "work per command, less the idle rate ("
        + ", ".join(f"{k} {v:.1f}/s" for k, v in idle.items())
        + "): "
        + ", ".join(f"{k} {v:.2f}" for k, v in per.items())
    )
    p50, p99 = pct(overhead, 50) * 1e3, pct(overhead, 99) * 1e3
    rr50, pg50 = pct(raw_rr, 50) * 1e3, pct(raw_pg, 50) * 1e3
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    quiet = rr50 <= QUIET_RR_P50_MS and pg50 <= QUIET_PG_P50_MS and load <= QUIET_LOAD_PER_CPU
    verdict = (
        f"command overhead p50 {p50:.2f} ms (target {OVERHEAD_P50_MS}), p99 {p99:.2f} ms "
        f"(target {OVERHEAD_P99_MS}); machine {'quiet' if quiet else 'busy'} "
        f"(raw request/reply p50 {rr50:.2f} ms, raw commit p50 {pg50:.2f} ms, "
        f"load {load:.2f} per CPU)"
    )
    print(verdict)
    if quiet or os.environ.get("BENCH_STRICT") == "1":
        assert p50 <= OVERHEAD_P50_MS and p99 <= OVERHEAD_P99_MS, verdict
    else:
        print("command overhead target NOT ASSERTED: the raw baselines say the machine was busy")


IDLE_WINDOW = 5.0  # seconds the hub is watched with no command, for its idle rates


async def _work_counts(hub) -> dict[str, float]:
    """Counters of the work on the command path: PostgreSQL commits and the time its
    sessions spent running statements, commits' WAL flushes included (the whole
    database, as pg_stat_database counts them; its statistics lag by up to a
    second), the scans of channel_submissions (the channel router's read after a
    final), and the NATS messages the hub's connection sent and received."""
    db = await hub.pool.fetchrow(
        "SELECT xact_commit, active_time, (SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) "
        "FROM pg_stat_user_tables WHERE relname = 'channel_submissions') AS router_reads "
        "FROM pg_stat_database WHERE datname = current_database()"
    )
    stats = hub.nc.stats
    return {
        "PostgreSQL commits": float(db["xact_commit"]),
        "PostgreSQL active ms": float(db["active_time"]),
        "channel_submissions reads": float(db["router_reads"]),
        "hub NATS messages out": float(stats["out_msgs"]),
        "hub NATS messages in": float(stats["in_msgs"]),
    }


def _per(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    return {k: (after[k] - before[k]) / seconds for k in after}


async def _raw_pg_commit(hub, n: int) -> list[float]:
    """One autocommitted single-row INSERT through the hub's pool: the price of a commit."""
    await hub.pool.execute(
        "CREATE TABLE IF NOT EXISTS bench_commit (id bigserial PRIMARY KEY, v text)"
    )
    samples = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await hub.pool.execute("INSERT INTO bench_commit (v) VALUES ($1)", "x" * 200)
            samples.append(time.perf_counter() - t0)
    finally:
        await hub.pool.execute("DROP TABLE bench_commit")
    return samples


# --------------------------------------------------------------------------
# 2. Relay throughput
# --------------------------------------------------------------------------


async def _cursor(hub, pid: str) -> int:
    return (
        await hub.pool.fetchval(
            "SELECT last_sequence FROM workspace_cursors WHERE tenant = $1 AND workspace_id = $2",
            TENANT,
            pid,
        )
        or 0
    )


async def _raw_jetstream(peer, sizes: int, n: int, batch: int) -> float:
    """Seconds to publish n messages of `sizes` bytes into a FILE stream, `batch` acks
    awaited together with message ids, as the relay does."""
    js = peer.jetstream(timeout=5.0)
    await js.add_stream(
        StreamConfig(
            name=RAW_STREAM,
            subjects=[RAW_SUBJECT.format("*")],
            storage=StorageType.FILE,
            duplicate_window=120.0,
            max_msg_size=1024 * 1024,
        )
    )
    try:
        data = b"x" * sizes
        subject = RAW_SUBJECT.format("session")
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            futures = [
                await js.publish_async(subject, data, headers={"Nats-Msg-Id": f"raw-{i}"})
                for i in range(start, min(n, start + batch))
            ]
            await asyncio.wait_for(asyncio.gather(*futures), 30)
        elapsed = time.perf_counter() - t0
        info = await js.stream_info(RAW_STREAM)
        assert info.state.messages == n
        return elapsed
    finally:
        await js.delete_stream(RAW_STREAM)


class _ProjectorProbe:
    """Counts the hub projector's batches and the time they spend in PostgreSQL, by
    wrapping the projector instance's `_project` (the class stays untouched)."""

    def __init__(self, projector) -> None:
        self.projector = projector
        self.calls, self.events, self.seconds = 0, 0, 0.0
        self.ends: list[float] = []  # time.monotonic() at each commit
        self.durations: list[float] = []
        inner = projector._project

        async def probe(fence, new):
            t0 = time.perf_counter()
            try:
                return await inner(fence, new)
            finally:
                self.durations.append(time.perf_counter() - t0)
                self.seconds += self.durations[-1]
                self.calls += 1
                self.events += len(new)
                self.ends.append(time.monotonic())

        projector._project = probe

    def close(self) -> None:
        del self.projector._project


async def _projected(hub, pid: str, n: int, base_cursor: int) -> float:
    """perf_counter() when the workspace cursor has moved n further (committed in
    PostgreSQL); polled every 5 ms."""
    while await _cursor(hub, pid) - base_cursor < n:
        await asyncio.sleep(0.005)
    return time.perf_counter()


class RelayLoad(FleetLoad):
    """tests/bench/relay_load.py: the product's Desktop agent in a process of its own."""

    script = RELAY_LOAD

    async def command(self, op: str, timeout: float = 300, **args: Any) -> dict:
        return await self.ask(json.dumps({"op": op, **args}), timeout)


# Relay end to end vs raw JetStream publishing (issue 17): asserted when the run's
# raw baseline and the load average say the machine was quiet (or BENCH_STRICT=1).
RELAY_RATIO = 0.3
QUIET_RAW_JS_RATE = 15_000  # msgs/s; about 24,000 on the quiet 2-vCPU VM, 6,000 when busy


async def test_bench_relay_throughput(hub, http, opencode, operator_nats_url, peer, tmp_path):
    state = tmp_path / "relay-desktop"
    created, _ = await redeem(http, operator_nats_url, state)
    pid = created["pairingId"]
    load = await RelayLoad.start({"stateDir": str(state), "opencodeUrl": opencode.url})
    try:
        await wait_online(http, pid)
        await _relay_throughput(hub, pid, load, peer)
        await load.command("stop", 30)
    finally:
        await load.kill()


class _Cpu:
    """CPU seconds of the Desktop's process, this one (the hub), nats-server and
    PostgreSQL (server and backends): what a stage costs whatever the machine's load."""

    def __init__(self, desktop: int, nats_pid: int, postmaster: psutil.Process) -> None:
        self.desktop, self.nats = psutil.Process(desktop), psutil.Process(nats_pid)
        self.hub, self.postmaster = psutil.Process(), postmaster

    def sample(self) -> dict[str, float]:
        return {
            "desktop": _cpu(self.desktop),
            "hub": _cpu(self.hub),
            "nats": _cpu(self.nats),
            "pg": _tree_cpu(self.postmaster),
        }

    @staticmethod
    def per_event(before: dict, after: dict, n: int) -> dict[str, float]:
        """Microseconds of CPU per event, by process."""
        return {k: (after[k] - before[k]) / n * 1e6 for k in before}


async def _relay_throughput(hub, pid: str, load: RelayLoad, peer) -> None:
    session = "ses_benchrelay0000000001"
    cpu = _Cpu(
        load.process.pid, _listener(hub.settings.nats_servers[0]), await _postmaster(hub.pool)
    )

    # (a) Live relay: the Desktop (its own process) queues events while its publisher
    # drains and the hub projects.
    probe = _ProjectorProbe(hub.projector)
    try:
        await load.command("live", n=1000, session="ses_benchwarmup000000001", chunk=RELAY_CHUNK)
        await _projected(hub, pid, 1000, 0)  # warm-up: connections, statements, caches
        # The raw baseline runs before and after the relay, and the relay is compared
        # with the better one: a pause of this process (a garbage collector's full
        # pass) or a busy core in one raw run must not make the ratio look better.
        size = await _stored_envelope_size(peer, f"cw.{TENANT}.device.{pid}.evt.session")
        raw_before = await _raw_jetstream(peer, size, N_RELAY, 1000)
        base_cursor = await _cursor(hub, pid)
        probe.calls = probe.events = 0
        probe.seconds = 0.0
        watcher = asyncio.create_task(_projected(hub, pid, N_RELAY, base_cursor))
        cpu_before = cpu.sample()
        live = await load.command("live", n=N_RELAY, session=session, chunk=RELAY_CHUNK)
        projected_at = await asyncio.wait_for(watcher, 120)
        live_cpu = _Cpu.per_event(cpu_before, cpu.sample(), N_RELAY)
        live_probe = (probe.calls, probe.events, probe.seconds)
    finally:
        probe.close()
    t0 = live["t0"]
    count = await eventually(
        lambda: _count(hub, pid, session, N_RELAY), 30, what="every relayed event in PostgreSQL"
    )
    assert count == N_RELAY
    await _assert_in_order(hub, pid, session, N_RELAY)
    stored = await hub.pool.fetchval(
        "SELECT octet_length(payload::text) FROM workspace_events WHERE tenant = $1 AND "
        "workspace_id = $2 AND session_id = $3 LIMIT 1",
        TENANT,
        pid,
        session,
    )
    assert size == await _stored_envelope_size(peer, f"cw.{TENANT}.device.{pid}.evt.session"), (
        "the raw baseline's messages are the size of the relayed envelopes"
    )

    # (b) Hub unreachable: the publisher is detached (as when NATS is away), so the
    # outbox grows; then reattached, the backlog drains and is projected.
    backlog = N_BACKLOG
    backlog_session = "ses_benchbacklog00000001"
    outage = await load.command("outage", n=backlog, session=backlog_session)
    assert outage["outbox"] == backlog
    chunk_rates = outage["chunkRates"]
    base_cursor = await _cursor(hub, pid)
    watcher = asyncio.create_task(_projected(hub, pid, backlog, base_cursor))
    catch_up = await load.command("reattach", n=backlog)
    caught_up_at = await asyncio.wait_for(watcher, 120)
    d0 = catch_up["t0"]
    assert await eventually(lambda: _count(hub, pid, backlog_session, backlog), 30) == backlog

    cpu_before = cpu.sample()
    raw_elapsed = await _raw_jetstream(peer, size, N_RELAY, 1000)
    raw_cpu = _Cpu.per_event(cpu_before, cpu.sample(), N_RELAY)
    raw_rate = N_RELAY / min(raw_before, raw_elapsed)
    load_avg = os.getloadavg()[0]

    def row(stage: str, n: int, seconds: float) -> list[Any]:
        return [stage, n / seconds, seconds, f"{n / seconds / raw_rate:.2f}x"]

    table(
        f"2. Relay throughput, {N_RELAY:,} events, {size} B envelopes ({stored} B payload "
        f"as stored); the Desktop in its own process",
        ["stage", "events/s", "seconds", "vs raw JetStream"],
        [
            row("live: queued (redact + envelope + SQLite outbox)", N_RELAY, live["queued"] - t0),
            row("live: relayed (outbox -> JetStream acked)", N_RELAY, live["relayed"] - t0),
            row("live: end to end (projected into PostgreSQL)", N_RELAY, projected_at - t0),
            row("outage: queued, outbox 0 -> 1,000", 1000, 1000 / chunk_rates[0]),
            row(
                f"outage: queued, outbox {backlog - 1000:,} -> {backlog:,}",
                1000,
                1000 / chunk_rates[-1],
            ),
            row(
                f"catch-up: {backlog:,} backlog -> JetStream acked",
                backlog,
                catch_up["relayed"] - d0,
            ),
            row(f"catch-up: {backlog:,} backlog -> projected", backlog, caught_up_at - d0),
            row("baseline: raw js.publish_async, 1000 a batch (before)", N_RELAY, raw_before),
            row("baseline: raw js.publish_async, 1000 a batch (after)", N_RELAY, raw_elapsed),
        ],
    )
    calls, events, seconds = live_probe
    print(
        f"hub projector during the live run: {calls} PostgreSQL transactions, "
        f"{events / max(calls, 1):.0f} events each on average, {seconds:.2f} s inside them "
        f"({seconds / (projected_at - t0):.0%} of the end-to-end time)"
    )
    table(
        "2. CPU per event (microseconds; the pipeline's processes share the machine's cores)",
        ["", "Desktop", "hub (this process)", "nats-server", "PostgreSQL", "total"],
        [
            ["live relay, end to end"]
            + [round(live_cpu[k], 1) for k in ("desktop", "hub", "nats", "pg")]
            + [round(sum(live_cpu.values()), 1)],
            ["raw js.publish_async (after)"]
            + [round(raw_cpu[k], 1) for k in ("desktop", "hub", "nats", "pg")]
            + [round(sum(raw_cpu.values()), 1)],
        ],
    )
    ratio = N_RELAY / (projected_at - t0) / raw_rate
    per_cpu = load_avg / (os.cpu_count() or 1)
    quiet = raw_rate >= QUIET_RAW_JS_RATE and per_cpu <= QUIET_LOAD_PER_CPU
    verdict = (
        f"relay end to end {ratio:.2f}x raw JetStream (target {RELAY_RATIO}x); machine "
        f"{'quiet' if quiet else 'busy'} (raw JetStream {raw_rate:,.0f} msgs/s, "
        f"1-minute load {load_avg:.2f}, {per_cpu:.2f} per CPU)"
    )
    print(verdict)
    if quiet or os.environ.get("BENCH_STRICT") == "1":
        assert ratio >= RELAY_RATIO, verdict
    else:
        print("relay ratio target NOT ASSERTED: the raw baseline says the machine was busy")


async def _assert_in_order(hub, pid: str, session: str, n: int) -> None:
    """The session's events are stored once each, numbered in the order relayed."""
    parts = await hub.pool.fetch(
        "SELECT payload->'properties'->>'partID' AS part FROM workspace_events "
        "WHERE tenant = $1 AND workspace_id = $2 AND session_id = $3 ORDER BY sequence",
        TENANT,
        pid,
        session,
    )
    assert [r["part"] for r in parts] == [f"prt_bench{i:016d}" for i in range(n)]


async def _stored_envelope_size(peer, subject: str) -> int:
    """The size of the last relayed delta stored under `subject` (OpenCode's own
    events, e.g. a session's status, may come after it). A partitioned stream
    (event_partitions > 1) stores it with the partition number appended, so both
    forms are asked for."""
    js = peer.jetstream()
    for stored in (f"{subject}.*", subject):
        try:
            msg = await js.get_last_msg("CW_DEVICE_EVENTS", stored)
        except nats.js.errors.NotFoundError:
            continue
        for seq in range(msg.seq, max(0, msg.seq - 200), -1):
            if seq != msg.seq:
                msg = await js.get_msg("CW_DEVICE_EVENTS", seq)
            if msg.subject.startswith(subject) and b'"message.part.delta"' in msg.data:
                return len(msg.data)
    raise AssertionError(f"no relayed delta stored under {subject}")


async def _count(hub, pid: str, session: str, want: int) -> int | None:
    n = await hub.pool.fetchval(
        "SELECT count(*) FROM workspace_events WHERE tenant = $1 AND "
        "workspace_id = $2 AND session_id = $3",
        TENANT,
        pid,
        session,
    )
    return n if n >= want else None


# --------------------------------------------------------------------------
# 3. Live latency: relayed on the Desktop -> frame on the hub's SSE tail
# --------------------------------------------------------------------------


async def _raw_core_latency(hub, peer, n: int) -> list[float]:
    """One-way core NATS latency hub.nc -> peer, as the projection's live publish."""
    got: asyncio.Queue[float] = asyncio.Queue()

    async def on_msg(msg):
        got.put_nowait(time.perf_counter())

    sub = await peer.subscribe("cw.bench.live", cb=on_msg)
    await peer.flush()
    samples = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await hub.nc.publish("cw.bench.live", b"x" * 600)
            samples.append(await asyncio.wait_for(got.get(), 5) - t0)
    finally:
        await sub.unsubscribe()
    return samples


async def _raw_jetstream_latency(peer, n: int) -> list[float]:
    """Publish one message to a FILE stream, wait for its ack, then pull it with a durable
    consumer: the JetStream part of the live path without the hub's code."""
    js = peer.jetstream(timeout=5.0)
    await js.add_stream(
        StreamConfig(
            name=RAW_STREAM,
            subjects=[RAW_SUBJECT.format("*")],
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    try:
        sub = await js.pull_subscribe(RAW_SUBJECT.format("*"), durable="bench-raw")
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            await js.publish(
                RAW_SUBJECT.format("live"), b"x" * 900, headers={"Nats-Msg-Id": f"live-{i}"}
            )
            msgs = await sub.fetch(batch=1, timeout=5)
            await msgs[0].ack()
            samples.append(time.perf_counter() - t0)
        return samples
    finally:
        await js.delete_stream(RAW_STREAM)


async def test_bench_live_latency(hub, http, desktop, peer):
    pid = desktop.pairing_id
    relay = desktop.agent.relay
    session = "ses_benchlive00000000001"
    await eventually(lambda: desktop.agent.store.outbox_size() == 0, 30, what="an empty outbox")
    start = await _cursor(hub, pid)
    samples: list[float] = []
    to_commit: list[float] = []
    commit_to_sse: list[float] = []
    probe = _ProjectorProbe(hub.projector)
    try:
        async with sse(http, pid, last_event_id=start) as tail:
            for i in range(10 + N_LIVE):
                marker = f"live-{i:06d}"
                seen, commits = len(tail.frames), len(probe.ends)
                t0 = time.monotonic()
                assert relay.relay(delta_event(session, i, marker))
                index = await _wait_frame(tail, seen, marker)
                if i < 10:  # warm-up
                    continue
                arrived = tail.arrival[index]
                committed = next((t for t in probe.ends[commits:] if t >= t0), None)
                samples.append(arrived - t0)
                if committed is not None and committed <= arrived:
                    to_commit.append(committed - t0)
                    commit_to_sse.append(arrived - committed)
        pg = probe.durations[-N_LIVE:]
    finally:
        probe.close()
    raw_core = await _raw_core_latency(hub, peer, N_LIVE)
    raw_js = await _raw_jetstream_latency(peer, min(N_LIVE, 200))
    assert len(samples) == N_LIVE
    table(
        f"3. Live latency: relay.relay() on the Desktop -> frame on the hub SSE tail, "
        f"{N_LIVE} events one at a time",
        LATENCY_HEADER,
        [
            latency_row("Desktop relay -> SSE frame", samples),
            latency_row("  relay -> committed in PostgreSQL", to_commit),
            latency_row("    of which the projection transaction", pg),
            latency_row("  committed -> SSE frame parsed", commit_to_sse),
            latency_row("baseline: raw JetStream publish+ack+pull fetch(1)", raw_js),
            latency_row("baseline: raw core NATS publish -> subscriber", raw_core),
        ],
    )
    table(
        "3. Ratios",
        ["ratio", "p50", "p99"],
        [
            [
                "live latency / raw JetStream publish+pull",
                f"{pct(samples, 50) / pct(raw_js, 50):.1f}x",
                f"{pct(samples, 99) / pct(raw_js, 99):.1f}x",
            ]
        ],
    )


async def _wait_frame(tail, seen: int, marker: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        for index in range(seen, len(tail.frames)):
            frame = tail.frames[index]
            if (frame.get("payload") or {}).get("properties", {}).get("delta") == marker:
                return index
        if time.monotonic() > deadline:
            raise AssertionError(f"{marker} never reached the SSE tail")
        await asyncio.sleep(0.0005)
