"""The batching heartbeat writer's own rules, without a database (the rooms' tests,
tests/hub/desktop/test_presence.py and tests/hub/gateways/test_gateway_heartbeats.py,
run it against PostgreSQL): one write per flush with the latest beat per sender,
a failed write keeps its beats, a late beat is dropped and counted, and a
superseded beat's waiter learns the later beat's refusal."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from hub.core import BeatWriter, LateBeat, Superseded
from hub.core._beats import CLOCK_SKEW


class Recorder:
    def __init__(self) -> None:
        self.writes: list[list[tuple[str, int]]] = []
        self.fail = False
        self.refuse: set[str] = set()
        self.late = 0

    async def write(self, chunk: list[tuple[str, int]]) -> dict:
        if self.fail:
            raise ConnectionError("the database is away")
        self.writes.append(chunk)
        return {k: (ValueError(f"refused {k}") if k in self.refuse else b) for k, b in chunk}

    def on_late(self, n: int) -> None:
        self.late += n


def _writer(rec: Recorder) -> BeatWriter[str, int]:
    return BeatWriter("test", rec.write, on_late=rec.on_late)


async def test_one_write_per_flush_with_the_latest_beat_of_each_sender():
    rec = Recorder()
    beats = _writer(rec)
    for n in range(3):
        for key in ("b", "a"):
            beats.note(key, n, interval=5.0)
    assert await beats.flush() == 2
    assert rec.writes == [[("a", 2), ("b", 2)]]  # key order, the latest of each


async def test_a_failed_write_keeps_its_beats_unless_a_newer_one_came():
    rec = Recorder()
    beats = _writer(rec)
    beats.note("a", 1, interval=5.0)
    beats.note("b", 1, interval=5.0)
    rec.fail = True
    with pytest.raises(ConnectionError):
        await beats.flush()
    beats.note("b", 2, interval=5.0)
    rec.fail = False
    await beats.flush()
    assert rec.writes == [[("a", 1), ("b", 2)]]


async def test_late_beats_are_dropped_counted_and_their_waiters_told():
    rec = Recorder()
    beats = _writer(rec)
    beats.note("taken-long-ago", 1, interval=1.0).taken_at -= 3.0
    sent = datetime.now(UTC) - timedelta(seconds=2 * 1.0 + CLOCK_SKEW + 1)
    waiter = asyncio.create_task(beats.beat("sent-long-ago", 1, interval=1.0, sent_at=sent))
    await asyncio.sleep(0)
    assert await beats.flush() == 0
    assert rec.late == 2 and rec.writes == []
    with pytest.raises(LateBeat):
        await waiter


async def test_a_superseded_beat_learns_the_later_ones_refusal_or_that_it_was_replaced():
    rec = Recorder()
    beats = _writer(rec)
    first = asyncio.create_task(beats.beat("a", 1, interval=5.0))
    await asyncio.sleep(0)
    second = asyncio.create_task(beats.beat("a", 2, interval=5.0))
    await asyncio.sleep(0)
    await beats.flush()
    assert await second == 2
    with pytest.raises(Superseded):
        await first
    rec.refuse.add("a")
    first = asyncio.create_task(beats.beat("a", 3, interval=5.0))
    await asyncio.sleep(0)
    second = asyncio.create_task(beats.beat("a", 4, interval=5.0))
    await asyncio.sleep(0)
    await beats.flush()
    for task in (first, second):
        with pytest.raises(ValueError, match="refused a"):
            await task


async def test_a_goodbye_waits_for_the_write_of_its_earlier_beat_already_in_flight():
    """A goodbye handled while the sender's last beat is being written must not be
    overtaken by that write (it would mark the sender online again after it left)."""
    order: list[str] = []
    release = asyncio.Event()

    async def slow_write(chunk: list[tuple[str, int]]) -> dict:
        order.append("write started")
        await release.wait()
        order.append("beat written")
        return {}

    beats: BeatWriter[str, int] = BeatWriter("test", slow_write, on_late=lambda n: None)
    beats.note("d1", 1, interval=5.0)
    flushing = asyncio.create_task(beats.flush())
    await asyncio.sleep(0)
    assert order == ["write started"]

    async def goodbye() -> None:
        await beats.forget("d1")
        order.append("goodbye written")

    leaving = asyncio.create_task(goodbye())
    await asyncio.sleep(0.05)
    assert order == ["write started"], "the goodbye must wait for the beat in flight"
    release.set()
    await asyncio.gather(flushing, leaving)
    assert order == ["write started", "beat written", "goodbye written"]
    await beats.forget("d2")  # nothing noted, nothing in flight: returns at once


async def test_the_writer_is_behind_while_beats_wait_longer_than_a_second_for_a_write(
    monkeypatch,
):
    """A slow write (or a failing one) leaves beats the hub took unwritten: the sweeps
    ask `behind()` before reading silence into stale stamps."""
    monkeypatch.setattr("hub.core._beats.BEHIND_SECONDS", 0.2)
    rec, release = Recorder(), asyncio.Event()
    slow_write = rec.write

    async def stalled(chunk):
        await release.wait()
        return await slow_write(chunk)

    writer = BeatWriter("test", stalled, on_late=rec.on_late)
    assert not writer.behind(), "nothing noted: nothing to be behind on"
    writer.note("a", 1, interval=5)
    flushing = asyncio.create_task(writer.flush())
    await asyncio.sleep(0.05)
    writer.note("b", 1, interval=5)  # waits behind the stalled write
    assert not writer.behind()
    await asyncio.sleep(0.25)
    assert writer.behind(), "beats have waited longer than BEHIND_SECONDS"
    release.set()
    await flushing
    assert writer.behind(), "b, noted after the flush began, is still unwritten"
    await writer.flush()
    assert not writer.behind()
    # A failing write keeps its beats, and the writer behind, until one succeeds.
    rec.fail = True
    writer.note("c", 1, interval=5)
    with pytest.raises(ConnectionError):
        await writer.flush()
    await asyncio.sleep(0.25)
    assert writer.behind()
    rec.fail = False
    await writer.flush()
    assert not writer.behind()


async def test_deaf_seconds_say_how_long_silence_has_been_no_evidence(monkeypatch):
    """0 while the writer keeps up; while it is behind, the time since silence was
    last evidence (so a reader judging stamps by their age allows for it); 0 again
    once it has caught up."""
    monkeypatch.setattr("hub.core._beats.BEHIND_SECONDS", 0.1)
    rec, release = Recorder(), asyncio.Event()

    async def stalled(chunk):
        await release.wait()
        return await rec.write(chunk)

    writer = BeatWriter("test", stalled, on_late=rec.on_late)
    assert writer.deaf_seconds() == 0.0
    writer.note("a", 1, interval=5)
    flushing = asyncio.create_task(writer.flush())
    await asyncio.sleep(0.3)
    first = writer.deaf_seconds()
    assert 0.25 <= first < 1.0, first
    await asyncio.sleep(0.2)
    assert writer.deaf_seconds() >= first + 0.15, "it grows while the writer is behind"
    release.set()
    await flushing
    assert writer.deaf_seconds() == 0.0
