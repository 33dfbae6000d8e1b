"""The relay's JetStream publishes (`StoredAcks`, edges/desktop/_relay.py) against a
real nats-server: back only once the stream stored every message of the batch, in
order; a message the stream already has (its id in the duplicate window) is
stored, not refused; a refusal or a subject no stream takes raises, so the relay
keeps the rows and publishes them again."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest
from nats.js.errors import APIError, NoStreamResponseError

from edges.desktop._relay import StoredAcks


async def _stream(js, **limits) -> str:
    name = f"ACKS_{uuid.uuid4().hex[:8].upper()}"
    await js.add_stream(name=name, subjects=[f"acks.{name.lower()}.>"], **limits)
    return name


def _rows(name: str, ids: list[str]) -> list[tuple[int, str, str, bytes]]:
    return [(i, f"acks.{name.lower()}.e", msg_id, msg_id.encode()) for i, msg_id in enumerate(ids)]


async def test_a_batch_is_back_once_every_message_is_stored_in_order(nats_url):
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        name = await _stream(js)
        acks = StoredAcks(nc)
        await acks.publish(_rows(name, [f"m{i}" for i in range(500)]), 5.0)
        info = await js.stream_info(name)
        assert info.state.messages == 500
        first = await js.get_msg(name, 1)
        last = await js.get_msg(name, 500)
        assert (first.data, last.data) == (b"m0", b"m499")
        # The same rows again (a drain that timed out and runs again): duplicates
        # by their ids, acknowledged, not stored twice.
        await acks.publish(_rows(name, [f"m{i}" for i in range(500)]), 5.0)
        assert (await js.stream_info(name)).state.messages == 500
    finally:
        await nc.close()


async def test_a_refused_message_or_no_stream_raises(nats_url):
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        name = await _stream(js, max_msg_size=64)
        acks = StoredAcks(nc)
        rows = _rows(name, ["small"]) + [(1, f"acks.{name.lower()}.e", "big", b"x" * 1000)]
        with pytest.raises(APIError):
            await acks.publish(rows, 5.0)
        with pytest.raises(NoStreamResponseError):
            await acks.publish([(0, "acks.nobody.e", "id", b"x")], 5.0)
        # The connection's ack inbox still serves the next batch.
        await acks.publish(_rows(name, ["after"]), 5.0)
        assert (await js.get_msg(name, 2)).data == b"after"
    finally:
        await nc.close()


async def test_batches_published_at_once_are_acked_one_after_the_other(nats_url):
    """A stopping agent's flush may overlap the publisher's drain: each batch still
    waits for its own answers, and neither is taken for the other's (the first
    batch's refusal is the first's, not lost under the second's success)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        name = await _stream(js, max_msg_size=64)
        acks = StoredAcks(nc)
        first = _rows(name, [f"a{i}" for i in range(300)])
        first.append((300, f"acks.{name.lower()}.e", "too-big", b"x" * 1000))
        second = _rows(name, [f"b{i}" for i in range(300)])
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                acks.publish(first, 5.0), acks.publish(second, 5.0), return_exceptions=True
            ),
            10,
        )
        assert isinstance(outcomes[0], APIError), outcomes[0]
        assert outcomes[1] is None
        assert (await js.stream_info(name)).state.messages == 600
    finally:
        await nc.close()


def test_an_answer_is_a_refusal_only_when_it_carries_an_error():
    from edges.desktop._relay import _refusal

    assert _refusal(b'{"stream":"error","seq":3}') is None
    assert _refusal(b'{"stream":"S","seq":3,"domain":"error"}') is None
    refused = _refusal(b'{"error":{"code":400,"err_code":10054,"description":"message size"}}')
    assert refused is not None and refused.err_code == 10054
    assert _refusal(b'"error" not json') is not None
