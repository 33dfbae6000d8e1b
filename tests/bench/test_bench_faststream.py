"""FastStream against raw nats-py on the hub's bus hot paths, in one run.

The design card named FastStream; the rule was to keep it only if the hub's bus
handlers ran on it within 20% of the raw nats-py pipeline. This measures that
(docs/performance.md, "FastStream vs raw nats-py", records the numbers and the
decision). Run with `make bench` or

    .venv/bin/python -m pytest -m bench -o addopts="-p no:cacheprovider" -s \
        tests/bench/test_bench_faststream.py

Self-contained: its own nats-server (edges.local.NatsServer, the one `cowork
up` runs) on a free loopback port, no PostgreSQL, no hub.

**Request/reply** (the Gateway heartbeat responder's shape, hub/gateways/_bus.py):
a request arrives on `cw.<tenant>.gateway.<registration>.heartbeat`, the
subject is parsed (it names the caller), the envelope is decoded and validated
with the project's pydantic models (`Envelope[GatewayHeartbeat]`), a trivial
handler picks the state, and an `Envelope[GatewayHeartbeatReply]` (correlated to
the request id) is encoded and published to `msg.reply`. Six responders do
that same work, one at a time, in the pytest process:

  raw          nats-py `nc.subscribe(filter, queue=..., cb=...)` + `msg.respond`,
               as the hub does;
  fs-raw       a FastStream NatsBroker (router, subscriber) whose handler takes the
               raw message (`NatsMessage`, FastStream's documented way) and does
               the same decode;
  fs-raw-lean  the same without any FastStream `Context` parameter: an async
               pass-through decoder hands the handler the body bytes, the subject
               is read from `broker.context` inside the handler;
  fs-bare      fs-raw-lean on a broker with `apply_types=False` (no fast-depends
               at all: the handler gets the decoded body as it is). FastStream's
               floor for this work;
  fs-pyd       idiomatic FastStream: the subject's ids as `Path()` parameters, the
               body decoded by FastStream into an `Envelope[GatewayHeartbeat]`
               argument, the reply model returned and serialised by FastStream;
  fs-pyd-lean  the same body decoding and reply, the subject from `broker.context`.

Why the lean variants: FastStream 0.7.8 resolves every `Context()`-based
parameter (`NatsMessage`, `Path()`, `Logger`, ...) through fast-depends 3.0.9,
which calls the field's sync `use` with `run_in_threadpool`: one worker-thread
round trip per such parameter per message. The lean and bare variants show
what is left when a handler avoids that.

The load comes from a separate process (this file run as a script): nats-py
request/reply with BENCH_FS_CONCURRENCY requests in flight (and 1 in flight for
latency), over a warm-up then a measured window bounded in time and count. It
validates every measured reply afterwards (contract decode, correlation id,
state). Reported per variant: requests/s, p50/p99 latency, the responder's CPU
per request (its process CPU time over the requests it answered: the number
that least depends on what else runs on the machine) and the ratio to raw.

**JetStream pull consumer** (the hub's pull_forever shape, hub/core/_background.py):
a stream holds BENCH_FS_JS_MESSAGES `device.event` envelopes; each variant
drains them through its own new durable consumer (fetch a batch, parse the
subject, decode, trivial handler, ack): raw nats-py `pull_subscribe` + `fetch`
+ `msg.ack()`, and FastStream's pull subscriber (default ack after the
handler) in the same five forms as above.

FastStream's broker gets a logger at WARNING, as hub/core/_logging.py sets third-party
loggers: its per-message access log is not written (its default logger would
write two lines per message to stdout). No FastStream middleware
is added: the cheapest FastStream configuration is measured.

The variants take turns in BENCH_FS_ROUNDS rounds; the table shows medians and
the per-round ratio range. Assertions are about completeness and correctness
only (every measured reply correct, every stream message handled once,
non-zero throughput), never about speed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from edges.local import NatsServer
from schemas import (
    DeviceEvent,
    Envelope,
    GatewayHeartbeat,
    GatewayHeartbeatReply,
    Source,
    WorkerState,
    check_tenant,
    check_token,
    decode,
    subjects,
)

ROUNDS = int(os.environ.get("BENCH_FS_ROUNDS", "3"))
SECONDS = float(os.environ.get("BENCH_FS_SECONDS", "4"))
SECONDS_SERIAL = float(os.environ.get("BENCH_FS_SECONDS_SERIAL", "2"))
WARMUP = float(os.environ.get("BENCH_FS_WARMUP", "1"))
CONCURRENCY = int(os.environ.get("BENCH_FS_CONCURRENCY", "32"))
MAX_REQUESTS = int(os.environ.get("BENCH_FS_MAX_REQUESTS", "500000"))
JS_MESSAGES = int(os.environ.get("BENCH_FS_JS_MESSAGES", "10000"))
JS_BATCH = int(os.environ.get("BENCH_FS_JS_BATCH", "100"))

HEARTBEAT = subjects.GATEWAY_HEARTBEAT
DEVICE_EVENT = subjects.DEVICE_EVENT
QUEUE = "hub-gateways"
TENANT, REGISTRATION, DEVICE = "bench", "reg1", "dev1"
STREAM = "CW_BENCH_FASTSTREAM"
HUB = Source(principal_kind="hub", principal_id="hub-bench")
GATEWAY = Source(principal_kind="gateway", principal_id=REGISTRATION)
ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------
# The work every variant does
# --------------------------------------------------------------------------


class Tally:
    """Messages handled by the current responder (the same bump in every variant)."""

    handled = 0
    first_at = 0.0
    last_at = 0.0


def answer(tenant: str, request: Envelope) -> Envelope:
    """The trivial handler: the registration's state from the beat, correlated."""
    beat = request.data
    state = WorkerState.ACTIVE if beat.liveness == "alive" else WorkerState.DRAINING
    Tally.handled += 1
    return Envelope.wrap(
        GatewayHeartbeatReply(state=state), source=HUB, tenant=tenant, correlation_id=request.id
    )


def check_envelope(envelope: Envelope, model: type) -> None:
    """What `schemas.decode` checks beyond validation (fs-pyd validates the model itself)."""
    if envelope.type != model.message_type or envelope.schema_version > model.schema_version:
        raise ValueError(f"not a {model.message_type} v{model.schema_version} envelope")


def consume_event(where: dict, event: Envelope) -> None:
    """The JetStream handler: trivial, it only reads the event."""
    if event.data.pairing_id != where["device_id"]:
        raise ValueError("event from another device")
    now = time.perf_counter()
    if Tally.handled == 0:
        Tally.first_at = now
    Tally.handled += 1
    Tally.last_at = now


# --------------------------------------------------------------------------
# Responders
# --------------------------------------------------------------------------


async def raw_responder(url: str) -> Any:
    nc = await nats.connect(url)

    async def handle(msg: Any) -> None:
        where = HEARTBEAT.parse(msg.subject)
        reply = answer(where["tenant"], decode(msg.data, GatewayHeartbeat))
        await msg.respond(reply.encode())

    sub = await nc.subscribe(HEARTBEAT.filter(), queue=QUEUE, cb=handle)
    await nc.flush()

    async def stop() -> None:
        await sub.unsubscribe()
        await nc.close()

    return stop


def _broker(url: str, **options: Any) -> Any:
    from faststream.nats import NatsBroker

    logger = logging.getLogger("cowork.bench.faststream")
    logger.setLevel(logging.WARNING)
    return NatsBroker(url, logger=logger, **options)


async def _started(broker: Any) -> Any:
    await broker.start()

    async def stop() -> None:
        await broker.stop()

    return stop


async def _pass_body(msg: Any) -> bytes:
    """A decoder that hands the handler the body bytes (FastStream's own would JSON-parse
    it). Async on purpose: FastStream runs a sync decoder in a worker thread."""
    return msg.body


def _subject(broker: Any) -> str:
    """The current message's subject, read from the broker's context in the handler
    (a `Context()`/`Path()` parameter costs a worker-thread hop per message)."""
    return broker.context.get_local("message").raw_message.subject


async def fs_raw_responder(url: str) -> Any:
    from faststream.nats import NatsMessage, NatsRouter

    router = NatsRouter()

    @router.subscriber(HEARTBEAT.filter(), queue=QUEUE)
    async def handle(msg: NatsMessage) -> bytes:
        where = HEARTBEAT.parse(msg.raw_message.subject)
        return answer(where["tenant"], decode(msg.body, GatewayHeartbeat)).encode()

    broker = _broker(url)
    broker.include_router(router)
    return await _started(broker)


async def fs_raw_lean_responder(url: str) -> Any:
    from faststream.nats import NatsRouter

    router = NatsRouter()
    broker = _broker(url)

    @router.subscriber(HEARTBEAT.filter(), queue=QUEUE, decoder=_pass_body)
    async def handle(body: bytes) -> bytes:
        where = HEARTBEAT.parse(_subject(broker))
        return answer(where["tenant"], decode(body, GatewayHeartbeat)).encode()

    broker.include_router(router)
    return await _started(broker)


async def fs_bare_responder(url: str) -> Any:
    from faststream.nats import NatsRouter

    router = NatsRouter()
    broker = _broker(url, apply_types=False)  # no fast-depends: the handler gets the body

    @router.subscriber(HEARTBEAT.filter(), queue=QUEUE, decoder=_pass_body)
    async def handle(body: bytes) -> bytes:
        where = HEARTBEAT.parse(_subject(broker))
        return answer(where["tenant"], decode(body, GatewayHeartbeat)).encode()

    broker.include_router(router)
    return await _started(broker)


async def fs_pyd_responder(url: str) -> Any:
    from faststream import Path as SubjectPart
    from faststream.nats import NatsRouter

    router = NatsRouter()

    @router.subscriber(HEARTBEAT.template, queue=QUEUE)
    async def handle(
        envelope: Envelope[GatewayHeartbeat],
        tenant: str = SubjectPart(),
        registration_id: str = SubjectPart(),
    ) -> Envelope:
        check_tenant(tenant)
        check_token(registration_id)
        check_envelope(envelope, GatewayHeartbeat)
        return answer(tenant, envelope)

    broker = _broker(url)
    broker.include_router(router)
    return await _started(broker)


async def fs_pyd_lean_responder(url: str) -> Any:
    from faststream.nats import NatsRouter

    router = NatsRouter()
    broker = _broker(url)

    @router.subscriber(HEARTBEAT.filter(), queue=QUEUE)
    async def handle(envelope: Envelope[GatewayHeartbeat]) -> Envelope:
        where = HEARTBEAT.parse(_subject(broker))
        check_envelope(envelope, GatewayHeartbeat)
        return answer(where["tenant"], envelope)

    broker.include_router(router)
    return await _started(broker)


RESPONDERS = {
    "raw": raw_responder,
    "fs-raw": fs_raw_responder,
    "fs-raw-lean": fs_raw_lean_responder,
    "fs-bare": fs_bare_responder,
    "fs-pyd": fs_pyd_responder,
    "fs-pyd-lean": fs_pyd_lean_responder,
}


# --------------------------------------------------------------------------
# JetStream consumers: each drains the stream through its own durable consumer
# --------------------------------------------------------------------------


async def raw_drain(url: str, durable: str) -> None:
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(
        DEVICE_EVENT.filter(),
        durable=durable,
        stream=STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL),
    )
    deadline = time.monotonic() + 120
    try:
        while Tally.handled < JS_MESSAGES and time.monotonic() < deadline:
            try:
                msgs = await sub.fetch(batch=JS_BATCH, timeout=1.0)
            except (TimeoutError, NatsTimeout):
                continue
            for msg in msgs:
                consume_event(DEVICE_EVENT.parse(msg.subject), decode(msg.data, DeviceEvent))
                await msg.ack()
    finally:
        await nc.close()


async def _fs_drain(url: str, register: Any, **options: Any) -> None:
    from faststream.nats import NatsRouter

    router = NatsRouter()
    broker = _broker(url, **options)
    register(router, broker)
    broker.include_router(router)
    await broker.start()
    deadline = time.monotonic() + 120
    try:
        while Tally.handled < JS_MESSAGES and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await broker.stop()


def _js_options(durable: str) -> dict:
    from faststream.nats import JStream, PullSub
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    return {
        "stream": JStream(STREAM, declare=False),
        "durable": durable,
        "pull_sub": PullSub(batch_size=JS_BATCH, timeout=1.0),
        "config": ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL),
    }


async def fs_raw_drain(url: str, durable: str) -> None:
    from faststream.nats import NatsMessage

    def register(router: Any, broker: Any) -> None:
        @router.subscriber(DEVICE_EVENT.filter(), **_js_options(durable))
        async def handle(msg: NatsMessage) -> None:
            consume_event(
                DEVICE_EVENT.parse(msg.raw_message.subject), decode(msg.body, DeviceEvent)
            )

    await _fs_drain(url, register)


async def fs_raw_lean_drain(url: str, durable: str) -> None:
    def register(router: Any, broker: Any) -> None:
        @router.subscriber(DEVICE_EVENT.filter(), decoder=_pass_body, **_js_options(durable))
        async def handle(body: bytes) -> None:
            consume_event(DEVICE_EVENT.parse(_subject(broker)), decode(body, DeviceEvent))

    await _fs_drain(url, register)


async def fs_bare_drain(url: str, durable: str) -> None:
    def register(router: Any, broker: Any) -> None:
        @router.subscriber(DEVICE_EVENT.filter(), decoder=_pass_body, **_js_options(durable))
        async def handle(body: bytes) -> None:
            consume_event(DEVICE_EVENT.parse(_subject(broker)), decode(body, DeviceEvent))

    await _fs_drain(url, register, apply_types=False)


async def fs_pyd_drain(url: str, durable: str) -> None:
    from faststream import Path as SubjectPart

    def register(router: Any, broker: Any) -> None:
        @router.subscriber(DEVICE_EVENT.template, **_js_options(durable))
        async def handle(
            event: Envelope[DeviceEvent],
            tenant: str = SubjectPart(),
            device_id: str = SubjectPart(),
            event_kind: str = SubjectPart(),
        ) -> None:
            check_tenant(tenant)
            check_token(device_id)
            check_token(event_kind)
            check_envelope(event, DeviceEvent)
            consume_event(
                {"tenant": tenant, "device_id": device_id, "event_kind": event_kind}, event
            )

    await _fs_drain(url, register)


async def fs_pyd_lean_drain(url: str, durable: str) -> None:
    def register(router: Any, broker: Any) -> None:
        @router.subscriber(DEVICE_EVENT.filter(), **_js_options(durable))
        async def handle(event: Envelope[DeviceEvent]) -> None:
            check_envelope(event, DeviceEvent)
            consume_event(DEVICE_EVENT.parse(_subject(broker)), event)

    await _fs_drain(url, register)


DRAINS = {
    "raw": raw_drain,
    "fs-raw": fs_raw_drain,
    "fs-raw-lean": fs_raw_lean_drain,
    "fs-bare": fs_bare_drain,
    "fs-pyd": fs_pyd_drain,
    "fs-pyd-lean": fs_pyd_lean_drain,
}


# --------------------------------------------------------------------------
# The load generator process (this file run as a script)
# --------------------------------------------------------------------------


def _requests(count: int) -> list[tuple[str, str, bytes]]:
    """(request id, expected state, bytes): distinct envelopes, alive and stopping."""
    out = []
    for i in range(count):
        alive = i % 4 != 3
        beat = GatewayHeartbeat(
            liveness="alive" if alive else "stopping",
            mode="active",
            health="healthy",
            current_load=i % 8,
            active_work_ids=[f"w{i}", f"w{i + 1}"],
            heartbeat_sequence=i,
        )
        envelope = Envelope.wrap(beat, source=GATEWAY, tenant=TENANT)
        out.append((envelope.id, "active" if alive else "draining", envelope.encode()))
    return out


def _pct(ordered: list[float], q: float) -> float:
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


async def _loadgen(spec: dict) -> dict:
    nc = await nats.connect(spec["url"])
    subject = HEARTBEAT.build(tenant=TENANT, registration_id=REGISTRATION)
    requests = _requests(1024)
    concurrency, max_requests = spec["concurrency"], spec["maxRequests"]
    latencies: list[float] = []
    replies: list[tuple[int, bytes]] = []
    errors: dict[str, int] = {}
    cpu0 = time.process_time()
    begin = time.perf_counter()
    measure_from = begin + spec["warmupSeconds"]
    stop_at = [measure_from + spec["durationSeconds"]]

    async def worker(k: int) -> None:
        i = k
        while True:
            started = time.perf_counter()
            if started >= stop_at[0]:
                return
            index = i % len(requests)
            i += concurrency
            try:
                reply = await nc.request(subject, requests[index][2], timeout=spec["timeout"])
            except Exception as exc:  # counted, and fails the sanity check
                if started >= measure_from:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                continue
            done = time.perf_counter()
            if started >= measure_from and done <= stop_at[0]:
                latencies.append(done - started)
                replies.append((index, reply.data))
                if len(latencies) >= max_requests:
                    stop_at[0] = done

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    window = stop_at[0] - measure_from
    cpu = time.process_time() - cpu0
    await nc.close()
    wrong = 0
    for index, data in replies:
        try:
            envelope = decode(data, GatewayHeartbeatReply)
            ok = (
                envelope.correlation_id == requests[index][0]
                and envelope.tenant == TENANT
                and envelope.data.state == requests[index][1]
            )
        except Exception:
            ok = False
        wrong += not ok
    ordered = sorted(latencies)
    return {
        "ok": len(replies),
        "wrong": wrong,
        "errors": errors,
        "window": window,
        "rps": len(replies) / window if window > 0 else 0.0,
        "p50Ms": _pct(ordered, 50) * 1000 if ordered else None,
        "p99Ms": _pct(ordered, 99) * 1000 if ordered else None,
        "clientCpuSeconds": cpu,
    }


async def run_load(url: str, concurrency: int, duration: float) -> dict:
    spec = {
        "url": url,
        "concurrency": concurrency,
        "warmupSeconds": WARMUP,
        "durationSeconds": duration,
        "maxRequests": MAX_REQUESTS,
        "timeout": 5.0,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).resolve()),
        "--loadgen",
        cwd=str(ROOT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        proc.communicate(json.dumps(spec).encode()), timeout=WARMUP + duration + 60
    )
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


# --------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------


pytestmark = [pytest.mark.bench, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
async def bench_nats(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("faststream.nats", reason="install the bench extra: .[dev,bench]")
    server = NatsServer(
        store_dir=tmp_path_factory.mktemp("bench-faststream"), host="127.0.0.1", port=0
    )
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()


async def _measure(url: str, name: str, concurrency: int, duration: float) -> dict:
    stop = await RESPONDERS[name](url)
    try:
        nc = await nats.connect(url)  # one request first: the responder answers
        try:
            probe = _requests(1)[0]
            reply = await nc.request(
                HEARTBEAT.build(tenant=TENANT, registration_id=REGISTRATION), probe[2], timeout=5
            )
            assert decode(reply.data, GatewayHeartbeatReply).correlation_id == probe[0]
        finally:
            await nc.close()
        handled0, cpu0 = Tally.handled, time.process_time()
        result = await run_load(url, concurrency, duration)
        handled, cpu = Tally.handled - handled0, time.process_time() - cpu0
    finally:
        await stop()
    result["handled"] = handled
    result["cpuUs"] = cpu / handled * 1e6 if handled else None
    result["clientCpuUs"] = (result["clientCpuSeconds"] / handled * 1e6) if handled else None
    return result


def _report(
    title: str,
    rows: dict[str, list[dict]],
    columns: list[tuple[str, str, str]],
    ratios: list[tuple[str, str]],
) -> None:
    """Median of each column over the rounds, and each round's ratio to raw's in the
    same round: median (min-max)."""
    print(f"\n{title}")
    print(
        f"{'variant':12}"
        + "".join(f"{label:>14}" for _, label, _ in columns)
        + "".join(f"{label:>24}" for _, label in ratios)
    )
    for name, results in rows.items():
        line = f"{name:12}" + "".join(
            f"{format(statistics.median(r[key] for r in results), fmt):>14}"
            for key, _, fmt in columns
        )
        for key, _ in ratios:
            each = [r[key] / raw[key] for r, raw in zip(results, rows["raw"])]
            line += f"{statistics.median(each):.2f} ({min(each):.2f}-{max(each):.2f})".rjust(24)
        print(line)
    key, label, fmt = columns[0]
    for name, results in rows.items():
        print(f"  {label} per round, {name}: " + ", ".join(format(r[key], fmt) for r in results))


async def test_request_reply_raw_vs_faststream(bench_nats: str) -> None:
    url = bench_nats
    for concurrency, duration in ((CONCURRENCY, SECONDS), (1, SECONDS_SERIAL)):
        rows: dict[str, list[dict]] = {name: [] for name in RESPONDERS}
        for _ in range(ROUNDS):
            for name in RESPONDERS:
                result = await _measure(url, name, concurrency, duration)
                assert result["errors"] == {}, (name, result)
                assert result["wrong"] == 0, (name, result)
                assert result["ok"] > 0 and result["rps"] > 0, (name, result)
                rows[name].append(result)
        _report(
            f"Request/reply, gateway heartbeat, {concurrency} in flight, "
            f"{duration:g} s measured after {WARMUP:g} s warm-up, {ROUNDS} rounds "
            f"(median; ratio to raw: median (min-max over rounds))",
            rows,
            [
                ("rps", "req/s", ".0f"),
                ("p50Ms", "p50 ms", ".3f"),
                ("p99Ms", "p99 ms", ".3f"),
                ("cpuUs", "CPU us/req", ".1f"),
                ("clientCpuUs", "client us/req", ".1f"),
            ],
            [("rps", "req/s vs raw"), ("cpuUs", "CPU/req vs raw")],
        )


async def _fill_stream(url: str) -> None:
    from nats.js.api import StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await js.delete_stream(STREAM)
    except Exception:
        pass
    await js.add_stream(StreamConfig(name=STREAM, subjects=[DEVICE_EVENT.filter(tenant=TENANT)]))
    subject = DEVICE_EVENT.build(tenant=TENANT, device_id=DEVICE, event_kind="status")
    for i in range(JS_MESSAGES):
        event = DeviceEvent(
            id=f"e{i}",
            pairing_id=DEVICE,
            type="status",
            workspace_id="ws1",
            sequence=i,
            occurred_at=time.time(),
            payload={"status": "idle", "n": i},
        )
        await nc.publish(subject, Envelope.wrap(event, source=GATEWAY, tenant=TENANT).encode())
        if i % 1000 == 999:
            await nc.flush()
    await nc.flush()
    for _ in range(200):
        if (await js.stream_info(STREAM)).state.messages == JS_MESSAGES:
            break
        await asyncio.sleep(0.05)
    assert (await js.stream_info(STREAM)).state.messages == JS_MESSAGES
    await nc.close()


async def test_jetstream_pull_raw_vs_faststream(bench_nats: str) -> None:
    url = bench_nats
    await _fill_stream(url)
    rows: dict[str, list[dict]] = {name: [] for name in DRAINS}
    for round_ in range(ROUNDS):
        for name, drain in DRAINS.items():
            Tally.handled = 0
            cpu0 = time.process_time()
            await drain(url, f"bench-{name}-{round_}")
            cpu = time.process_time() - cpu0
            assert Tally.handled == JS_MESSAGES, (name, Tally.handled)
            span = Tally.last_at - Tally.first_at
            assert span > 0
            rows[name].append({"mps": (JS_MESSAGES - 1) / span, "cpuUs": cpu / JS_MESSAGES * 1e6})
    nc = await nats.connect(url)
    state = (await nc.jetstream().stream_info(STREAM)).state
    await nc.close()
    assert state.messages == JS_MESSAGES
    _report(
        f"JetStream pull consumer, device.event, {JS_MESSAGES} messages, batch "
        f"{JS_BATCH}, {ROUNDS} rounds (median; ratio to raw: median (min-max))",
        rows,
        [("mps", "msg/s", ".0f"), ("cpuUs", "CPU us/msg", ".1f")],
        [("mps", "msg/s vs raw"), ("cpuUs", "CPU/msg vs raw")],
    )


if __name__ == "__main__" and sys.argv[1:] == ["--loadgen"]:
    print(json.dumps(asyncio.run(_loadgen(json.loads(sys.stdin.read())))), flush=True)
