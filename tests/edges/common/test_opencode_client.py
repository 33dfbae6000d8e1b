"""The OpenCode client and event stream: SSE captures offline, then a real `opencode serve`.

The real server runs offline against tests/opencode_env.FakeModelServer, whose
answers are picked by keywords in the prompt (RUN_BASH, ASK_QUESTION, SLOW).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from opencode_env import (
    ASK_QUESTION,
    BASH_OUTPUT,
    CAPTURES_DIR,
    RUN_BASH,
    SLOW,
    FakeModelServer,
    OpenCodeServer,
)

from edges.common._opencode import (
    RESYNC,
    EventFilter,
    OpenCodeClient,
    OpenCodeError,
    OpenCodeEvents,
    SseDecoder,
    parse_events,
    replayed_events,
)

CAPTURES = CAPTURES_DIR
CAPTURE_FILES = sorted(CAPTURES.glob("*.sse"))
WAIT = 20.0

Event = dict[str, Any]


# --------------------------------------------------------------------------
# SSE parsing and filtering, on the raw captures of a real OpenCode
# --------------------------------------------------------------------------


def capture_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def decode_all(lines: list[str]) -> list[Event]:
    decoder = SseDecoder()
    return [e for e in (decoder.feed(line) for line in [*lines, ""]) if e is not None]


def idle_sessions(events: list[Event]) -> list[str]:
    return [e["properties"]["sessionID"] for e in events if e.get("type") == "session.idle"]


def test_the_captures_are_there():
    assert len(CAPTURE_FILES) >= 10


@pytest.mark.parametrize("path", CAPTURE_FILES, ids=lambda p: p.stem)
def test_every_data_line_of_a_capture_decodes_to_one_event(path):
    lines = capture_lines(path)
    events = decode_all(lines)
    assert len(events) == sum(line.startswith("data:") for line in lines)
    assert events == [
        json.loads(line[len("data: ") :]) for line in lines if line.startswith("data:")
    ]


@pytest.mark.parametrize("path", CAPTURE_FILES, ids=lambda p: p.stem)
def test_filtering_drops_only_heartbeats_and_repeated_idles(path):
    raw = decode_all(capture_lines(path))
    kept = list(parse_events(capture_lines(path)))
    dropped = [e for e in raw if e not in kept]
    assert all(e.get("type") in ("server.heartbeat", "session.idle") for e in dropped)
    assert [e for e in raw if e.get("type") not in ("server.heartbeat", "session.idle")] == [
        e for e in kept if e.get("type") != "session.idle"
    ]
    assert not any(e.get("type") == "server.heartbeat" for e in kept)


# Turns that ended in each capture (per /event capture: one idle per turn).
EXPECTED_IDLES = {
    "abort-mid-stream": 1,  # OpenCode sent 2
    "idle-heartbeats": 1,
    "permission-rejected-then-question-rejected": 3,  # 2 turns + abort of an unknown id
    "plain-prompt": 1,
    "question-answered": 1,
    "retry-after-http500": 2,  # OpenCode sent 3 (401 idles twice)
    "second-plain-prompt": 1,
    "tool-permission-approved": 1,
}


@pytest.mark.parametrize("name,count", sorted(EXPECTED_IDLES.items()))
def test_one_idle_per_turn(name, count):
    kept = list(parse_events(capture_lines(CAPTURES / f"{name}.sse")))
    assert len(idle_sessions(kept)) == count


def test_the_abort_capture_loses_its_duplicate_idle_but_keeps_the_error_and_statuses():
    lines = capture_lines(CAPTURES / "abort-mid-stream.sse")
    raw, kept = decode_all(lines), list(parse_events(lines))
    assert len(idle_sessions(raw)) == 2 and len(idle_sessions(kept)) == 1
    statuses = [e for e in raw if e["type"] == "session.status"]
    assert statuses == [e for e in kept if e["type"] == "session.status"]
    errors = [e for e in kept if e["type"] == "session.error"]
    assert [e["properties"]["error"]["name"] for e in errors] == ["MessageAbortedError"]
    assert kept.index(errors[0]) < kept.index(next(e for e in kept if e["type"] == "session.idle"))


def test_heartbeats_are_dropped():
    kept = list(parse_events(capture_lines(CAPTURES / "idle-heartbeats.sse")))
    assert [e["type"] for e in kept] == [
        "server.connected",
        "session.created",
        "session.updated",
        "session.status",
        "session.idle",
    ]


def test_global_stream_envelopes_pass_untouched():
    """/global/event wraps events in {directory, payload}: not ours to unwrap, never dropped."""
    lines = capture_lines(CAPTURES / "global-directory-scoped.sse")
    assert list(parse_events(lines)) == decode_all(lines)


def test_unknown_types_pass_and_malformed_data_is_skipped():
    lines = [
        ": a comment",
        "event: ignored",
        "id: 7",
        'data: {"type":"brand.new","properties":{"x":1}}',
        "",
        "data: {not json",
        "",
        "data: [1, 2]",
        "",
        "",
        "",
        'data: {"type":"server.heartbeat","properties":{}}\r',
        "\r",
        'data: {"type":',
        'data: "split.lines","properties":{}}',
        "",
        'data:{"no":"type"}',
        "",
    ]
    assert list(parse_events(lines)) == [
        {"type": "brand.new", "properties": {"x": 1}},
        {"type": "split.lines", "properties": {}},
        {"no": "type"},
    ]


def test_a_busy_status_or_a_busy_snapshot_makes_the_next_idle_count():
    idle = {"type": "session.idle", "properties": {"sessionID": "ses_a"}}
    busy = {
        "type": "session.status",
        "properties": {"sessionID": "ses_a", "status": {"type": "busy"}},
    }
    retry = {
        "type": "session.status",
        "properties": {
            "sessionID": "ses_a",
            "status": {"type": "retry", "attempt": 1, "message": "x", "next": 0},
        },
    }
    still_idle = {
        "type": "session.status",
        "properties": {"sessionID": "ses_a", "status": {"type": "idle"}},
    }
    f = EventFilter()
    assert [f.accept(e) for e in (idle, still_idle, idle, busy, idle, retry, idle)] == [
        True,
        True,
        False,
        True,
        True,
        True,
        True,
    ]
    assert f.accept(idle) is False
    f.resync({"ses_b": {"type": "busy"}})
    assert f.accept(idle) is False
    f.resync({"ses_a": {"type": "busy"}})
    assert f.accept(idle) is True


def test_a_replay_holds_the_messages_changed_since_the_stream_was_last_live():
    """What a reconnect re-reads of a followed session: messages started or finished
    at or after the time, and an answer still being written; not older ones."""

    def message(mid: str, role: str, **time: int) -> dict:
        part = {"id": f"prt_{mid}", "messageID": mid, "type": "text", "text": mid}
        return {"info": {"id": mid, "role": role, "time": time}, "parts": [part]}

    messages = [
        message("old_q", "user", created=100),
        message("old_a", "assistant", created=101, completed=150),
        message("q", "user", created=190),
        message("a", "assistant", created=195, completed=250),
        message("q2", "user", created=260),
        message("a2", "assistant", created=261),
    ]
    replayed = list(replayed_events("ses_a", messages, since_ms=200))
    assert [
        (e["type"], e["properties"].get("info", e["properties"].get("part"))["id"])
        for e in replayed
    ] == [
        ("message.updated", "a"),
        ("message.part.updated", "prt_a"),
        ("message.updated", "q2"),
        ("message.part.updated", "prt_q2"),
        ("message.updated", "a2"),
        ("message.part.updated", "prt_a2"),
    ]
    assert all(e["replayed"] is True and e["properties"]["sessionID"] == "ses_a" for e in replayed)


# --------------------------------------------------------------------------
# Errors without a server
# --------------------------------------------------------------------------


async def test_an_unreachable_server_is_an_opencode_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connection refused
        async with OpenCodeClient(f"http://127.0.0.1:{port}", timeout=2) as client:
            with pytest.raises(OpenCodeError) as caught:
                await client.health()
    assert caught.value.status is None and caught.value.name == "Unreachable"
    assert not caught.value.is_not_found


async def test_the_event_iterator_keeps_retrying_an_unreachable_server():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        async with OpenCodeClient(f"http://127.0.0.1:{port}", timeout=2) as client:
            events = OpenCodeEvents(client, min_backoff=0.01, max_backoff=0.02)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(anext(events), 0.3)
            assert events.connected is False and events.reconnects == 0
            await events.aclose()
            with pytest.raises(StopAsyncIteration):
                await anext(events)


# --------------------------------------------------------------------------
# A real OpenCode server (one per module, password-protected)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def opencode() -> AsyncIterator[OpenCodeServer]:
    async with OpenCodeServer(password=secrets.token_urlsafe(16)) as server:
        yield server


@pytest.fixture(scope="module")
async def client(opencode: OpenCodeServer) -> AsyncIterator[OpenCodeClient]:
    async with OpenCodeClient(
        opencode.url, password=opencode.password, directory=opencode.directory
    ) as client:
        yield client


class Stream:
    """An OpenCodeEvents plus everything it yielded so far, for waiting on events."""

    def __init__(self, events: OpenCodeEvents) -> None:
        self.events = events
        self.seen: list[Event] = []

    async def wait_for(self, match: Callable[[Event], bool], timeout: float = WAIT) -> Event:
        """The first event (seen before or arriving now) that matches; consumes as it goes."""
        for event in self.seen:
            if match(event):
                return event

        async def read() -> Event:
            while True:
                event = await anext(self.events)
                self.seen.append(event)
                if match(event):
                    return event

        return await asyncio.wait_for(read(), timeout)

    def of(self, session_id: str, kind: str | None = None) -> list[Event]:
        return [
            e
            for e in self.seen
            if e.get("properties", {}).get("sessionID") == session_id
            and (kind is None or e["type"] == kind)
        ]


def is_(kind: str, session_id: str | None = None, **props: Any) -> Callable[[Event], bool]:
    def match(event: Event) -> bool:
        p = event.get("properties", {})
        return (
            event.get("type") == kind
            and (session_id is None or p.get("sessionID") == session_id)
            and all(p.get(k) == v for k, v in props.items())
        )

    return match


def tool_part(session_id: str, tool: str, status: str) -> Callable[[Event], bool]:
    def match(event: Event) -> bool:
        part = event.get("properties", {}).get("part", {})
        return (
            event.get("type") == "message.part.updated"
            and part.get("sessionID") == session_id
            and part.get("type") == "tool"
            and part.get("tool") == tool
            and part.get("state", {}).get("status") == status
        )

    return match


@pytest.fixture
async def stream(client: OpenCodeClient) -> AsyncIterator[Stream]:
    async with OpenCodeEvents(client, min_backoff=0.05, max_backoff=0.5) as events:
        s = Stream(events)
        await s.wait_for(is_(RESYNC))
        yield s


async def settled_idles(stream: Stream, client: OpenCodeClient, session_id: str) -> list[Event]:
    """The session's idles, once a later marker event shows nothing more is in flight."""
    marker = await client.create_session(title="marker")
    await stream.wait_for(is_("session.created", marker["id"]))
    return stream.of(session_id, "session.idle")


async def test_health_needs_the_password(opencode):
    async with OpenCodeClient(opencode.url, password=opencode.password) as good:
        assert await good.health() == {"healthy": True, "version": "1.18.33"}
    for password in (None, "wrong-password"):
        async with OpenCodeClient(opencode.url, password=password) as bad:
            with pytest.raises(OpenCodeError) as caught:
                await bad.health()
            assert caught.value.status == 401


async def test_the_event_stream_needs_the_password_too(opencode):
    async with OpenCodeClient(opencode.url, password="wrong-password") as bad:
        async with OpenCodeEvents(bad, min_backoff=0.01, max_backoff=0.05) as events:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(anext(events), 0.5)
            assert events.connected is False


async def test_an_unknown_session_is_not_found(client):
    with pytest.raises(OpenCodeError) as caught:
        await client.get_session("ses_doesnotexist")
    assert caught.value.is_not_found and caught.value.name == "NotFoundError"
    assert "ses_doesnotexist" in caught.value.message
    with pytest.raises(OpenCodeError) as caught:
        await client.messages("ses_doesnotexist")
    assert caught.value.is_not_found


async def test_a_prompt_streams_the_models_text_then_one_idle(client, stream, opencode):
    session = await client.create_session(title="plain")
    assert session["id"].startswith("ses_") and session["title"] == "plain"
    assert (await client.get_session(session["id"]))["id"] == session["id"]
    prompt = "Say hello"
    assert await client.prompt_async(session["id"], [{"type": "text", "text": prompt}]) is None

    await stream.wait_for(is_("session.idle", session["id"]))
    deltas = [e["properties"]["delta"] for e in stream.of(session["id"], "message.part.delta")]
    assert len(deltas) > 1
    assert "".join(deltas) == opencode.model.reply_for(prompt)
    assert len(await settled_idles(stream, client, session["id"])) == 1
    assert stream.events.connected and stream.events.reconnects == 0

    history = await client.messages(session["id"])
    assert [m["info"]["role"] for m in history] == ["user", "assistant"]
    texts = [p["text"] for p in history[1]["parts"] if p["type"] == "text"]
    assert texts == [opencode.model.reply_for(prompt)]
    assert len(await client.messages(session["id"], limit=1)) == 1
    assert session["id"] in {s["id"] for s in await client.list_sessions(limit=50)}
    assert session["id"] not in await client.session_status()


async def test_a_bash_tool_waits_for_permission_then_runs(client, stream, opencode):
    session = await client.create_session(title="bash")
    await client.prompt_async(session["id"], [{"type": "text", "text": f"please {RUN_BASH}"}])

    asked = await stream.wait_for(is_("permission.asked", session["id"]))
    request = asked["properties"]
    assert request["permission"] == "bash" and request["id"].startswith("per_")
    assert request["metadata"]["command"] == "echo cowork-tool-ran"
    assert request["id"] in {p["id"] for p in await client.list_permissions()}
    busy = await client.session_status()
    assert busy[session["id"]]["type"] == "busy"

    assert await client.reply_permission(request["id"], "once") is True
    replied = await stream.wait_for(is_("permission.replied", session["id"]))
    assert replied["properties"] == {
        "sessionID": session["id"],
        "requestID": request["id"],
        "reply": "once",
    }
    done = await stream.wait_for(tool_part(session["id"], "bash", "completed"))
    assert BASH_OUTPUT in done["properties"]["part"]["state"]["output"]
    await stream.wait_for(is_("session.idle", session["id"]))
    assert request["id"] not in {p["id"] for p in await client.list_permissions()}
    assert any(
        m.get("role") == "tool" and BASH_OUTPUT in json.dumps(m.get("content"))
        for body in opencode.model.requests
        for m in body["messages"]
    )


async def test_a_rejected_permission_fails_the_tool(client, stream):
    session = await client.create_session(title="bash-rejected")
    await client.prompt_async(session["id"], [{"type": "text", "text": RUN_BASH}])
    asked = await stream.wait_for(is_("permission.asked", session["id"]))
    await client.reply_permission(asked["properties"]["id"], "reject", message="not today")
    await stream.wait_for(is_("permission.replied", session["id"], reply="reject"))
    await stream.wait_for(tool_part(session["id"], "bash", "error"))
    await stream.wait_for(is_("session.idle", session["id"]))


async def test_a_question_is_answered(client, stream):
    session = await client.create_session(title="question")
    await client.prompt_async(session["id"], [{"type": "text", "text": ASK_QUESTION}])

    asked = await stream.wait_for(is_("question.asked", session["id"]))
    request = asked["properties"]
    assert request["id"].startswith("que_")
    assert [o["label"] for o in request["questions"][0]["options"]] == ["Blue", "Red"]
    assert request["id"] in {q["id"] for q in await client.list_questions()}

    assert await client.reply_question(request["id"], [["Blue"]]) is True
    replied = await stream.wait_for(is_("question.replied", session["id"]))
    assert replied["properties"]["answers"] == [["Blue"]]
    done = await stream.wait_for(tool_part(session["id"], "question", "completed"))
    assert done["properties"]["part"]["state"]["metadata"]["answers"] == [["Blue"]]
    await stream.wait_for(is_("session.idle", session["id"]))
    assert request["id"] not in {q["id"] for q in await client.list_questions()}


async def test_a_question_is_rejected(client, stream):
    session = await client.create_session(title="question-rejected")
    await client.prompt_async(session["id"], [{"type": "text", "text": f"{ASK_QUESTION} again"}])
    asked = await stream.wait_for(is_("question.asked", session["id"]))
    assert await client.reject_question(asked["properties"]["id"]) is True
    rejected = await stream.wait_for(is_("question.rejected", session["id"]))
    assert rejected["properties"]["requestID"] == asked["properties"]["id"]
    await stream.wait_for(tool_part(session["id"], "question", "error"))
    await stream.wait_for(is_("session.idle", session["id"]))
    with pytest.raises(OpenCodeError) as caught:
        await client.reply_question(asked["properties"]["id"], [["Red"]])
    assert caught.value.is_not_found


async def test_an_abort_mid_stream_errors_then_idles_once(client, stream):
    session = await client.create_session(title="abort")
    await client.prompt_async(session["id"], [{"type": "text", "text": f"{SLOW} please"}])
    await stream.wait_for(is_("message.part.delta", session["id"]))
    assert await client.abort(session["id"]) is True

    error = await stream.wait_for(is_("session.error", session["id"]))
    assert error["properties"]["error"]["name"] == "MessageAbortedError"
    await stream.wait_for(is_("session.idle", session["id"]))
    # OpenCode reports idle twice after an abort, each time after an idle status:
    # once the second status is in, its idle is next; a later marker proves it was dropped.
    idle_status = is_("session.status", session["id"], status={"type": "idle"})
    await stream.wait_for(lambda e: sum(map(idle_status, stream.seen)) >= 2)
    assert len(await settled_idles(stream, client, session["id"])) == 1


async def test_the_prompt_body_carries_agent_and_model(client, stream, opencode):
    session = await client.create_session(title="options", agent="build")
    await client.prompt_async(
        session["id"],
        [{"type": "text", "text": "with options"}],
        agent="build",
        model="fake/fake-model",
    )
    user = await stream.wait_for(
        lambda e: (
            is_("message.updated", session["id"])(e) and e["properties"]["info"]["role"] == "user"
        )
    )
    assert user["properties"]["info"]["agent"] == "build"
    assert user["properties"]["info"]["model"] == {"providerID": "fake", "modelID": "fake-model"}
    await stream.wait_for(is_("session.idle", session["id"]))


async def test_abort_of_an_unknown_session_is_harmless(client):
    assert await client.abort("ses_doesnotexist") is True


# --------------------------------------------------------------------------
# Reconnecting: its own server (no password), restarted under the iterator
# --------------------------------------------------------------------------


async def test_a_restarted_server_is_followed_with_a_fresh_resync():
    async with (
        FakeModelServer() as model,
        OpenCodeServer(model) as server,
        OpenCodeClient(server.url, directory=server.directory) as client,
    ):
        assert (await client.health())["healthy"] is True  # no password set: open
        async with OpenCodeEvents(
            client, min_backoff=0.05, max_backoff=0.5, open_timeout=1.0
        ) as events:
            stream = Stream(events)
            first = await stream.wait_for(is_(RESYNC))
            assert first["properties"] == {"status": {}, "permissions": [], "questions": []}
            await stream.wait_for(is_("server.connected"))
            assert events.connected and events.reconnects == 0

            # Leave a question pending across the restart? It dies with the
            # process, so the snapshot after the restart must not show it.
            session = await client.create_session(title="before restart")
            await client.prompt_async(session["id"], [{"type": "text", "text": ASK_QUESTION}])
            await stream.wait_for(is_("question.asked", session["id"]))

            await server.restart()
            resyncs = lambda e: is_(RESYNC)(e) and e is not first  # noqa: E731
            second = await stream.wait_for(resyncs)
            assert events.reconnects == 1 and events.connected
            assert second["properties"]["questions"] == []
            assert Counter(e["type"] for e in stream.seen)[RESYNC] == 2

            await client.get_session(session["id"])  # sessions persist on disk
            after = await client.create_session(title="after restart")
            await stream.wait_for(is_("session.created", after["id"]))
