"""A paired Desktop end to end: real operator-mode NATS, real PostgreSQL, real
hub, real `opencode serve` (with the tests' fake model), and the Desktop agent
in between. Everything the remote surface does goes through the hub's HTTP API."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from desktopkit import (
    TENANT,
    events,
    eventually,
    finished,
    get_pairing,
    opencode_events,
    pair_and_start,
    run_command,
    sse,
    submit,
    wait_online,
)
from hubkit import client, running_hub
from opencode_env import ASK_QUESTION, BASH_OUTPUT, OPENCODE_OUTPUT_TIMEOUT, RUN_BASH, SLOW

from edges.desktop._agent import notify_hub_of_revocation, revoke_locally
from edges.desktop._store import DesktopStore

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def hub_options():
    return {"command_lease_seconds": 10}


async def _session(http, pairing_id: str, title: str = "remote") -> str:
    done = await run_command(http, pairing_id, "create_session", payload={"title": title})
    assert done["status"] == "completed", done
    return done["result"]["session"]["id"]


async def _relayed(
    http, pairing_id: str, kind: str, session_id: str, timeout: float = OPENCODE_OUTPUT_TIMEOUT
):
    async def found():
        return opencode_events(await events(http, pairing_id), kind, session_id)

    return await eventually(found, timeout, 0.1, f"{kind} in the projection")


async def test_pairing_prompt_and_live_stream(http, desktop, opencode):
    pid = desktop.pairing_id
    view = await get_pairing(http, pid)
    assert view["online"] and view["redeemed"] and view["deviceName"] == "test-box"
    assert "code" not in json.dumps(view).lower().replace("codeexpiresat", "")
    session = await _session(http, pid)
    async with sse(http, pid) as tail:
        done = await run_command(http, pid, "prompt", session, {"text": "hello there"})
        assert done["status"] == "queued" and done["result"]["ok"] is True
        assert "projectionFence" in done["result"] and done["result"]["projectionFence"] is None
        assert done["result"]["reason"] == "desktop_pairing_projection_fence_unsupported"

        def streamed_text() -> str:
            return "".join(
                f["payload"]["properties"].get("delta", "")
                for f in tail.frames
                if f["type"] == "session.event" and f["payload"]["type"] == "message.part.delta"
            )

        await eventually(
            lambda: "reply to: hello there" in streamed_text(),
            OPENCODE_OUTPUT_TIMEOUT,
            what="the streamed reply on the hub's SSE",
        )
        await eventually(
            lambda: any(
                f["payload"].get("type") == "session.idle"
                for f in tail.frames
                if f["type"] == "session.event"
            ),
            20,
        )
    sequences = [e["sequence"] for e in await events(http, pid)]
    assert sequences == list(range(1, len(sequences) + 1)), "gapless, in order"
    idles = opencode_events(await events(http, pid), "session.idle", session)
    assert len(idles) == 1, "duplicate session.idle dropped"
    everything = json.dumps(await events(http, pid))
    assert opencode.directory not in everything, "local paths are redacted on the Desktop"
    assert opencode.directory in json.dumps(await desktop.agent.opencode.get_session(session))


async def test_sse_resumes_from_last_event_id(http, desktop):
    pid = desktop.pairing_id
    session = await _session(http, pid)
    await run_command(http, pid, "prompt", session, {"text": "first"})
    await _relayed(http, pid, "session.idle", session)
    seen = await events(http, pid)
    middle = seen[len(seen) // 2]["sequence"]
    async with sse(http, pid, last_event_id=middle) as tail:
        await eventually(lambda: len(tail.frames) >= len(seen) - middle, 10)
        await run_command(http, pid, "prompt", session, {"text": "second"})
        await eventually(
            lambda: sum(1 for f in tail.frames if f["payload"].get("type") == "session.idle") == 2,
            20,
        )
    got = [f["sequence"] for f in tail.frames]
    assert got == list(range(middle + 1, got[-1] + 1)), "resumed after the id, no gap, no dup"


async def test_relaying_turn_after_turn_adds_no_subscription(http, desktop):
    """Each publish of the relay's outbox (a drain) used a JetStream context of its
    own, whose first async publish subscribes a reply inbox that is never removed:
    one more subscription on the Desktop's connection, and on the server, at every
    drain of a Desktop's life. The count now stays what it was after the first turn."""
    pid = desktop.pairing_id
    session = await _session(http, pid)
    await run_command(http, pid, "prompt", session, {"text": "warm up"})
    await _relayed(http, pid, "session.idle", session)
    nc = desktop.agent.nc
    assert nc is not None
    subscriptions, published = len(nc._subs), desktop.agent.relay.published
    for turn in range(3):
        await run_command(http, pid, "prompt", session, {"text": f"turn {turn}"})
        await _idles(http, pid, session, turn + 2)
    assert desktop.agent.relay.published > published + 3, "several drains happened"
    assert desktop.agent.nc is nc, "one connection throughout"
    assert len(nc._subs) == subscriptions


async def _idles(http, pairing_id: str, session_id: str, count: int) -> None:
    async def enough():
        found = opencode_events(await events(http, pairing_id), "session.idle", session_id)
        return len(found) >= count

    await eventually(enough, OPENCODE_OUTPUT_TIMEOUT, 0.1, f"{count} session.idle events")


async def test_permission_under_local_confirmation_then_remote_allowed(
    hub, http, opencode, operator_nats_url, tmp_path
):
    running = await pair_and_start(http, operator_nats_url, tmp_path / "d", opencode.url)
    pid = running.pairing_id  # contract-default policy
    try:
        session = await _session(http, pid, "tool")
        await run_command(http, pid, "prompt", session, {"text": f"please {RUN_BASH}"})
        asked = (await _relayed(http, pid, "permission.asked", session))[0]["properties"]
        payload = {"permissionId": asked["id"], "allowed": True}

        blocked = await run_command(http, pid, "permission.respond", session, payload)
        assert blocked["status"] == "requires_local_confirmation", blocked
        assert asked["id"] in {p["id"] for p in await running.agent.opencode.list_permissions()}

        response = await http.patch(
            f"/api/v1/tenants/{TENANT}/pairings/{pid}",
            json={"policy": {"remoteApprovals": "remote_allowed"}},
        )
        assert response.status_code == 200, response.text
        revision = response.json()["revision"]
        await eventually(lambda: running.agent.state.revision >= revision, 10)
        audit = await hub.pool.fetch(
            "SELECT action FROM audit_log WHERE tenant = $1 AND target_id = $2", TENANT, pid
        )
        assert "pairing.remote_allowed_enabled" in {r["action"] for r in audit}

        approved = await run_command(http, pid, "permission.respond", session, payload)
        assert approved["status"] == "completed", approved
        await _relayed(http, pid, "permission.replied", session)

        async def tool_ran():
            parts = opencode_events(await events(http, pid), "message.part.updated", session)
            return any(
                BASH_OUTPUT in json.dumps(p) and '"completed"' in json.dumps(p) for p in parts
            )

        await eventually(tool_ran, OPENCODE_OUTPUT_TIMEOUT, 0.1, "the bash tool to complete")
        local = [line["action"] for line in DesktopStore(tmp_path / "d").read_audit()]
        assert "command.accepted" in local and "pairing.updated" in local
    finally:
        await running.stop()


async def test_question_reply_and_reject(http, desktop):
    pid = desktop.pairing_id
    session = await _session(http, pid, "questions")
    await run_command(http, pid, "prompt", session, {"text": ASK_QUESTION})
    asked = (await _relayed(http, pid, "question.asked", session))[0]["properties"]
    replied = await run_command(
        http, pid, "question.reply", session, {"requestId": asked["id"], "answers": [["Blue"]]}
    )
    assert replied["status"] == "completed", replied
    await _relayed(http, pid, "question.replied", session)

    await _relayed(http, pid, "session.idle", session)
    await run_command(http, pid, "prompt", session, {"text": f"again {ASK_QUESTION}"})

    async def second_question():
        asks = opencode_events(await events(http, pid), "question.asked", session)
        return asks[1]["properties"] if len(asks) > 1 else None

    second = await eventually(second_question, OPENCODE_OUTPUT_TIMEOUT, 0.1, "a second question")
    rejected = await run_command(http, pid, "question.reject", session, {"requestId": second["id"]})
    assert rejected["status"] == "completed", rejected
    await _relayed(http, pid, "question.rejected", session)

    unknown = await run_command(
        http, pid, "question.reply", session, {"requestId": "que_missing", "answers": [["Red"]]}
    )
    assert unknown["status"] == "failed" and "no pending request" in unknown["result"]["message"]


async def test_abort_a_slow_prompt_and_status(http, desktop):
    pid = desktop.pairing_id
    session = await _session(http, pid, "slow")
    await run_command(http, pid, "prompt", session, {"text": f"{SLOW} please"})
    await _relayed(http, pid, "message.part.delta", session)
    aborted = await run_command(http, pid, "abort", session)
    assert aborted["status"] == "completed", aborted
    await _relayed(http, pid, "session.idle", session)
    status = await run_command(http, pid, "status")
    assert status["status"] == "completed"
    assert session in {s["id"] for s in status["result"]["sessions"]}


async def test_a_command_done_at_once_sends_one_ack_and_both_are_audited(
    hub, http, desktop, monkeypatch
):
    """A command done within ACCEPT_AFTER sends its final ack alone: the hub takes it
    as the accept too, and audits `command.accepted` then `command.completed`, once
    each, as for a command that ran long enough to be accepted on its own (that one:
    tests/edges/desktop/test_desktop_faults.py, a runner held inside its command)."""
    from edges.desktop import _agent

    monkeypatch.setattr(_agent, "ACCEPT_AFTER", 5.0)  # "at once", however busy the machine
    sent: list[str] = []
    send = desktop.agent._send_ack

    async def recording(command, outcome, result):
        sent.append(outcome)
        return await send(command, outcome, result)

    desktop.agent._send_ack = recording
    try:
        done = await run_command(http, desktop.pairing_id, "status")
    finally:
        del desktop.agent._send_ack
    assert done["status"] == "completed" and done["attempts"] == 1, done
    assert sent == ["completed"]
    audit = await hub.pool.fetch(
        "SELECT action, metadata FROM audit_log WHERE tenant = $1 AND command_id = $2 ORDER BY id",
        TENANT,
        done["commandId"],
    )
    assert [r["action"] for r in audit] == ["command.accepted", "command.completed"]
    local = [
        line["action"]
        for line in desktop.agent.store.read_audit()
        if line.get("commandId") == done["commandId"]
    ]
    assert local == ["command.accepted", "command.completed"]  # the journal as before


async def test_outside_the_allowlist_is_refused_at_the_hub(http, desktop):
    response = await http.post(
        f"/api/v1/tenants/{TENANT}/pairings/{desktop.pairing_id}/commands",
        json={"kind": "status", "workspaceId": "elsewhere"},
    )
    assert response.status_code in (400, 403, 422), response.text
    assert "allowlisted" in response.text


async def test_admin_revoke_disconnects_the_desktop_and_refuses_commands(hub, http, desktop):
    pid = desktop.pairing_id
    response = await http.post(
        f"/api/v1/tenants/{TENANT}/pairings/{pid}/revoke", json={"reason": "lost laptop"}
    )
    assert response.status_code == 200, response.text
    await asyncio.wait_for(desktop.task, 10)  # the agent stops by itself
    assert desktop.agent.pairing.revoked
    assert not desktop.agent.store.creds_path.exists()
    refused = await http.post(
        f"/api/v1/tenants/{TENANT}/pairings/{pid}/commands", json={"kind": "status"}
    )
    assert refused.status_code == 409, refused.text
    assert (await get_pairing(http, pid))["status"] == "revoked"


async def test_revoke_pairing_command_revokes_both_sides(hub, http, desktop):
    pid = desktop.pairing_id
    submitted = await submit(http, pid, "revoke_pairing")
    done = await finished(http, pid, submitted["commandId"])
    assert done["status"] == "completed"
    await asyncio.wait_for(desktop.task, 10)
    assert desktop.agent.pairing.revoked
    await eventually(lambda: get_pairing(http, pid), 5)
    assert (await get_pairing(http, pid))["status"] == "revoked"


async def test_local_revoke_tells_the_hub(hub, http, desktop):
    pid = desktop.pairing_id
    await desktop.stop()
    store = DesktopStore(desktop.agent.store.directory)
    pairing = store.load_pairing()
    assert await notify_hub_of_revocation(store, pairing, "user clicked revoke")
    revoke_locally(store, "user clicked revoke")
    view = await get_pairing(http, pid)
    assert view["status"] == "revoked" and view["revokeReason"] == "user clicked revoke"
    actions = await hub.pool.fetch(
        "SELECT actor_kind FROM audit_log WHERE tenant = $1 AND "
        "target_id = $2 AND action = 'pairing.revoked'",
        TENANT,
        pid,
    )
    assert [r["actor_kind"] for r in actions] == ["desktop"]


async def test_a_crashed_desktop_shows_offline_within_two_heartbeats(
    http, opencode, operator_nats_url, tmp_path
):
    running = await pair_and_start(
        http, operator_nats_url, tmp_path / "d", opencode.url, heartbeat=0.5
    )
    await running.kill()  # no goodbye heartbeat
    # two intervals, plus the hub's sweep tick (0.5 s) and slack for a loaded 2-core machine
    view = await wait_online(http, running.pairing_id, online=False, timeout=2 * 0.5 + 5.0)
    assert view["status"] == "paired_offline"


async def test_a_stopped_desktop_says_goodbye_and_is_offline_at_once(
    http, opencode, operator_nats_url, tmp_path
):
    running = await pair_and_start(
        http, operator_nats_url, tmp_path / "d", opencode.url, heartbeat=30
    )
    await running.stop()
    # At once: missed beats (30 s apart) would take a minute; 10 s covers a loaded machine.
    await wait_online(http, running.pairing_id, online=False, timeout=10)


async def test_stopping_the_hub_ends_live_tails_instead_of_waiting_them_out(
    operator_nats_url, database_url, bus_keys
):
    from hub.workspaces._routes import KEEPALIVE_SECONDS

    async with (
        running_hub(operator_nats_url, database_url, keys=bus_keys) as other,
        client(other, admin=True) as other_http,
    ):
        async with sse(other_http, "some-workspace") as tail:
            await asyncio.sleep(0.2)
            started = time.monotonic()
            await other.stop()
            await asyncio.wait_for(tail._task, 5)  # the stream ended at the client
            assert time.monotonic() - started < KEEPALIVE_SECONDS / 3
