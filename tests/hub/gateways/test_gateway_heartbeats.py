"""Gateway heartbeats against the real hub, NATS and PostgreSQL, on the same batching
writer as Desktop presence: a fleet's heartbeats are written in a few transactions
(never one round trip each) and each is answered with its registration's state; a
heartbeat that comes too late never revives a Gateway the sweep marked unhealthy;
two beats from one Gateway in one flush are coalesced into one write."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from gatewaykit import TENANT, healthy_beat

from hub.core._beats import CLOCK_SKEW
from hub.gateways._service import GatewayError

FLEET = 300
pytestmark = pytest.mark.timeout(120)


async def _fleet(hub, count: int, status: str = "active") -> list[str]:
    """`count` registered Gateways (rows as registration leaves them)."""
    batch = uuid.uuid4().hex[:8]
    ids = [f"gwfleet{batch}{i:04d}" for i in range(count)]
    await hub.pool.execute(
        """INSERT INTO gateway_registrations (tenant, registration_id, display_name, kind,
               trust_model, scopes, sync_scopes, credential_expires_at, public_key, status,
               registered_at, created_by)
           SELECT $1, id, 'fleet', 'edge_worker', 'self_hosted_same_operator', '{}', '{}',
               now() + interval '1 day', 'UKEY', $3, now(), 'test'
           FROM unnest($2::text[]) AS id""",
        TENANT,
        ids,
        status,
    )
    return ids


_beat = healthy_beat


async def _commits(hub) -> int:
    return await hub.pool.fetchval(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
    )


async def _row(hub, reg_id: str) -> dict:
    return dict(
        await hub.pool.fetchrow(
            "SELECT * FROM gateway_registrations WHERE tenant = $1 AND registration_id = $2",
            TENANT,
            reg_id,
        )
    )


async def test_a_fleets_heartbeats_are_written_together_and_each_answered(hub):
    ids = await _fleet(hub, FLEET, status="unhealthy")
    await asyncio.sleep(0.6)  # pg_stat_database is updated at most every 0.5 s
    before = await _commits(hub)
    replies = await asyncio.gather(*(hub.gateways.heartbeat(TENANT, i, _beat(1)) for i in ids))
    assert {r.state for r in replies} == {"active"}
    await asyncio.sleep(0.6)
    # One transaction per flush for the whole fleet (plus the hub's own sweeps and
    # the statistics queries), never one per Gateway.
    assert await _commits(hub) - before < FLEET // 5
    rows = await hub.pool.fetch(
        "SELECT status, heartbeats_accepted, heartbeat_sequence FROM gateway_registrations "
        "WHERE tenant = $1 AND registration_id = ANY($2)",
        TENANT,
        ids,
    )
    assert {(r["status"], r["heartbeats_accepted"], r["heartbeat_sequence"]) for r in rows} == {
        ("active", 1, 1)
    }
    # Each came back from unhealthy: one transition audited each.
    audited = await hub.pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE tenant = $1 AND target_id = ANY($2) "
        "AND action = 'gateway.registration.heartbeat'",
        TENANT,
        ids,
    )
    assert audited == FLEET


async def test_a_late_heartbeat_does_not_revive_a_gateway_that_has_gone(hub):
    (reg_id,) = await _fleet(hub, 1, status="unhealthy")
    late = hub.metrics.presence_late.labels("gateway")
    late_before = late._value.get()
    sent = datetime.now(UTC) - timedelta(seconds=3 * 5.0 + CLOCK_SKEW)
    with pytest.raises(GatewayError) as refused:
        await hub.gateways.heartbeat(TENANT, reg_id, _beat(1), sent_at=sent)
    assert refused.value.code == "gateway.late_heartbeat"
    row = await _row(hub, reg_id)
    assert (row["status"], row["heartbeats_accepted"]) == ("unhealthy", 0)
    assert late._value.get() == late_before + 1
    # A heartbeat sent now does revive it.
    reply = await hub.gateways.heartbeat(TENANT, reg_id, _beat(2), sent_at=datetime.now(UTC))
    assert reply.state == "active"


async def test_two_beats_in_one_flush_are_one_write(hub):
    (reg_id,) = await _fleet(hub, 1)
    first = asyncio.create_task(hub.gateways.heartbeat(TENANT, reg_id, _beat(1)))
    await asyncio.sleep(0)  # noted first
    second = await hub.gateways.heartbeat(TENANT, reg_id, _beat(2))
    assert second.state == "active"
    with pytest.raises(GatewayError) as refused:
        await first
    assert refused.value.code == "gateway.stale_heartbeat"
    # An older sequence than the one waiting is refused at once, never written.
    waiting = asyncio.create_task(hub.gateways.heartbeat(TENANT, reg_id, _beat(5)))
    await asyncio.sleep(0)
    with pytest.raises(GatewayError) as stale:
        await hub.gateways.heartbeat(TENANT, reg_id, _beat(4))
    assert stale.value.code == "gateway.stale_heartbeat"
    assert (await waiting).state == "active"
    row = await _row(hub, reg_id)
    assert (row["heartbeats_accepted"], row["heartbeat_sequence"]) == (2, 5)


async def test_a_revoked_gateways_beats_in_a_batch_are_refused_and_the_rest_answered(hub):
    ids = await _fleet(hub, 20)
    await hub.pool.execute(
        "UPDATE gateway_registrations SET status = 'revoked', public_key = NULL "
        "WHERE tenant = $1 AND registration_id = $2",
        TENANT,
        ids[0],
    )
    results = await asyncio.gather(
        *(hub.gateways.heartbeat(TENANT, i, _beat(1)) for i in ids), return_exceptions=True
    )
    assert isinstance(results[0], GatewayError) and results[0].code == "gateway.revoked"
    assert {r.state for r in results[1:]} == {"active"}
