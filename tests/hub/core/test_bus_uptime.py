"""When silence is evidence (hub/core/_bus_uptime.py), on a clock the test turns: the
sweeps pause while the bus is down, then until both the bus has been up and no edge
has come back for the grace, and never longer than MAX_PAUSE_GRACES graces."""

from __future__ import annotations

import pytest

from hub.core import _bus_uptime
from hub.core._bus_uptime import MAX_PAUSE_GRACES, BusUptime


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(_bus_uptime.time, "monotonic", clock)
    return clock


def test_a_starting_replica_hears_at_once_and_an_outage_pauses_it_for_the_grace(clock):
    bus = BusUptime(grace=30)
    desktops = bus.returns()
    assert bus.heard()
    desktops(("t", "a"))  # nothing settling: no effect
    assert bus.heard()
    bus.lost()
    clock.now += 600
    assert not bus.heard(), "silence while the bus is down is no evidence"
    bus.restored()
    clock.now += 29.9
    assert not bus.heard()
    clock.now += 0.1
    assert bus.heard(), "nobody came back and the grace passed: silence is evidence again"


def test_edges_still_coming_back_keep_the_pause_until_none_has_for_the_grace(clock):
    bus = BusUptime(grace=30)
    desktops = bus.returns()
    bus.lost()
    bus.restored()
    for i in range(80):  # one edge back a second, for 80 s (the fleet bench's 11,000)
        clock.now += 1
        desktops(("t", str(i)))
        desktops(("t", str(i // 2)))  # (beats of edges already back)
        assert not bus.heard(), f"{i + 1} s after the bus came back, edges still arriving"
    clock.now += 29.9
    desktops(("t", "3"))  # one already back beats again: not a return
    assert not bus.heard()
    clock.now += 0.1
    assert bus.heard()


def test_a_trickle_of_returns_cannot_pause_the_sweeps_for_longer_than_the_bound(clock):
    bus = BusUptime(grace=2)
    gateways = bus.returns()
    bus.lost()
    bus.restored()
    for i in range(int(2 * MAX_PAUSE_GRACES) - 1):
        clock.now += 1
        gateways(("t", str(i)))
        assert not bus.heard()
    clock.now += 1
    gateways(("t", "late"))
    assert bus.heard(), "paused for MAX_PAUSE_GRACES graces at most"


def test_a_second_outage_while_settling_starts_over(clock):
    bus = BusUptime(grace=10)
    desktops = bus.returns()
    bus.lost()
    bus.restored()
    clock.now += 5
    desktops(("t", "a"))
    bus.lost()
    clock.now += 50
    assert not bus.heard()
    bus.restored()
    clock.now += 9
    desktops(("t", "a"))  # back again after the second outage: a return
    clock.now += 9
    assert not bus.heard()
    clock.now += 1
    assert bus.heard()


def test_each_kind_of_edge_is_counted_apart(clock):
    bus = BusUptime(grace=10)
    desktops, gateways = bus.returns(), bus.returns()
    bus.lost()
    bus.restored()
    clock.now += 8
    desktops(("t", "same-id"))
    clock.now += 8
    gateways(("t", "same-id"))  # a Gateway with a Desktop's id: a return of its own
    clock.now += 9
    assert not bus.heard()
    clock.now += 1
    assert bus.heard()


def test_a_stall_of_the_event_loop_deafens_the_replica_for_as_long_again(clock):
    bus = BusUptime(grace=30)
    bus.stalled(12.0)  # the beats sent meanwhile still wait unread in the socket
    assert not bus.heard()
    clock.now += 11.9
    assert not bus.heard()
    clock.now += 0.1
    assert bus.heard(), "the loop has run for as long as it stalled: silence is evidence"


def test_a_sweep_the_loop_runs_before_its_watch_after_a_stall_hears_nothing(clock):
    bus = BusUptime(grace=30)
    bus._ticked = clock.now  # the watch's last tick, just before the loop stalled
    clock.now += _bus_uptime.LOOP_TICK + _bus_uptime.LOOP_STALL + 0.01
    assert not bus.heard(), "the watch has not run since: the loop is only now back"
    bus._ticked = clock.now
    assert bus.heard()


async def test_the_loop_watch_measures_a_real_stall_and_pauses_the_sweeps():
    import asyncio
    import time

    from hub.core import HubMetrics

    metrics = HubMetrics()
    bus = BusUptime(grace=30, metrics=metrics)
    watch = asyncio.create_task(bus.watch_loop())
    try:
        await asyncio.sleep(0.3)
        assert bus.heard()
        time.sleep(1.5)  # the whole loop blocked (a GC pause, a starved CPU)
        assert not bus.heard(), "a sweep run straight after the stall concludes nothing"
        await asyncio.sleep(0.3)  # the watch has measured it
        assert not bus.heard()
        stalls = metrics.registry.get_sample_value(
            "cowork_event_loop_lag_seconds_bucket", {"le": "1.0"}
        )
        total = metrics.registry.get_sample_value("cowork_event_loop_lag_seconds_count")
        assert total - stalls == 1, "one tick over a second late"
        await asyncio.sleep(1.5)
        assert bus.heard()
    finally:
        watch.cancel()
