"""Edge work under real PostgreSQL concurrency: the service is called directly,
32 callers at once through asyncio.gather, on a pool of 40 connections (so the
callers really are concurrent transactions, not queued behind a small pool).
Each race is repeated a few rounds, each round on a fresh tenant.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import uuid

import pytest
from edgeworkkit import add_registration, edge_work_service

from hub.work._common import EdgeWorkError
from hub.work._service import EdgeWorkService, EnqueueWork
from schemas import WorkClaimRequest, WorkOutput

pytestmark = pytest.mark.timeout(120)
N = 32
ROUNDS = 3


@pytest.fixture(scope="module")
async def service(hub, database_url_module):
    """A second EdgeWorkService on its own 40-connection pool (the hub's own is
    small); offers and live events go out on the hub's NATS connection."""
    async with edge_work_service(
        hub, database_url_module, hub_id="race", min_size=N + 1, max_size=40
    ) as svc:
        yield svc


def _tenant() -> str:
    return f"r{secrets.token_hex(4)}"


async def _enqueue(
    svc: EdgeWorkService,
    tenant: str,
    text: str = "go",
    *,
    workspace: str = "ws",
    key: str | None = None,
) -> dict:
    row, _ = await svc.enqueue(
        tenant,
        EnqueueWork.model_validate(
            {
                "kind": "prompt",
                "sessionRef": {"workspaceId": workspace},
                "payload": {"text": text},
                "idempotencyKey": key,
            }
        ),
    )
    return row


async def _registrations(svc: EdgeWorkService, tenant: str, n: int, **options) -> list[str]:
    return list(
        await asyncio.gather(*(add_registration(svc._pool, tenant, **options) for _ in range(n)))
    )


async def _attempt(coro):
    """The result, or the refusal code."""
    try:
        return await coro
    except EdgeWorkError as exc:
        return exc.code


def _out(
    work_id: str, token: str, sequence: int, kind: str = "event", body: dict | None = None
) -> WorkOutput:
    return WorkOutput(
        work_id=work_id,
        lease_token=token,
        kind=kind,
        sequence=sequence,
        body=body if body is not None else {"n": sequence},
    )


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_32_workers_race_for_one_item(service, round_):
    tenant = _tenant()
    regs = await _registrations(service, tenant, N)
    work = await _enqueue(service, tenant)
    replies = await asyncio.gather(
        *(service.claim(tenant, reg, WorkClaimRequest()) for reg in regs)
    )
    winners = [(reg, r) for reg, r in zip(regs, replies) if r.work_id is not None]
    assert len(winners) == 1 and winners[0][1].work_id == work["work_id"]
    leases = await service._pool.fetch(
        "SELECT registration_id FROM edge_work_leases WHERE tenant = $1", tenant
    )
    assert [r["registration_id"] for r in leases] == [winners[0][0]]


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_one_claim_sent_32_times_at_once_leases_once(service, round_):
    """One claim id in 32 concurrent transactions (a Gateway's retries landing on
    every replica at once): one lease, and every caller is answered with it."""
    tenant = _tenant()
    [reg] = await _registrations(service, tenant, 1)
    works = [await _enqueue(service, tenant, f"item {i}") for i in range(3)]
    request = WorkClaimRequest(claim_id=uuid.uuid4())
    replies = await asyncio.gather(*(service.claim(tenant, reg, request) for _ in range(N)))
    assert {(r.work_id, r.lease_token) for r in replies} == {
        (works[0]["work_id"], replies[0].lease_token)
    }
    leased = await service._pool.fetchval(
        "SELECT count(*) FROM edge_work WHERE tenant = $1 AND state = 'leased'", tenant
    )
    assert leased == 1


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_32_claimers_10_items_each_leased_once(service, round_):
    tenant = _tenant()
    regs = await _registrations(service, tenant, N, max_concurrent_work=1)
    items = {(await _enqueue(service, tenant, f"item {i}"))["work_id"] for i in range(10)}
    replies = await asyncio.gather(
        *(service.claim(tenant, reg, WorkClaimRequest()) for reg in regs)
    )
    got = [r.work_id for r in replies if r.work_id is not None]
    assert sorted(got) == sorted(items)  # every item once, no item twice
    assert (
        await service._pool.fetchval(
            "SELECT count(*) FROM edge_work_leases WHERE tenant = $1", tenant
        )
        == 10
    )


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_one_gateway_racing_itself_keeps_its_quota(service, round_):
    tenant = _tenant()
    (reg,) = await _registrations(service, tenant, 1, max_concurrent_work=5)
    for i in range(12):
        await _enqueue(service, tenant, f"item {i}")
    results = await asyncio.gather(
        *(_attempt(service.claim(tenant, reg, WorkClaimRequest())) for _ in range(N))
    )
    leased = [r for r in results if not isinstance(r, str)]
    assert len(leased) == 5 and len({r.work_id for r in leased}) == 5
    assert [r for r in results if isinstance(r, str)] == ["gateway.over_quota"] * (N - 5)


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_old_token_fails_after_takeover(service, round_):
    tenant = _tenant()
    old, new = await _registrations(service, tenant, 2)
    work = await _enqueue(service, tenant)
    work_id = work["work_id"]
    first = await service.claim(tenant, old, WorkClaimRequest())
    await service.write(tenant, old, _out(work_id, first.lease_token, 1))
    await service._pool.execute(
        "UPDATE edge_work SET lease_expires_at = now() - interval '1 s' "
        "WHERE tenant = $1 AND work_id = $2",
        tenant,
        work_id,
    )

    async def takeover():
        while await service.reaper.reap() == 0:  # may share the DB with the hub's reaper
            if await _state(service, tenant, work_id) == "queued":
                break
            await asyncio.sleep(0.01)
        # A claim skips (SKIP LOCKED) an item that a stale write holds locked for its
        # refusal; a Gateway claims again on the next offer, so do the same here.
        while (
            reply := await service.claim(tenant, new, WorkClaimRequest(work_id=work_id))
        ).work_id is None:
            await asyncio.sleep(0.005)
        return reply

    # The old holder keeps writing while the lease is reaped and claimed again.
    old_writes = [
        _attempt(service.write(tenant, old, _out(work_id, first.lease_token, s)))
        for s in range(2, 2 + N)
    ]
    *results, second = await asyncio.gather(*old_writes, takeover())
    assert set(results) == {"work.stale_lease"}  # the lease had expired: none stored
    assert second.attempt == 2 and second.next_sequence == 2
    late = await asyncio.gather(
        *(
            _attempt(
                service.write(tenant, old, _out(work_id, first.lease_token, s, body={"late": s}))
            )
            for s in range(2, 10)
        )
    )
    assert set(late) == {"work.stale_lease"}
    assert await service.write(tenant, new, _out(work_id, second.lease_token, 2)) is True
    rows = await service._pool.fetch(
        "SELECT o.sequence, o.attempt, o.registration_id, l.registration_id AS holder "
        "FROM edge_work_outputs o JOIN edge_work_leases l USING (tenant, work_id, attempt) "
        "WHERE o.tenant = $1 ORDER BY o.sequence",
        tenant,
    )
    assert [(r["sequence"], r["attempt"]) for r in rows] == [(1, 1), (2, 2)]
    assert all(r["registration_id"] == r["holder"] for r in rows)
    refusals = await service._pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE tenant = $1 AND action = "
        "'gateway.edge.output_refused' AND actor_id = $2",
        tenant,
        old,
    )
    assert refusals == N + 8


async def _state(service, tenant: str, work_id: str) -> str:
    return await service._pool.fetchval(
        "SELECT state FROM edge_work WHERE tenant = $1 AND work_id = $2", tenant, work_id
    )


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_32_concurrent_event_writers_gapless(service, round_):
    tenant = _tenant()
    (reg,) = await _registrations(service, tenant, 1)
    workspace = f"ws{round_}"
    work = await _enqueue(service, tenant, workspace=workspace)
    lease = await service.claim(tenant, reg, WorkClaimRequest())
    sequences = list(range(1, N + 1))
    random.shuffle(sequences)
    results = await asyncio.gather(
        *(
            service.write(tenant, reg, _out(work["work_id"], lease.lease_token, s))
            for s in sequences
        )
    )
    assert all(r is True for r in results)
    stored = await service._pool.fetch(
        "SELECT sequence FROM edge_work_outputs WHERE tenant = $1 ORDER BY sequence", tenant
    )
    assert [r["sequence"] for r in stored] == list(range(1, N + 1))
    projected = await service._pool.fetch(
        "SELECT sequence, payload FROM workspace_events WHERE tenant = $1 "
        "AND workspace_id = $2 ORDER BY sequence",
        tenant,
        workspace,
    )
    assert [r["sequence"] for r in projected] == list(range(1, N + 1))
    assert sorted(r["payload"]["sequence"] for r in projected) == list(range(1, N + 1))
    assert (
        await service.write(
            tenant, reg, _out(work["work_id"], lease.lease_token, N + 1, "result", {"ok": True})
        )
        is True
    )
    row = await service._pool.fetchrow(
        "SELECT state, last_sequence, output_count FROM edge_work WHERE tenant = $1", tenant
    )
    assert tuple(row) == ("completed", N + 1, N + 1)


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_32_writers_same_sequence_one_wins(service, round_):
    tenant = _tenant()
    (reg,) = await _registrations(service, tenant, 1)
    work = await _enqueue(service, tenant)
    lease = await service.claim(tenant, reg, WorkClaimRequest())
    results = await asyncio.gather(
        *(
            _attempt(
                service.write(
                    tenant, reg, _out(work["work_id"], lease.lease_token, 1, body={"writer": i})
                )
            )
            for i in range(N)
        )
    )
    assert results.count(True) == 1
    assert results.count("work.sequence_conflict") == N - 1
    winner = results.index(True)
    body = await service._pool.fetchval(
        "SELECT body FROM edge_work_outputs WHERE tenant = $1", tenant
    )
    assert body == {"writer": winner}
    assert (
        await service._pool.fetchval(
            "SELECT count(*) FROM workspace_events WHERE tenant = $1", tenant
        )
        == 1
    )


@pytest.mark.parametrize("round_", range(ROUNDS))
async def test_32_identical_enqueues_one_item(service, round_):
    tenant = _tenant()

    async def enqueue(text: str):
        try:
            row, created = await service.enqueue(
                tenant,
                EnqueueWork.model_validate(
                    {
                        "kind": "prompt",
                        "sessionRef": {"workspaceId": "ws"},
                        "payload": {"text": text},
                        "idempotencyKey": "same-key",
                    }
                ),
            )
        except EdgeWorkError as exc:
            return exc.code
        return row["work_id"], created

    results = await asyncio.gather(*(enqueue("identical") for _ in range(N)))
    assert len({r[0] for r in results}) == 1
    assert sorted(r[1] for r in results) == [False] * (N - 1) + [True]
    different = await asyncio.gather(*(enqueue(f"different {i}") for i in range(8)))
    assert set(different) == {"work.idempotency_conflict"}
    assert (
        await service._pool.fetchval("SELECT count(*) FROM edge_work WHERE tenant = $1", tenant)
        == 1
    )

    # Two bodies racing for a fresh key: one wins, the other body is refused every time.
    mixed_tenant = _tenant()
    tenant = mixed_tenant
    mixed = await asyncio.gather(*(enqueue("A" if i % 2 else "B") for i in range(N)))
    won = [r for r in mixed if not isinstance(r, str)]
    assert len({r[0] for r in won}) == 1 and len(won) == N // 2
    assert [r for r in mixed if isinstance(r, str)] == ["work.idempotency_conflict"] * (N // 2)
