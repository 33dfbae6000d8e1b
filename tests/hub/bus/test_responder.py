"""The one bus pipeline (hub.bus): a route per hub-consumed request family, answers
only on the requester's own inbox, the envelope's source checked against the subject,
and the bootstrap gates in memory before the database."""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from datetime import UTC, datetime

import nats
import pytest
from desktopkit import TENANT, eventually, redeem

from hub.bus import BootstrapLockout
from hub.core import Refusal, db, flushed, streams
from schemas import AckReply, CommandAck, Envelope, Source, decode, subjects

OTHER_TENANT = "globex"


def _hub_consumed(*deliveries: subjects.Delivery) -> set[str]:
    return {f.name for f in subjects.FAMILIES if f.delivery in deliveries and "hub" in f.consumer}


async def test_every_family_the_hub_consumes_has_exactly_one_handler(hub):
    """Requests and notices: one route each in the one responder, none extra; stream
    families: one durable hub consumer each, none extra."""
    R, C, J = subjects.Delivery.REQUEST, subjects.Delivery.CORE, subjects.Delivery.JETSTREAM
    assert set(hub.bus.routes) == _hub_consumed(R, C)
    with pytest.raises(ValueError, match="already has a route"):
        await hub.bus.serve([hub.bus.routes["work.claim"]], queue="hub-twice")
    by_filter = {f.filter(): f.name for f in subjects.FAMILIES}
    consumers = Counter(by_filter[spec.filter_subject] for spec in streams.HUB_CONSUMERS)
    assert set(consumers) == _hub_consumed(J) and set(consumers.values()) == {1}, consumers
    # A partitioned family adds exactly one consumer per partition, and nothing else.
    partitions = hub.settings.event_partitions
    extra = streams.hub_consumers(partitions)[len(streams.HUB_CONSUMERS) :]
    partitioned = [f for f in subjects.FAMILIES if f.partition_by]
    assert sorted(s.filter_subject for s in extra) == sorted(
        f.partition_filter(p) for f in partitioned for p in range(partitions)
    )


async def _desktop(http, nats_url, tmp_path):
    _, store = await redeem(http, nats_url, tmp_path / "d", allowedWorkspaceIds=["ws1"])
    pairing = store.load_pairing()
    nc = await nats.connect(
        nats_url,
        user_credentials=str(store.creds_path),
        inbox_prefix=subjects.inbox_prefix(TENANT, "desktop", pairing.pairing_id),
    )
    return pairing.pairing_id, nc


def _ack(pid: str, *, source_id: str) -> bytes:
    ack = CommandAck(
        command_id="cmd" + secrets.token_hex(8),
        pairing_id=pid,
        sequence=1,
        lease_token="t" * 32,
        outcome="accepted",
    )
    source = Source(principal_kind="desktop", principal_id=source_id)
    return Envelope.wrap(ack, source=source, tenant=TENANT).encode()


async def _audit_actions(http, tenant: str) -> list[dict]:
    return (await http.get(f"/api/v1/tenants/{tenant}/audit")).json()["items"]


async def test_an_answer_goes_only_to_the_requesters_own_inbox(
    hub, http, operator_nats_url, tmp_path
):
    """A Desktop names another tenant's command subject as its reply subject: the hub,
    whose permissions cover every tenant, must not publish there."""
    pid, nc = await _desktop(http, operator_nats_url, tmp_path)
    victim = subjects.DEVICE_COMMAND.build(tenant=OTHER_TENANT, device_id="victim")
    watch = await hub.nc.subscribe(victim)
    await flushed(hub.nc)  # a misdirected answer would reach it (hub.core._flush)
    dropped = hub.metrics.bus_messages.labels("device.command_ack", "dropped")
    before = dropped._value.get()
    try:
        subject = subjects.DEVICE_COMMAND_ACK.build(tenant=TENANT, device_id=pid)
        await nc.publish(subject, _ack(pid, source_id=pid), reply=victim)
        await nc.flush()
        # The same request on its own inbox is answered (here: the command is unknown).
        answer = decode(
            (await nc.request(subject, _ack(pid, source_id=pid), timeout=5)).data, AckReply
        ).data
        assert answer.ok is False and answer.code == "command.unknown"
        with pytest.raises(nats.errors.TimeoutError):
            await watch.next_msg(timeout=0.5)
        assert dropped._value.get() == before + 1

        async def audited() -> bool:
            return any(
                r["action"] == "bus.reply_refused"
                and r["actorId"] == pid
                and r["targetId"] == victim
                for r in await _audit_actions(http, TENANT)
            )

        await eventually(audited, timeout=5, what="the audit of the misdirected reply")
    finally:
        await watch.unsubscribe()
        await nc.close()


async def test_an_envelope_speaking_for_another_principal_is_refused(
    hub, http, operator_nats_url, tmp_path
):
    pid, nc = await _desktop(http, operator_nats_url, tmp_path)
    try:
        subject = subjects.DEVICE_COMMAND_ACK.build(tenant=TENANT, device_id=pid)
        raw = await nc.request(subject, _ack(pid, source_id="someone-else"), timeout=5)
        answer = decode(raw.data, AckReply).data
        assert (answer.ok, answer.code) == (False, "contract.principal_mismatch")
        garbage = decode((await nc.request(subject, b"{", timeout=5)).data, AckReply).data
        assert (garbage.ok, garbage.code) == (False, "contract.invalid")
    finally:
        await nc.close()


async def test_a_flooding_source_is_refused_in_memory_before_the_database(database_url):
    """The gate refuses a flood without a database round trip: with the pool closed,
    the flooding source still gets its refusal while a new source reaches the
    (closed) database."""
    pool = await db.create_pool(database_url, min_size=1, max_size=2)
    async with pool.acquire() as conn:
        await db.migrate(conn)
    gate = BootstrapLockout(pool, source_rate=1.0, source_burst=3, source_pending=2)
    for _ in range(3):
        async with gate.admit("198.51.100.1", "pairing code"):
            pass
    await pool.close()
    started = datetime.now(UTC)
    for _ in range(1000):
        with pytest.raises(Refusal) as refused:
            async with gate.admit("198.51.100.1", "pairing code"):
                pass
        assert refused.value.code == "bootstrap.rate_limited" and refused.value.retry_after
    print(f"\n1000 flood refusals in {(datetime.now(UTC) - started).total_seconds() * 1000:.1f} ms")
    with pytest.raises(Exception) as other:  # another address goes on to the database
        async with gate.admit("198.51.100.2", "pairing code"):
            pass
    assert not isinstance(other.value, Refusal)


async def test_requests_in_flight_per_source_are_bounded(hub):
    gate = BootstrapLockout(hub.pool, source_pending=2)
    release = asyncio.Event()
    entered: list[int] = []

    async def hold(i: int) -> None:
        async with gate.admit("198.51.100.9", "pairing code"):
            entered.append(i)
            await release.wait()

    holders = [asyncio.create_task(hold(i)) for i in range(2)]
    await eventually(lambda: len(entered) == 2, timeout=5, what="two requests in flight")
    with pytest.raises(Refusal, match="in flight"):
        async with gate.admit("198.51.100.9", "pairing code"):
            pass
    async with gate.admit("198.51.100.10", "pairing code"):  # another source is not held up
        pass
    release.set()
    await asyncio.gather(*holders)
    async with gate.admit("198.51.100.9", "pairing code"):  # its slots are back
        pass


async def test_a_copy_of_a_request_this_replica_is_still_on_is_set_aside(
    hub, http, operator_nats_url, tmp_path
):
    """An edge whose answer is slow sends its request again on the same reply inbox
    (edges.common.ask), for another replica to take. A copy that reaches the replica
    still working on the first is handled once: the hub used to run it again and
    answer twice, and the server refused the second answer (it lets the hub answer
    a reply inbox once per request delivered): 799 permission-violation warnings in
    ten minutes of the 11,000-edge fleet benchmark."""
    pid, nc = await _desktop(http, operator_nats_url, tmp_path)
    route = "device.command_ack"
    refused = hub.metrics.bus_messages.labels(route, "refused")
    copies = hub.metrics.bus_messages.labels(route, "copy")
    refused_before, copies_before = refused._value.get(), copies._value.get()
    inbox = subjects.inbox_prefix(TENANT, "desktop", pid) + ".copies"
    answers = await nc.subscribe(inbox)
    subject = subjects.DEVICE_COMMAND_ACK.build(tenant=TENANT, device_id=pid)
    try:
        async with hub.pool.acquire() as conn, conn.transaction():
            # The first copy's handler waits on this lock, as on a slow database.
            await conn.execute("LOCK TABLE pairing_commands IN ACCESS EXCLUSIVE MODE")
            for _ in range(3):
                await nc.publish(subject, _ack(pid, source_id=pid), reply=inbox)
            await nc.flush()
            await eventually(
                lambda: copies._value.get() == copies_before + 2, 5, what="the copies set aside"
            )
        first = decode((await answers.next_msg(timeout=5)).data, AckReply).data
        assert (first.ok, first.code) == (False, "command.unknown")
        with pytest.raises(nats.errors.TimeoutError):
            await answers.next_msg(timeout=0.5)
        assert refused._value.get() == refused_before + 1, "the request was handled once"
        # Once answered, the same inbox asks again and is answered again.
        await nc.publish(subject, _ack(pid, source_id=pid), reply=inbox)
        again = decode((await answers.next_msg(timeout=5)).data, AckReply).data
        assert again.code == "command.unknown"
    finally:
        await answers.unsubscribe()
        await nc.close()
