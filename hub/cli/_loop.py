"""The event loop every `cowork` command runs on, and the heap a hub settles once started.

uvloop (libuv's loop) where it is installed, which is everywhere but Windows: the
hub's bus paths spend about a quarter of their CPU in the event loop itself,
and uvloop cuts that (docs/performance.md, "Edge work claims").
`COWORK_EVENT_LOOP=asyncio` keeps the standard loop, e.g. to rule uvloop out
while debugging; `uvloop` insists on it. The choice is made once, here, for the
whole process, so every room's `asyncio.run` gets the same loop.
"""

from __future__ import annotations

import asyncio
import gc

EVENT_LOOP_ENV = "COWORK_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")


def use_event_loop(choice: str) -> str:
    """Make `choice` this process's event loop; return the loop it got.

    Raises ValueError with a one-line reason for a choice it cannot honour.
    """
    choice = choice.strip().lower() or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{EVENT_LOOP_ENV}={choice!r}: choose one of {', '.join(CHOICES)}")
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError(f"{EVENT_LOOP_ENV}=uvloop, but uvloop is not installed") from None
        return "asyncio"
    # A policy (deprecated from Python 3.14, still honoured to 3.16) rather than a
    # loop factory per call: asyncio.run is called by each room's own command.
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def settle_heap() -> None:
    """Once the hub has started: what it made to start (modules, models, the app)
    lives as long as the process, so it leaves the garbage collector's full passes
    (`gc.freeze`, after one collection of what starting left behind). In the relay
    bench a full pass of a hub's process took up to 200 ms, 1 s in all over the
    run; frozen, up to 66 ms, 0.16 s (docs/performance.md, relay round 8)."""
    gc.collect()
    gc.freeze()
