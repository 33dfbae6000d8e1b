"""The Desktop side of the relay throughput bench (tests/bench/test_bench_desktop.py),
run as its own process.

The Desktop's redaction, envelopes and SQLite outbox must not share the hub
projector's event loop (nor its GIL): the bench starts this file with
`python tests/bench/relay_load.py` and talks to it in JSON lines, as
tests/bench/fleet_load.py does. It runs the product's own `DesktopAgent` on a
paired state directory (its relay, outbox and publisher untouched) against the
bench's OpenCode, and drives `agent.relay.relay(event)`, the entry point the
OpenCode event stream uses.

Spec (the first line, camelCase JSON): stateDir, opencodeUrl. Answered by
{ready: true} once the agent is connected.

Commands (JSON, one a line), each answered by one JSON line; times are
`time.perf_counter()` (CLOCK_MONOTONIC, the same clock in every process here):
- {op: "live", n, session, chunk}: relay n `message.part.delta` events, `chunk`
  per event-loop turn (the publisher drains in between, as during a busy stream);
  answers {t0, queued, relayed, cpuSeconds}: queued when the last relay() returned,
  relayed when the outbox is empty and n more were acknowledged by JetStream.
- {op: "outage", n, session}: detach the publisher (as when NATS is away) and
  queue n events; answers {chunkRates: events/s per 1,000, outbox}.
- {op: "reattach", n}: reattach the publisher; answers {t0, relayed} once n more
  were acknowledged and the outbox is empty.
- {op: "stop"}: stop the agent; answers {stopped: true}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from edges.desktop._agent import DesktopAgent
from edges.desktop._store import DesktopStore
from hub.cli._loop import EVENT_LOOP_ENV, use_event_loop

DELTA = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 2  # ~110 chars


def delta_event(session: str, i: int, text: str = DELTA) -> dict[str, Any]:
    """An OpenCode `message.part.delta` event, as a busy stream sends them."""
    return {
        "type": "message.part.delta",
        "properties": {
            "sessionID": session,
            "messageID": "msg_bench0000000000000001",
            "partID": f"prt_bench{i:016d}",
            "field": "text",
            "delta": text,
        },
    }


class Driver:
    def __init__(self, agent: DesktopAgent) -> None:
        self.agent = agent
        self.relay = agent.relay
        self._nc: Any = None

    async def _relayed(self, base: int, n: int) -> float:
        """When n more rows have left the outbox, acknowledged by JetStream."""
        while self.relay.published - base < n or self.agent.store.outbox_size():
            await asyncio.sleep(0.002)
        return time.perf_counter()

    async def live(self, n: int, session: str, chunk: int) -> dict:
        base, cpu = self.relay.published, time.process_time()
        t0 = time.perf_counter()
        for start in range(0, n, chunk):
            for i in range(start, min(n, start + chunk)):
                assert self.relay.relay(delta_event(session, i))
            await asyncio.sleep(0)  # the publisher runs in between
        queued = time.perf_counter()
        relayed = await self._relayed(base, n)
        return {
            "t0": t0,
            "queued": queued,
            "relayed": relayed,
            "cpuSeconds": time.process_time() - cpu,
        }

    async def outage(self, n: int, session: str) -> dict:
        self._nc, self.relay._nc = self.relay._nc, None  # the publisher skips its drain
        rates = []
        for start in range(0, n, 1000):
            c0 = time.perf_counter()
            for i in range(start, min(n, start + 1000)):
                assert self.relay.relay(delta_event(session, i))
            rates.append((min(n, start + 1000) - start) / (time.perf_counter() - c0))
            await asyncio.sleep(0)
        return {"chunkRates": rates, "outbox": self.agent.store.outbox_size()}

    async def reattach(self, n: int) -> dict:
        base = self.relay.published
        t0 = time.perf_counter()
        self.relay.attach(self._nc)
        return {"t0": t0, "relayed": await self._relayed(base, n)}


async def desktop_from_stdin() -> tuple[asyncio.StreamReader, DesktopAgent]:
    """The JSON spec on the first line of stdin (stateDir, opencodeUrl, heartbeat), the
    paired Desktop's agent built from it, and stdin for the commands that follow."""
    logging.basicConfig(level=logging.ERROR)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())
    agent = DesktopAgent(
        DesktopStore(Path(spec["stateDir"])),
        spec["opencodeUrl"],
        heartbeat_interval=float(spec.get("heartbeat", 5.0)),
    )
    return reader, agent


async def main() -> None:
    reader, agent = await desktop_from_stdin()
    task = asyncio.create_task(agent.run())
    connected = asyncio.create_task(agent.connected.wait())
    await asyncio.wait([task, connected], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if not agent.connected.is_set():
        raise SystemExit(f"the Desktop did not connect: {task}")
    driver = Driver(agent)

    def answer(body: dict) -> None:
        sys.stdout.write(json.dumps(body) + "\n")
        sys.stdout.flush()

    answer({"ready": True})
    while line := (await reader.readline()).decode().strip():
        command = json.loads(line)
        op = command.pop("op")
        if op == "stop":
            break
        answer(await getattr(driver, op)(**command))
    agent.stop()
    await asyncio.wait_for(task, 15)
    answer({"stopped": True})


if __name__ == "__main__":
    # The loop `cowork desktop run` gets (hub/cli/_loop.py: uvloop where installed),
    # as tests/bench/command_desktop.py does: the bench's Desktop is the product's.
    use_event_loop(os.environ.get(EVENT_LOOP_ENV, "auto"))
    asyncio.run(main())
