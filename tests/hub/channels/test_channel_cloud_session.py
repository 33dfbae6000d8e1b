"""Cloud-worker chats keep their session: the session a Gateway reports in a chat
prompt's result becomes the binding's, and the next prompt's sessionRef names it
(service level: the real router, EdgeWorkService and a Gateway's bus requests);
and the Gateway's runner continues a named session it has, or opens a new one."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from edgeworkkit import GatewayBus, add_registration
from routerkit import TENANT, Kit
from test_channel_renderer import caps

from edges.common._opencode import OpenCodeError
from edges.gateway._work import SessionEvents, WorkRunner
from hub.channels._actions import ActionTokens
from hub.channels._renderer import ChannelRenderer
from schemas import SessionRef, WorkClaimReply


@pytest.fixture
async def kit(hub):
    return Kit(hub)


@pytest.fixture
async def gateway(hub):
    reg_id = await add_registration(hub.pool, TENANT)
    bus = await GatewayBus.connect(hub, TENANT, reg_id)
    yield bus
    await bus.close()


async def work_of(kit: Kit, inbound) -> dict:
    row = await kit.hub.pool.fetchrow(
        "SELECT * FROM edge_work WHERE tenant = $1 AND idempotency_key = $2", TENANT, inbound.id
    )
    assert row is not None, "the prompt did not become edge work"
    return dict(row)


async def run(gateway: GatewayBus, work_id: str, result: dict) -> None:
    """What a Gateway does with a prompt: claim, running, the result."""
    lease = await gateway.claim(work_id)
    assert isinstance(lease, WorkClaimReply) and lease.work_id == work_id, lease
    seq = lease.next_sequence or 1
    assert (
        await gateway.output(work_id, lease.lease_token, seq, "status", {"state": "running"})
    ).ok
    assert (await gateway.output(work_id, lease.lease_token, seq + 1, "result", result)).ok


async def replied(kit: Kit, inst: dict, wanted, timeout: float = 10.0) -> None:
    """Wait until the chat is sent a text that `wanted` accepts (on a loaded 2-core
    machine the hub's answer can take seconds; it returns as soon as it is there)."""
    texts: list[str] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while not any(wanted(t) for t in texts):
        left = deadline - asyncio.get_running_loop().time()
        assert left > 0, texts
        texts += [d.text or "" for d in await kit.replies(inst, 1, timeout=left)]


async def binding_session(kit: Kit, inst: dict) -> str | None:
    return await kit.hub.pool.fetchval(
        "SELECT session_id FROM channel_bindings WHERE tenant = $1 AND instance_id = $2 AND active",
        TENANT,
        inst["instance_id"],
    )


async def test_second_prompt_continues_the_first_prompts_session(kit, http, gateway):
    inst = await kit.instance(http, authority="cloud_worker")
    await kit.role(inst, "u1", "member")
    first = await work_of(kit, await kit.send(inst, "start a plan"))
    assert first["session_ref"].get("sessionId") is None
    # A prompt sent while the first still runs cannot know the session yet.
    early = await work_of(kit, await kit.send(inst, "and also this"))
    assert early["session_ref"].get("sessionId") is None
    await run(gateway, first["work_id"], {"text": "planned", "sessionId": "ses_first1"})
    await run(gateway, early["work_id"], {"text": "also", "sessionId": "ses_other2"})
    second = await work_of(kit, await kit.send(inst, "now do step 2"))
    assert second["session_ref"]["sessionId"] == "ses_first1"  # the first one wins
    assert await binding_session(kit, inst) == "ses_first1"
    # /new starts over: the fresh binding's first prompt opens a new session again.
    await kit.send(inst, "/new")
    fresh = await work_of(kit, await kit.send(inst, "unrelated"))
    assert fresh["session_ref"].get("sessionId") is None


async def test_a_result_without_a_valid_session_id_is_not_adopted(kit, http, gateway):
    inst = await kit.instance(http, authority="cloud_worker")
    await kit.role(inst, "u1", "member")
    first = await work_of(kit, await kit.send(inst, "one"))
    await run(gateway, first["work_id"], {"text": "done", "sessionId": "ses.bad>*"})
    second = await work_of(kit, await kit.send(inst, "two"))
    assert second["session_ref"].get("sessionId") is None
    assert await binding_session(kit, inst) is None


async def test_renderer_adopts_the_session_when_it_renders_the_result(hub, kit, http, gateway):
    inst = await kit.instance(http, authority="cloud_worker", capabilities=caps())
    await kit.role(inst, "u1", "member")
    renderer = ChannelRenderer(
        hub.nc,
        hub.pool,
        hub.metrics,
        hub_id="test-sessions",
        instances=kit.instances,
        outbox=hub.channel_outbox,
        actions=ActionTokens(hub.pool),
        sweep_interval=0.2,
    )
    await renderer.start()
    try:
        first = await work_of(kit, await kit.send(inst, "hello"))
        await run(gateway, first["work_id"], {"text": "hi there", "sessionId": "ses_shown"})
        for _ in range(50):
            if await binding_session(kit, inst) == "ses_shown":
                break
            await asyncio.sleep(0.1)
        assert await binding_session(kit, inst) == "ses_shown"
        await kit.send(inst, "/status")
        await replied(kit, inst, lambda t: "[ses_shown]" in t)
    finally:
        await renderer.stop()


async def test_abort_from_a_cloud_worker_chat_cancels_its_running_work(kit, http, gateway):
    """/abort in a cloud_worker chat: the chat's running work is cancelled, the Gateway
    holding it is refused at its next write or renewal (and aborts its run), the chat
    says so; and the admin API cancels the same way, once."""
    from schemas import AckReply

    inst = await kit.instance(http, authority="cloud_worker")
    await kit.role(inst, "u1", "member")
    work = await work_of(kit, await kit.send(inst, "a long job"))
    lease = await gateway.claim(work["work_id"])
    assert isinstance(lease, WorkClaimReply) and lease.work_id == work["work_id"], lease
    assert (
        await gateway.output(
            work["work_id"],
            lease.lease_token,
            lease.next_sequence or 1,
            "status",
            {"state": "running"},
        )
    ).ok
    await kit.send(inst, "/abort")
    await replied(kit, inst, lambda t: t == "Stopped.")
    view = (await http.get(f"/api/v1/tenants/{TENANT}/work/{work['work_id']}")).json()
    assert view["state"] == "cancelled" and "/abort" in view["error"], view
    assert view["leases"][-1]["outcome"] == "cancelled"
    assert (view["status"], view["leaseExpiresAt"]) == ({"state": "cancelled"}, None)
    renewed = await gateway.renew(work["work_id"], lease.lease_token)
    assert isinstance(renewed, AckReply) and not renewed.ok, renewed
    written = await gateway.output(work["work_id"], lease.lease_token, 9, "event", {"n": 9})
    assert not written.ok
    told = await kit.hub.pool.fetchval(
        "SELECT count(*) FROM workspace_events WHERE tenant = $1 AND type = 'work.cancelled'",
        TENANT,
    )
    assert told == 1
    await kit.send(inst, "/abort")
    await replied(kit, inst, lambda t: "Nothing is running" in t)

    queued = await work_of(kit, await kit.send(inst, "another"))
    url = f"/api/v1/tenants/{TENANT}/work/{queued['work_id']}/cancel"
    # Registrations made straight in the table (add_registration) may claim: no hint.
    view = (await http.get(f"/api/v1/tenants/{TENANT}/work/{queued['work_id']}")).json()
    assert "waiting" not in view, view
    r = await http.post(url, json={"reason": "wrong chat"})
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    r = await http.post(url)
    assert r.status_code == 409 and r.json()["error"]["code"] == "work.already_final"
    r = await http.post(f"/api/v1/tenants/{TENANT}/work/nope/cancel")
    assert r.status_code == 404
    got = await gateway.claim(queued["work_id"])  # cancelled work is never claimed
    assert getattr(got, "work_id", None) != queued["work_id"], got


async def test_sessions_shows_the_title_opencode_gave_the_session(kit, http, gateway):
    inst = await kit.instance(http, authority="cloud_worker")
    await kit.role(inst, "u1", "member")
    work = await work_of(kit, await kit.send(inst, "plan a trip"))
    lease = await gateway.claim(work["work_id"])
    assert isinstance(lease, WorkClaimReply) and lease.work_id == work["work_id"], lease
    seq = lease.next_sequence or 1
    for n, title in enumerate(("New session - 2026-12-05", "Plan the trip")):
        assert (
            await gateway.output(
                work["work_id"],
                lease.lease_token,
                seq + n,
                "event",
                {
                    "type": "session.updated",
                    "properties": {"info": {"id": "ses_titled1", "title": title}},
                },
            )
        ).ok
    assert (
        await gateway.output(
            work["work_id"],
            lease.lease_token,
            seq + 2,
            "result",
            {"text": "ok", "sessionId": "ses_titled1"},
        )
    ).ok
    await kit.send(inst, "/sessions")
    await replied(kit, inst, lambda t: "Plan the trip [ses_titled1]" in t)


# --- the Gateway side -----------------------------------------------------------------------
class FakeOpenCode:
    """Just enough of OpenCodeClient for one prompt turn."""

    def __init__(self, events: SessionEvents, known: set[str]) -> None:
        self.events, self.known, self.created, self.prompted = events, known, [], []

    async def get_session(self, session_id: str) -> dict:
        if session_id not in self.known:
            raise OpenCodeError(404, "NotFoundError", f"no session {session_id}")
        return {"id": session_id}

    async def create_session(self, *, title=None, agent=None, parent_id=None) -> dict:
        session = f"ses_new{len(self.created) + 1}"
        self.created.append(title)
        self.known.add(session)
        return {"id": session}

    async def prompt_async(self, session_id: str, parts, **options) -> None:
        self.prompted.append(session_id)
        self.stream_open_at_prompt = self.events.connected
        self.events.register(session_id).put_nowait(
            {"type": "session.idle", "properties": {"sessionID": session_id}}
        )

    async def messages(self, session_id: str) -> list:
        return [
            {
                "info": {"role": "assistant", "time": {"completed": 1}},
                "parts": [{"type": "text", "text": f"answer in {session_id}"}],
            }
        ]

    async def abort(self, session_id: str) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.outputs: list = []
        self.runner: WorkRunner | None = None

    async def append(self, output) -> None:
        self.outputs.append(output)
        assert self.runner is not None
        self.runner.delivered(output.sequence)


class Bus:
    async def renew(self, work_id: str, lease_token: str) -> float:
        return 30.0


class Store:
    def journal_claim(self, *args) -> bool:
        return True

    def journal_update(self, *args, **kw) -> None:
        pass

    def audit(self, *args, **kw) -> None:
        pass


async def run_runner(
    opencode: FakeOpenCode,
    events: SessionEvents,
    session_id: str | None,
    stream_wait: float = 0.0,  # (these fakes stream nothing: no wait)
) -> tuple[str, dict]:
    claim = WorkClaimReply(
        work_id="w1",
        kind="prompt",
        lease_token="t" * 32,
        lease_seconds=30,
        attempt=1,
        next_sequence=1,
        session_ref=SessionRef(workspace_id="ws", session_id=session_id, title="Chat"),
        payload={"text": "go on"},
    )
    sink = Sink()
    runner = WorkRunner(
        claim,
        opencode=opencode,
        events=events,
        sink=sink,
        bus=Bus(),
        store=Store(),
        stream_wait_seconds=stream_wait,
    )
    sink.runner = runner
    outcome = await runner.run()
    return outcome, sink.outputs[-1].body


async def test_gateway_continues_a_named_session_it_has():
    events = SessionEvents(None)  # type: ignore[arg-type]  (never streamed here)
    opencode = FakeOpenCode(events, {"ses_known"})
    outcome, result = await run_runner(opencode, events, "ses_known")
    assert outcome == "completed" and opencode.prompted == ["ses_known"]
    assert opencode.created == [] and result == {
        "text": "answer in ses_known",
        "sessionId": "ses_known",
    }


async def test_gateway_opens_a_new_session_when_the_named_one_is_gone_or_busy():
    events = SessionEvents(None)  # type: ignore[arg-type]
    opencode = FakeOpenCode(events, {"ses_busy"})
    outcome, result = await run_runner(opencode, events, "ses_gone")
    assert outcome == "completed" and result["sessionId"] == "ses_new1"
    assert opencode.created == ["Chat"]
    events.register("ses_busy")  # another run here is using it
    outcome, result = await run_runner(opencode, events, "ses_busy")
    assert result["sessionId"] == "ses_new2" and opencode.prompted[-1] == "ses_new2"
    assert "ses_gone" not in events._queues  # the failed reservation was released


class LateStream:
    """An OpenCode event stream that opens when the test says."""

    def __init__(self) -> None:
        self.live, self.followed = asyncio.Event(), []

    @property
    def connected(self) -> bool:
        return self.live.is_set()

    async def open_for(self, session_id: str | None, timeout: float) -> bool:
        self.followed.append(session_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.live.wait()
        return self.live.is_set()


async def test_a_gateway_prompts_only_once_its_event_stream_is_open():
    """A Gateway just started can claim before its OpenCode event stream is open; the
    prompt then waits for it (bounded), so the turn's events stream live, and the
    session is followed (its messages relayed if the stream opens later still)."""
    events = SessionEvents(None)  # type: ignore[arg-type]
    events.stream = LateStream()  # type: ignore[assignment]
    opencode = FakeOpenCode(events, {"ses_known"})
    asyncio.get_running_loop().call_later(0.3, events.stream.live.set)
    outcome, _ = await run_runner(opencode, events, "ses_known", stream_wait=5.0)
    assert outcome == "completed" and opencode.stream_open_at_prompt
    assert events.stream.followed == ["ses_known"]
    # A stream that does not open in time holds the work up no longer than that.
    events.stream = LateStream()  # type: ignore[assignment]
    started = asyncio.get_running_loop().time()
    outcome, _ = await run_runner(opencode, events, "ses_known", stream_wait=0.3)
    assert outcome == "completed" and not opencode.stream_open_at_prompt
    assert asyncio.get_running_loop().time() - started < 3.0
