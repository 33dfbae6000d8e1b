"""The renderer against a running hub: workspace events in PostgreSQL -> deliveries
on CW_CHANNEL_OUTBOUND, cursors, slots and approval tokens."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from datetime import UTC, datetime

import pytest
from desktopkit import eventually
from opencode_env import CAPTURES_DIR

from channels import ButtonLimits, Capabilities
from edges.common._opencode import session_of
from hub.channels._actions import ActionTokens
from hub.channels._renderer import ChannelRenderer
from hub.workspaces import append_events, lock_cursor, publish_live
from schemas import ChannelOutbound, Source, WorkspaceEvent, decode, new_id

CAPTURES = CAPTURES_DIR
_counter = itertools.count(1)


def caps(*, edit=True, buttons=ButtonLimits(8, 4, 64), typing=True, limit=4096) -> Capabilities:
    return Capabilities(
        threads=True,
        edit=edit,
        buttons=buttons,
        file_upload=False,
        file_download=False,
        typing=typing,
        reactions=False,
        max_text_length=limit,
        parse_modes=frozenset({"plain"}),
        max_file_bytes=0,
        interaction_ack="none",
        rate_limit="none",
        ephemeral=False,
    )


def capture(name: str) -> list[dict]:
    return [
        json.loads(line[6:])
        for line in (CAPTURES / name).read_text().splitlines()
        if line.startswith("data: ") and '"plugin.added"' not in line
    ]


class Instances:
    """Stands in for ChannelService.instance()."""

    def __init__(self) -> None:
        self.known: dict[str, dict] = {}

    def add(
        self, instance_id: str, capabilities: Capabilities, *, enabled=True, tenant="acme"
    ) -> None:
        self.known[instance_id] = {
            "tenant": tenant,
            "instance_id": instance_id,
            "kind": "telegram",
            "workspace_id": "x",
            "authority": "desktop_paired",
            "enabled": enabled,
            "capabilities": capabilities,
        }

    def instance(self, instance_id: str) -> dict | None:
        return self.known.get(instance_id)


class RecordingOutbox:
    """The hub's outbox, recording every send (a re-send would show here even
    though JetStream would drop it as a duplicate)."""

    def __init__(self, real) -> None:
        self.real, self.sent = real, []

    async def send(self, tenant, instance_id, delivery, *, conn=None):
        await self.real.send(tenant, instance_id, delivery, conn=conn)
        self.sent.append((instance_id, delivery))

    def of(self, instance_id: str) -> list[ChannelOutbound]:
        return [d for i, d in self.sent if i == instance_id]


@pytest.fixture(scope="module")
async def world(hub):
    await hub.channel_renderer.stop()  # this module runs its own renderer(s)
    instances = Instances()
    outbox = RecordingOutbox(hub.channel_outbox)
    renderer = ChannelRenderer(
        hub.nc,
        hub.pool,
        hub.metrics,
        hub_id="test-renderer",
        instances=instances,
        outbox=outbox,
        actions=ActionTokens(hub.pool),
        sweep_interval=0.2,
    )
    await renderer.start()
    state = {"renderer": renderer, "instances": instances, "outbox": outbox, "hub": hub}
    yield state
    await state["renderer"].stop()


class Chat:
    def __init__(self, world, capabilities: Capabilities, *, enabled=True) -> None:
        n = next(_counter)
        self.world, self.hub = world, world["hub"]
        self.instance, self.workspace = f"inst-{n}", f"ws-{n}"
        self.binding, self.chat_id = f"bind-{n}", f"chat-{n}"
        world["instances"].add(self.instance, capabilities, enabled=enabled)

    async def bind(self, session_id: str = "ses_df39c50efffetUqIde65vCZWgj") -> None:
        await self.hub.pool.execute(
            "INSERT INTO channel_bindings (tenant, binding_id, instance_id, workspace_id, "
            "chat_id, session_id) VALUES ('acme', $1, $2, $3, $4, $5)",
            self.binding,
            self.instance,
            self.workspace,
            self.chat_id,
            session_id,
        )

    async def events(self, items: list[tuple[str, dict, str | None]]) -> None:
        """Append (type, payload, command_id) rows the way the projection does."""
        async with self.hub.pool.acquire() as conn, conn.transaction():
            last = await lock_cursor(conn, "acme", self.workspace)
            events = [
                WorkspaceEvent(
                    workspace_id=self.workspace,
                    sequence=last + i,
                    event_id=new_id(),
                    type=kind,
                    session_id=session_of(payload) if kind == "session.event" else None,
                    command_id=command,
                    occurred_at=datetime.now(UTC),
                    payload=payload,
                )
                for i, (kind, payload, command) in enumerate(items, start=1)
            ]
            await append_events(
                conn, "acme", self.workspace, "desktop", ["p"] * len(events), events
            )
        await publish_live(
            self.hub.nc,
            Source(principal_kind="hub", principal_id="t"),
            "acme",
            self.workspace,
            events,
        )

    async def opencode(self, events: list[dict]) -> None:
        await self.events([("session.event", e, None) for e in events])

    def sent(self) -> list[ChannelOutbound]:
        return self.world["outbox"].of(self.instance)

    def shown(self) -> list[tuple[str, str | None]]:
        return [(str(d.type), d.text) for d in self.sent() if str(d.type) in ("text", "edit")]

    async def until(self, check, timeout: float = 8.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out; sent: {self.shown()}")

    async def until_cursor(self, sequence: int, timeout: float = 8.0) -> None:
        deadline = time.monotonic() + timeout
        while await self.cursor() != sequence:
            assert time.monotonic() < deadline, f"cursor {await self.cursor()} != {sequence}"
            await asyncio.sleep(0.05)

    async def cursor(self) -> int | None:
        return await self.hub.pool.fetchval(
            "SELECT last_sequence FROM channel_render_cursors WHERE tenant = 'acme' "
            "AND workspace_id = $1",
            self.workspace,
        )


def split_at_deltas(events: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    deltas = [i for i, e in enumerate(events) if e["type"] == "message.part.delta"]
    return events[: deltas[0] + 1], events[deltas[0] + 1 : deltas[2] + 1], events[deltas[2] + 1 :]


async def test_streamed_text_is_sent_then_edited_with_the_full_text(world):
    chat = Chat(world, caps())
    await chat.bind()
    first, middle, rest = split_at_deltas(capture("plain-prompt.sse"))
    await chat.opencode(first)
    await chat.until(lambda: chat.shown() == [("text", "Hello ")])
    original = next(d for d in chat.sent() if str(d.type) == "text")
    assert original.target.chat_id == chat.chat_id
    assert [str(d.type) for d in chat.sent()].count("typing") == 1

    # a receipt told the hub the platform's id of the first message
    async def receipt_stored():  # the row commits with the renderer's batch
        return (
            await chat.hub.pool.execute(
                "UPDATE channel_deliveries SET status = 'sent', provider_message_id = '777' "
                "WHERE tenant = 'acme' AND delivery_id = $1",
                original.delivery_id,
            )
            == "UPDATE 1"
        )

    deadline = time.monotonic() + 5
    while not await receipt_stored():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await chat.opencode(middle)
    await chat.until(lambda: ("edit", "Hello from the ") in chat.shown())
    await chat.opencode(rest)
    await chat.until(lambda: chat.shown()[-1] == ("edit", "Hello from the fake model."))
    edits = [d for d in chat.sent() if str(d.type) == "edit"]
    assert {d.edit_of_delivery_id for d in edits} == {original.delivery_id}
    assert {d.edit_message_id for d in edits} == {"777"}
    assert len(chat.shown()) == 3  # throttled: no edit per delta, none repeated

    async def stored() -> bool:  # the batch commits after its publishes: up to 10 s
        row = await chat.hub.pool.fetchrow(
            "SELECT delivery_id, text, finished FROM channel_render_messages "
            "WHERE tenant = 'acme' AND binding_id = $1 AND message_key LIKE 'prt_%#0'",
            chat.binding,
        )
        final = (original.delivery_id, "Hello from the fake model.", True)
        return row is not None and (row["delivery_id"], row["text"], row["finished"]) == final

    await eventually(stored, 10, 0.05, "the message's final render state committed")
    # the deliveries are on the instance's outbound subject, in order
    sub = await chat.hub.js.pull_subscribe(
        f"cw.acme.chan.{chat.instance}.out",
        durable=f"t-{chat.instance}",
        stream="CW_CHANNEL_OUTBOUND",
    )
    msgs = await sub.fetch(batch=20, timeout=2)
    got = [decode(m.data, ChannelOutbound).data.delivery_id for m in msgs]
    assert got == [d.delivery_id for d in chat.sent()]


async def test_text_past_the_limit_continues_in_a_new_message(world):
    chat = Chat(world, caps(limit=100))
    await chat.bind()
    text = " ".join(f"word{i:03d}" for i in range(40))  # 319 characters
    events = [e for e in capture("plain-prompt.sse") if e["type"] != "message.part.delta"]
    for e in events:
        part = e["properties"].get("part") or {}
        if part.get("text") == "Hello from the fake model.":
            part["text"] = text
    await chat.opencode(events)
    shown = await chat.until(lambda: len(chat.shown()) >= 4 and chat.shown())
    assert all(kind == "text" and len(body) <= 100 for kind, body in shown)
    assert "".join(body for _, body in shown) == text


async def test_platform_without_edits_never_gets_the_same_text_twice(world):
    chat = Chat(world, caps(edit=False, buttons=None, typing=False, limit=20_000))
    await chat.bind()
    first, middle, rest = split_at_deltas(capture("plain-prompt.sse"))
    for stage in (first, middle, rest):
        await chat.opencode(stage)
        await asyncio.sleep(0.3)
    await chat.until(lambda: chat.shown())
    await asyncio.sleep(0.5)
    assert chat.shown() == [("text", "Hello from the fake model.")]
    assert not [d for d in chat.sent() if str(d.type) == "typing"]


async def test_tool_progress_and_permission_buttons_with_single_use_tokens(world):
    chat = Chat(world, caps())
    await chat.bind()
    await chat.opencode(capture("tool-permission-approved.sse"))
    buttons = await chat.until(lambda: [d for d in chat.sent() if str(d.type) == "buttons"])
    await chat.until(lambda: ("text", "Tool finished.") in chat.shown())
    tool = [(k, t) for k, t in chat.shown() if t and "bash" in t]
    assert tool[0][0] == "text" and tool[-1] == ("edit", "✅ bash: echo hi-from-bash")
    assert all(k == "edit" for k, _ in tool[1:])
    [delivery] = buttons
    assert delivery.text == "Permission requested: bash echo hi-from-bash"
    [[allow, deny]] = delivery.buttons
    assert (allow.label, allow.style, deny.label, deny.style) == (
        "Allow",
        "success",
        "Deny",
        "danger",
    )
    actions = ActionTokens(chat.hub.pool)
    async with chat.hub.pool.acquire() as conn:
        got = await actions.consume(
            conn, "acme", allow.token, instance_id=chat.instance, chat_id=chat.chat_id, user_id="u1"
        )
        assert (got["action"], got["kind"], got["session_id"]) == (
            "allow",
            "permission",
            "ses_df39c50efffetUqIde65vCZWgj",
        )
        assert got["request_id"] == "per_20c63e543001I0dmTwu1VuhaSd"
        for token in (allow.token, deny.token):
            assert (
                await actions.consume(
                    conn,
                    "acme",
                    token,
                    instance_id=chat.instance,
                    chat_id=chat.chat_id,
                    user_id="u2",
                )
                is None
            )


async def test_text_fallback_when_buttons_do_not_fit(world):
    chat = Chat(world, caps(buttons=ButtonLimits(8, 4, 16)))
    await chat.bind()
    await chat.opencode(capture("question-answered.sse"))
    fallback = await chat.until(lambda: [t for _, t in chat.shown() if t and "/reject" in t])
    assert not [d for d in chat.sent() if str(d.type) == "buttons"]
    lines = fallback[0].splitlines()
    assert lines[0] == "❓ Colour: Pick a colour?"
    answer = next(line for line in lines if line.startswith("/answer "))
    reject = next(line for line in lines if line.startswith("/reject "))
    token = answer.split()[1]
    async with chat.hub.pool.acquire() as conn:
        got = await ActionTokens(chat.hub.pool).consume(
            conn, "acme", token, instance_id=chat.instance, chat_id=chat.chat_id, user_id="u"
        )
        assert (got["kind"], got["action"], got["answer"]) == ("question", "answer", None)
        assert (
            await ActionTokens(chat.hub.pool).consume(
                conn,
                "acme",
                reject.split()[1],
                instance_id=chat.instance,
                chat_id=chat.chat_id,
                user_id="u",
            )
            is None
        )


async def test_restart_resumes_at_the_cursor_without_resending(world):
    chat = Chat(world, caps())
    await chat.bind()
    first, middle, rest = split_at_deltas(capture("plain-prompt.sse"))
    await chat.opencode(first)
    await chat.until(lambda: chat.shown() == [("text", "Hello ")])
    hub = world["hub"]
    await world["renderer"].stop()
    before = await chat.cursor()
    await chat.opencode(middle + rest)
    world["renderer"] = ChannelRenderer(
        hub.nc,
        hub.pool,
        hub.metrics,
        hub_id="test-renderer-2",
        instances=world["instances"],
        outbox=world["outbox"],
        actions=ActionTokens(hub.pool),
        sweep_interval=0.2,
    )
    await world["renderer"].start()
    await chat.until(lambda: chat.shown()[-1] == ("edit", "Hello from the fake model."))
    ids = [d.delivery_id for d in chat.sent()]
    assert len(ids) == len(set(ids))  # nothing re-sent
    assert chat.shown() == [("text", "Hello "), ("edit", "Hello from the fake model.")]
    last = await hub.pool.fetchval(
        "SELECT last_sequence FROM workspace_cursors WHERE tenant = 'acme' AND workspace_id = $1",
        chat.workspace,
    )
    assert before < last
    await chat.until_cursor(last)


async def test_unbound_sessions_and_disabled_instances_get_nothing(world):
    chat = Chat(world, caps())
    await chat.bind(session_id="ses_someone_else")
    await chat.opencode(capture("plain-prompt.sse"))
    last = await chat.hub.pool.fetchval(
        "SELECT last_sequence FROM workspace_cursors WHERE tenant = 'acme' AND workspace_id = $1",
        chat.workspace,
    )
    await chat.until_cursor(last)
    assert chat.sent() == []
    off = Chat(world, caps(), enabled=False)
    await off.bind()
    await off.opencode(capture("plain-prompt.sse"))
    await asyncio.sleep(1.0)
    assert off.sent() == []


async def test_failed_submission_says_it_could_not_run(world):
    chat = Chat(world, caps())
    await chat.bind(session_id=None)
    await chat.hub.pool.execute(
        "INSERT INTO channel_submissions (tenant, command_id, binding_id, kind, message_id) "
        "VALUES ('acme', 'cmd-1x', $1, 'prompt', 'in-1')",
        chat.binding,
    )
    await chat.events(
        [
            ("command.accepted", {"kind": "prompt_async", "sequence": 1}, "cmd-1x"),
            (
                "command.failed",
                {
                    "kind": "prompt_async",
                    "sequence": 1,
                    "result": {
                        "ok": False,
                        "status": "failed",
                        "message": "OpenCode: session not found",
                    },
                },
                "cmd-1x",
            ),
            (
                "command.failed",
                {
                    "kind": "prompt_async",
                    "sequence": 2,
                    "result": {"ok": False, "status": "failed", "message": "not ours"},
                },
                "cmd-other",
            ),
        ]
    )
    await chat.until(lambda: chat.shown())
    await asyncio.sleep(0.3)
    assert chat.shown() == [("text", "could not run: OpenCode: session not found")]
    assert [str(d.type) for d in chat.sent()] == ["typing", "text"]


async def test_edge_work_streams_by_submission_and_fails_visibly(world):
    chat = Chat(world, caps())
    await chat.bind(session_id=None)
    await chat.hub.pool.execute(
        "INSERT INTO channel_submissions (tenant, command_id, binding_id, kind, message_id) "
        "VALUES ('acme', 'work-1x', $1, 'work', 'in-2')",
        chat.binding,
    )
    opencode = capture("tool-permission-approved.sse")
    rows = [
        (
            "work.status",
            {
                "workId": "work-1x",
                "sequence": 1,
                "attempt": 1,
                "body": {"state": "running", "attempt": 1},
            },
            None,
        )
    ]
    rows += [
        ("work.event", {"workId": "work-1x", "sequence": i, "attempt": 1, "body": e}, None)
        for i, e in enumerate(opencode, start=2)
    ]
    rows.append(
        (
            "work.result",
            {"workId": "work-1x", "sequence": 99, "attempt": 1, "body": {"text": "Tool finished."}},
            None,
        )
    )
    await chat.events(rows)
    await chat.until(lambda: ("text", "Tool finished.") in chat.shown())
    await asyncio.sleep(0.5)
    kinds = [str(d.type) for d in chat.sent()]
    assert "buttons" not in kinds  # the gateway refuses approvals of Cloud work itself
    assert [t for _, t in chat.shown()].count("Tool finished.") == 1  # not again as result
    assert ("edit", "✅ bash: echo hi-from-bash") in chat.shown()
    assert kinds[0] == "typing"  # the work started
    await chat.events(
        [
            (
                "work.fail",
                {
                    "workId": "work-1x",
                    "sequence": 100,
                    "attempt": 2,
                    "body": {"error": "lease lost"},
                },
                None,
            )
        ]
    )
    await chat.until(lambda: ("text", "could not run: lease lost") in chat.shown())


async def test_failed_edge_work_is_told_once_in_words(world):
    """OpenCode's session.error inside Cloud work (twice, once as a stack trace) is not
    shown: the work's end is, once, whether the Gateway failed it or the hub
    dead-lettered it."""
    chat = Chat(world, caps())
    await chat.bind(session_id=None)
    for work in ("work-2x", "work-3x"):
        await chat.hub.pool.execute(
            "INSERT INTO channel_submissions (tenant, command_id, binding_id, kind, message_id) "
            "VALUES ('acme', $2, $1, 'work', $3)",
            chat.binding,
            work,
            f"in-{work}",
        )
    error = {"name": "UnknownError", "data": {"message": 'Agent not found: "nope"'}}
    trace = {"name": "UnknownError", "data": {"message": "UnknownError\n    at <anonymous>"}}
    rows = [
        (
            "work.event",
            {
                "workId": "work-2x",
                "sequence": i,
                "attempt": 1,
                "body": {"type": "session.error", "properties": {"sessionID": "ses_x", "error": e}},
            },
            None,
        )
        for i, e in enumerate((error, trace), start=1)
    ]
    rows.append(
        (
            "work.fail",
            {
                "workId": "work-2x",
                "sequence": 3,
                "attempt": 1,
                "body": {"reason": 'Agent not found: "nope"'},
            },
            None,
        )
    )
    rows.append(
        (
            "work.dead_lettered",
            {"workId": "work-3x", "attempt": 3, "body": {"reason": "gave up after 3 attempts"}},
            None,
        )
    )
    await chat.events(rows)
    await chat.until(lambda: len(chat.shown()) >= 2)
    await asyncio.sleep(0.5)
    assert chat.shown() == [
        ("text", 'could not run: Agent not found: "nope"'),
        ("text", "could not run: gave up after 3 attempts"),
    ]


async def test_with_the_real_channel_service_the_platform_shows_one_edited_message(world):
    """The hub's own renderer, instances, runtime delivery and receipts together,
    against a fake Telegram."""
    from channelkit import create_instance, wait_posted, wait_ready
    from fakeplatforms import FAKES
    from hubkit import client

    hub = world["hub"]
    await hub.channel_renderer.start()
    fake = FAKES["telegram"]()
    await fake.start()
    try:
        async with client(hub, admin=True) as admin:
            await create_instance(
                admin, fake, instance_id="tg-real", workspace_id="ws-real", authority="cloud_worker"
            )
            await wait_ready(admin, "tg-real")
        await hub.pool.execute(
            "INSERT INTO channel_bindings (tenant, binding_id, instance_id, workspace_id, "
            "chat_id, session_id) VALUES ('acme', 'bind-real', 'tg-real', 'ws-real', '4242', "
            "'ses_df39c50efffetUqIde65vCZWgj')"
        )
        chat = Chat.__new__(Chat)
        chat.world, chat.hub, chat.workspace = world, hub, "ws-real"
        first, middle, rest = split_at_deltas(capture("plain-prompt.sse"))
        await chat.opencode(first)
        await wait_posted(fake, "4242", lambda p: p.text == "Hello ", timeout=15)
        await chat.opencode(middle + rest)
        final = await wait_posted(
            fake, "4242", lambda p: p.text == "Hello from the fake model.", timeout=15
        )
        assert len(fake.chats["4242"]) == 1 and final.edits >= 1
        # the receipt of the first send recorded the platform's message id
        row = await hub.pool.fetchrow(
            "SELECT status, provider_message_id FROM channel_deliveries WHERE tenant = 'acme' "
            "AND instance_id = 'tg-real' AND type = 'text'"
        )
        deadline = time.monotonic() + 10
        while row["status"] != "sent" and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            row = await hub.pool.fetchrow(
                "SELECT status, provider_message_id FROM channel_deliveries WHERE "
                "tenant = 'acme' AND instance_id = 'tg-real' AND type = 'text'"
            )
        assert row["status"] == "sent" and row["provider_message_id"] == str(final.message_id)
    finally:
        await fake.stop()
