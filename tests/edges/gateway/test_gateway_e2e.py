"""Gateways end to end: real operator-mode NATS, real PostgreSQL, real hub, real
`opencode serve` (with the tests' fake model), and the Gateway agent between them,
once as a real `cowork gateway run` process that is SIGKILLed mid-run.
Everything Cloud does goes through the hub's HTTP API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
from desktopkit import COWORK, TENANT, cowork, eventually
from gateway_agent_kit import (
    create_registration,
    enqueue,
    get_registration,
    registered,
    start_gateway,
    wait_status,
    work_state,
    work_view,
)
from opencode_env import OPENCODE_VERSION, SLOW, FakeModelServer, OpenCodeServer

from edges.common._bootstrap import dial_once
from edges.common._credentials import EdgeCredentials
from edges.common._opencode import OpenCodeClient
from edges.gateway._store import GatewayStore
from schemas import AckReply, Envelope, Source, WorkOutput, decode, subjects

LEASE_SECONDS = 3
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def hub_options():
    return {"work_lease_seconds": LEASE_SECONDS}


@pytest.fixture(scope="module")
async def opencode():
    """OpenCode whose SLOW answers take about 8 s: long enough to kill a Gateway mid-run."""
    async with (
        FakeModelServer(slow_chunks=160, slow_delay=0.05) as model,
        OpenCodeServer(model) as server,
    ):
        yield server


def _leases(view: dict) -> list[tuple]:
    return [(x["attempt"], x["registrationId"], x["outcome"]) for x in view["leases"]]


def _sequences(view: dict) -> list[int]:
    return [e["sequence"] for e in view["events"]]


async def test_edge_worker_runs_cloud_prompt_on_its_opencode(
    hub, http, opencode, operator_nats_url, tmp_path
):
    created, _ = await registered(http, operator_nats_url, tmp_path / "gw", "edge_worker")
    gateway = await start_gateway(tmp_path / "gw", opencode.url)
    try:
        view = await wait_status(http, created["registrationId"], "active")
        work_id = await enqueue(http, "hello edge", title="Edge title")
        work = await work_state(http, work_id, ("completed", "failed", "dead_lettered"))
    finally:
        await gateway.stop()

    assert work["state"] == "completed", work
    assert work["attempts"] == 1 and work["owner"] == created["registrationId"]
    assert _leases(work) == [(1, created["registrationId"], "completed")]
    events = work["events"]
    # In order, gapless, from 1: the status first, the result last, OpenCode in between.
    assert _sequences(work) == list(range(1, len(events) + 1))
    assert events[0]["kind"] == "status" and events[0]["body"]["state"] == "running"
    assert events[-1]["kind"] == "result"
    assert events[-1]["body"]["text"] == opencode.model.reply_for("hello edge")
    assert events[-1]["body"]["tokens"]["output"] >= 1
    assert work["result"]["text"] == opencode.model.reply_for("hello edge")
    relayed = [e["body"]["type"] for e in events if e["kind"] == "event"]
    assert "message.part.delta" in relayed and "session.status" in relayed
    deltas = "".join(
        e["body"]["properties"]["delta"]
        for e in events
        if e["kind"] == "event" and e["body"]["type"] == "message.part.delta"
    )
    assert deltas == opencode.model.reply_for("hello edge")
    # Redacted on the Gateway: its OpenCode project directory never reached Cloud.
    assert opencode.directory not in json.dumps(events)
    # The session ran on the Gateway's own OpenCode, titled from the sessionRef.
    async with OpenCodeClient(opencode.url) as client:
        titles = [s["title"] for s in await client.list_sessions()]
    assert "Edge title" in titles
    # Heartbeats carried the versions and the load (back to 0 once done).
    view = await get_registration(http, created["registrationId"])
    assert view["versions"]["opencode"] == OPENCODE_VERSION
    assert view["versions"]["busProtocol"] == "1.0"
    journal = GatewayStore(tmp_path / "gw").journal(work_id)
    assert [(j.attempt, j.state) for j in journal] == [(1, "completed")]


async def _late_write(state_dir: Path, nats_url: str, output: WorkOutput) -> AckReply:
    """What a dead Gateway's process would still send: its stored credential, its lease."""
    gateway = json.loads((state_dir / "gateway.json").read_text())
    creds = EdgeCredentials.from_creds_file(state_dir / "gateway.creds")
    reg = gateway["registrationId"]
    nc = await dial_once(
        [nats_url],
        5.0,
        **creds.connect_options(),
        inbox_prefix=subjects.inbox_prefix(TENANT, "gateway", reg),
    )
    try:
        env = Envelope.wrap(
            output,
            tenant=TENANT,
            source=Source(
                principal_kind="gateway", principal_id=reg, authority="gateway_standalone"
            ),
        )
        msg = await nc.request(
            subjects.WORK_OUTPUT.build(tenant=TENANT, registration_id=reg), env.encode(), timeout=5
        )
        return decode(msg.data, AckReply).data
    finally:
        await nc.close()


async def test_killed_gateway_loses_its_lease_and_another_completes(
    hub, http, opencode, operator_nats_url, tmp_path
):
    # Gateway A: registered and run as real processes, as an operator would.
    created_a = await create_registration(http, "edge_worker", name="gateway A")
    dir_a = tmp_path / "a"
    code, out, err = await cowork(
        "gateway",
        "register",
        "--hub",
        operator_nats_url,
        "--opencode",
        opencode.url,
        "--state-dir",
        str(dir_a),
        env={"COWORK_GATEWAY_CREDENTIAL": created_a["credential"]},
    )
    assert code == 0, err
    assert created_a["registrationId"] in out and "cowork gateway run" in out
    process = await asyncio.create_subprocess_exec(
        COWORK,
        "gateway",
        "run",
        "--opencode",
        opencode.url,
        "--heartbeat-interval",
        "0.5",
        "--state-dir",
        str(dir_a),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        await wait_status(http, created_a["registrationId"], "active")
        work_id = await enqueue(http, f"{SLOW} long edge answer", title="slow edge")

        async def running_on_a() -> dict | None:
            view = await work_view(http, work_id)
            deltas = [
                e
                for e in view["events"]
                if e["kind"] == "event" and e["body"].get("type") == "message.part.delta"
            ]
            return (
                view if view["owner"] == created_a["registrationId"] and len(deltas) >= 3 else None
            )

        before = await eventually(running_on_a, 30, 0.1, "gateway A to be mid-run")
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    assert before["state"] == "leased" and before["attempts"] == 1

    # Gateway B takes the work over once A's lease has expired.
    created_b, _ = await registered(
        http, operator_nats_url, tmp_path / "b", "edge_worker", name="gateway B"
    )
    gateway_b = await start_gateway(tmp_path / "b", opencode.url)
    try:
        work = await work_state(http, work_id, ("completed", "failed", "dead_lettered"), 90)
    finally:
        await gateway_b.stop()
    assert work["state"] == "completed", work
    assert work["attempts"] == 2 and work["owner"] == created_b["registrationId"]
    assert _leases(work) == [
        (1, created_a["registrationId"], "expired"),
        (2, created_b["registrationId"], "completed"),
    ]
    # One gapless sequence across both attempts: B continued after A's last output.
    assert _sequences(work) == list(range(1, len(work["events"]) + 1))
    attempts = [e["attempt"] for e in work["events"]]
    assert attempts == sorted(attempts) and set(attempts) == {1, 2}
    assert work["events"][-1]["kind"] == "result"
    assert work["result"]["text"].startswith(opencode.model.reply_for(f"{SLOW} long edge answer"))

    # A's journal still holds the lease it died with; its late write is refused as stale.
    journal = GatewayStore(dir_a).journal(work_id)
    assert [(j.attempt, j.state) for j in journal] == [(1, "running")]
    late = WorkOutput(
        work_id=work_id,
        lease_token=journal[0].lease_token,
        kind="event",
        sequence=work["lastSequence"] + 1,
        body={"type": "late.write"},
    )
    reply = await _late_write(dir_a, operator_nats_url, late)
    assert reply.ok is False and reply.code == "work.stale_lease", reply
    # ... and a replay of one of its own earlier outputs under the old lease too.
    first_a = next(e for e in work["events"] if e["attempt"] == 1 and e["kind"] == "event")
    replay = WorkOutput(
        work_id=work_id,
        lease_token=journal[0].lease_token,
        kind="event",
        sequence=first_a["sequence"],
        body=first_a["body"],
    )
    reply = await _late_write(dir_a, operator_nats_url, replay)
    assert reply.ok is False and reply.code == "work.stale_lease", reply
    after = await work_view(http, work_id)
    assert after["lastSequence"] == work["lastSequence"]  # nothing was written

    audit = (await http.get(f"/api/v1/tenants/{TENANT}/audit", params={"limit": 1000})).json()[
        "items"
    ]
    refused = [
        a
        for a in audit
        if a["action"] == "gateway.edge.output_refused" and a.get("targetId") == work_id
    ]
    assert len(refused) >= 2
    assert {a["actorId"] for a in refused} == {created_a["registrationId"]}
    assert all(a["metadata"]["code"] == "work.stale_lease" for a in refused)

    # Restarting A: its interrupted lease is journalled as such and never run again.
    gateway_a = await start_gateway(dir_a, opencode.url)
    await gateway_a.stop()
    journal = GatewayStore(dir_a).journal(work_id)
    assert [(j.attempt, j.state) for j in journal] == [(1, "interrupted")]


async def test_refused_renewal_aborts_the_run_and_resume_claims_again(
    hub, http, opencode, operator_nats_url, tmp_path
):
    """Drain with a deadline shorter than the run: the next renewal is refused, so the
    Gateway aborts its OpenCode session and writes nothing more under that lease; on
    resume the registration turns active again and the Gateway claims the work anew."""
    created, _ = await registered(http, operator_nats_url, tmp_path / "gw", "edge_worker")
    reg = created["registrationId"]
    gateway = await start_gateway(tmp_path / "gw", opencode.url)
    store = GatewayStore(tmp_path / "gw")
    try:
        await wait_status(http, reg, "active")
        work_id = await enqueue(http, f"{SLOW} drained mid-run")

        async def running() -> bool:
            view = await work_view(http, work_id)
            return view["owner"] == reg and view["outputCount"] >= 3

        await eventually(running, 30, 0.1, "the work to be mid-run")
        response = await http.post(
            f"/api/v1/tenants/{TENANT}/gateway-registrations/{reg}/drain",
            json={"deadlineSeconds": 1},
        )
        assert response.status_code == 200, response.text

        def lost() -> bool:
            return [j.state for j in store.journal(work_id)] == ["lost"]

        await eventually(lost, 15, 0.1, "the lease to be lost on the Gateway")
        entry = store.journal(work_id)[0]
        # Whichever came first after the deadline: the renewal or a write.
        assert entry.detail and entry.detail.startswith(("renew refused: ", "write refused: "))
        async with OpenCodeClient(opencode.url) as client:  # aborted, not left running
            status = await client.session_status()
            assert entry.session_id not in status
        written = (await work_view(http, work_id))["lastSequence"]
        await asyncio.sleep(1.0)
        assert (await work_view(http, work_id))["lastSequence"] == written
        assert gateway.agent.runners == {}

        response = await http.post(
            f"/api/v1/tenants/{TENANT}/gateway-registrations/{reg}/resume", json={}
        )
        assert response.status_code == 200, response.text
        work = await work_state(http, work_id, ("completed", "failed", "dead_lettered"), 60)
    finally:
        await gateway.stop()
    assert work["state"] == "completed" and work["attempts"] == 2
    assert [lease["registrationId"] for lease in work["leases"]] == [reg, reg]
    assert _sequences(work) == list(range(1, len(work["events"]) + 1))
    assert [j.state for j in store.journal(work_id)] == ["lost", "completed"]
    store.close()
