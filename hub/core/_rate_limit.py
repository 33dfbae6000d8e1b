"""Per-principal token buckets for bus requests (heartbeats, fenced writes).

Each hub replica keeps its own buckets: a Gateway spread over N replicas gets
at most N times the rate, which bounds abuse without a shared round trip on
the hot path. A refusal carries how long to wait (`retry_after`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`rate` tokens per second, bursts up to `burst`; keys are forgotten when full."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self._max_keys = rate, burst, max_keys
        self._buckets: dict[object, _Bucket] = {}

    def take(self, key: object, now: float | None = None, *, cost: float = 1.0) -> float:
        """0.0 when allowed (`cost` tokens spent, at most a burst), else the seconds
        until they are available."""
        cost = min(cost, self.burst)
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._evict_full(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        # (`now` may be a message's own time: one older than the last never refills)
        bucket.tokens = min(self.burst, bucket.tokens + max(0.0, now - bucket.updated) * self.rate)
        bucket.updated = max(bucket.updated, now)
        if bucket.tokens >= cost:
            bucket.tokens -= cost
            return 0.0
        # Never 0.0 for a refusal (callers read 0.0 as "allowed"): a wait under
        # 0.5 ms must not round to it, or a flood is let through at several times
        # the rate, by the calls that land just before each token is due.
        return max(round((cost - bucket.tokens) / self.rate, 3), 0.001)

    def _evict_full(self, now: float) -> None:
        full = [
            k
            for k, b in self._buckets.items()
            if b.tokens + (now - b.updated) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self._max_keys:  # still full: drop the stalest
            oldest = min(self._buckets, key=lambda k: self._buckets[k].updated)
            del self._buckets[oldest]
