"""Python 3.11's `asyncio.wait_for` (inside nats-py's requests and fetches) can drop
a cancellation that arrives just as its awaited result does: the caller gets the
result, and the cancel request stays on the task without ever being raised. A
loop that goes round again would then never stop, and whoever cancelled it waits
forever (seen as a hung replica stop). Loops call this once a round.
"""

from __future__ import annotations

import asyncio


def honour_dropped_cancel() -> None:
    """Raise CancelledError if this task was asked to stop and the request was lost."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
