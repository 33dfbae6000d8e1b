"""Limits. Ingress, per (instance, source): a token-bucket request rate and an
auth-failure lockout, both answering "how long to wait" so the webhook can say
429 with Retry-After. Delivery, per instance: the circuit breaker. Both delivery
retries and outbound transports' reconnects wait `backoff_delay`.

Channel code may not import the hub, so this is its own small implementation.
State is per process and bounded: under a flood of distinct sources the
buckets that are full again (idle sources) are forgotten first.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING

from schemas import ChannelInstanceState

if TYPE_CHECKING:
    from ._runtime import Instance


class TokenBuckets:
    """`rate` tokens per second, bursts up to `burst`, one bucket per key."""

    __slots__ = ("rate", "burst", "_max_keys", "_buckets")

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate, self.burst, self._max_keys = rate, burst, max_keys
        # key -> [tokens, updated]; a list, not an object, to keep the hot path lean
        self._buckets: dict[Hashable, list[float]] = {}

    def take(self, key: Hashable, now: float | None = None) -> float:
        """0.0 when allowed (one token spent), else seconds until a token is available."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                self._evict(now)
            bucket = self._buckets[key] = [self.burst, now]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return 0.0
        bucket[0] = tokens
        return (1.0 - tokens) / self.rate

    def _evict(self, now: float) -> None:
        full = [
            k
            for k, (tokens, updated) in self._buckets.items()
            if tokens + (now - updated) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]
        if len(self._buckets) >= self._max_keys:  # still full: drop the stalest
            del self._buckets[min(self._buckets, key=lambda k: self._buckets[k][1])]


class Lockout:
    """`failures` authentication failures within `window` seconds lock a key out
    until the window has passed since the failure that locked it."""

    __slots__ = ("failures", "window", "_max_keys", "_recent", "_locked_until")

    def __init__(self, failures: int, window: float, *, max_keys: int = 100_000) -> None:
        if failures < 1 or window <= 0:
            raise ValueError("failures must be >= 1 and window > 0")
        self.failures, self.window, self._max_keys = failures, window, max_keys
        self._recent: dict[Hashable, deque[float]] = {}
        self._locked_until: dict[Hashable, float] = {}

    def retry_after(self, key: Hashable, now: float | None = None) -> float:
        """Seconds the key stays locked out, 0.0 when it may try."""
        if not self._locked_until:  # the common case: nobody is locked out
            return 0.0
        until = self._locked_until.get(key)
        if until is None:
            return 0.0
        now = time.monotonic() if now is None else now
        if now >= until:
            del self._locked_until[key]
            self._recent.pop(key, None)
            return 0.0
        return until - now

    def fail(self, key: Hashable, now: float | None = None) -> bool:
        """Count one failure; True when this failure locks the key out."""
        now = time.monotonic() if now is None else now
        recent = self._recent.get(key)
        if recent is None:
            if len(self._recent) >= self._max_keys:
                self._evict(now)
            recent = self._recent[key] = deque(maxlen=self.failures)
        while recent and now - recent[0] >= self.window:
            recent.popleft()
        recent.append(now)
        if len(recent) >= self.failures:
            self._locked_until[key] = now + self.window
            return True
        return False

    def _evict(self, now: float) -> None:
        stale = [k for k, d in self._recent.items() if not d or now - d[-1] >= self.window]
        for key in stale:
            del self._recent[key]
        if len(self._recent) >= self._max_keys:
            del self._recent[min(self._recent, key=lambda k: self._recent[k][-1])]


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """The wait before retry number `attempt` (1, 2, ...): full jitter over
    base * 2^(attempt-1), at most `cap` (the one backoff of channel code)."""
    return random.uniform(0, min(cap, base * 2 ** (max(1, attempt) - 1)))


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds; never 0 (that would invite an immediate retry)."""
    return str(max(1, math.ceil(seconds)))


class Breaker:
    """Closed -> open (after `threshold` consecutive failures) -> half-open (one attempt)."""

    def __init__(self, instance: Instance, threshold: int, cooldown: float) -> None:
        self._instance, self._threshold, self._cooldown = instance, threshold, cooldown
        self.state = "closed"
        self.until = 0.0
        self._changed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self.state == "closed"

    def admit_now(self) -> tuple[bool, float | None]:
        """(admitted, seconds to wait or None to wait for the half-open outcome)."""
        if self.state == "closed":
            return True, 0.0
        if self.state == "open":
            left = self.until - time.monotonic()
            if left > 0:
                return False, left
            self.state = "half_open"  # this caller makes the one trial attempt
            return True, 0.0
        return False, None

    def changed(self) -> asyncio.Event:
        """Set when the half-open outcome is known (taken now, so none is missed)."""
        return self._changed

    def _signal(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def success(self) -> None:
        instance = self._instance
        instance.consecutive_failures = 0
        if self.state != "closed":
            self.state = "closed"
            self._signal()
        if instance.state == ChannelInstanceState.DEGRADED:
            instance.mark(ChannelInstanceState.READY, "delivering")

    def failure(self) -> None:
        instance = self._instance
        instance.consecutive_failures += 1
        if self.state == "half_open" or (
            self.state == "closed" and instance.consecutive_failures >= self._threshold
        ):
            self.state, self.until = "open", time.monotonic() + self._cooldown
            self._signal()
            if instance.state in (ChannelInstanceState.READY, ChannelInstanceState.DEGRADED):
                instance.mark(
                    ChannelInstanceState.DEGRADED,
                    (
                        f"circuit open after {instance.consecutive_failures} consecutive "
                        f"failed deliveries; trying again in {self._cooldown:g} s"
                    ),
                )
