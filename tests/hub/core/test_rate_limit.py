"""The per-Gateway token buckets behind heartbeat and fenced-write rate limits."""

import pytest

from hub.core._rate_limit import RateLimiter


def test_a_burst_is_allowed_then_refused_with_the_wait():
    limiter = RateLimiter(rate=2.0, burst=3)
    assert [limiter.take("gw", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("gw", now=100.0)
    assert wait == pytest.approx(0.5)  # one token every 0.5 s at 2/s


def test_tokens_come_back_with_time_and_never_beyond_the_burst():
    limiter = RateLimiter(rate=1.0, burst=2)
    limiter.take("gw", now=0.0)
    limiter.take("gw", now=0.0)
    assert limiter.take("gw", now=0.0) > 0
    assert limiter.take("gw", now=1.0) == 0.0
    # A long pause refills to the burst only: two allowed, the third waits.
    assert [limiter.take("gw", now=1000.0) for _ in range(3)][:2] == [0.0, 0.0]
    assert limiter.take("gw", now=1000.0) > 0


def test_a_flood_gets_the_rate_and_no_more():
    """A refusal is never 0.0 (which callers read as allowed), however close the next
    token is: 7,200 calls a second for 10 s at 20/s (burst 100) get 300 (899 when
    sub-millisecond waits rounded to 0.0)."""
    limiter = RateLimiter(rate=20.0, burst=100)
    waits = [limiter.take("src", now=n / 7200) for n in range(1, 72_001)]
    assert 100 + 200 - 1 <= waits.count(0.0) <= 100 + 200  # float sums: the last may be late
    assert min(w for w in waits if w) > 0


def test_keys_do_not_share_a_bucket():
    limiter = RateLimiter(rate=1.0, burst=1)
    assert limiter.take(("acme", "gw1"), now=0.0) == 0.0
    assert limiter.take(("acme", "gw1"), now=0.0) > 0
    assert limiter.take(("acme", "gw2"), now=0.0) == 0.0


def test_memory_stays_bounded_when_many_keys_arrive():
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=10)
    for i in range(100):
        limiter.take(i, now=float(i))
    assert len(limiter._buckets) <= 10
    # The newest key still has its state (it was refused a second time at once).
    assert limiter.take(99, now=99.0) > 0


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 5), (1, 0)])
def test_nonsense_limits_are_refused(rate, burst):
    with pytest.raises(ValueError):
        RateLimiter(rate=rate, burst=burst)
