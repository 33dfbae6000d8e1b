"""How long this replica has heard the bus: the one answer every sweep that concludes
something from missing heartbeats asks before it concludes it.

While the hub's own NATS connection is down it hears no heartbeat, and right after
it is back the edges are still reconnecting (jittered waits of up to 10 s): their
silence then says nothing about them. Marking them offline would be a flap caused
by the hub's own outage, so those sweeps pause until the bus has been up for a
grace period; an edge that stays silent past it is marked as before.
"""

from __future__ import annotations

import logging
import time

from ._logging import kv
from ._metrics import HubMetrics

log = logging.getLogger("cowork.hub.presence")


class BusUptime:
    """The bus is taken as heard from the start (a replica that starts has no outage
    of its own to forgive); `lost()` and `restored()` follow the connection."""

    def __init__(self, grace: float, metrics: HubMetrics | None = None) -> None:
        self._grace, self._metrics = grace, metrics
        self._up_since: float | None = time.monotonic() - grace
        self._paused = False  # a pause is logged and counted once per outage

    def lost(self) -> None:
        self._up_since = None

    def restored(self) -> None:
        self._up_since = time.monotonic()

    def heard(self) -> bool:
        """True when silence is evidence: the bus up for at least the grace period."""
        up = self._up_since is not None and time.monotonic() - self._up_since >= self._grace
        if up and self._paused:
            self._paused = False
            log.info("presence.sweep_resumed", **kv(grace_seconds=self._grace))
        elif not up and not self._paused:
            self._paused = True
            if self._metrics is not None:
                self._metrics.presence_sweep_paused.inc()
            log.warning(
                "presence.sweep_paused",
                **kv(grace_seconds=self._grace, reason="this replica could not hear the bus"),
            )
        return up
