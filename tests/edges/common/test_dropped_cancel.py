"""An agent's loops stop even when a cancel was dropped.

Python 3.11's `asyncio.wait_for`, inside nats-py's requests and fetches, can take a
cancel that lands as its answer does and return the answer instead; the task goes
on as if never asked to stop. The agent's stop cancels its tasks and waits for
them, so a loop that goes round again would hold the stop forever. Each fake below
drops the first cancel the way wait_for does, then behaves."""

from __future__ import annotations

import asyncio

import pytest

from edges.common import honour_dropped_cancel
from edges.desktop._agent import DesktopAgent

STOP_BUDGET = 5.0


class DropsFirstCancel:
    """An awaited call that, the first time a cancel reaches it, returns instead."""

    def __init__(self) -> None:
        self.calls = 0
        self.dropped = False

    async def __call__(self, *args) -> None:
        self.calls += 1
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            if self.dropped:
                raise
            self.dropped = True


async def _stopped(task: asyncio.Task, call: DropsFirstCancel) -> None:
    while call.calls == 0:
        await asyncio.sleep(0.001)
    task.cancel()  # lands inside the call, which drops it
    done, _ = await asyncio.wait({task}, timeout=STOP_BUDGET)
    if not done:  # (without the fix: cancel again, which the fake now honours)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert call.dropped, "the cancel never reached the call"
    assert done, f"the loop went on after its cancel was dropped ({call.calls} calls)"
    assert task.cancelled()


async def test_the_check_raises_only_after_a_dropped_cancel():
    honour_dropped_cancel()  # never asked to stop: nothing

    async def body() -> str:
        asyncio.get_running_loop().call_later(0.01, asyncio.current_task().cancel)
        await DropsFirstCancel()()  # the cancel lands in the call, which drops it
        honour_dropped_cancel()
        return "went on"

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(body())


def _agent() -> DesktopAgent:
    """A Desktop agent with only what its loops read (no pairing, store or bus)."""
    agent = object.__new__(DesktopAgent)
    agent.heartbeat_interval = 0.01
    agent._commands = asyncio.Queue()
    agent._in_hand = set()
    return agent


async def test_the_desktops_heartbeat_loop_stops_after_a_dropped_cancel():
    agent, call = _agent(), DropsFirstCancel()
    agent._heartbeat = call
    await _stopped(asyncio.create_task(agent._heartbeats()), call)


async def test_the_desktops_command_worker_stops_after_a_dropped_cancel():
    agent, call = _agent(), DropsFirstCancel()
    agent._dispatch = call
    for _ in range(2):  # a command in hand, one waiting
        agent._commands.put_nowait(object())
    await _stopped(asyncio.create_task(agent._command_worker()), call)
