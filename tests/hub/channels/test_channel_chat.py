"""Chat commands end to end: each command's answer, refusals by role, session
bindings (/new, /sessions, /switch), /abort, and approvals by token (unknown
tokens never approve; only approver roles may answer)."""

from __future__ import annotations

import pytest
from routerkit import TENANT, Kit

from hub.channels._chat import UNKNOWN_TOKEN


@pytest.fixture
async def kit(hub):
    return Kit(hub)


async def ask(kit: Kit, inst: dict, text: str, **kw) -> str:
    await kit.send(inst, text, **kw)
    return await kit.reply(inst)


async def bind_session(
    kit: Kit, inst: dict, session: str, chat: str = "c1", title: str | None = None
) -> str:
    binding = f"b-{inst['instance_id']}-{session}"
    await kit.hub.pool.execute(
        "UPDATE channel_bindings SET active = false WHERE instance_id = $1 AND chat_id = $2",
        inst["instance_id"],
        chat,
    )
    await kit.hub.pool.execute(
        "INSERT INTO channel_bindings (tenant, binding_id, instance_id, workspace_id, chat_id, "
        "session_id, title) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        TENANT,
        binding,
        inst["instance_id"],
        inst["workspace_id"],
        chat,
        session,
        title,
    )
    return binding


async def test_help_depends_on_role(kit, http):
    inst = await kit.instance(http)
    pending = await ask(kit, inst, "/help", user="p")
    assert "claim code" in pending and "/claim CODE" in pending and "/status" not in pending
    await kit.role(inst, "v", "viewer")
    viewer = await ask(kit, inst, "/help", user="v")
    assert "/status" in viewer and "/sessions" in viewer and "/new" not in viewer
    assert "/approve" not in viewer and "prompt" not in viewer
    await kit.role(inst, "m", "member")
    member = await ask(kit, inst, "/help", user="m")
    assert "/new" in member and "/abort" in member and "/approve" not in member
    assert "Any other message is sent to the active session" in member
    await kit.role(inst, "a", "approver")
    approver = await ask(kit, inst, "/help", user="a")
    assert "/approve TOKEN" in approver and "/answer TOKEN TEXT" in approver
    assert "/new" not in approver


async def test_status_whereami_and_unknown_command(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "viewer")
    status = await ask(kit, inst, "/status")
    assert f"Instance: Bot {inst['instance_id']} ({inst['instance_id']}, telegram)" in status
    assert f"Workspace: {inst['workspace_id']} (desktop_paired)" in status
    assert "Session: none yet" in status and "Desktop: offline" in status
    where = await ask(kit, inst, "/whereami", chat="c9", thread="t3")
    assert where.splitlines() == [
        f"Tenant: {TENANT}",
        f"Instance: {inst['instance_id']}",
        f"Workspace: {inst['workspace_id']}",
        "Chat: c9",
        "Thread: t3",
        "Session: none yet (your next message starts one)",
        "Role: viewer",
    ]
    assert await ask(kit, inst, "/frobnicate now") == "Unknown command /frobnicate. Send /help."
    # a viewer reads but does not prompt or change sessions
    assert await ask(kit, inst, "please do it") == "Your role (viewer) may not send prompts here."
    assert await ask(kit, inst, "/new x") == "Your role (viewer) may not use /new."
    assert await kit.commands(inst) == []


async def test_new_sessions_switch(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    assert await ask(kit, inst, "/sessions") == (
        "No sessions in this chat yet. Send a message to start one."
    )
    await bind_session(kit, inst, "ses_a", title="first")
    reply = await ask(kit, inst, "/new Release notes")
    assert reply.startswith("Started a new session 'Release notes'")
    listing = await ask(kit, inst, "/sessions")
    assert listing.splitlines() == [
        "Sessions (* = active):",
        "  1. first [ses_a]",
        "* 2. Release notes [starting with the next message]",
    ]
    assert await ask(kit, inst, "/switch 1") == "Switched to first [ses_a]."
    await kit.send(inst, "continue there")
    await kit.reply(inst)  # "Desktop is offline" notice
    prompt = (await kit.commands(inst))[-1]
    assert prompt["kind"] == "prompt" and prompt["session_id"] == "ses_a"
    assert await ask(kit, inst, "/switch ses_zzz") == (
        "No session 'ses_zzz' in this chat. Send /sessions."
    )
    assert (await ask(kit, inst, "/switch")).startswith("Usage: /switch N")
    # another thread has its own bindings
    assert (await ask(kit, inst, "/sessions", thread="t1")).startswith("No sessions")


async def test_abort(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    assert await ask(kit, inst, "/abort") == "There is no active session to abort."
    await bind_session(kit, inst, "ses_run")
    inbound = await kit.send(inst, "/abort")
    assert await kit.reply(inst) == "Abort sent to the Desktop."
    [abort] = await kit.commands(inst)
    assert (abort["kind"], abort["session_id"], abort["command_id"]) == (
        "abort",
        "ses_run",
        f"{inbound.id}-abort",
    )
    cloud = await kit.instance(http, authority="cloud_worker")
    await kit.role(cloud, "u1", "member")
    # Cloud workers: /abort cancels the chat's running work (none here).
    assert await ask(kit, cloud, "/abort") == "Nothing is running here to abort."


async def test_unknown_token_never_approves(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "boss", "admin")
    await bind_session(kit, inst, "ses_p")
    assert await ask(kit, inst, "/approve tok-nope", user="boss") == UNKNOWN_TOKEN
    # a real token presented from another chat is unknown there, and stays unused
    kit.actions.add(
        "tok-1",
        kind="permission",
        request_id="per_1",
        action="allow",
        answer=None,
        workspace_id=inst["workspace_id"],
        session_id="ses_p",
        binding_id=None,
        chat_id="c1",
        instance_id=inst["instance_id"],
    )
    assert await ask(kit, inst, "/approve tok-1", user="boss", chat="c-other") == UNKNOWN_TOKEN
    assert await kit.commands(inst) == []
    assert "tok-1" in kit.actions.rows


async def test_role_gate_and_approvals(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "mem", "member")
    await kit.role(inst, "appr", "approver")
    await bind_session(kit, inst, "ses_q")

    def token(name: str, kind: str, action: str, request: str, answer=None) -> None:
        kit.actions.add(
            name,
            kind=kind,
            request_id=request,
            action=action,
            answer=answer,
            workspace_id=inst["workspace_id"],
            session_id="ses_q",
            binding_id=None,
            chat_id="c1",
            instance_id=inst["instance_id"],
        )

    token("t-allow", "permission", "allow", "per_1")
    assert await ask(kit, inst, "/approve t-allow", user="mem") == (
        "Your role (member) may not use /approve."
    )
    assert "t-allow" in kit.actions.rows  # refused before the token was touched
    assert await ask(kit, inst, "/approve t-allow", user="appr") == "Allowed."
    token("t-deny", "permission", "deny", "per_2")
    assert await ask(kit, inst, "/deny t-deny", user="appr") == "Denied."
    token("t-q", "question", "answer", "que_1")
    assert await ask(kit, inst, "/answer t-q blue, please", user="appr") == "Answer sent."
    token("t-r", "question", "reject", "que_2")
    assert await ask(kit, inst, "/reject t-r", user="appr") == "Question declined."
    got = [(c["kind"], c["session_id"], c["payload"]) for c in await kit.commands(inst)]
    assert got == [
        ("permission.respond", "ses_q", {"permissionId": "per_1", "allowed": True}),
        ("permission.respond", "ses_q", {"permissionId": "per_2", "allowed": False}),
        ("question.reply", "ses_q", {"requestId": "que_1", "answers": [["blue, please"]]}),
        ("question.reject", "ses_q", {"requestId": "que_2"}),
    ]
    assert await ask(kit, inst, "/approve t-allow", user="appr") == UNKNOWN_TOKEN  # single use
    assert (await ask(kit, inst, "/answer t-x", user="appr")).startswith("Usage: /answer")


async def test_button_press_is_answered_on_the_interaction(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "appr", "approver")
    await kit.role(inst, "view", "viewer")
    await bind_session(kit, inst, "ses_b")
    kit.actions.add(
        "btn-1",
        kind="permission",
        request_id="per_9",
        action="deny",
        answer=None,
        workspace_id=inst["workspace_id"],
        session_id="ses_b",
        binding_id=None,
        chat_id="c1",
        instance_id=inst["instance_id"],
    )
    press = {"id": "cb-1", "token": "btn-1", "kind": "button", "responseToken": "cbq-1"}
    await kit.send(inst, "", user="view", event_type="interaction", interaction=press)
    [refusal] = await kit.replies(inst)
    assert refusal.type == "answer_interaction" and refusal.interaction.response_token == "cbq-1"
    assert refusal.text == "Your role (viewer) may not use /approve."
    await kit.send(
        inst,
        "",
        user="appr",
        event_type="interaction",
        interaction=dict(press, id="cb-2"),
        event_id="press-2",
    )
    [answer] = await kit.replies(inst)
    assert (answer.type, answer.text, answer.interaction.id) == (
        "answer_interaction",
        "Denied.",
        "cb-2",
    )
    [cmd] = await kit.commands(inst)
    assert cmd["payload"] == {"permissionId": "per_9", "allowed": False}


async def test_slash_commands_are_prompts_or_commands(kit, http):
    inst = await kit.instance(http)
    await kit.role(inst, "u1", "member")
    await bind_session(kit, inst, "ses_s")
    interaction = {"id": "i-1", "token": "x", "kind": "command", "responseToken": "rt"}
    await kit.send(
        inst,
        "",
        event_type="command",
        command="ask",
        args=["fix", "the", "bug"],
        interaction=interaction,
    )
    await kit.send(
        inst,
        "",
        event_type="command",
        command="cowork",
        args=["deploy", "it"],
        interaction=dict(interaction, id="i-2"),
    )
    await kit.send(
        inst, "", event_type="command", command="status", interaction=dict(interaction, id="i-3")
    )
    prompts = [c["payload"]["text"] for c in await kit.commands(inst)]
    assert prompts == ["fix the bug", "deploy it"]
    replies = await kit.replies(inst, 3)
    status = [r for r in replies if r.text and r.text.startswith("Instance:")]
    assert status and status[0].type == "answer_interaction"


async def test_real_action_tokens_single_use_and_no_upgrade(kit, http):
    """With the hub's own ActionTokens: a Deny token never approves, the token a
    user consumed invalidates its siblings, and a used token approves nothing."""
    from hub.channels._actions import ActionTokens

    kit.router.chat._actions = ActionTokens(kit.hub.pool)
    inst = await kit.instance(http)
    await kit.role(inst, "appr", "approver")
    binding = await bind_session(kit, inst, "ses_t")
    async with kit.hub.pool.acquire() as conn:
        issued = {
            action: await kit.router.chat._actions.issue(
                conn,
                tenant=TENANT,
                instance_id=inst["instance_id"],
                binding_id=binding,
                workspace_id=inst["workspace_id"],
                session_id="ses_t",
                kind="permission",
                request_id="per_t",
                action=action,
            )
            for action in ("allow", "deny")
        }
    assert (await ask(kit, inst, f"/approve {issued['deny']}", user="appr")).startswith(
        "That token is for deny on a permission, not /approve."
    )
    assert await kit.commands(inst) == []
    assert await ask(kit, inst, f"/approve {issued['allow']}", user="appr") == UNKNOWN_TOKEN
    assert await ask(kit, inst, "/approve caAAAAAAAAAAAAAAAAAAAA", user="appr") == UNKNOWN_TOKEN
    assert await kit.commands(inst) == []
    async with kit.hub.pool.acquire() as conn:
        allow = await kit.router.chat._actions.issue(
            conn,
            tenant=TENANT,
            instance_id=inst["instance_id"],
            binding_id=binding,
            workspace_id=inst["workspace_id"],
            session_id="ses_t",
            kind="permission",
            request_id="per_u",
            action="allow",
        )
    assert await ask(kit, inst, f"/deny {allow}", user="appr") == "Denied."
    [cmd] = await kit.commands(inst)
    assert cmd["payload"] == {"permissionId": "per_u", "allowed": False}
