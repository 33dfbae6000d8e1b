"""The inbound router against a real hub: dead letters, durable dedupe, prompts
becoming Desktop commands (create_session first, then prompts in order) or
edge work, and failures answered in chat.

Instances are a stand-in (the test owns their configuration); everything else
(JetStream, PostgreSQL, CommandService, EdgeWorkService, the outbox) is real.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime

import pytest

from channels import message_id
from desktopkit import eventually
from schemas import ChannelInbound, ChannelOutbound, Envelope, Source, decode, subjects

TENANT = "acme"
_n = itertools.count()


class Instances:
    """Stand-in for ChannelService.instance()."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def instance(self, instance_id: str) -> dict | None:
        return self.rows.get(instance_id)


class Actions:
    """Stand-in for ActionTokens: single use, bound to chat and user."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def add(self, token: str, **row) -> None:
        self.rows[token] = row

    async def consume(self, conn, tenant, token, *, instance_id, chat_id, user_id):
        row = self.rows.get(token)
        if row is None or row["chat_id"] != chat_id or row["instance_id"] != instance_id:
            return None
        del self.rows[token]
        return row


class Kit:
    def __init__(self, hub) -> None:
        self.hub, self.router = hub, hub.channel_router
        self.instances, self.actions = Instances(), Actions()
        self.router.instances = self.instances
        self.router.chat._actions = self.actions
        self.subs: dict[str, object] = {}

    async def instance(self, http, authority: str = "desktop_paired", **extra) -> dict:
        iid = f"tg-{next(_n)}-{datetime.now(UTC).strftime('%H%M%S%f')}"
        if authority == "desktop_paired":
            r = await http.post(f"/api/v1/tenants/{TENANT}/pairings", json={"label": iid})
            assert r.status_code == 201, r.text
            workspace = r.json()["pairingId"]
            await self.hub.pool.execute("UPDATE pairings SET status = 'paired_offline' "
                                        "WHERE tenant = $1 AND pairing_id = $2", TENANT, workspace)
        else:
            workspace = f"ws-{iid}"
        row = {"tenant": TENANT, "instance_id": iid, "kind": "telegram",
               "workspace_id": workspace, "authority": authority, "default_agent": "build",
               "enabled": True, "display_name": f"Bot {iid}", "revision": 1,
               "capabilities": None, **extra}
        self.instances.rows[iid] = row
        self.subs[iid] = await self.hub.js.pull_subscribe(
            subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=iid), durable=None,
            stream="CW_CHANNEL_OUTBOUND")
        return row

    async def role(self, inst: dict, user: str, role: str) -> None:
        await self.hub.pool.execute(
            "INSERT INTO channel_users (tenant, instance_id, provider_user_id, role) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (tenant, instance_id, provider_user_id) "
            "DO UPDATE SET role = EXCLUDED.role", TENANT, inst["instance_id"], user, role)

    @staticmethod
    def inbound(inst: dict, text: str = "", *, user: str = "u1", chat: str = "c1",
                thread: str | None = None, event_type: str = "message",
                event_id: str | None = None, command: str | None = None,
                args: list[str] | None = None, interaction: dict | None = None,
                workspace: str | None = None) -> ChannelInbound:
        event_id = event_id or f"ev-{next(_n)}"
        if text.startswith("/") and command is None:
            head, *rest = text[1:].split()
            command, args = head, rest
        return ChannelInbound.model_validate({
            "id": message_id(TENANT, inst["instance_id"], event_type, event_id),
            "eventType": event_type, "providerEventId": event_id,
            "providerMessageId": f"pm-{event_id}", "provider": inst["instance_id"],
            "providerKind": "telegram", "workspaceId": workspace or inst["workspace_id"],
            "target": {"chatId": chat, "threadId": thread, "userId": user},
            "sender": {"providerUserId": user, "username": user, "displayName": user.upper()},
            "text": text, "rawText": text, "isCommand": command is not None,
            "command": command, "commandArgs": args or [], "interaction": interaction,
            "receivedAt": datetime.now(UTC).isoformat()})

    async def publish(self, inst: dict, inbound: ChannelInbound, *, msg_id: str | None = None,
                      source: str | None = None, workspace: str | None = None,
                      raw: bytes | None = None) -> None:
        subject = subjects.CHANNEL_INBOUND.build(
            tenant=TENANT, instance_id=inst["instance_id"],
            workspace_id=workspace or inst["workspace_id"])
        env = Envelope.wrap(inbound, source=Source(principal_kind="channel",
                                                   principal_id=source or inst["instance_id"]),
                            tenant=TENANT)
        await self.hub.js.publish(subject, raw if raw is not None else env.encode(),
                                  headers={"Nats-Msg-Id": msg_id or inbound.id})

    async def send(self, inst: dict, text: str, **kw) -> ChannelInbound:
        inbound = self.inbound(inst, text, **kw)
        await self.publish(inst, inbound)
        await self.processed(inst, inbound)
        return inbound

    async def processed(self, inst: dict, inbound: ChannelInbound) -> dict:
        async def check():
            row = await self.claim(inst, inbound)
            return row if row and row["status"] in ("done", "waiting") else None
        return await eventually(check, timeout=10)

    async def claim(self, inst: dict, inbound: ChannelInbound) -> dict | None:
        row = await self.hub.pool.fetchrow(
            "SELECT * FROM channel_inbound_claims WHERE tenant = $1 AND instance_id = $2 AND "
            "provider_event_id = $3", TENANT, inst["instance_id"], inbound.provider_event_id)
        return dict(row) if row else None

    async def replies(self, inst: dict, count: int = 1, timeout: float = 5.0) -> list:
        """The next `count` deliveries to the instance (decoded ChannelOutbound)."""
        out: list[ChannelOutbound] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < count and asyncio.get_running_loop().time() < deadline:
            try:
                msgs = await self.subs[inst["instance_id"]].fetch(batch=count - len(out),
                                                                  timeout=0.5)
            except Exception:
                continue
            for m in msgs:
                out.append(decode(m.data, ChannelOutbound).data)
                await m.ack()
        return out

    async def reply(self, inst: dict) -> str:
        got = await self.replies(inst, 1)
        assert got, "no reply"
        return got[0].text or ""

    async def no_reply(self, inst: dict) -> None:
        assert await self.replies(inst, 1, timeout=1.0) == []

    async def commands(self, inst: dict) -> list[dict]:
        rows = await self.hub.pool.fetch(
            "SELECT * FROM pairing_commands WHERE tenant = $1 AND pairing_id = $2 "
            "ORDER BY sequence", TENANT, inst["workspace_id"])
        return [dict(r) for r in rows]

    async def complete(self, command: dict, result: dict, status: str = "completed") -> None:
        """What CommandService._finish hands to on_final, as the Desktop would make it."""
        row = dict(command, state="done", result_status=status, result=result)
        await self.hub.pool.execute(
            "UPDATE pairing_commands SET state = 'done', result_status = $3, result = $4 "
            "WHERE tenant = $1 AND command_id = $2", TENANT, command["command_id"], status,
            result)
        await self.router.on_command_final(TENANT, row)


@pytest.fixture
async def kit(hub):
    return Kit(hub)


# --- dead letters -----------------------------------------------------------------------
@pytest.fixture
async def dead(hub):
    letters: list[dict] = []

    async def on(msg):
        letters.append(json.loads(msg.data))
    sub = await hub.nc.subscribe(subjects.dead_letter_subject(TENANT, subjects.CHANNEL_INBOUND),
                                 cb=on)
    yield letters
    await sub.unsubscribe()


async def test_bad_contract_wrong_source_and_wrong_workspace_are_dead_lettered(kit, http, dead):
    inst = await kit.instance(http)
    good = kit.inbound(inst, "hello")
    await kit.publish(inst, good, raw=b'{"type": "channel.inbound", "nonsense": true}',
                      msg_id="bad-1")
    await kit.publish(inst, kit.inbound(inst, "x"), source="someone-else")
    other = kit.inbound(inst, "y", workspace="elsewhere")
    await kit.publish(inst, other, workspace="elsewhere")
    kit.instances.rows["tg-disabled"] = dict(inst, instance_id="tg-disabled", enabled=False)
    await kit.publish(kit.instances.rows["tg-disabled"],
                      kit.inbound(kit.instances.rows["tg-disabled"], "z"))
    await kit.publish({**inst, "instance_id": "tg-nobody"}, kit.inbound(
        {**inst, "instance_id": "tg-nobody"}, "w"))

    async def all_in():
        return len(dead) >= 5 or None
    await eventually(all_in)
    codes = sorted(d["data"]["code"] for d in dead)
    assert codes == sorted(["contract.invalid", "contract.principal_mismatch",
                            "channel.wrong_workspace", "channel.instance_disabled",
                            "channel.unknown_instance"]), codes
    assert all(d["data"]["reason"] for d in dead)
    # Nothing was claimed or answered for any of them.
    assert await kit.hub.pool.fetchval("SELECT count(*) FROM channel_inbound_claims WHERE "
                                       "instance_id = $1", inst["instance_id"]) == 0
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
    assert len(await kit.replies(inst, 2, timeout=1.5)) == 1
    assert (await kit.claim(inst, inbound))["status"] == "done"


async def test_reprocessing_a_claimed_message_does_not_double_submit(kit, http):
    """A crash after the claim and before the ack: the claim row is 'claimed' and
    the message comes again. It runs again, but submits and replies nothing twice."""
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    await kit.hub.pool.execute(
        "INSERT INTO channel_bindings (tenant, binding_id, instance_id, workspace_id, chat_id, "
        "session_id) VALUES ($1, 'b-re', $2, $3, 'c1', 'ses_1')", TENANT, inst["instance_id"],
        inst["workspace_id"])
    inbound = kit.inbound(inst, "do the thing")
    await kit.publish(inst, inbound)
    await kit.processed(inst, inbound)
    await kit.hub.pool.execute(
        "UPDATE channel_inbound_claims SET status = 'claimed' WHERE tenant = $1 AND "
        "provider_event_id = $2", TENANT, inbound.provider_event_id)
    await kit.publish(inst, inbound, msg_id="again-" + inbound.id[:30])
    await kit.processed(inst, inbound)
    prompts = [c for c in await kit.commands(inst) if c["kind"] == "prompt"]
    assert len(prompts) == 1
    assert prompts[0]["payload"] == {"text": "do the thing", "agent": "build"}
    assert prompts[0]["session_id"] == "ses_1"
    # one offline notice, delivered once (same delivery id both times)
    rows = await kit.hub.pool.fetch("SELECT delivery_id FROM channel_deliveries WHERE "
                                    "instance_id = $1", inst["instance_id"])
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

    await kit.complete(commands[0], {"ok": True, "status": "completed",
                                     "session": {"id": "ses_new"}})
    commands = await kit.commands(inst)
    assert [(c["kind"], (c["payload"] or {}).get("text")) for c in commands] == [
        ("create_session", None), ("prompt", "first question"), ("prompt", "second question")]
    assert all(c["session_id"] == "ses_new" for c in commands[1:])
    assert commands[1]["command_id"] == f"{first.id}-prompt"
    assert (await kit.claim(inst, first))["status"] == "done"
    binding = await kit.hub.pool.fetchrow("SELECT * FROM channel_bindings WHERE instance_id = "
                                          "$1 AND active", inst["instance_id"])
    assert binding["session_id"] == "ses_new"
    subs = await kit.hub.pool.fetch("SELECT kind FROM channel_submissions WHERE binding_id = $1",
                                    binding["binding_id"])
    assert sorted(r["kind"] for r in subs) == ["create_session", "prompt", "prompt"]

    # With a session, the next prompt goes straight to the Desktop.
    third = await kit.send(inst, "third")
    assert (await kit.commands(inst))[-1]["command_id"] == f"{third.id}-prompt"


async def test_failed_create_session_and_failed_prompt_are_answered_in_chat(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    waiting = await kit.send(inst, "hello")
    await kit.complete((await kit.commands(inst))[0],
                       {"ok": False, "status": "failed", "message": "opencode is down"},
                       status="failed")
    reply = await kit.replies(inst, 1)
    assert reply[0].text == "Could not start a session: opencode is down."
    assert reply[0].reply_to_message_id == waiting.provider_message_id
    assert (await kit.claim(inst, waiting))["outcome"] == "session_failed"

    # The next message asks for a session again; then a prompt is refused by policy.
    await kit.send(inst, "again")
    create = [c for c in await kit.commands(inst) if c["kind"] == "create_session"]
    assert len(create) == 2
    await kit.complete(create[1], {"ok": True, "status": "completed", "session": {"id": "s2"}})
    await kit.replies(inst, 1)  # the "Desktop is offline" notice for the waited prompt
    prompt = (await kit.commands(inst))[-1]
    await kit.complete(prompt, {"ok": False, "status": "blocked_by_policy",
                                "message": "prompts need local confirmation"},
                       status="blocked_by_policy")
    text = await kit.reply(inst)
    assert "did not run that (prompt): prompts need local confirmation" in text


async def test_revoked_pairing_is_a_clear_reply(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    r = await http.post(f"/api/v1/tenants/{TENANT}/pairings/{inst['workspace_id']}/revoke",
                        json={})
    assert r.status_code in (200, 204), r.text
    inbound = await kit.send(inst, "anyone there?")
    assert await kit.reply(inst) == "Could not start a session: the Desktop's pairing is revoked."
    assert (await kit.claim(inst, inbound))["status"] == "done"
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
    mine = [w for w in items if (w.get("sessionRef") or w.get("session_ref") or {}).get(
        "workspaceId") == inst["workspace_id"]]
    assert len(mine) == 1
    row = await kit.hub.pool.fetchrow("SELECT * FROM edge_work WHERE tenant = $1 AND "
                                      "idempotency_key = $2", TENANT, inbound.id)
    assert row["kind"] == "prompt"
    assert row["payload"]["text"] == "summarise the repo" and row["payload"]["agent"] == "build"
    assert row["session_ref"]["workspaceId"] == inst["workspace_id"]
    sub = await kit.hub.pool.fetchrow("SELECT * FROM channel_submissions WHERE command_id = $1",
                                      row["work_id"])
    assert sub["kind"] == "edge_prompt" and sub["message_id"] == inbound.id
    accepted = await kit.hub.pool.fetchrow(
        "SELECT * FROM audit_log WHERE action = 'channel.message_accepted' AND target_id = $1",
        inbound.id)
    assert accepted is not None and "summarise" not in json.dumps(accepted["metadata"])
