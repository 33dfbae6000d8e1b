"""The per-source brute-force limit shared by every bootstrap request.

Pairing-code redemption and Gateway registration both take a secret from a
client that holds no credential yet. The server shares the client's info with
the request (`Nats-Request-Info`), which gives its source address. After
`MAX_FAILURES` failed secrets within `WINDOW`, that source is refused for
`LOCKOUT`. The count lives in PostgreSQL so every hub replica shares it, and it
is one count per source for all bootstrap secrets: guessing pairing codes and
guessing registration credentials from one address spend the same budget.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import asyncpg
from nats.aio.msg import Msg

from ._logging import kv

log = logging.getLogger("cowork.hub.bootstrap")

MAX_FAILURES = 10
WINDOW = timedelta(minutes=10)
LOCKOUT = timedelta(minutes=15)


def request_source(msg: Msg) -> str:
    """The client's address from the shared client info, else 'unknown'."""
    info = (msg.headers or {}).get("Nats-Request-Info")
    if not info:
        return "unknown"
    try:
        return str(json.loads(info).get("host") or "unknown")[:128]
    except (ValueError, AttributeError):
        return "unknown"


class BootstrapLockout:
    """Failed bootstrap secrets counted per source; `locked_for` says how long a
    source must still wait (None when it may try)."""

    def __init__(self, pool: asyncpg.Pool, *, max_failures: int = MAX_FAILURES,
                 window: timedelta = WINDOW, lockout: timedelta = LOCKOUT) -> None:
        self._pool = pool
        self.max_failures, self.window, self.lockout = max_failures, window, lockout

    async def locked_for(self, source: str) -> float | None:
        left = await self._pool.fetchval(
            "SELECT extract(epoch FROM locked_until - now()) FROM bootstrap_failures "
            "WHERE source = $1 AND locked_until > now()", source)
        return None if left is None else round(float(left), 1)

    async def count_failure(self, source: str, what: str) -> int:
        """Count one failed secret from `source` (`what` names it in the log); returns
        the failures in the current window."""
        failures = await self._pool.fetchval(
            """INSERT INTO bootstrap_failures (source, window_started_at, failures)
               VALUES ($1, now(), 1)
               ON CONFLICT (source) DO UPDATE SET
                 failures = CASE WHEN bootstrap_failures.window_started_at < now() - $2::interval
                                 THEN 1 ELSE bootstrap_failures.failures + 1 END,
                 window_started_at = CASE WHEN bootstrap_failures.window_started_at < now() - $2
                                 THEN now() ELSE bootstrap_failures.window_started_at END,
                 locked_until = CASE WHEN bootstrap_failures.window_started_at >= now() - $2
                                      AND bootstrap_failures.failures + 1 >= $3
                                 THEN now() + $4 ELSE bootstrap_failures.locked_until END
               RETURNING failures""", source, self.window, self.max_failures, self.lockout)
        log.warning("bootstrap.secret_refused", **kv(what=what, source=source,
                                                     failures=failures))
        return int(failures)
