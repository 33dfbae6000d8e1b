"""Supervising local server processes: run until stopped, restart children that exit.

Shared by `cowork up` (hub/cli) and the Gateway appliance (`cowork gateway up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

# A child that dies this many times within the window is not restarted again.
MAX_RESTARTS = 3
RESTART_WINDOW_SECONDS = 60.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


def say(text: str) -> None:
    print(text, flush=True)


async def step(label: str, action: Callable[[], Awaitable[object]]) -> None:
    print(f"  {label} ...", end="", flush=True)
    started = time.monotonic()
    try:
        await action()
    except BaseException:
        print(" failed", flush=True)
        raise
    print(f" ready ({time.monotonic() - started:.1f}s)", flush=True)


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM set `stop` while inside (instead of raising in the middle
    of a start or a stop)."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def run_until_stopped(
    start: Callable[[], Coroutine[Any, Any, object]],
    supervise: Callable[[], Coroutine[Any, Any, T]],
    stop: asyncio.Event,
) -> T | None:
    """`start`, then `supervise` until `stop` is set. Returns what `supervise` returned
    when it ended first; None when stopped, also while starting (the start is
    abandoned). A failed start raises its error."""
    stopper = asyncio.create_task(stop.wait())
    startup = asyncio.create_task(start())
    await asyncio.wait({startup, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not startup.done():
        startup.cancel()
        await asyncio.gather(startup, return_exceptions=True)
        return None
    if startup.exception() is not None:
        stopper.cancel()
        startup.result()  # raises the start's error
    supervisor = asyncio.create_task(supervise())
    await asyncio.wait({supervisor, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if supervisor.done():
        stopper.cancel()
        return supervisor.result()
    supervisor.cancel()
    await asyncio.gather(supervisor, return_exceptions=True)
    return None


class _CrashCounter:
    """Each child's exits within the last RESTART_WINDOW_SECONDS."""

    def __init__(self) -> None:
        self._times: dict[str, list[float]] = {}

    def crashed(self, name: str) -> int:
        """Count one exit of `name`; returns its exits within the window."""
        now = time.monotonic()
        recent = [t for t in self._times.get(name, []) if now - t < RESTART_WINDOW_SECONDS]
        self._times[name] = recent + [now]
        return len(self._times[name])


async def supervise_children(
    children: dict[str, Any],
    program: str,
    *,
    until: asyncio.Task | None = None,
    restarted: Callable[[Any], None] | None = None,
) -> str | None:
    """Restart a child server (`start()`/`wait()`) when it exits, calling `restarted`
    with it. Returns why supervision ends: a child exited more than MAX_RESTARTS
    times within the window (the reason), or `until` finished (None)."""
    crashes = _CrashCounter()
    waits = {asyncio.create_task(c.wait()): name for name, c in children.items()}
    watched = {until} if until is not None else set()
    try:
        while True:
            done, _ = await asyncio.wait({*waits, *watched}, return_when=asyncio.FIRST_COMPLETED)
            if until is not None and until in done:
                return None
            for task in done:
                name = waits.pop(task)
                count = crashes.crashed(name)
                if count > MAX_RESTARTS:
                    return f"{name} exited {count} times within a minute"
                say(f"{program}: {name} exited unexpectedly (code {task.result()}); restarting")
                await children[name].start()
                if restarted is not None:
                    restarted(children[name])
                waits[asyncio.create_task(children[name].wait())] = name
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
