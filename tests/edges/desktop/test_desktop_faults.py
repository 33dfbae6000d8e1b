"""A paired Desktop under faults: offline while commands queue, nats-server
killed mid-stream, a command submitted while nats-server is down, a push of the
command running now, the hub restarted mid-lease, the Desktop crashing
mid-command. Real operator-mode NATS, PostgreSQL, hub and OpenCode throughout."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from desktopkit import (
    TENANT,
    command,
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
        # The reply stops after its first deltas until NATS is down: under load the
        # projection can lag the whole 2 s stream, which then ends before the kill.
        gate = opencode.model.slow_gate = asyncio.Event()
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
            gate.set()
            buffered = await eventually(
                running.agent.store.outbox_size, 20, 0.05, "events buffered while NATS is down"
            )
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
            gate.set()
            opencode.model.slow_gate = None
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


def _final_acks(running) -> list[str]:
    """Record the final acks the Desktop sends from now on (outcomes, in order)."""
    sent: list[str] = []
    send = running.agent._send_ack

    async def recording(command, outcome, result):
        if outcome != "accepted":
            sent.append(outcome)
        return await send(command, outcome, result)

    running.agent._send_ack = recording
    return sent


async def _reconnected_at(nc) -> float:
    await eventually(lambda: nc.stats["reconnects"] and nc.is_connected, 40, 0.02, what="back")
    return time.monotonic()


async def _hub_audits(hub, command_id: str, action: str) -> int:
    return await hub.pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE tenant = $1 AND command_id = $2 AND action = $3",
        TENANT,
        command_id,
        action,
    )


async def test_a_command_submitted_while_nats_is_down_arrives_when_it_is_back(
    own_nats, database_url, bus_keys, opencode, tmp_path
):
    """Issue 16, item 3: kill -9 of nats-server with the Desktop connected, a command
    submitted during the outage. It reaches the Desktop soon after the path is back,
    not when its 30 s lease runs out; it runs once and is reported once."""
    async with (
        running_hub(own_nats.url, database_url, keys=bus_keys, command_lease_seconds=30) as hub,
        client(hub, admin=True) as http,
    ):
        # The Desktop's default heartbeat: delivery must not wait for a periodic one.
        running = await pair_and_start(
            http, own_nats.url, tmp_path / "d", opencode.url, heartbeat=5.0
        )
        pid = running.pairing_id
        runner = BlockingRunner()
        runner.release.set()
        running.agent.runner = runner  # type: ignore[assignment]
        acks = _final_acks(running)
        # Desktops come back after the hub (measured: every Desktop in 5.3 s, NATS in
        # 0.4 s), so what the hub pushes when it reconnects finds nobody subscribed.
        nc = running.agent.nc
        assert nc is not None
        nc.options["reconnect_time_wait"] = 2.0
        try:
            await own_nats.kill()
            await asyncio.sleep(0.5)
            submitted = await submit(http, pid, "status")
            await own_nats.start()
            back = time.monotonic()
            desktop_back = asyncio.create_task(_reconnected_at(nc))
            done = await finished(http, pid, submitted["commandId"], timeout=40)
            recovery = time.monotonic() - back
            print(
                f"done {recovery:.2f} s after nats-server was back, "
                f"{time.monotonic() - await desktop_back:.2f} s after the Desktop was"
            )
            assert recovery < 5.0, f"{recovery:.1f} s: it waited for the lease"
            assert done["status"] == "completed" and done["attempts"] == 1, done
            assert runner.calls == [submitted["commandId"]], "run exactly once"
            assert acks == ["completed"], "one final ack"
            assert await _hub_audits(hub, submitted["commandId"], "command.completed") == 1
        finally:
            await running.stop()


async def test_a_push_of_the_command_running_now_is_ignored(
    operator_nats_url, database_url, bus_keys, opencode, tmp_path, caplog
):
    caplog.set_level("INFO", logger="cowork.edge.desktop")
    async with (  # the default 30 s lease outlasts the test: one lease, one delivery
        running_hub(operator_nats_url, database_url, keys=bus_keys) as hub,
        client(hub, admin=True) as http,
    ):
        pid, running, blocking, submitted = await _blocked_command(
            http, operator_nats_url, opencode, tmp_path
        )
        acks = _final_acks(running)
        try:
            # (its accept goes once it has run ACCEPT_AFTER: let it land first)
            await eventually(
                lambda: _accepted(http, pid, submitted["commandId"]), 10, what="the accept"
            )
            # As if its accept had been lost: to the hub the lease is unaccepted and
            # was pushed long ago, so the Desktop's next heartbeat has it pushed again.
            await hub.pool.execute(
                "UPDATE pairing_commands SET state = 'leased', pushed_at = now() - "
                "interval '5 seconds' WHERE tenant = $1 AND command_id = $2",
                TENANT,
                submitted["commandId"],
            )
            await eventually(
                lambda: "desktop.duplicate_push_ignored" in caplog.text,
                10,
                what="the push to reach the Desktop",
            )
            blocking.release.set()
            done = await finished(http, pid, submitted["commandId"])
            assert done["status"] == "completed" and done["attempts"] == 1, done
            assert blocking.calls == [submitted["commandId"]], "run exactly once"
            assert acks == ["completed"], "one final ack, none for the push"
            audit = [line["action"] for line in running.agent.store.read_audit()]
            assert audit.count("command.completed") == 1 and "command.failed" not in audit
            assert await _hub_audits(hub, submitted["commandId"], "command.completed") == 1
        finally:
            await running.stop()


async def test_an_ack_the_hub_cannot_apply_now_is_sent_again_not_left_to_the_lease(
    operator_nats_url, database_url, bus_keys, opencode, tmp_path
):
    """The final ack reaches the hub while its database cannot take it (the chaos
    suite's PostgreSQL restart: the answer is `hub.unavailable`). The Desktop asks
    again while the lease is live, so the command is done within a second or two of
    the database being back, not when its 30 s lease runs out; reported once."""
    async with (
        running_hub(
            operator_nats_url, database_url, keys=bus_keys, command_lease_seconds=30
        ) as hub,
        client(hub, admin=True) as http,
    ):
        pid, running, blocking, submitted = await _blocked_command(
            http, operator_nats_url, opencode, tmp_path
        )
        acks = _final_acks(running)
        try:
            accepted = await eventually(
                lambda: _accepted(http, pid, submitted["commandId"]), 10, what="the accept"
            )
            assert accepted
            await hub.pool.execute("ALTER TABLE pairing_commands RENAME TO pairing_commands_away")
            try:
                blocking.release.set()
                await eventually(lambda: acks, 5, what="the final ack")
                await asyncio.sleep(1.5)  # answered hub.unavailable meanwhile
            finally:
                await hub.pool.execute(
                    "ALTER TABLE pairing_commands_away RENAME TO pairing_commands"
                )
            back = time.monotonic()
            done = await finished(http, pid, submitted["commandId"], timeout=10)
            took = time.monotonic() - back
            assert took < 3.0, f"done {took:.2f} s after the database was back"
            assert done["status"] == "completed" and done["attempts"] == 1, done
            assert acks == ["completed"], "one final ack (its copies are one request)"
            assert blocking.calls == [submitted["commandId"]], "run exactly once"
            assert await _hub_audits(hub, submitted["commandId"], "command.completed") == 1
            assert await _hub_audits(hub, submitted["commandId"], "command.accepted") == 1
        finally:
            await running.stop()


async def _accepted(http, pairing_id: str, command_id: str) -> bool:
    return (await command(http, pairing_id, command_id))["state"] == "accepted"


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
            # Pushed to the restarted Desktop on the same lease (killed within
            # ACCEPT_AFTER, it never sent its accept, so the hub took the push as lost)
            # or on a new one (accepted, the lease ran out): either way not run again.
            assert done["status"] == "failed" and done["attempts"] >= 1
            assert "not run again" in done["result"]["message"]
            assert again.calls == [], "the restarted Desktop did not run it again"
            follow = await submit(http, pid, "status")
            again.release.set()
            assert (await finished(http, pid, follow["commandId"]))["status"] == "completed"
        finally:
            await second.stop()
