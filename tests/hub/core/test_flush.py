"""hub.core.flushed against a real nats-server: its last PING goes on the wire after
the commands sent before it, so its PONG means the server has processed them
(hub/core/_flush.py says why nats-py's flush() alone does not)."""

from __future__ import annotations

import nats
import pytest

from hub.core import flushed

WAIT = 5.0


def _record_wire(nc) -> list[bytes]:
    """The protocol lines `nc` hands its socket from now on, in order."""
    lines: list[bytes] = []
    transport = nc._transport
    write, writelines = transport.write, transport.writelines

    def recording_write(payload):
        lines.extend(bytes(payload).splitlines())
        return write(payload)

    def recording_writelines(payloads):
        for payload in payloads:
            lines.extend(bytes(payload).splitlines())
        return writelines(payloads)

    transport.write, transport.writelines = recording_write, recording_writelines
    return lines


def _verbs(lines: list[bytes]) -> list[bytes]:
    return [line.split(b" ")[0] for line in lines if line]


@pytest.fixture
async def two(nats_url: str):
    a, b = await nats.connect(nats_url), await nats.connect(nats_url)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_plain_flush_writes_its_ping_ahead_of_the_pending_sub(two):
    """The nats-py behaviour flushed() exists for; if this fails, nats-py changed
    and flushed() may become a plain flush()."""
    a, _ = two
    wire = _record_wire(a)
    await a.subscribe("t.flush.plain")
    await a.flush(timeout=int(WAIT))
    verbs = _verbs(wire)
    assert verbs.index(b"PING") < verbs.index(b"SUB"), verbs


async def test_flushed_pings_after_what_was_sent_and_interest_is_registered(two):
    a, b = two
    wire = _record_wire(a)
    for i in range(20):  # another connection publishes the moment flushed() returns
        sub = await a.subscribe(f"t.flush.{i}")
        await flushed(a)
        verbs = _verbs(wire)
        assert b"PING" in verbs[verbs.index(b"SUB") :], verbs
        wire.clear()
        await b.publish(f"t.flush.{i}", b"now")
        assert (await sub.next_msg(timeout=WAIT)).data == b"now"
        await sub.unsubscribe()
