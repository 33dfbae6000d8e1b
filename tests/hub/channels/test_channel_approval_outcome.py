"""Approval messages show their outcome: the renderer's permission buttons, pressed
through the router, are edited in place to "✅ Allowed by ..." (once, without
buttons) on platforms that can edit; nothing more on those that cannot; and an
approval nobody answered is edited to "⌛ Expired" by the sweep, once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from desktopkit import eventually
from routerkit import TENANT, Kit
from test_channel_renderer import caps, capture

from edges.common._opencode import session_of
from hub.channels._actions import ActionTokens
from hub.channels._approval_outcome import EXPIRED, outcome_text, record_approval_message
from hub.channels._chat import UNKNOWN_TOKEN
from hub.channels._renderer import ChannelRenderer
from hub.workspaces import append_events, lock_cursor, publish_live
from schemas import Source, WorkspaceEvent, new_id

SESSION = "ses_df39c50efffetUqIde65vCZWgj"
REQUEST = "per_20c63e543001I0dmTwu1VuhaSd"


@pytest.fixture(scope="module")
async def renderer(hub):
    """The hub's renderer, pointed at the router's stand-in instances per test."""
    await hub.channel_renderer.stop()
    own = ChannelRenderer(
        hub.nc,
        hub.pool,
        hub.metrics,
        hub_id="test-approvals",
        instances=hub.channel_router.instances,
        outbox=hub.channel_outbox,
        actions=ActionTokens(hub.pool),
        sweep_interval=0.2,
    )
    yield own
    await own.stop()


@pytest.fixture
async def kit(hub, renderer):
    kit = Kit(hub)
    kit.router.chat._actions = ActionTokens(hub.pool)
    renderer._instances = kit.instances
    await renderer.start()
    yield kit
    await renderer.stop()


async def permission_asked(kit: Kit, inst: dict) -> tuple[str, list]:
    """Bind chat c1 to SESSION, let OpenCode ask for a permission there; the
    buttons delivery the renderer sent (its id and button rows)."""
    await kit.hub.pool.execute(
        "INSERT INTO channel_bindings (tenant, binding_id, instance_id, workspace_id, chat_id, "
        "session_id) VALUES ($1, $2, $3, $4, 'c1', $5)",
        TENANT,
        f"b-{inst['instance_id']}",
        inst["instance_id"],
        inst["workspace_id"],
        SESSION,
    )
    events = capture("tool-permission-approved.sse")
    asked = next(i for i, e in enumerate(events) if e["type"] == "permission.asked")
    async with kit.hub.pool.acquire() as conn, conn.transaction():
        last = await lock_cursor(conn, TENANT, inst["workspace_id"])
        rows = [
            WorkspaceEvent(
                workspace_id=inst["workspace_id"],
                sequence=last + i,
                event_id=new_id(),
                type="session.event",
                session_id=session_of(e),
                occurred_at=datetime.now(UTC),
                payload=e,
            )
            for i, e in enumerate(events[: asked + 1], start=1)
        ]
        await append_events(conn, TENANT, inst["workspace_id"], "desktop", ["p"] * len(rows), rows)
    await publish_live(
        kit.hub.nc,
        Source(principal_kind="hub", principal_id="t"),
        TENANT,
        inst["workspace_id"],
        rows,
    )
    seen = []
    for _ in range(20):
        seen += await kit.replies(inst, 1, timeout=1.0)
        buttons = [d for d in seen if str(d.type) == "buttons"]
        if buttons:
            return buttons[0].delivery_id, buttons[0].buttons
    raise AssertionError(f"no buttons; got {[(str(d.type), d.text) for d in seen]}")


async def about(kit: Kit, inst: dict, delivery: str, count: int, timeout: float = 10.0) -> list:
    """Edits of the approval message and answers to the chat (the renderer's own
    streamed edits of other messages are not what these tests look at)."""
    got: list = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(got) < count and asyncio.get_running_loop().time() < deadline:
        got += [
            d
            for d in await kit.replies(inst, 1, timeout=0.5)
            if d.edit_of_delivery_id == delivery
            or str(d.type) in ("answer_interaction")
            or (str(d.type) == "text" and d.notice is False and d.text == UNKNOWN_TOKEN)
        ]
    return got


async def press(kit: Kit, inst: dict, token: str, user: str = "appr") -> None:
    pressed = f"cb-{token[-6:]}"
    await kit.send(
        inst,
        "",
        user=user,
        event_type="interaction",
        event_id=pressed,
        interaction={"id": pressed, "token": token, "kind": "button", "responseToken": "cbq-1"},
    )


async def test_allowed_approval_is_edited_once_without_buttons(kit, http):
    inst = await kit.instance(http, capabilities=caps())
    await kit.role(inst, "appr", "approver")
    delivery, [[allow, deny]] = await permission_asked(kit, inst)
    stored = await kit.hub.pool.fetch(
        "SELECT delivery_id FROM channel_action_tokens WHERE tenant = $1 AND request_id = $2 "
        "AND instance_id = $3",
        TENANT,
        REQUEST,
        inst["instance_id"],
    )
    assert [r["delivery_id"] for r in stored] == [delivery, delivery]

    # The receipt for the approval message told the hub its platform message id.
    # (The renderer commits the delivery row just after publishing it.)
    async def receipt() -> bool | None:
        return await kit.hub.pool.fetchval(
            "UPDATE channel_deliveries SET status = 'sent', provider_message_id = 'tg-77' "
            "WHERE delivery_id = $1 RETURNING true",
            delivery,
        )

    await eventually(receipt)
    await press(kit, inst, allow.token)
    [cmd] = [c for c in await kit.commands(inst) if c["kind"] == "permission.respond"]
    assert cmd["payload"] == {"permissionId": REQUEST, "allowed": True}
    sent = await about(kit, inst, delivery, 2)
    [edit] = [d for d in sent if str(d.type) == "edit"]
    assert (edit.edit_of_delivery_id, edit.edit_message_id) == (delivery, "tg-77")
    assert edit.text == "Permission requested: bash echo hi-from-bash\n\n✅ Allowed by APPR"
    assert not edit.buttons and edit.target.chat_id == "c1"
    assert [d.text for d in sent if str(d.type) == "answer_interaction"] == ["Allowed."]
    # The sibling is spent: pressing Deny approves nothing and edits nothing again.
    await press(kit, inst, deny.token)
    later = await about(kit, inst, delivery, 1, timeout=10.0)  # a loaded machine
    later += await about(kit, inst, delivery, 1, timeout=1.0)  # and nothing more
    assert [d.text for d in later] == [UNKNOWN_TOKEN]
    settled = await kit.hub.pool.fetchrow(
        "SELECT outcome, settled_at FROM channel_approval_messages WHERE delivery_id = $1", delivery
    )
    assert settled["outcome"] == "✅ Allowed by APPR" and settled["settled_at"] is not None
    # ... and the expiry sweep leaves a settled message alone.
    await kit.hub.pool.execute(
        "UPDATE channel_action_tokens SET expires_at = now() - "
        "interval '1 minute' WHERE delivery_id = $1",
        delivery,
    )
    await kit.router.approvals.sweep_expired()
    assert await about(kit, inst, delivery, 1, timeout=1.0) == []


async def test_denied_with_text_command_and_platform_without_edits(kit, http):
    inst = await kit.instance(http, capabilities=caps())
    await kit.role(inst, "appr", "approver")
    delivery, [[allow, _deny]] = await permission_asked(kit, inst)
    await kit.send(inst, f"/deny {allow.token}", user="appr")
    [edit] = [d for d in await about(kit, inst, delivery, 1) if str(d.type) == "edit"]
    assert edit.text.endswith("\n\n🚫 Denied by APPR")

    flat = await kit.instance(http, capabilities=caps(edit=False))
    await kit.role(flat, "appr", "approver")
    delivery, [[allow, _]] = await permission_asked(kit, flat)
    await press(kit, flat, allow.token)
    sent = await about(kit, flat, delivery, 1, timeout=10.0)  # a loaded machine
    sent += await about(kit, flat, delivery, 1, timeout=1.0)  # and no edit after it
    assert [(str(d.type), d.text) for d in sent] == [("answer_interaction", "Allowed.")]
    # Settled all the same: it will not be reported as expired later.
    assert (
        await kit.hub.pool.fetchval(
            "SELECT outcome FROM channel_approval_messages WHERE delivery_id = $1", delivery
        )
        == "✅ Allowed by APPR"
    )


async def test_unanswered_approval_expires_once(kit, http):
    inst = await kit.instance(http, capabilities=caps())
    delivery, _ = await permission_asked(kit, inst)
    await kit.router.approvals.sweep_expired()
    assert await about(kit, inst, delivery, 1, timeout=1.0) == []  # still valid: untouched
    await kit.hub.pool.execute(
        "UPDATE channel_action_tokens SET expires_at = now() - "
        "interval '1 second' WHERE delivery_id = $1",
        delivery,
    )
    # The router's own sweep (every 5 s) settles it, once.
    edits = []
    for _ in range(10):
        edits += await about(kit, inst, delivery, 1, timeout=1.0)
        if edits:
            break
    await kit.router.approvals.sweep_expired()
    edits += await about(kit, inst, delivery, 1, timeout=1.0)
    assert [(e.edit_of_delivery_id, e.text) for e in edits] == [
        (delivery, f"Permission requested: bash echo hi-from-bash\n\n{EXPIRED}")
    ]


async def test_answered_question_shows_the_answer(kit, http):
    inst = await kit.instance(http, capabilities=caps())
    await kit.role(inst, "appr", "approver")
    binding = f"b-{inst['instance_id']}"
    await kit.hub.pool.execute(
        "INSERT INTO channel_bindings (tenant, binding_id, instance_id, workspace_id, chat_id, "
        "session_id) VALUES ($1, $2, $3, $4, 'c1', $5)",
        TENANT,
        binding,
        inst["instance_id"],
        inst["workspace_id"],
        SESSION,
    )
    async with kit.hub.pool.acquire() as conn, conn.transaction():
        await record_approval_message(
            conn, TENANT, "d-question-1", inst["instance_id"], binding, "Question: which colour?"
        )
        token = await kit.router.chat._actions.issue(
            conn,
            tenant=TENANT,
            instance_id=inst["instance_id"],
            binding_id=binding,
            workspace_id=inst["workspace_id"],
            session_id=SESSION,
            kind="question",
            request_id="que_1",
            action="answer",
            delivery_id="d-question-1",
        )
    await kit.send(inst, f"/answer {token} dark   blue", user="appr")
    [edit] = await about(kit, inst, "d-question-1", 1)
    assert edit.text == "Question: which colour?\n\n💬 Answered by APPR: dark blue"
    assert edit.edit_of_delivery_id == "d-question-1" and edit.edit_message_id is None


def test_outcome_texts():
    assert outcome_text("permission", "allow", "Ann") == "✅ Allowed by Ann"
    assert outcome_text("permission", "deny", "Ann") == "🚫 Denied by Ann"
    assert outcome_text("question", "reject", "Ann") == "🚫 Rejected by Ann"
    assert outcome_text("question", "answer", "Ann", "x" * 900).endswith("x" * 500)


async def test_metrics_name_instances_only(kit, http, hub):
    """The router counts per instance; unknown instances are one 'unknown' label."""
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    await kit.send(inst, "/status")
    await kit.publish(
        {**inst, "instance_id": "tg-nobody-x"},
        kit.inbound({**inst, "instance_id": "tg-nobody-x"}, "w"),
    )

    def value(instance: str, outcome: str) -> float:
        return hub.metrics.channel_inbound.labels(instance, outcome)._value.get()

    async def dead() -> bool | None:
        return value("unknown", "dead_lettered") >= 1 or None

    await eventually(dead)
    assert value(inst["instance_id"], "accepted") == 1
    scraped = (await http.get("/metrics")).text
    assert (
        f'cowork_channel_inbound_total{{instance="{inst["instance_id"]}",'
        f'outcome="accepted"}} 1.0' in scraped
    )
    assert "tg-nobody-x" not in scraped
