"""The Desktop of the command round-trip bench (tests/bench/test_bench_desktop.py),
run as its own process.

The Desktop is a load generator for the hub: it must not share the hub's event
loop (nor its GIL), so the benchmark starts this with `python
tests/bench/command_desktop.py`, hands it a JSON spec on stdin ({stateDir,
opencodeUrl}: a store already paired) and talks to it in JSON lines: a command
on stdin, one answer line on stdout. It runs the product's own `DesktopAgent`
against the given (real) OpenCode, and times, per command id, the stages on its
side with `time.perf_counter()` (CLOCK_MONOTONIC: one clock for every process
on the machine, so the bench can line them up with the hub's):

- `desktop.start/.end`: `_handle_command` (checks, journal, run, final ack);
- `execute.start/.end`: `runner.run`, OpenCode's own time for the command (what
  the bench subtracts from the round trip, per command);
- `ack.<outcome>.start/.end`: each ack's round trip to the hub (a command done
  within the agent's ACCEPT_AFTER sends no `accepted` ack: its final implies it).

Commands: `marks` answers {command id: {stage: time}} (and forgets them);
`cpu` answers {cpuSeconds}; `stop` stops the agent and answers {stopped}.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from relay_load import desktop_from_stdin

from edges.desktop._agent import DesktopAgent
from hub.cli._loop import EVENT_LOOP_ENV, use_event_loop


def probe(agent: DesktopAgent, marks: dict[str, dict[str, float]]) -> None:
    """Time the agent's stages per command id (on the instance; the class is untouched)."""
    handle, run, send_ack = agent._handle_command, agent.runner.run, agent._send_ack

    async def timed_handle(command: Any) -> None:
        start = time.perf_counter()
        await handle(command)
        marks.setdefault(command.id, {}).update(
            {"desktop.start": start, "desktop.end": time.perf_counter()}
        )

    async def timed_run(command: Any) -> Any:
        start = time.perf_counter()
        result = await run(command)
        marks.setdefault(command.id, {}).update(
            {"execute.start": start, "execute.end": time.perf_counter()}
        )
        return result

    async def timed_ack(command: Any, outcome: str, result: Any) -> bool:
        start = time.perf_counter()
        try:
            return await send_ack(command, outcome, result)
        finally:
            marks.setdefault(command.id, {}).update(
                {f"ack.{outcome}.start": start, f"ack.{outcome}.end": time.perf_counter()}
            )

    agent._handle_command = timed_handle  # type: ignore[method-assign]
    agent.runner.run = timed_run  # type: ignore[method-assign]
    agent._send_ack = timed_ack  # type: ignore[method-assign]


async def main() -> None:
    reader, agent = await desktop_from_stdin()
    marks: dict[str, dict[str, float]] = {}
    probe(agent, marks)
    task = asyncio.create_task(agent.run())

    def answer(body: dict) -> None:
        sys.stdout.write(json.dumps(body) + "\n")
        sys.stdout.flush()

    while not agent.connected.is_set() and not task.done():
        await asyncio.sleep(0.02)
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # uvloop or asyncio
    answer({"ready": agent.connected.is_set(), "loop": loop})
    try:
        while line := (await reader.readline()).decode().strip():
            if line == "marks":
                answer(dict(marks))
                marks.clear()
            elif line == "cpu":
                answer({"cpuSeconds": time.process_time()})
            elif line == "stop":
                break
    finally:
        agent.stop()
        await asyncio.wait_for(task, 15)
        answer({"stopped": True})


if __name__ == "__main__":
    # The loop `cowork desktop run` gets (hub/cli/_loop.py: uvloop where installed),
    # so that the bench's Desktop is the product's, event loop included.
    use_event_loop(os.environ.get(EVENT_LOOP_ENV, "auto"))
    asyncio.run(main())
