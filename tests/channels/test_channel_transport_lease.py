"""The single-connection lease of an outbound transport (CW_CHANNEL_LEASES
semantics, on a bucket of its own with a 1 s TTL so the test is quick; the lease
is `channels.KvLease`, the hub's partition leases' too): one holder at a time;
a crashed holder's lease ages out and is taken over, and the old holder can
neither renew it nor think itself sure past two thirds of a TTL; a later holder's
fencing token is larger; a handed-back lease is free at once; one instance's
lease is not another's."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
import pytest
from nats.js.api import StreamConfig

from channels import KvLease, LeaseLost
from channels.runtime import _transport_state as state

TTL = 1.0


@pytest.fixture
async def js(nats_url, monkeypatch):
    nc = await nats.connect(nats_url)
    bucket = f"TEST_LEASES_{uuid.uuid4().hex[:8].upper()}"
    js = nc.jetstream()
    # As the hub declares its buckets (hub/core/_streams.py): direct gets, one value
    # a key, keys aging out after the TTL.
    await js.add_stream(
        StreamConfig(
            name=f"KV_{bucket}",
            subjects=[f"$KV.{bucket}.>"],
            max_age=TTL,
            max_msgs_per_subject=1,
            allow_direct=True,
            duplicate_window=TTL,
        )
    )
    monkeypatch.setattr(state, "LEASE_BUCKET", bucket)
    yield js
    await js.delete_key_value(bucket)
    await nc.close()


def lease(js, holder: str, instance: str = "tg-1") -> KvLease:
    return state.transport_lease(js, "acme", instance, holder, ttl=TTL, timeout=2.0)


async def test_one_holder_and_a_crashed_one_is_taken_over(js) -> None:
    a, b = lease(js, "edge gw1"), lease(js, "hub replica r1")
    assert await a.try_take() and a.sure()
    assert not await b.try_take()
    assert await b.holder_now() == "edge gw1"  # held: b learns by whom
    crashed_at = time.monotonic()  # a stops renewing (a kill -9)
    while not await b.try_take():
        assert await b.holder_now() in ("edge gw1", None)
        assert time.monotonic() - crashed_at < TTL + 3, "the lease never aged out"
        await asyncio.sleep(0.1)
    took = time.monotonic() - crashed_at
    assert took >= TTL * 2 / 3, took  # not before the old holder stopped being sure
    assert not a.sure()  # two thirds of a TTL have passed: a has stopped working
    assert b.token > a.token > 0  # b's writes fence a's
    with pytest.raises(LeaseLost):
        await a.renew()  # and cannot take it back
    assert not a.held and a.token == 0
    await b.renew()
    assert b.sure()


async def test_a_handed_back_lease_is_free_at_once_and_leases_are_per_instance(js) -> None:
    a, b = lease(js, "a"), lease(js, "b")
    assert await a.try_take()
    assert await lease(js, "c", instance="tg-2").try_take()  # another instance
    await a.release()
    assert not a.held
    assert await b.holder_now() is None
    assert await b.try_take()  # at once, not after a TTL
    await a.release()  # releasing again (nothing held) changes nothing
    d = lease(js, "d")
    assert not await d.try_take() and await d.holder_now() == "b"


async def test_a_key_aging_out_inside_a_take_is_taken_not_raised(js) -> None:
    """nats-py's create, refused because a key is there, reads the key to see
    whether it is a delete marker. When the key ages out between the two, that
    read finds nothing and raises KeyNotFoundError (seen in CI). The take must
    treat the key as free, not fail. The race is forced on the real server: the
    read waits until the key has really aged out."""
    a, b = lease(js, "edge gw1"), lease(js, "hub replica r1")
    assert await a.try_take()
    real_get, forced = b._kv._get, []

    async def get_after_the_key_aged_out(key, revision=None):
        if not forced:
            forced.append(key)
            deadline = time.monotonic() + TTL + 5
            while await a.holder_now() is not None:
                assert time.monotonic() < deadline, "the key never aged out"
                await asyncio.sleep(0.05)
        return await real_get(key, revision)

    b._kv._get = get_after_the_key_aged_out
    assert await b.try_take()  # not KeyNotFoundError
    assert forced and b.held and b.token > a.token
    assert await b.holder_now() == "hub replica r1"
