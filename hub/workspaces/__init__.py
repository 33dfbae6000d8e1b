"""The workspace event log: projection of Desktop events, append with a per-
workspace cursor, live publish, the events page and SSE tails.
"""

from __future__ import annotations

from ._log import append_events, append_steps, lock_cursor, publish_live
from ._projection import EventProjector
from ._routes import add_routes

__all__ = [
    "EventProjector",
    "add_routes",
    "append_events",
    "append_steps",
    "lock_cursor",
    "publish_live",
]
