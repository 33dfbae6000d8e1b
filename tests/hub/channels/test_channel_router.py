"""The inbound router against a real hub: dead letters, durable dedupe, prompts
becoming Desktop commands (create_session first, then prompts in order) or
edge work, and failures answered in chat.

Instances are a stand-in (the test owns their configuration); everything else
(JetStream, PostgreSQL, CommandService, EdgeWorkService, the outbox) is real.
"""

from __future__ import annotations

import json

import pytest
from desktopkit import eventually
from hubkit import waiting_on_a_lock
from routerkit import TENANT, Kit

from schemas import subjects


@pytest.fixture
async def kit(hub):
    return Kit(hub)


# --- dead letters -----------------------------------------------------------------------
@pytest.fixture
async def dead(hub):
    letters: list[dict] = []

    async def on(msg):
        letters.append(json.loads(msg.data))

    sub = await hub.nc.subscribe(
        subjects.dead_letter_subject(TENANT, subjects.CHANNEL_INBOUND), cb=on
    )
    yield letters
    await sub.unsubscribe()


async def test_bad_contract_wrong_source_and_wrong_workspace_are_dead_lettered(kit, http, dead):
    inst = await kit.instance(http)
    good = kit.inbound(inst, "hello")
    await kit.publish(
        inst, good, raw=b'{"type": "channel.inbound", "nonsense": true}', msg_id="bad-1"
    )
    await kit.publish(inst, kit.inbound(inst, "x"), source="someone-else")
    other = kit.inbound(inst, "y", workspace="elsewhere")
    await kit.publish(inst, other, workspace="elsewhere")
    kit.instances.rows["tg-disabled"] = dict(inst, instance_id="tg-disabled", enabled=False)
    await kit.publish(
        kit.instances.rows["tg-disabled"], kit.inbound(kit.instances.rows["tg-disabled"], "z")
    )
    await kit.publish(
        {**inst, "instance_id": "tg-nobody"}, kit.inbound({**inst, "instance_id": "tg-nobody"}, "w")
    )

    async def all_in():
        return len(dead) >= 5 or None

    await eventually(all_in)
    codes = sorted(d["data"]["code"] for d in dead)
    assert codes == sorted(
        [
            "contract.invalid",
            "contract.principal_mismatch",
            "channel.wrong_workspace",
            "channel.instance_disabled",
            "channel.unknown_instance",
        ]
    ), codes
    assert all(d["data"]["reason"] for d in dead)
    # Nothing was claimed or answered for any of them.
    assert (
        await kit.hub.pool.fetchval(
            "SELECT count(*) FROM channel_inbound_claims WHERE instance_id = $1",
            inst["instance_id"],
        )
        == 0
    )
    await kit.no_reply(inst)


# --- dedupe ----------------------------------------------------------------------------
async def test_same_event_twice_is_processed_once(kit, http, hub):
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    inbound = kit.inbound(inst, "/status")
    before = hub.metrics.bus_messages.labels("channel.inbound", "duplicate")._value.get()
    # Different Nats-Msg-Ids defeat the stream's duplicate window: the claim must catch it.
    await kit.publish(inst, inbound, msg_id="first-" + inbound.id[:20])
    await kit.publish(inst, inbound, msg_id="second-" + inbound.id[:20])

    async def counted():
        now = hub.metrics.bus_messages.labels("channel.inbound", "duplicate")._value.get()
        return now > before or None

    await eventually(counted)
    got = await kit.replies(inst, 1, timeout=10.0)  # the one reply, on a loaded machine
    got += await kit.replies(inst, 1, timeout=1.5)  # and no second one
    assert len(got) == 1
    assert (await kit.claim(inst, inbound))["status"] == "done"


async def test_reprocessing_a_claimed_message_does_not_double_submit(kit, http):
    """A crash after the claim and before the ack: the claim row is 'claimed' and
    the message comes again. It runs again, but submits and replies nothing twice."""
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    await kit.hub.pool.execute(
        "INSERT INTO channel_bindings (tenant, binding_id, instance_id, workspace_id, chat_id, "
        "session_id) VALUES ($1, 'b-re', $2, $3, 'c1', 'ses_1')",
        TENANT,
        inst["instance_id"],
        inst["workspace_id"],
    )
    inbound = kit.inbound(inst, "do the thing")
    await kit.publish(inst, inbound)
    await kit.processed(inst, inbound)
    await kit.hub.pool.execute(
        "UPDATE channel_inbound_claims SET status = 'claimed' WHERE tenant = $1 AND "
        "provider_event_id = $2",
        TENANT,
        inbound.provider_event_id,
    )
    await kit.publish(inst, inbound, msg_id="again-" + inbound.id[:30])
    await kit.processed(inst, inbound)
    prompts = [c for c in await kit.commands(inst) if c["kind"] == "prompt"]
    assert len(prompts) == 1
    assert prompts[0]["payload"] == {"text": "do the thing", "agent": "build"}
    assert prompts[0]["session_id"] == "ses_1"
    # one offline notice, delivered once (same delivery id both times)
    rows = await kit.hub.pool.fetch(
        "SELECT delivery_id FROM channel_deliveries WHERE instance_id = $1", inst["instance_id"]
    )
    assert len(rows) == 1


# --- prompts to a paired Desktop ---------------------------------------------------------
async def test_first_prompts_wait_for_create_session_then_go_in_order(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    first = await kit.send(inst, "first question")
    second = await kit.send(inst, "second question")
    commands = await kit.commands(inst)
    assert [c["kind"] for c in commands] == ["create_session"]  # only one session asked for
    assert commands[0]["payload"]["title"] == f"Bot {inst['instance_id']}: U1"
    assert (await kit.claim(inst, first))["status"] == "waiting"
    assert (await kit.claim(inst, second))["status"] == "waiting"

    await kit.complete(
        commands[0], {"ok": True, "status": "completed", "session": {"id": "ses_new"}}
    )
    commands = await kit.commands(inst)
    assert [(c["kind"], (c["payload"] or {}).get("text")) for c in commands] == [
        ("create_session", None),
        ("prompt", "first question"),
        ("prompt", "second question"),
    ]
    assert all(c["session_id"] == "ses_new" for c in commands[1:])
    assert commands[1]["command_id"] == f"{first.id}-prompt"
    assert (await kit.claim(inst, first))["status"] == "done"
    binding = await kit.hub.pool.fetchrow(
        "SELECT * FROM channel_bindings WHERE instance_id = $1 AND active", inst["instance_id"]
    )
    assert binding["session_id"] == "ses_new"
    subs = await kit.hub.pool.fetch(
        "SELECT kind FROM channel_submissions WHERE binding_id = $1", binding["binding_id"]
    )
    assert sorted(r["kind"] for r in subs) == ["create_session", "prompt", "prompt"]

    # With a session, the next prompt goes straight to the Desktop.
    third = await kit.send(inst, "third")
    assert (await kit.commands(inst))[-1]["command_id"] == f"{third.id}-prompt"


async def test_failed_create_session_and_failed_prompt_are_answered_in_chat(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    waiting = await kit.send(inst, "hello")
    await kit.complete(
        (await kit.commands(inst, at_least=1))[0],
        {"ok": False, "status": "failed", "message": "opencode is down"},
        status="failed",
    )
    reply = await kit.replies(inst, 1)
    assert reply[0].text == "Could not start a session: opencode is down."
    assert reply[0].reply_to_message_id == waiting.provider_message_id
    assert (await kit.claim_status(inst, waiting, "done"))["outcome"] == "session_failed"

    # The next message asks for a session again; then a prompt is refused by policy.
    await kit.send(inst, "again")
    create = [c for c in await kit.commands(inst, at_least=2) if c["kind"] == "create_session"]
    assert len(create) == 2
    await kit.complete(create[1], {"ok": True, "status": "completed", "session": {"id": "s2"}})
    await kit.replies(inst, 1)  # the "Desktop is offline" notice for the waited prompt
    prompt = (await kit.commands(inst))[-1]
    await kit.complete(
        prompt,
        {"ok": False, "status": "blocked_by_policy", "message": "prompts need local confirmation"},
        status="blocked_by_policy",
    )
    text = await kit.reply(inst)
    assert "did not run that (prompt): prompts need local confirmation" in text


async def test_a_command_refused_before_the_router_is_done_is_still_answered_in_chat(kit, http):
    """The Desktop may answer a command at once (a refusal takes it no time), while the
    router that submitted it is still busy with the message: the chat must still hear.
    (CI: a sealed Desktop's refusal never reached the chat; the router recorded which
    chat the command serves only after submitting it, and the final found no record.)
    The router's record is held on a table lock; meanwhile the Desktop answers the
    message's command if it exists."""
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    await kit.send(inst, "hello")
    create = (await kit.commands(inst, at_least=1))[0]
    await kit.complete(create, {"ok": True, "status": "completed", "session": {"id": "s1"}})
    hello = (await kit.commands(inst, at_least=2))[1]
    await kit.complete(hello, {"ok": True, "status": "queued"}, status="queued")
    await kit.replies(inst, 1)  # the "Desktop is offline" notice for the waited prompt
    inbound = kit.inbound(inst, "after removal")

    async def refuse_it() -> None:
        for command in await kit.commands(inst):
            if command["command_id"] == f"{inbound.id}-prompt" and command["state"] != "done":
                refused = {"ok": False, "status": "blocked_by_policy", "message": "not enrolled"}
                await kit.complete(command, refused, status="blocked_by_policy")

    async with kit.hub.pool.acquire() as conn:
        held = conn.transaction()
        await held.start()
        await conn.execute("LOCK TABLE channel_submissions IN SHARE ROW EXCLUSIVE MODE")
        try:
            await kit.publish(inst, inbound)
            await waiting_on_a_lock(kit.hub.pool, "INSERT INTO channel_submissions")
            await refuse_it()
        finally:
            await held.rollback()
    await kit.commands(inst, at_least=3)
    await refuse_it()
    await kit.claim_status(inst, inbound, "done")
    texts = [r.text or "" for r in await kit.replies(inst, 2, timeout=10)]
    assert "The Desktop did not run that (prompt): not enrolled." in texts, texts


async def test_the_router_reads_after_a_final_only_for_a_channels_command(kit, http, hub):
    """A command's row says whether a channel submitted it (`from_channel`), and the
    router looks for its chat after the final only then: a command another client
    sent (the admin API) costs no read after its final ack, and no chat hears of it,
    even with a channel submission under its id (written here by hand: only a
    channel's own submit writes one)."""
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    await kit.send(inst, "hello")
    create = (await kit.commands(inst, at_least=1))[0]
    assert create["from_channel"] is True
    sent = await hub.commands.submit(  # as the admin API submits
        TENANT, inst["workspace_id"], {"kind": "status", "workspace_id": "local"}
    )
    other = next(c for c in await kit.commands(inst, 2) if c["command_id"] == sent["command_id"])
    assert other["from_channel"] is False
    await hub.pool.execute(
        "INSERT INTO channel_submissions (tenant, command_id, binding_id, kind, message_id) "
        "SELECT tenant, $2, binding_id, 'prompt', 'by-hand' FROM channel_submissions "
        "WHERE tenant = $1 AND command_id = $3",
        TENANT,
        other["command_id"],
        create["command_id"],
    )
    await kit.complete(other, {"ok": False, "status": "failed", "message": "no"}, "failed")
    await kit.no_reply(inst)


async def test_revoked_pairing_is_a_clear_reply(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    r = await http.post(f"/api/v1/tenants/{TENANT}/pairings/{inst['workspace_id']}/revoke", json={})
    assert r.status_code in (200, 204), r.text
    inbound = await kit.send(inst, "anyone there?")
    assert await kit.reply(inst) == "Could not start a session: the Desktop's pairing is revoked."
    await kit.claim_status(inst, inbound, "done")
    assert await kit.commands(inst) == []


async def test_a_sealed_desktop_is_a_clear_reply(kit, http, hub):
    """A Desktop that reports itself sealed (docs/sealed.md) takes no chat commands."""
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    await hub.pool.execute(
        "UPDATE pairings SET reported_trust = 'sealed' WHERE tenant = $1 AND pairing_id = $2",
        TENANT,
        inst["workspace_id"],
    )
    inbound = await kit.send(inst, "anyone there?")
    assert await kit.reply(inst) == (
        "Could not start a session: the Desktop is sealed: only controllers enrolled on it "
        "can drive it, and this chat channel is not one (its owner can enrol it: "
        "cowork channel enrol)."
    )
    await kit.claim_status(inst, inbound, "done")
    assert await kit.commands(inst) == []


# --- prompts to cloud workers ---------------------------------------------------------------
async def test_cloud_worker_prompt_becomes_edge_work(kit, http):
    inst = await kit.instance(http, authority="cloud_worker")
    await kit.role(inst, "u1", "member")
    inbound = await kit.send(inst, "summarise the repo")
    r = await http.get(f"/api/v1/tenants/{TENANT}/work")
    assert r.status_code == 200, r.text
    body = r.json()
    items = body if isinstance(body, list) else body.get("items") or body.get("work")
    mine = [
        w
        for w in items
        if (w.get("sessionRef") or w.get("session_ref") or {}).get("workspaceId")
        == inst["workspace_id"]
    ]
    assert len(mine) == 1
    row = await kit.hub.pool.fetchrow(
        "SELECT * FROM edge_work WHERE tenant = $1 AND idempotency_key = $2", TENANT, inbound.id
    )
    assert row["kind"] == "prompt"
    assert row["payload"]["text"] == "summarise the repo" and row["payload"]["agent"] == "build"
    assert row["session_ref"]["workspaceId"] == inst["workspace_id"]
    sub = await kit.hub.pool.fetchrow(
        "SELECT * FROM channel_submissions WHERE command_id = $1", row["work_id"]
    )
    assert sub["kind"] == "edge_prompt" and sub["message_id"] == inbound.id
    accepted = await kit.hub.pool.fetchrow(
        "SELECT * FROM audit_log WHERE action = 'channel.message_accepted' AND target_id = $1",
        inbound.id,
    )
    assert accepted is not None and "summarise" not in json.dumps(accepted["metadata"])
