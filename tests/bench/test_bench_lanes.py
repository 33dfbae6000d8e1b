"""How fast a line passes over a laned flood, against raw nats-py fetch + ack of the
same messages in the same run (docs/performance.md, "Same partition: lanes").

`.venv/bin/python -m pytest -m bench -o addopts="-p no:cacheprovider" -s
tests/bench/test_bench_lanes.py` (about 15 s). BENCH_PASS_EVENTS (20000) messages of
one key are stored; then (1) nats-py's `fetch(256)` and an ack each, (2) the hub's
line (`pull_forever` + `Lanes`, batch 256) with the key in a lane (at a rate of
one batch a second meanwhile). Each runs on a consumer of its own, twice, alternating.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

import nats
import pytest

from hub.core import BackgroundTask, LanePolicy, Lanes, pull_forever
from hub.core._streams import ConsumerSpec, consumer_config

pytestmark = [pytest.mark.bench, pytest.mark.timeout(300)]

N = int(os.environ.get("BENCH_PASS_EVENTS", "20000"))
BATCH = 256
log = logging.getLogger("bench.lanes")


async def _raw(js, spec: ConsumerSpec) -> float:
    sub = await js.pull_subscribe_bind(spec.durable, stream=spec.stream)
    started, n = time.perf_counter(), 0
    while n < N:
        msgs = await sub.fetch(batch=BATCH, timeout=5)
        for msg in msgs:
            await msg.ack()
        n += len(msgs)
    seconds = time.perf_counter() - started
    await sub.unsubscribe()
    return seconds


async def _line(js, spec: ConsumerSpec, subject: str) -> float:
    passed = [0]
    done = asyncio.Event()

    def on_change(open_lanes: int, moved: int) -> None:
        passed[0] += moved
        if passed[0] >= N - 1:  # (the first message opens the lane, within its burst)
            done.set()

    async def handle(msgs) -> None:  # (the lane goes at 1 batch a second meanwhile)
        for msg in msgs:
            await msg.ack()

    lanes = Lanes(
        js,
        spec,
        LanePolicy(rate=1.0, burst=1.0),
        key_of=lambda msg: (msg.subject,),
        filter_of=lambda key: subject,
        handle=handle,
        may_fetch=lambda: True,
        log=log,
        on_change=on_change,
    )
    await lanes.restore()
    worker = BackgroundTask(
        "line", lambda: pull_forever(js, spec, BATCH, lanes.handle, log, "f", ordered=True)
    )
    started = time.perf_counter()
    worker.start()
    try:
        await asyncio.wait_for(done.wait(), 120)
        return time.perf_counter() - started
    finally:
        await worker.stop()
        await lanes.stop()


async def test_the_line_passes_over_a_laned_flood_as_fast_as_raw_fetch_and_ack(nats_url):
    nc = await nats.connect(nats_url)
    js = nc.jetstream(timeout=30)
    stream = f"PASS_{uuid.uuid4().hex[:8].upper()}"
    subject = f"{stream.lower()}.a"
    await js.add_stream(name=stream, subjects=[subject])
    body = b"x" * 700  # about a stored Desktop event
    for _ in range(0, N, 1000):
        await asyncio.gather(*[await js.publish_async(subject, body) for _ in range(1000)])
    results: dict[str, list[float]] = {"raw nats-py fetch + ack": [], "the hub's line": []}
    try:
        for _ in range(2):
            for name in results:
                spec = ConsumerSpec(stream, f"c{uuid.uuid4().hex[:6]}", subject, max_ack_pending=N)
                await js.add_consumer(stream, consumer_config(spec))
                run = _raw(js, spec) if name.startswith("raw") else _line(js, spec, subject)
                results[name].append(await run)
    finally:
        await js.delete_stream(stream)
        await nc.close()
    print(f"\n{N:,} messages of one key, batch {BATCH}:")
    for name, runs in results.items():
        print(f"  {name:<24} " + ", ".join(f"{s:.2f} s ({N / s:,.0f}/s)" for s in runs))
    raw, line = min(results["raw nats-py fetch + ack"]), min(results["the hub's line"])
    assert line <= raw * 1.5, "the line passes over a flood much slower than raw fetch + ack"
