"""A paired Desktop under faults: offline while commands queue, nats-server
killed mid-stream, the hub restarted mid-lease, the Desktop crashing mid-command.
Real operator-mode NATS, PostgreSQL, hub and OpenCode throughout."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from desktopkit import (
    events,
    eventually,
    finished,
    get_pairing,
    opencode_events,
    pair_and_start,
    redeem,
    start_desktop,
    submit,
    wait_online,
)
from hubkit import client, operator_nats, running_hub
from opencode_env import SLOW, FakeModelServer, OpenCodeServer

from edges.local import free_port
from schemas import CommandResult

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
async def opencode():
    model = FakeModelServer(slow_chunks=60, slow_delay=0.03)  # about two seconds of streaming
    await model.start()
    try:
        async with OpenCodeServer(model) as server:
            yield server
    finally:
        await model.stop()


@pytest.fixture
async def own_nats(tmp_path, bus_keys):
    """A private operator-mode server this test may kill and restart."""
    async with operator_nats(tmp_path / "nats", bus_keys, port=free_port()) as server:
        yield server


class BlockingRunner:
    """Stands in for CommandRunner.run: records calls and waits until released."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release = asyncio.Event()

    async def run(self, command):
        self.calls.append(command.id)
        await self.release.wait()
        return CommandResult(ok=True, status="completed", message="ran once")


async def test_commands_queued_offline_run_in_order_on_reconnect(
    operator_nats_url, database_url, bus_keys, opencode, tmp_path
):
    async with (
        running_hub(operator_nats_url, database_url, keys=bus_keys) as hub,
        client(hub, admin=True) as http,
    ):
        created, _ = await redeem(http, operator_nats_url, tmp_path / "d")
        pid = created["pairingId"]
        queued = [
            await submit(http, pid, "create_session", payload={"title": f"s{i}"}) for i in range(3)
        ]
        queued.append(await submit(http, pid, "status"))
        assert [q["sequence"] for q in queued] == [1, 2, 3, 4]
        assert (await get_pairing(http, pid))["online"] is False
        running = await start_desktop(tmp_path / "d", opencode.url)
        try:
            done = [await finished(http, pid, q["commandId"]) for q in queued]
            assert [d["status"] for d in done] == ["completed"] * 4
            order = [
                line["commandId"]
                for line in running.agent.store.read_audit()
                if line["action"] == "command.accepted"
            ]
            assert order == [q["commandId"] for q in queued], "delivered in sequence order"
            titles = [d["result"]["session"]["title"] for d in done[:3]]
            assert titles == ["s0", "s1", "s2"]
            assert (await get_pairing(http, pid))["lastCommandSequence"] == 4
        finally:
            await running.stop()


async def test_nats_killed_mid_stream_loses_and_duplicates_nothing(
    own_nats, database_url, bus_keys, opencode, tmp_path
):
    async with (
        running_hub(own_nats.url, database_url, keys=bus_keys) as hub,
        client(hub, admin=True) as http,
    ):
        running = await pair_and_start(http, own_nats.url, tmp_path / "d", opencode.url)
        pid = running.pairing_id
        appended: list[str] = []
        original = running.agent.store.outbox_append

        def recording(items):
            appended.extend(msg_id for _, msg_id, _ in items)
            return original(items)

        running.agent.store.outbox_append = recording  # type: ignore[method-assign]
        try:
            await wait_online(http, pid)
            session = (
                await finished(
                    http,
                    pid,
                    (await submit(http, pid, "create_session", payload={"title": "long"}))[
                        "commandId"
                    ],
                )
            )["result"]["session"]["id"]
            await finished(
                http,
                pid,
                (await submit(http, pid, "prompt", session, {"text": f"{SLOW} stream"}))[
                    "commandId"
                ],
            )

            async def streaming():
                return opencode_events(await events(http, pid), "message.part.delta", session)

            await eventually(streaming, 20, 0.05, "the first deltas")
            await own_nats.kill()  # mid-stream: OpenCode keeps emitting, the outbox keeps them
            await asyncio.sleep(1.0)
            buffered = running.agent.store.outbox_size()
            await own_nats.start()

            async def all_projected():
                items = await events(http, pid)
                ids = [i["id"] for i in items]
                return (
                    items
                    if set(appended) <= set(ids)
                    and running.agent.store.outbox_size() == 0
                    and opencode_events(items, "session.idle", session)
                    else None
                )

            items = await eventually(all_projected, 60, 0.2, "every relayed event projected")
            ids = [i["id"] for i in items]
            assert buffered > 0, "events were buffered while NATS was down"
            assert not [k for k, n in Counter(ids).items() if n > 1], "no duplicates"
            assert [i["sequence"] for i in items] == list(range(1, len(items) + 1))
            text = "".join(
                e["properties"].get("delta", "")
                for e in opencode_events(items, "message.part.delta", session)
            )
            assert text.startswith(opencode.model.reply_for(f"{SLOW} stream")[:10])
        finally:
            await running.stop()


async def _blocked_command(http, nats_url, opencode, tmp_path):
    """A paired Desktop whose runner is stuck inside a `status` command."""
    running = await pair_and_start(http, nats_url, tmp_path / "d", opencode.url)
    pid = running.pairing_id
    blocking = BlockingRunner()
    running.agent.runner = blocking  # type: ignore[assignment]
    submitted = await submit(http, pid, "status")
    await eventually(lambda: blocking.calls, 10, what="the command to start")
    return pid, running, blocking, submitted


async def test_hub_restarted_mid_lease_completes_the_command_once(
    operator_nats_url, database_url, bus_keys, opencode, tmp_path
):
    async with (
        running_hub(
            operator_nats_url, database_url, keys=bus_keys, command_lease_seconds=30
        ) as hub,
        client(hub, admin=True) as http,
    ):
        pid, running, blocking, submitted = await _blocked_command(
            http, operator_nats_url, opencode, tmp_path
        )
    try:
        # The hub is down now; the Desktop finishes and keeps offering its ack.
        blocking.release.set()
        await asyncio.sleep(0.5)
        async with (
            running_hub(
                operator_nats_url, database_url, keys=bus_keys, command_lease_seconds=30
            ) as hub,
            client(hub, admin=True) as http,
        ):
            done = await finished(http, pid, submitted["commandId"], timeout=20)
            assert done["status"] == "completed" and done["attempts"] == 1
            assert done["result"]["message"] == "ran once"
            assert blocking.calls == [submitted["commandId"]], "run exactly once"
    finally:
        await running.stop()


async def test_desktop_crash_mid_command_never_runs_it_twice(
    operator_nats_url, database_url, bus_keys, opencode, tmp_path
):
    async with (
        running_hub(operator_nats_url, database_url, keys=bus_keys, command_lease_seconds=2) as hub,
        client(hub, admin=True) as http,
    ):
        pid, first, _, submitted = await _blocked_command(
            http, operator_nats_url, opencode, tmp_path
        )
        await first.kill()  # crash mid-command: no result, no ack

        second = await start_desktop(tmp_path / "d", opencode.url)
        again = BlockingRunner()
        second.agent.runner = again  # type: ignore[assignment]
        try:
            done = await finished(http, pid, submitted["commandId"], timeout=20)
            assert done["status"] == "failed" and done["attempts"] >= 2
            assert "not run again" in done["result"]["message"]
            assert again.calls == [], "the restarted Desktop did not run it again"
            follow = await submit(http, pid, "status")
            again.release.set()
            assert (await finished(http, pid, follow["commandId"]))["status"] == "completed"
        finally:
            await second.stop()
