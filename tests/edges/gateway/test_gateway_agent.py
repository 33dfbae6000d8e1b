"""The Gateway agent against a real hub (operator-mode NATS, PostgreSQL) and a real
OpenCode: registration and re-registration, heartbeats and capabilities, claiming
no more than it may, metadata sync within its scopes, drain and revoke; and the
`cowork gateway` commands as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from datetime import datetime
from typing import Any

import pytest
from desktopkit import TENANT, cowork, eventually
from gateway_agent_kit import (
    admin,
    create_registration,
    enqueue,
    get_registration,
    registered,
    start_gateway,
    wait_status,
    work_state,
    work_view,
)
from opencode_env import OPENCODE_VERSION, SLOW

from edges.common._opencode import OpenCodeClient
from edges.gateway._registration import RegistrationFailed, register, version_set
from edges.gateway._store import GatewayStore
from edges.local import free_port
from hub.core import flushed
from schemas import Envelope, Source, WorkClaimRequest, decode, parse_creds, subjects

pytestmark = pytest.mark.timeout(180)
FINAL = ("completed", "failed", "dead_lettered")


@pytest.fixture(scope="module")
def hub_options():
    return {"work_lease_seconds": 6}


# --- registration ------------------------------------------------------------------------------
async def test_register_stores_a_private_identity_and_reregistering_replaces_it(
    hub, http, operator_nats_url, tmp_path
):
    created, store = await registered(
        http, operator_nats_url, tmp_path / "gw", "external_workspace_edge_worker", name="rack 7"
    )
    gateway = store.load()
    assert (gateway.tenant, gateway.registration_id) == (TENANT, created["registrationId"])
    assert gateway.kind == "external_workspace_edge_worker" and gateway.display_name == "rack 7"
    assert "gateway.edge.claim" in gateway.scopes
    assert "redacted_session_metadata" in gateway.sync_scopes
    assert stat.S_IMODE(os.stat(tmp_path / "gw").st_mode) == 0o700
    for name in ("gateway.creds", "gateway.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "gw" / name).st_mode) == 0o600
    first_jwt, first_seed = parse_creds(store.creds_path.read_text())
    on_disk = json.loads(store.gateway_path.read_text())
    assert on_disk["registrationId"] == created["registrationId"]
    assert created["credential"] not in store.gateway_path.read_text()
    assert created["credential"] not in store.audit_path.read_text()

    # A rotation: the old credential stops working, the new one registers again.
    rotated = await admin(http, created["registrationId"], "rotate")
    with pytest.raises(RegistrationFailed) as refused:
        await register(
            created["credential"], [operator_nats_url], store, version_set(OPENCODE_VERSION)
        )
    assert refused.value.code.startswith("gateway.") or refused.value.code.startswith(
        "credential"
    ), refused.value.code
    await register(rotated["credential"], [operator_nats_url], store, version_set(OPENCODE_VERSION))
    second_jwt, second_seed = parse_creds(store.creds_path.read_text())
    assert second_seed != first_seed and second_jwt != first_jwt
    actions = [a["action"] for a in store.read_audit()]
    assert actions == ["gateway.registration.registered", "gateway.registration.reregistered"]


async def test_register_refusals_are_one_line_errors(hub, http, operator_nats_url, tmp_path):
    store = GatewayStore(tmp_path / "gw")
    with pytest.raises(RegistrationFailed) as malformed:
        await register(
            "not-a-credential", [operator_nats_url], store, version_set(OPENCODE_VERSION)
        )
    assert malformed.value.code == "credential.malformed"
    created = await create_registration(http, "edge_worker")
    forged = created["credential"][:-4] + (
        "AAAA" if not created["credential"].endswith("AAAA") else "BBBB"
    )
    with pytest.raises(RegistrationFailed) as wrong:
        await register(forged, [operator_nats_url], store, version_set(OPENCODE_VERSION))
    assert "\n" not in str(wrong.value) and wrong.value.code != "contract.invalid"
    with pytest.raises(RegistrationFailed) as away:
        await register(
            created["credential"],
            [f"nats://127.0.0.1:{free_port()}"],
            store,
            version_set(OPENCODE_VERSION),
            timeout=2,
        )
    assert away.value.code == "bootstrap.unreachable"
    assert not store.is_registered() and not store.creds_path.exists()


# --- running -----------------------------------------------------------------------------------
async def test_heartbeats_report_versions_capabilities_and_load(
    hub, http, opencode, operator_nats_url, tmp_path
):
    created, _ = await registered(http, operator_nats_url, tmp_path / "gw", "edge_worker")
    gateway = await start_gateway(tmp_path / "gw", opencode.url, max_concurrent_work=2)
    try:
        view = await wait_status(http, created["registrationId"], "active")

        async def reported() -> dict | None:
            v = await get_registration(http, created["registrationId"])
            return v if v.get("versions") and v.get("health") == "healthy" else None

        view = await eventually(reported, 15, 0.1, "a healthy heartbeat with versions")
        assert view["versions"]["opencode"] == OPENCODE_VERSION
        assert view["maxConcurrentWork"] == 2
        assert view["currentLoad"] == 0 and view["activeWorkIds"] == []
        assert created["credential"] not in json.dumps(view)
    finally:
        await gateway.stop()
    view = await get_registration(http, created["registrationId"])
    assert view["liveness"] == "stopping"


async def test_a_healthy_opencode_is_asked_now_and_then_not_at_every_beat(
    hub, http, opencode, operator_nats_url, tmp_path
):
    """Its live event stream vouches for OpenCode between checks; once the stream is
    down, every beat asks again and reports what it found (degraded here)."""
    created, _ = await registered(http, operator_nats_url, tmp_path / "gw", "edge_worker")
    gateway = await start_gateway(
        tmp_path / "gw", opencode.url, heartbeat=0.2, opencode_check_interval=1.5
    )
    agent = gateway.agent
    asked: list[float] = []
    beats: list[float] = []
    ask_health, beat = agent.opencode.health, agent._heartbeat

    async def counted_health() -> dict:
        asked.append(time.monotonic())
        return await ask_health()

    async def counted_beat(*args: Any) -> None:
        beats.append(time.monotonic())
        await beat(*args)

    agent.opencode.health = counted_health  # type: ignore[method-assign]
    agent._heartbeat = counted_beat  # type: ignore[method-assign]
    try:

        async def healthy() -> dict | None:
            v = await get_registration(http, created["registrationId"])
            return v if v.get("health") == "healthy" and agent.events.connected else None

        await eventually(healthy, 15, 0.1, "a healthy heartbeat with the event stream live")
        asked.clear(), beats.clear()
        # At least 2.5 s and 8 beats, however slowly a busy machine runs them: checks
        # come once per check interval (1.5 s), not at every beat.
        started = time.monotonic()
        await eventually(
            lambda: time.monotonic() - started >= 2.5 and len(beats) >= 8, 20, 0.1, "8 beats"
        )
        checks, elapsed = len(asked), time.monotonic() - started
        assert 1 <= checks <= elapsed / 1.5 + 1, f"{checks} health checks in {elapsed:.1f} s"
        assert checks < len(beats) / 2, f"{checks} health checks in {len(beats)} beats"
        agent.events.stream._live.clear()  # as when OpenCode's stream drops
        asked.clear(), beats.clear()

        async def degraded() -> dict | None:
            v = await get_registration(http, created["registrationId"])
            return v if v.get("health") == "degraded" else None

        await eventually(degraded, 10, 0.1, "the beat after the stream dropped says so")
        await eventually(lambda: len(beats) >= 4, 10, 0.05, "4 beats with the stream down")
        assert len(asked) >= len(beats) - 1, "every beat asks while the stream is down"
    finally:
        await gateway.stop()


async def test_a_hung_opencode_makes_the_beats_say_so_and_never_silences_them(
    hub, http, opencode, operator_nats_url, tmp_path
):
    """OpenCode that takes a connection and never answers its health check: the
    Gateway goes on beating every interval, reporting OpenCode degraded and why, and
    stays active at the hub (no unhealthy sweep for missing beats); healthy again
    once OpenCode answers."""
    created, _ = await registered(http, operator_nats_url, tmp_path / "gw", "edge_worker")
    gateway = await start_gateway(
        tmp_path / "gw", opencode.url, heartbeat=0.5, opencode_check_interval=0.0
    )
    agent = gateway.agent
    reg = created["registrationId"]
    answer, ask_health, beat = asyncio.Event(), agent.opencode.health, agent._heartbeat
    beats: list[float] = []

    async def hung_health() -> dict:
        await answer.wait()
        return await ask_health()

    async def counted_beat(*args: Any) -> None:
        beats.append(time.monotonic())
        await beat(*args)

    try:
        await wait_status(http, reg, "active")
        agent.opencode.health = hung_health  # type: ignore[method-assign]
        agent._heartbeat = counted_beat  # type: ignore[method-assign]

        async def degraded() -> dict | None:
            v = await get_registration(http, reg)
            error = v.get("lastError") or ""
            return v if "has not answered its health check" in error else None

        view = await eventually(degraded, 10, 0.1, "a beat saying OpenCode does not answer")
        assert view["health"] == "degraded", view
        beats.clear()
        await asyncio.sleep(4)
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        assert len(beats) >= 6 and max(gaps) < 0.5 + 0.25 + 0.5, (len(beats), gaps)
        assert (await get_registration(http, reg))["status"] == "active"
        answer.set()

        async def healthy() -> dict | None:
            v = await get_registration(http, reg)
            return v if v.get("health") == "healthy" else None

        assert (await eventually(healthy, 10, 0.1, "healthy again"))["lastError"] is None
    finally:
        answer.set()
        await gateway.stop()


async def test_claims_one_at_a_time_when_told_and_never_polls(
    hub, http, opencode, operator_nats_url, tmp_path
):
    created, _ = await registered(http, operator_nats_url, tmp_path / "gw", "edge_worker")
    gateway = await start_gateway(tmp_path / "gw", opencode.url, max_concurrent_work=1)
    reg = created["registrationId"]
    try:
        await wait_status(http, reg, "active")
        first = await enqueue(http, f"{SLOW} first")
        second = await enqueue(http, "second")
        most_running = 0

        async def both_final() -> bool:
            nonlocal most_running
            most_running = max(most_running, len(gateway.agent.runners))
            views = [await work_view(http, w) for w in (first, second)]
            return all(v["state"] in FINAL for v in views)

        await eventually(both_final, 60, 0.05, "both work items to finish")
    finally:
        await gateway.stop()
    one, two = await work_view(http, first), await work_view(http, second)
    assert one["state"] == two["state"] == "completed"
    assert most_running == 1
    # The second lease began only after the first ended (claimed on finishing).
    assert two["leases"][0]["claimedAt"] >= one["leases"][0]["endedAt"]
    assert gateway.agent.runners == {}


async def test_an_opencode_session_error_ends_the_run_with_its_reason(
    hub, http, opencode, operator_nats_url, tmp_path
):
    """An unknown agent: OpenCode emits `session.error` (then a stack trace) and never
    goes idle. The run fails at once with the first error's words, and the Gateway
    (one item at a time) goes on to the next item instead of holding the lease."""
    created, _ = await registered(http, operator_nats_url, tmp_path / "gw", "edge_worker")
    gateway = await start_gateway(tmp_path / "gw", opencode.url, max_concurrent_work=1)
    try:
        await wait_status(http, created["registrationId"], "active")
        broken = await enqueue(http, "hello", payload={"text": "hello", "agent": "no-such-agent"})
        after = await enqueue(http, "after the broken one")
        failed = await work_state(http, broken, FINAL, 30)
        done = await work_state(http, after, FINAL, 30)
    finally:
        await gateway.stop()
    assert failed["state"] == "failed" and failed["attempts"] == 1, failed
    final = failed["events"][-1]
    assert final["kind"] == "fail"
    reason = final["body"]["reason"]
    assert "no-such-agent" in reason and "\n" not in reason and "at <anonymous>" not in reason
    assert not reason.startswith("UnknownError")
    errors = [
        e
        for e in failed["events"]
        if e["kind"] == "event" and e["body"].get("type") == "session.error"
    ]
    assert len(errors) == 1  # the stack-trace repeat is not relayed
    assert done["state"] == "completed"
    # An ended item's view shows its end, not the last "running" status and a lease.
    assert (done["status"], done["leaseExpiresAt"]) == ({"state": "completed"}, None)
    assert (failed["status"], failed["leaseExpiresAt"]) == ({"state": "failed"}, None)
    # Its workspace events name the session it ran in (its sessionRef named none).
    rows = await hub.pool.fetch(
        "SELECT type, session_id FROM workspace_events WHERE payload->>'workId' = $1 "
        "AND type IN ('work.event', 'work.result')",
        after,
    )
    session = done["result"]["sessionId"]
    assert rows and {r["session_id"] for r in rows} == {session}, rows


async def test_external_workspace_syncs_redacted_metadata_and_never_claims(
    hub, http, opencode, operator_nats_url, tmp_path
):
    async with OpenCodeClient(opencode.url) as client:
        local = await client.create_session(title="fix /home/alice/secret/app.py for sk-abc")
    created, _ = await registered(http, operator_nats_url, tmp_path / "gw", "external_workspace")
    gateway = await start_gateway(tmp_path / "gw", opencode.url, sync_interval=0.5)
    reg = created["registrationId"]
    try:
        await wait_status(http, reg, "active")
        work_id = await enqueue(http, "nobody should run this")

        async def synced() -> dict | None:
            v = await get_registration(http, reg)
            sync = v.get("sync") or {}
            return v if "redacted_session_metadata" in sync and "health" in sync else None

        view = await eventually(synced, 15, 0.1, "metadata synced")
        response = await http.get(
            f"/api/v1/tenants/{TENANT}/gateway-registrations/{reg}/sync/redacted_session_metadata"
        )
        assert response.status_code == 200, response.text
        items = response.json()["items"]
        mine = [i for i in items if i["externalId"] == local["id"]]
        assert mine and set(mine[0]) == {"externalId", "title", "updatedAt"}
        assert "/home/alice" not in json.dumps(items) and "[local-path]" in mine[0]["title"]
        assert opencode.directory not in json.dumps(view)
        await asyncio.sleep(1.0)
        assert (await work_view(http, work_id))["state"] == "queued"
    finally:
        await gateway.stop()


async def test_drain_stops_claims_and_revoke_stops_the_agent(
    hub, http, opencode, operator_nats_url, tmp_path
):
    created, store = await registered(http, operator_nats_url, tmp_path / "gw", "edge_worker")
    gateway = await start_gateway(tmp_path / "gw", opencode.url)
    reg = created["registrationId"]
    try:
        await wait_status(http, reg, "active")
        await admin(http, reg, "drain", deadlineSeconds=30)
        await eventually(lambda: gateway.agent.state == "draining", 10, 0.05, "draining")
        work_id = await enqueue(http, "not while draining")
        await asyncio.sleep(1.5)
        assert (await work_view(http, work_id))["owner"] != reg

        await admin(http, reg, "revoke")
        await asyncio.wait_for(gateway.task, 30)
    finally:
        if not gateway.task.done():
            await gateway.stop()
    assert gateway.agent.fatal and "register" in gateway.agent.fatal
    done = GatewayStore(tmp_path / "gw")
    if done.load().revoked:  # told by a heartbeat reply before the disconnect
        assert done.load().state == "revoked"
    await work_state(http, work_id, FINAL + ("queued", "leased"))


async def test_a_claim_held_by_a_frozen_replica_is_granted_once_through_another(
    hub, http, opencode, operator_nats_url, tmp_path
):
    """Two more members of the hub's claim queue group freeze with the first copy of
    each claim NATS hands them (and answer any later copy as the hub does). The
    Gateway sends the same claim (same claimId) again within a fraction of a second,
    another member grants it, and when a frozen one wakes and runs the claim it held,
    the hub answers it with that same lease: one lease per item, no waiting for a
    request timeout or a lease expiry, the work done once."""
    # Work earlier tests left queued would be claimed first (a claim takes the oldest).
    for row in await hub.pool.fetch(
        "SELECT work_id FROM edge_work WHERE tenant = $1 AND state IN ('queued', 'leased')",
        TENANT,
    ):
        await hub.edge_work.cancel(TENANT, row["work_id"], reason="left by an earlier test")
    created, _ = await registered(http, operator_nats_url, tmp_path / "gw", "edge_worker")
    reg = created["registrationId"]
    held: list[WorkClaimRequest] = []
    source = Source(principal_kind="hub", principal_id="frozen")

    async def frozen(msg) -> None:
        claim = decode(msg.data, WorkClaimRequest).data
        if claim.claim_id not in {c.claim_id for c in held}:
            held.append(claim)  # froze with it: never answered
            return
        reply = await hub.edge_work.claim(TENANT, reg, claim)
        await msg.respond(Envelope.wrap(reply, source=source, tenant=TENANT).encode())

    frozen_subs = [
        await hub.nc.subscribe(subjects.WORK_CLAIM.filter(), queue="hub-edge-work", cb=frozen)
        for _ in range(2)
    ]
    await flushed(hub.nc)
    gateway = await start_gateway(tmp_path / "gw", opencode.url, max_concurrent_work=1)
    try:
        await wait_status(http, reg, "active")
        for attempt in range(6):  # until a frozen member held a claim that leased an item
            work_id = await enqueue(http, f"{SLOW} frozen {attempt}", title=f"frozen {attempt}")
            run = await eventually(
                lambda work_id=work_id: gateway.agent.runners.get(work_id), 10, 0.02, "the run"
            )
            mine = [c for c in held if c.claim_id and c.work_id in (work_id, None)]
            granted = await hub.pool.fetchval(
                "SELECT claim_id FROM edge_work_leases WHERE tenant = $1 AND work_id = $2",
                TENANT,
                work_id,
            )
            woken = [c for c in mine if str(c.claim_id) == granted]
            if woken:
                break
            await work_state(http, work_id, FINAL)
        assert woken, "no claim of the Gateway went to a frozen member in 6 items"
        # The frozen replica wakes and runs the claim it held: the same lease, not a second.
        again = await hub.edge_work.claim(TENANT, reg, woken[0])
        assert (again.work_id, again.lease_token) == (work_id, run.lease_token)
        view = await work_state(http, work_id, FINAL)
    finally:
        for sub in frozen_subs:
            await sub.unsubscribe()
        await gateway.stop()
    assert view["state"] == "completed" and view["attempts"] == 1
    assert [lease["attempt"] for lease in view["leases"]] == [1]
    # Claimed within a second or two of being offered, not after a 5 s request timeout
    # (nor a 6 s lease expiry).
    waited = (
        datetime.fromisoformat(view["leases"][0]["claimedAt"])
        - datetime.fromisoformat(view["createdAt"])
    ).total_seconds()
    assert waited < 2.5, f"claimed {waited:.2f} s after it was enqueued"


# --- the CLI ------------------------------------------------------------------------------------
async def test_cli_register_errors_and_status(hub, http, operator_nats_url, tmp_path):
    state = tmp_path / "state"
    code, _, err = await cowork(
        "gateway",
        "register",
        "--hub",
        operator_nats_url,
        "--state-dir",
        str(state),
        env={"COWORK_GATEWAY_CREDENTIAL": ""},
    )
    assert code == 2 and "no credential given" in err

    created = await create_registration(http, "edge_worker", name="cli box")
    bad = created["credential"][:-3] + "zzz"
    code, _, err = await cowork(
        "gateway",
        "register",
        "--hub",
        operator_nats_url,
        "--credential",
        bad,
        "--state-dir",
        str(state),
        "--opencode",
        f"http://127.0.0.1:{free_port()}",
    )
    assert code == 1 and "registration failed [" in err and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("warning: OpenCode at") and "unknown OpenCode version" in lines[0]
    assert lines[-1].startswith("cowork: error: registration failed [gateway.")
    assert sum("error" in line for line in lines) == 1
    code, _, err = await cowork(
        "gateway",
        "register",
        "--hub",
        f"nats://127.0.0.1:{free_port()}",
        "--credential",
        created["credential"],
        "--state-dir",
        str(state),
        "--timeout",
        "2",
    )
    assert code == 1 and "[bootstrap.unreachable]" in err and "Traceback" not in err
    code, _, err = await cowork("gateway", "status", "--state-dir", str(state))
    assert code == 1 and "not registered" in err

    secret_file = tmp_path / "credential"
    secret_file.write_text(created["credential"] + "\n")
    code, out, err = await cowork(
        "gateway",
        "register",
        "--hub",
        operator_nats_url,
        "--credential-file",
        str(secret_file),
        "--state-dir",
        str(state),
    )
    assert code == 0, err
    assert created["registrationId"] in out
    # The next step names the state dir it was registered into, for run and up alike.
    assert f"cowork gateway run --state-dir {state}" in out
    assert f"cowork gateway up --state-dir {state}" in out and "--cloud-leaf-port" in out

    code, out, _ = await cowork("gateway", "status", "--json", "--state-dir", str(state))
    report = json.loads(out)
    assert report["registrationId"] == created["registrationId"]
    assert report["kind"] == "edge_worker" and report["tenant"] == TENANT
    # Not the API's credentialExpiresAt (the registration credential's): the .creds JWT's.
    assert report["busCredentialExpiresAt"] and "credentialExpiresAt" not in report
    assert report["credential"] == str(state / "gateway.creds")
    _, seed = parse_creds((state / "gateway.creds").read_text())
    code, text, _ = await cowork("gateway", "status", "--state-dir", str(state))
    for shown in (out, text):
        assert created["credential"] not in shown and seed.decode() not in shown
        assert "eyJ" not in shown  # no JWT either
    assert "registrationId" in text and created["registrationId"] in text
