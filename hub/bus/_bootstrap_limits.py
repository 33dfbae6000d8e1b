"""The gates in front of every bootstrap request (pairing-code redemption and
Gateway registration): the client holds no credential yet and shares one public
identity with everyone, so the only name it has is its address (the server's
`Nats-Request-Info`, see `request_source`).

Two gates, cheapest first:

1. In memory, per source, before any database work: a token bucket of
   `SOURCE_RATE` requests per second (burst `SOURCE_BURST`) and a bound of
   `SOURCE_PENDING` requests in flight. A flood from one address is refused in
   microseconds, so it cannot queue another address's real pairing behind
   thousands of database round trips; what passes costs at most `SOURCE_RATE`
   lookups a second per replica, even while the address is locked out.
2. In PostgreSQL, shared by every hub replica: from the `MAX_FAILURES`th failed
   secret within `WINDOW`, each failure locks the source out for a delay that
   doubles with every further failure: 1 s, 2 s, 4 s ... up to `LOCKOUT`. A
   guesser gets about MAX_FAILURES + log2(WINDOW) tries a window, against codes
   of 50 bits that live 10 minutes; an office behind one NAT where somebody
   mistyped ten times waits a second, not a quarter of an hour. It is one count
   per source for all bootstrap secrets: guessing pairing codes and guessing
   registration credentials spend the same budget.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import asyncpg

from ..core import RateLimiter, Refusal, kv

log = logging.getLogger("cowork.hub.bootstrap")

MAX_FAILURES = 10
WINDOW = timedelta(minutes=10)
LOCKOUT = timedelta(minutes=15)  # the longest delay
FIRST_DELAY = timedelta(seconds=1)  # at the MAX_FAILURES-th failure, doubling after
SOURCE_RATE = 20.0  # bootstrap requests per second and source, after the burst
SOURCE_BURST = 100  # a site's Desktops and Gateways behind one NAT pairing at once
SOURCE_PENDING = 8  # requests of one source in flight at once


class BootstrapLockout:
    """Gate a bootstrap request from `source` (`admit`), and count its failed secrets
    (`count_failure`)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_failures: int = MAX_FAILURES,
        window: timedelta = WINDOW,
        lockout: timedelta = LOCKOUT,
        source_rate: float = SOURCE_RATE,
        source_burst: int = SOURCE_BURST,
        source_pending: int = SOURCE_PENDING,
    ) -> None:
        self._pool = pool
        self.max_failures, self.window, self.lockout = max_failures, window, lockout
        self._rate = RateLimiter(source_rate, source_burst)
        self._pending: dict[str, int] = {}
        self._source_pending = source_pending

    @asynccontextmanager
    async def admit(self, source: str, what: str) -> AsyncIterator[None]:
        """Hold one of the source's slots while the request runs, or refuse it with
        `bootstrap.rate_limited` (and `retry_after`): in memory when the source floods,
        from PostgreSQL when it is locked out."""
        self._gate_in_memory(source)
        # Held from here: the lockout lookup counts against the in-flight bound too.
        self._pending[source] = self._pending.get(source, 0) + 1
        try:
            left = await self.locked_for(source)
            if left is not None:
                raise _locked(what, left)
            yield
        finally:
            self._pending[source] -= 1
            if not self._pending[source]:
                del self._pending[source]

    def _gate_in_memory(self, source: str) -> None:
        if self._pending.get(source, 0) >= self._source_pending:
            raise Refusal(
                "bootstrap.rate_limited",
                "too many bootstrap requests in flight from this address; wait for the answers",
                status=429,
                retry_after=1.0,
            )
        wait = self._rate.take(source)
        if wait:
            raise Refusal(
                "bootstrap.rate_limited",
                "too many bootstrap requests from this address; slow down",
                status=429,
                retry_after=wait,
            )

    async def locked_for(self, source: str) -> float | None:
        """Seconds the source must still wait (None when it may try)."""
        left = await self._pool.fetchval(
            "SELECT extract(epoch FROM locked_until - now()) FROM bootstrap_failures "
            "WHERE source = $1 AND locked_until > now()",
            source,
        )
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
                                 THEN now() + least($4::interval, $5::interval
                                      * power(2, least(bootstrap_failures.failures + 1 - $3, 30)))
                                 ELSE bootstrap_failures.locked_until END
               RETURNING failures""",
            source,
            self.window,
            self.max_failures,
            self.lockout,
            FIRST_DELAY,
        )
        log.warning("bootstrap.secret_refused", **kv(what=what, source=source, failures=failures))
        return int(failures)


def _locked(what: str, left: float) -> Refusal:
    return Refusal(
        "bootstrap.rate_limited",
        f"too many failed {what}s from this address; retry later",
        status=429,
        retry_after=round(left, 1),
    )
