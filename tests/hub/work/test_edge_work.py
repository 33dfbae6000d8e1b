"""Cloud-owned edge work over the real bus: enqueue (HTTP), offers, claim, renew,
fenced outputs, the reaper, and every refusal a Gateway can meet.

Registrations are inserted as rows (tests/kits/edgeworkkit.py), so these tests need
only the registration data model, not the registration API. Each test uses its
own tenant: a claim takes the oldest claimable item of the tenant.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid

import pytest
from desktopkit import all_pages
from edgeworkkit import EDGE_SCOPES, GatewayBus, add_registration, collect, enqueue_body
from plankit import PLAN_MODES, plans_as_run, sorts, table_reads

from hub.work._leases import _CLAIM, _CLAIM_SCOPE, _EDGE_KINDS, _REFUSED_TRUST
from schemas import (
    AckReply,
    WorkClaimReply,
    WorkClaimRequest,
    WorkOffer,
    WorkspaceEvent,
    decode,
    new_id,
    subjects,
)

pytestmark = pytest.mark.timeout(60)
LEASE = 3.0


@pytest.fixture(scope="module")
def hub_options() -> dict:
    return {"work_lease_seconds": LEASE}


@pytest.fixture
def tenant() -> str:
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
async def gateways(hub):
    opened: list[GatewayBus] = []

    async def open_gateway(tenant: str, **registration) -> GatewayBus:
        reg_id = await add_registration(hub.pool, tenant, **registration)
        bus = await GatewayBus.connect(hub, tenant, reg_id)
        opened.append(bus)
        return bus

    yield open_gateway
    for bus in opened:
        await bus.close()


async def enqueue(http, tenant: str, **body) -> str:
    response = await http.post(f"/api/v1/tenants/{tenant}/work", json=enqueue_body(**body))
    assert response.status_code == 201, response.text
    return response.json()["workId"]


async def claimed(
    bus: GatewayBus, work_id: str | None = None, *, claim_id: uuid.UUID | None = None
) -> WorkClaimReply:
    reply = await bus.claim(work_id, claim_id=claim_id)
    assert isinstance(reply, WorkClaimReply), reply
    assert reply.work_id is not None
    return reply


async def expire(hub, tenant: str, work_id: str) -> None:
    await hub.pool.execute(
        "UPDATE edge_work SET lease_expires_at = now() - interval '1 s' "
        "WHERE tenant = $1 AND work_id = $2",
        tenant,
        work_id,
    )


def refused(reply, code: str) -> None:
    assert isinstance(reply, AckReply) and not reply.ok, reply
    assert reply.code == code, reply


async def audit_actions(hub, tenant: str) -> list[dict]:
    rows = await hub.pool.fetch("SELECT * FROM audit_log WHERE tenant = $1 ORDER BY id", tenant)
    return [dict(r) for r in rows]


# --------------------------------------------------------------------------- enqueue
async def test_enqueue_is_idempotent_and_validated(http, tenant):
    url = f"/api/v1/tenants/{tenant}/work"
    first = await http.post(url, json=enqueue_body("hi"), headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201 and first.json()["state"] == "queued"
    again = await http.post(url, json=enqueue_body("hi"), headers={"Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["workId"] == first.json()["workId"]
    in_body = await http.post(url, json=enqueue_body("hi", idempotencyKey="k1"))
    assert in_body.status_code == 200 and in_body.json()["workId"] == first.json()["workId"]
    other = await http.post(url, json=enqueue_body("bye"), headers={"Idempotency-Key": "k1"})
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "work.idempotency_conflict"

    unknown = await http.post(url, json={**enqueue_body(), "kind": "shell"})
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "work.unknown_kind"
    empty = await http.post(url, json=enqueue_body(""))
    assert empty.status_code == 422 and "payload.text" in empty.json()["error"]["message"]
    local = await http.post(url, json=enqueue_body(requirements={"hostPaths": True}))
    assert local.status_code == 422
    assert local.json()["error"]["code"] == "work.not_edge_runnable"
    assert "hostPaths" in local.json()["error"]["message"]
    mcp = await http.post(url, json=enqueue_body(requirements={"localStdioMcps": True}))
    assert mcp.json()["error"]["code"] == "work.not_edge_runnable"

    got = (await http.get(f"{url}/{first.json()['workId']}")).json()
    assert got["state"] == "queued" and got["attempts"] == 0 and got["maxAttempts"] == 3
    assert got["sessionRef"] == {"workspaceId": "ws1"} and got["events"] == []
    listed = (await http.get(url, params={"state": "queued"})).json()["items"]
    assert [w["workId"] for w in listed] == [first.json()["workId"]]
    assert (await http.get(f"{url}/nosuchwork")).status_code == 404
    assert (await http.get(url, params={"state": "bogus"})).status_code == 400


# --------------------------------------------------------------------------- happy path
async def test_queued_work_says_when_no_gateway_can_take_it(http, gateways, tenant):
    work_id = await enqueue(http, tenant)
    view = (await http.get(f"/api/v1/tenants/{tenant}/work/{work_id}")).json()
    assert (
        view["state"] == "queued" and "no Gateway of this tenant can claim it" in view["waiting"]
    ), view
    listed = (await http.get(f"/api/v1/tenants/{tenant}/work")).json()
    assert "no Gateway of this tenant can claim it" in listed["waiting"], listed
    instance = f"cw-{tenant}"[:60]
    created = await http.post(
        f"/api/v1/tenants/{tenant}/channel-instances",
        json={
            "instanceId": instance,
            "kind": "cli",
            "workspaceId": "ws1",
            "authority": "cloud_worker",
        },
    )
    assert created.status_code == 201, created.text
    health = (await http.get(f"/api/v1/tenants/{tenant}/channel-instances/{instance}")).json()
    assert "prompts will wait: no Gateway" in health["health"]["waiting"], health
    await gateways(tenant)  # an active edge worker appears: the hints go
    view = (await http.get(f"/api/v1/tenants/{tenant}/work/{work_id}")).json()
    assert "waiting" not in view, view
    assert "waiting" not in (await http.get(f"/api/v1/tenants/{tenant}/work")).json()
    health = (await http.get(f"/api/v1/tenants/{tenant}/channel-instances/{instance}")).json()
    assert "waiting" not in health["health"], health


async def test_offer_claim_renew_and_fenced_outputs(hub, http, gateways, tenant):
    gw = await gateways(tenant)
    offers = await collect(gw.nc, subjects.WORK_OFFER.filter(tenant=tenant), WorkOffer)
    live = await collect(
        hub.nc, subjects.WORKSPACE_EVENT.build(tenant=tenant, workspace_id="wsA"), WorkspaceEvent
    )

    work_id = await enqueue(
        http, tenant, workspace="wsA", sessionRef={"workspaceId": "wsA", "sessionId": "s1"}
    )
    offer = await asyncio.wait_for(offers.get(), 5)
    assert offer.work_id == work_id and offer.kind == "prompt"

    lease = await claimed(gw, offer.work_id)
    assert lease.work_id == work_id and lease.attempt == 1 and lease.next_sequence == 1
    assert lease.lease_seconds == LEASE and lease.payload == {"text": "say hello"}
    assert lease.session_ref.workspace_id == "wsA" and lease.session_ref.session_id == "s1"
    assert isinstance(await gw.claim(), WorkClaimReply)  # nothing else queued
    assert (await gw.claim()).work_id is None

    await asyncio.sleep(0.05)
    renewed = await gw.renew(work_id, lease.lease_token)
    assert renewed.lease_expires_at > lease.lease_expires_at

    for seq, kind, body in (
        (1, "event", {"delta": "hel"}),
        (2, "event", {"delta": "lo"}),
        (3, "status", {"phase": "running"}),
        (4, "result", {"text": "hello"}),
    ):
        reply = await gw.output(work_id, lease.lease_token, seq, kind, body)
        assert reply.ok, reply

    got = (await http.get(f"/api/v1/tenants/{tenant}/work/{work_id}")).json()
    assert got["state"] == "completed" and got["result"] == {"text": "hello"}
    # Ended: the view shows the end, not the last "running" status, and no lease.
    assert got["status"] == {"state": "completed"} and got["leaseExpiresAt"] is None
    assert got["owner"] == gw.reg_id
    assert [e["sequence"] for e in got["events"]] == [1, 2, 3, 4]
    assert got["events"][0] == {
        **got["events"][0],
        "kind": "event",
        "body": {"delta": "hel"},
        "attempt": 1,
        "registrationId": gw.reg_id,
    }
    assert [(x["attempt"], x["registrationId"], x["outcome"]) for x in got["leases"]] == [
        (1, gw.reg_id, "completed")
    ]
    page = (
        await http.get(
            f"/api/v1/tenants/{tenant}/work/{work_id}", params={"afterSequence": 1, "limit": 2}
        )
    ).json()
    assert [e["sequence"] for e in page["events"]] == [2, 3]

    projected = await hub.pool.fetch(
        "SELECT sequence, event_id, type, source_kind, source_id, session_id, payload "
        "FROM workspace_events WHERE tenant = $1 AND workspace_id = 'wsA' ORDER BY sequence",
        tenant,
    )
    assert [(r["sequence"], r["type"]) for r in projected] == [
        (1, "work.event"),
        (2, "work.event"),
        (3, "work.status"),
        (4, "work.result"),
    ]
    assert projected[0]["event_id"] == f"{work_id}-1"
    assert projected[0]["source_kind"] == "gateway" and projected[0]["source_id"] == gw.reg_id
    assert projected[0]["session_id"] == "s1"
    assert projected[0]["payload"] == {
        "workId": work_id,
        "sequence": 1,
        "attempt": 1,
        "body": {"delta": "hel"},
    }
    seen = [await asyncio.wait_for(live.get(), 5) for _ in range(4)]
    assert [e.sequence for e in seen] == [1, 2, 3, 4] and seen[3].type == "work.result"

    actions = [r["action"] for r in await audit_actions(hub, tenant)]
    assert actions.count("gateway.edge.lease_claimed") == 1
    assert actions.count("gateway.edge.write_fenced_output") == 2  # status + result, no events
    assert "edge_work.enqueued" in actions
    metrics = (await http.get("/metrics")).text
    assert 'cowork_bus_messages_total{family="work.claim",outcome="accepted"}' in metrics
    assert 'family="work.output",outcome="accepted"' in metrics


async def test_a_claim_sent_again_gets_the_same_lease_once(hub, http, gateways, tenant):
    """A claim's reply lost (or the replica holding it dead or frozen): the Gateway
    sends the same request again, same claimId, and gets the lease it was granted,
    not a second lease on the next item, and no waiting for the first to expire."""
    gw = await gateways(tenant)
    first = await enqueue(http, tenant, text="one")
    second = await enqueue(http, tenant, text="two")
    claim_id = uuid.uuid4()
    lease = await claimed(gw, claim_id=claim_id)
    again = await claimed(gw, claim_id=claim_id)
    assert lease.work_id == first and again.work_id == first
    assert (again.lease_token, again.attempt, again.next_sequence, again.payload) == (
        lease.lease_token,
        1,
        1,
        {"text": "one"},
    )
    leases = await hub.pool.fetch(
        "SELECT work_id, attempt, claim_id FROM edge_work_leases WHERE tenant = $1", tenant
    )
    assert [tuple(r) for r in leases] == [(first, 1, str(claim_id))]
    assert await _state(hub, tenant, second) == "queued"
    actions = [r["action"] for r in await audit_actions(hub, tenant)]
    assert actions.count("gateway.edge.lease_claimed") == 1

    # The renewed lease is what a later retry gets; another claim id claims afresh.
    renewed = await gw.renew(first, lease.lease_token)
    assert (await claimed(gw, claim_id=claim_id)).lease_expires_at == renewed.lease_expires_at
    assert (await claimed(gw, claim_id=uuid.uuid4())).work_id == second

    # The lease ended: its claim id gets nothing now, still not a new lease.
    assert (await gw.output(first, lease.lease_token, 1, "result", {"text": "done"})).ok
    third = await enqueue(http, tenant, text="three")
    assert (await gw.claim(claim_id=claim_id)).work_id is None
    assert await _state(hub, tenant, third) == "queued"

    # The reaper forgets claim ids after an hour (here: at once); then it claims afresh.
    assert await hub.edge_work.reaper.forget_claims(older_than=0) >= 2
    assert (await claimed(gw, claim_id=claim_id)).work_id == third


async def test_replay_is_a_noop_and_conflicts_are_refused(hub, http, gateways, tenant):
    gw = await gateways(tenant)
    work_id = await enqueue(http, tenant)
    lease = await claimed(gw)
    token = lease.lease_token
    assert (await gw.output(work_id, token, 1, "event", {"a": 1})).ok
    assert (await gw.output(work_id, token, 1, "event", {"a": 1})).ok  # replay: no-op
    refused(await gw.output(work_id, token, 1, "event", {"a": 2}), "work.sequence_conflict")
    refused(await gw.output(work_id, token, 1, "status", {"a": 1}), "work.sequence_conflict")
    assert (await gw.output(work_id, token, 2, "result", {"done": True})).ok
    assert (await gw.output(work_id, token, 2, "result", {"done": True})).ok  # final replay
    assert (await gw.output(work_id, token, 1, "event", {"a": 1})).ok  # earlier replay
    refused(await gw.output(work_id, token, 2, "result", {"done": False}), "work.already_final")
    refused(await gw.output(work_id, token, 3, "event", {"late": 1}), "work.already_final")
    refused(await gw.renew(work_id, token), "work.not_leased")
    count = await hub.pool.fetchval(
        "SELECT count(*) FROM edge_work_outputs WHERE tenant = $1", tenant
    )
    projected = await hub.pool.fetchval(
        "SELECT count(*) FROM workspace_events WHERE tenant = $1", tenant
    )
    assert count == 2 and projected == 2


async def test_result_with_a_gap_is_refused_until_filled(hub, http, gateways, tenant):
    gw = await gateways(tenant)
    work_id = await enqueue(http, tenant)
    token = (await claimed(gw)).lease_token
    assert (await gw.output(work_id, token, 3, "event")).ok  # out of order is fine
    assert (await gw.output(work_id, token, 1, "event")).ok
    gap = await gw.output(work_id, token, 4, "result", {"ok": True})
    refused(gap, "work.sequence_gap")
    assert gap.retry_after_seconds and gap.retry_after_seconds > 0
    assert (await gw.output(work_id, token, 2, "event")).ok
    refused(await gw.output(work_id, token, 2, "fail", {"error": "x"}), "work.sequence_conflict")
    assert (await gw.output(work_id, token, 4, "fail", {"error": "model refused"})).ok
    got = (await http.get(f"/api/v1/tenants/{tenant}/work/{work_id}")).json()
    assert got["state"] == "failed" and got["error"] == "model refused"
    assert got["leases"][0]["outcome"] == "failed"


async def test_final_must_be_the_highest_sequence(http, gateways, tenant):
    gw = await gateways(tenant)
    work_id = await enqueue(http, tenant)
    token = (await claimed(gw)).lease_token
    for seq in (1, 3):
        assert (await gw.output(work_id, token, seq)).ok
    refused(await gw.output(work_id, token, 2, "result", {}), "work.final_not_last")


# --------------------------------------------------------------------------- fencing
async def test_stale_token_after_takeover_is_refused_and_audited(hub, http, gateways, tenant):
    old, new = await gateways(tenant), await gateways(tenant)
    work_id = await enqueue(http, tenant)
    first = await claimed(old)
    assert (await old.output(work_id, first.lease_token, 1)).ok
    await expire(hub, tenant, work_id)
    assert await hub.edge_work.reaper.reap() >= 1
    second = await claimed(new, work_id)
    assert second.attempt == 2 and second.next_sequence == 2
    assert second.lease_token != first.lease_token

    refused(
        await old.output(work_id, first.lease_token, 2, "event", {"late": 1}), "work.stale_lease"
    )
    refused(await old.renew(work_id, first.lease_token), "work.stale_lease")
    refused(await new.output(work_id, first.lease_token, 2), "work.stale_lease")  # not its token
    assert (await new.output(work_id, second.lease_token, 2, "result", {"by": "new"})).ok

    rows = [
        r for r in await audit_actions(hub, tenant) if r["action"] == "gateway.edge.output_refused"
    ]
    mine = [r for r in rows if r["actor_id"] == old.reg_id]
    assert mine and mine[0]["target_id"] == work_id
    assert mine[0]["metadata"]["code"] == "work.stale_lease"
    assert mine[0]["metadata"]["sequence"] == 2
    assert any(
        r["action"] == "gateway.edge.renew_refused" and r["actor_id"] == old.reg_id
        for r in await audit_actions(hub, tenant)
    )
    got = (await http.get(f"/api/v1/tenants/{tenant}/work/{work_id}")).json()
    assert [(x["registrationId"], x["outcome"]) for x in got["leases"]] == [
        (old.reg_id, "expired"),
        (new.reg_id, "completed"),
    ]
    assert [(e["sequence"], e["attempt"]) for e in got["events"]] == [(1, 1), (2, 2)]


async def test_an_expired_lease_is_refused(hub, http, gateways, tenant):
    gw = await gateways(tenant)
    work_id = await enqueue(http, tenant)
    lease = await claimed(gw)
    await asyncio.sleep(LEASE + 0.3)  # the real clock, no SQL help
    refused(await gw.output(work_id, lease.lease_token, 1), "work.stale_lease")
    reply = await gw.renew(work_id, lease.lease_token)
    assert isinstance(reply, AckReply) and reply.code in ("work.lease_expired", "work.stale_lease")


async def test_reaper_requeues_then_dead_letters(hub, http, gateways, tenant):
    gws = [await gateways(tenant) for _ in range(3)]
    offers = await collect(gws[0].nc, subjects.WORK_OFFER.filter(tenant=tenant), WorkOffer)
    work_id = await enqueue(http, tenant)
    await _offered_while_queued(hub, tenant, work_id, offers)
    for attempt, gw in enumerate(gws, start=1):
        lease = await claimed(gw)
        assert lease.attempt == attempt
        await expire(hub, tenant, work_id)
        if attempt < 3:  # requeued by the running reaper, and offered again
            await _offered_while_queued(hub, tenant, work_id, offers)
    await _until(lambda: _state(hub, tenant, work_id), "dead_lettered")
    got = (await http.get(f"/api/v1/tenants/{tenant}/work/{work_id}")).json()
    assert got["error"] == f"lease expired 3 times (last holder {gws[2].reg_id})"
    assert got["completedAt"] is not None and got["attempts"] == 3
    assert [x["outcome"] for x in got["leases"]] == ["expired", "expired", "dead_lettered"]
    assert (await gws[0].claim()).work_id is None

    subject = subjects.dead_letter_subject(tenant, subjects.WORK_CLAIM)
    stored = await hub.js.get_last_msg("CW_DEADLETTER", subject)
    letter = json.loads(stored.data)["data"]
    assert letter["code"] == "work.lease_expired" and letter["attempts"] == 3
    assert gws[2].reg_id in letter["reason"]
    assert json.loads(letter["originalPayload"])["workId"] == work_id
    actions = [r["action"] for r in await audit_actions(hub, tenant)]
    assert actions.count("gateway.edge.lease_expired") == 2
    assert actions.count("gateway.edge.dead_lettered") == 1
    # ... and said in its workspace once, for a chat bound there to tell its user.
    [told] = await hub.pool.fetch(
        "SELECT payload FROM workspace_events WHERE tenant = $1 AND type = 'work.dead_lettered'",
        tenant,
    )
    body = json.loads(told["payload"]) if isinstance(told["payload"], str) else told["payload"]
    assert body["workId"] == work_id and "gave up after 3 attempts" in body["body"]["reason"]


async def _state(hub, tenant: str, work_id: str) -> str:
    return await hub.pool.fetchval(
        "SELECT state FROM edge_work WHERE tenant = $1 AND work_id = $2", tenant, work_id
    )


async def _offered_while_queued(hub, tenant: str, work_id: str, offers: asyncio.Queue) -> None:
    """Wait for an offer of `work_id` that arrives while it is queued. The reaper also
    re-offers waiting work every few seconds: such an offer, sent while the item was
    still queued before the last claim, can arrive after that claim (under load) and
    is skipped, or the claim that follows would find the item still leased."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while True:
        offer = await asyncio.wait_for(offers.get(), max(0.0, deadline - loop.time()))
        if offer.work_id == work_id and await _state(hub, tenant, work_id) == "queued":
            return


async def _until(probe, expected, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := await probe()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"{value!r} != {expected!r}"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- registration state
async def test_drain_refuses_claims_and_caps_renewals(hub, http, gateways, tenant):
    gw = await gateways(tenant)
    work_id = await enqueue(http, tenant)
    await enqueue(http, tenant, text="second")
    lease = await claimed(gw)
    await hub.pool.execute(
        "UPDATE gateway_registrations SET status = 'draining', "
        "drain_deadline = now() + interval '1 s' WHERE tenant = $1 AND registration_id = $2",
        tenant,
        gw.reg_id,
    )
    refused(await gw.claim(), "gateway.draining")
    deadline = await hub.pool.fetchval(
        "SELECT drain_deadline FROM gateway_registrations WHERE tenant = $1 "
        "AND registration_id = $2",
        tenant,
        gw.reg_id,
    )
    renewed = await gw.renew(work_id, lease.lease_token)
    assert renewed.lease_expires_at == deadline  # capped: LEASE (3 s) is past the deadline
    assert (await gw.output(work_id, lease.lease_token, 1)).ok  # writes go on while leased
    await asyncio.sleep(1.1)
    refused(await gw.renew(work_id, lease.lease_token), "gateway.draining")


async def test_revoked_registration_is_refused_everything(hub, http, gateways, tenant):
    gw = await gateways(tenant)
    work_id = await enqueue(http, tenant)
    await enqueue(http, tenant, text="second")
    lease = await claimed(gw)
    await hub.pool.execute(
        "UPDATE gateway_registrations SET status = 'revoked' "
        "WHERE tenant = $1 AND registration_id = $2",
        tenant,
        gw.reg_id,
    )
    refused(await gw.claim(), "gateway.revoked")
    refused(await gw.renew(work_id, lease.lease_token), "gateway.revoked")
    refused(await gw.output(work_id, lease.lease_token, 1), "gateway.revoked")
    assert (
        await hub.pool.fetchval("SELECT count(*) FROM edge_work_outputs WHERE tenant = $1", tenant)
        == 0
    )
    # The lease itself runs out normally and goes back to the queue.
    assert await _state(hub, tenant, work_id) == "leased"


async def test_quota_is_enforced(hub, http, gateways, tenant):
    gw = await gateways(tenant, max_concurrent_work=1)
    for text in ("one", "two"):
        await enqueue(http, tenant, text=text)
    await claimed(gw)
    refused(await gw.claim(), "gateway.over_quota")
    idle = await gateways(tenant, max_concurrent_work=0)  # no capacity advertised yet
    refused(await idle.claim(), "gateway.over_quota")


@pytest.mark.parametrize(
    ("registration", "code"),
    [
        ({"status": "pending"}, "gateway.pending"),
        ({"status": "paused"}, "gateway.paused"),
        ({"status": "unhealthy"}, "gateway.unhealthy"),
        ({"status": "retired"}, "gateway.retired"),
        ({"kind": "external_workspace"}, "gateway.not_edge_worker"),
        ({"trust": "customer_hosted_managed_saas_deferred"}, "gateway.trust_deferred"),
        (
            {"scopes": [s for s in EDGE_SCOPES if s != "gateway.edge.claim"]},
            "gateway.no_claim_scope",
        ),
        ({"work_kinds": ()}, "gateway.kind_not_advertised"),
    ],
)
async def test_ineligible_registrations_cannot_claim(
    hub, http, gateways, tenant, registration, code
):
    await enqueue(http, tenant)
    gw = await gateways(tenant, **registration)
    refused(await gw.claim(), code)
    rows = [
        r for r in await audit_actions(hub, tenant) if r["action"] == "gateway.edge.claim_refused"
    ]
    assert rows and rows[-1]["actor_id"] == gw.reg_id and rows[-1]["metadata"]["code"] == code
    assert (
        await hub.pool.fetchval("SELECT state FROM edge_work WHERE tenant = $1", tenant) == "queued"
    )


async def test_requirements_decide_who_may_claim(hub, http, gateways, tenant):
    needs = {"capabilities": ["browser"], "credentials": ["github"]}
    response = await http.post(
        f"/api/v1/tenants/{tenant}/work", json=enqueue_body(requirements=needs)
    )
    work_id = response.json()["workId"]
    no_browser = await gateways(tenant, approved_credentials=("github",))
    read_only = await gateways(
        tenant, capabilities={"browser": "read_only"}, approved_credentials=("github",)
    )
    no_credential = await gateways(tenant, capabilities={"browser": "supported"})
    fitting = await gateways(
        tenant,
        capabilities={"browser": "supported", "x": "deferred"},
        approved_credentials=("github", "slack"),
    )
    for gw in (no_browser, read_only, no_credential):
        assert (await gw.claim(work_id)).work_id is None
    assert (await claimed(fitting, work_id)).work_id == work_id


async def test_writes_are_rate_limited(hub, http, gateways, tenant):
    gw = await gateways(tenant)
    work_id = await enqueue(http, tenant)
    token = (await claimed(gw)).lease_token
    limiter = hub.edge_work._limiter  # the bus route's bucket per Gateway and operation
    saved = limiter.rate, limiter.burst
    limiter.rate, limiter.burst = 0.5, 2
    try:
        assert (await gw.output(work_id, token, 1)).ok
        assert (await gw.output(work_id, token, 2)).ok
        limited = await gw.output(work_id, token, 3)
        refused(limited, "rate_limited")
        assert limited.retry_after_seconds > 0
    finally:
        limiter.rate, limiter.burst = saved
    assert not any(
        r["action"] == "gateway.edge.output_refused" for r in await audit_actions(hub, tenant)
    )


async def test_envelope_must_match_the_subject(hub, gateways, tenant):
    gw = await gateways(tenant)
    gw.source = gw.source.model_copy(update={"principal_id": "someoneelse"})
    refused(await gw.claim(), "contract.principal_mismatch")


async def test_unknown_work_and_garbage(hub, gateways, tenant):
    gw = await gateways(tenant)
    refused(await gw.renew("nosuchwork", "x" * 32), "work.not_found")
    refused(await gw.output("nosuchwork", "x" * 32, 1), "work.not_found")
    subject = subjects.WORK_CLAIM.build(tenant=tenant, registration_id=gw.reg_id)
    raw = (await gw.nc.request(subject, b"not json", timeout=5)).data
    reply = decode(raw, AckReply).data
    assert not reply.ok and reply.code.startswith("contract.")


async def test_work_is_listed_page_by_page(http, tenant):
    made = {await enqueue(http, tenant) for _ in range(7)}
    items, pages = await all_pages(http, f"/api/v1/tenants/{tenant}/work", 3)
    assert sorted(w["workId"] for w in items) == sorted(made) and pages == 3
    queued, _ = await all_pages(http, f"/api/v1/tenants/{tenant}/work", 2, state="queued")
    assert {w["workId"] for w in queued} == made


async def test_a_claim_of_several_kinds_takes_the_oldest_it_may_do(hub, tenant):
    """Several requested kinds: the oldest claimable item among the requested kinds the
    registration advertises, in order across kinds; a requested kind it does not
    advertise, or an item it lacks a credential for, is never leased to it."""
    made = [("review", {}), ("other", {}), ("prompt", {"credentials": ["github"]})]
    made += [("prompt", {}), ("review", {}), ("prompt", {})]
    ids = [new_id() for _ in made]
    await hub.pool.executemany(
        """INSERT INTO edge_work (tenant, work_id, kind, session_ref, payload, requirements,
               body_hash, max_attempts, created_by, created_at)
           VALUES ($1, $2, $3, '{"workspaceId": "w"}', '{"text": "x"}', $4, '\\x00', 3,
                   'test', now() + make_interval(secs => $5))""",
        [(tenant, ids[i], kind, needs, i * 1e-3) for i, (kind, needs) in enumerate(made)],
    )
    reg = await add_registration(
        hub.pool, tenant, work_kinds=("prompt", "review"), max_concurrent_work=10
    )
    request = WorkClaimRequest(work_kinds=["review", "other", "prompt"])
    got = [(await hub.edge_work.claim(tenant, reg, request)).work_id for _ in range(5)]
    assert got == [ids[0], ids[3], ids[4], ids[5], None]


async def test_a_claim_reads_few_queued_rows(hub, tenant, database_url_module):
    """A claim walks the tenant's queued items in order and stops at the first claimable
    one, however many are queued and however many tenants share the table, in both
    the prepared statement's custom and generic plans. The generic plan knows no
    tenant: with a few hundred small tenants it took this tenant's backlog for one
    row, and read and sorted all of it on every claim (280 rows, 2.1 ms)."""
    queued = 600
    insert = """INSERT INTO edge_work (tenant, work_id, kind, session_ref, payload,
                   requirements, body_hash, max_attempts, created_by, created_at, state)
               VALUES ($1, $2, 'prompt', '{"workspaceId": "w"}', '{"text": "x"}', $3,
                       '\\x00', 3, 'test', now() + make_interval(secs => $4), $5)"""
    needs_github = {"credentials": ["github"]}  # not approved: the walk passes these
    await hub.pool.executemany(
        insert,
        [
            (tenant, new_id(), needs_github if i % 2 else {}, i * 1e-3, "queued")
            for i in range(queued)
        ],
    )
    others = [f"{tenant}-other-{j}" for j in range(200)]
    await hub.pool.executemany(
        insert,
        [
            (t, new_id(), {}, i * 1e-3, ("queued", "completed")[i % 2])
            for t in others
            for i in range(4)
        ],
    )
    reg = await add_registration(hub.pool, tenant, max_concurrent_work=queued)
    for _ in range(20):
        assert (await hub.edge_work.claim(tenant, reg, WorkClaimRequest())).work_id
    await hub.pool.execute("ANALYZE edge_work")
    args = [tenant, reg, ["prompt"], None, "t" * 32, 30.0]
    args += [_EDGE_KINDS, _REFUSED_TRUST, _CLAIM_SCOPE, None]
    for mode in PLAN_MODES:
        plans = await plans_as_run(database_url_module, _CLAIM, args, mode)
        # The pick: the one statement that walks the queued items in the pick's order
        # (edge_work_first_claimable's query, nested in the claim).
        picks = [p["Plan"] for p in plans if "ORDER BY w.created_at" in p["Query Text"]]
        assert len(picks) == 8, f"{mode}: {len(picks)} picks in 8 claims"
        for plan in picks:
            # The twenty claims took the first twenty items that need nothing; the
            # walk passes the twenty that need a credential the Gateway lacks (every
            # other item) and stops at the next: 21 rows of 580 queued.
            reads = table_reads(plan, "edge_work")
            assert reads == [("edge_work_queued_in_order", 21)], (mode, reads)
            assert not sorts(plan), mode
