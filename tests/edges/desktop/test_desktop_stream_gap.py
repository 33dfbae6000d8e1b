"""A command's events reach the hub even when OpenCode's event stream is not open
while they happen: the stream not open yet (it opened 2 s after the Desktop was
online at load 19), or dropped mid-turn. OpenCode sends an event only to the
streams open at the time; the Desktop re-reads the commanded session's messages
once a stream opens. The gap is made by a proxy that holds `GET /event`."""

from __future__ import annotations

import asyncio

import pytest
from desktopkit import (
    events,
    eventually,
    finished,
    opencode_events,
    redeem,
    run_command,
    start_desktop,
    submit,
    wait_online,
)
from opencode_env import (
    OPENCODE_OUTPUT_TIMEOUT,
    SLOW,
    EventStreamGate,
)

from edges.common import OpenCodeClient

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def hub_options():
    return {"command_lease_seconds": 30}


async def _turn_done(opencode, session: str, text: str) -> None:
    """Until OpenCode itself holds the completed answer (read past the proxy)."""

    async def done() -> bool:
        async with OpenCodeClient(opencode.url) as direct:
            messages = await direct.messages(session)
        return any(
            m["info"].get("role") == "assistant"
            and m["info"].get("time", {}).get("completed")
            and any(text in (p.get("text") or "") for p in m["parts"])
            for m in messages
        )

    await eventually(done, OPENCODE_OUTPUT_TIMEOUT, 0.1, "OpenCode to finish the turn")


async def _answer_relayed(http, pairing_id: str, session: str, text: str) -> None:
    """Until the hub's projection holds the assistant's finished text part."""

    async def found() -> bool:
        parts = opencode_events(await events(http, pairing_id), "message.part.updated", session)
        return any(
            p["properties"]["part"].get("type") == "text"
            and text in (p["properties"]["part"].get("text") or "")
            and (p["properties"]["part"].get("time") or {}).get("end")
            for p in parts
        )

    await eventually(found, OPENCODE_OUTPUT_TIMEOUT, 0.1, "the answer in the hub's projection")


async def test_a_command_run_before_the_event_stream_opens_is_relayed(
    hub, http, opencode, operator_nats_url, tmp_path
):
    async with EventStreamGate(opencode.url, held=True) as gate:
        created, _ = await redeem(http, operator_nats_url, tmp_path / "d")
        running = await start_desktop(tmp_path / "d", gate.url)
        try:
            pid = created["pairingId"]
            await wait_online(http, pid)
            assert not running.agent.relay.events.connected
            # Runs once its wait for the stream is over (bounded), the stream still held.
            made = await run_command(http, pid, "create_session", payload={"title": "gap"})
            session = made["result"]["session"]["id"]
            sent = await submit(http, pid, "prompt", session, {"text": "in the gap"})
            queued = await finished(http, pid, sent["commandId"], timeout=30)
            assert queued["status"] == "queued", queued
            answer = opencode.model.reply_for("in the gap")
            await _turn_done(opencode, session, answer)
            assert not running.agent.relay.events.connected, "the gap lasted the whole turn"
            gate.release()
            await _answer_relayed(http, pid, session, answer)
        finally:
            await running.stop()


async def test_a_turn_finished_while_the_stream_was_dropped_is_relayed(
    hub, http, opencode, operator_nats_url, tmp_path
):
    async with EventStreamGate(opencode.url) as gate:
        created, _ = await redeem(http, operator_nats_url, tmp_path / "d")
        running = await start_desktop(tmp_path / "d", gate.url)
        opencode.model.slow_gate = hold_reply = asyncio.Event()
        try:
            pid = created["pairingId"]
            await wait_online(http, pid)
            await running.listening()
            made = await run_command(http, pid, "create_session", payload={"title": "drop"})
            session = made["result"]["session"]["id"]
            text = f"{SLOW} then drop"
            await run_command(http, pid, "prompt", session, {"text": text})

            async def streaming() -> list:
                items = await events(http, pid)
                return opencode_events(items, "message.part.delta", session)

            await eventually(streaming, OPENCODE_OUTPUT_TIMEOUT, 0.1, "the reply streaming")
            await gate.hold()  # the stream drops mid-turn; the turn goes on without it
            await eventually(
                lambda: not running.agent.relay.events.connected, 10, what="the stream closed"
            )
            hold_reply.set()
            answer = opencode.model.reply_for(text)
            await _turn_done(opencode, session, answer)
            gate.release()
            await _answer_relayed(http, pid, session, answer)
        finally:
            opencode.model.slow_gate = None
            await running.stop()
