"""Python 3.11's `asyncio.wait_for` (inside nats-py's requests, publishes and
fetches) can drop a cancellation that arrives just as its awaited result does: the
caller gets the result, and the cancel request stays on the task without ever being
raised. An agent loop that goes round again would then never stop, and the agent's
stop (SIGTERM, Ctrl-C), which cancels its tasks and waits for them, would wait
forever. Loops call this once a round. (The hub's loops and the channel runtime's
make the same four-line check with their own copy, hub/core/_cancel.py and
channels/runtime/_runtime.py: the import layers let neither import edges, and the
top-level layout has no package below all three but the contract, `schemas`.)
"""

from __future__ import annotations

import asyncio


def honour_dropped_cancel() -> None:
    """Raise CancelledError if this task was asked to stop and the request was lost."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
