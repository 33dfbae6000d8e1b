"""Commands for a paired Desktop at the hub: validation, idempotency, ordered
lease-fenced delivery, ack refusals and re-delivery after a lease runs out.

The Desktop here is a fake on raw nats-py that uses the pairing's real
credential (redeemed through the bootstrap bus), so every subject permission
the server enforces applies. Leases are short (LEASE seconds) to keep it fast,
but for pushes that were lost: those go again long before a lease runs out.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import pytest
from desktopkit import TENANT, command, eventually, get_pairing, redeem, submit
from hubkit import client, operator_nats, running_hub, waiting_on_a_lock

from edges.common._credentials import EdgeCredentials
from hub.auth import _jwt
from hub.core import flushed
from hub.desktop import _commands as commands_module
from hub.desktop._commands import REPUSH_AFTER
from schemas import (
    AckReply,
    CommandAck,
    CommandResult,
    DeviceCommand,
    Envelope,
    PairingState,
    PresenceHeartbeat,
    Source,
    decode,
    new_id,
    subjects,
)

pytestmark = pytest.mark.timeout(60)

LEASE = 2.0
QUIET = 0.4  # how long "nothing else arrives" is watched for


@pytest.fixture(scope="module")
def hub_options():
    return {"command_lease_seconds": LEASE}


class FakeDesktop:
    """Speaks the Desktop's side of the bus by hand: heartbeats, pushed commands, acks."""

    def __init__(self, url: str, pairing_id: str, creds_path) -> None:
        self.url, self.pairing_id = url, pairing_id
        self.creds = EdgeCredentials.from_creds_file(creds_path)
        self.nc: nats.aio.client.Client | None = None
        self.commands: asyncio.Queue[DeviceCommand] = asyncio.Queue()
        self.states: list[PairingState] = []
        self.errors: list[str] = []
        self._beat = 0

    async def connect(self) -> None:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(
            self.url,
            allow_reconnect=False,
            error_cb=on_error,
            inbox_prefix=subjects.inbox_prefix(TENANT, "desktop", self.pairing_id),
            **self.creds.connect_options(),
        )
        await self.nc.subscribe(
            subjects.DEVICE_COMMAND.build(tenant=TENANT, device_id=self.pairing_id),
            cb=self._on_push,
        )
        await flushed(self.nc)

    async def _on_push(self, msg) -> None:
        if json.loads(msg.data)["type"] == PairingState.message_type:
            self.states.append(decode(msg.data, PairingState).data)
        else:
            self.commands.put_nowait(decode(msg.data, DeviceCommand).data)

    @property
    def source(self) -> Source:
        return Source(
            principal_kind="desktop", principal_id=self.pairing_id, authority="desktop_local"
        )

    async def heartbeat(self, status: str = "online", interval: float = 60.0) -> None:
        self._beat += 1
        beat = PresenceHeartbeat(
            principal_kind="desktop",
            principal_id=self.pairing_id,
            sequence=self._beat,
            interval_seconds=interval,
            status=status,
            version="fake-desktop/1",
        )
        await self.nc.publish(
            subjects.PRESENCE.build(
                tenant=TENANT, principal_kind="desktop", principal_id=self.pairing_id
            ),
            Envelope.wrap(beat, source=self.source, tenant=TENANT).encode(),
        )
        await self.nc.flush()

    async def next_command(self, timeout: float = 5.0) -> DeviceCommand:
        return await asyncio.wait_for(self.commands.get(), timeout)

    async def nothing_pushed(self, within: float = QUIET) -> None:
        await asyncio.sleep(within)
        assert self.commands.empty(), f"unexpected push: {self.commands._queue[0]}"

    async def ack(
        self,
        cmd: DeviceCommand,
        outcome: str = "completed",
        result: CommandResult | None | str = "default",
        **override: Any,
    ) -> AckReply:
        if result == "default":
            result = (
                None
                if outcome == "accepted"
                else CommandResult(
                    ok=outcome == "completed",
                    status="completed" if outcome == "completed" else "failed",
                    message=f"{outcome} {cmd.id}",
                )
            )
        fields = {
            "command_id": cmd.id,
            "pairing_id": self.pairing_id,
            "sequence": cmd.sequence,
            "lease_token": cmd.lease.lease_token,
            "outcome": outcome,
            "result": result,
        }
        fields.update(override)
        data = Envelope.wrap(CommandAck(**fields), source=self.source, tenant=TENANT).encode()
        reply = await self.nc.request(
            subjects.DEVICE_COMMAND_ACK.build(tenant=TENANT, device_id=self.pairing_id),
            data,
            timeout=5,
        )
        return decode(reply.data, AckReply).data

    async def close(self) -> None:
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()


async def _fake_desktop(http, nats_url: str, state_dir) -> FakeDesktop:
    """A redeemed pairing (offline) and a connected fake Desktop that has not heartbeat yet."""
    created, store = await redeem(http, nats_url, state_dir)
    desktop = FakeDesktop(nats_url, created["pairingId"], store.creds_path)
    await desktop.connect()
    return desktop


@pytest.fixture
async def paired(hub, http, operator_nats_url, tmp_path):
    desktop = await _fake_desktop(http, operator_nats_url, tmp_path / "desktop")
    yield desktop
    await desktop.close()


@pytest.fixture
async def lasting(database_url, bus_keys, tmp_path):
    """A hub of its own with the default 30 s lease, and a fake Desktop paired to it: a
    lost push must go again long before its lease could run out and be handed out anew.
    On a server of their own: the module's hub would answer half of the redemptions."""
    async with (
        operator_nats(tmp_path / "nats", bus_keys) as server,
        running_hub(server.url, database_url, keys=bus_keys, command_lease_seconds=30) as hub,
        client(hub, admin=True) as http,
    ):
        desktop = await _fake_desktop(http, server.url, tmp_path / "desktop")
        try:
            yield hub, http, desktop
        finally:
            await desktop.close()


async def _online(http, desktop: FakeDesktop, online: bool = True) -> None:
    await desktop.heartbeat("online" if online else "offline")

    async def check() -> bool:
        return (await get_pairing(http, desktop.pairing_id))["online"] is online

    await eventually(check, 5, 0.05, f"pairing online={online}")


async def _rejections(hub, command_id: str) -> list[dict]:
    rows = await hub.pool.fetch(
        "SELECT actor_kind, actor_id, reason, metadata FROM audit_log WHERE tenant = $1 AND "
        "action = 'command.ack_rejected' AND command_id = $2 ORDER BY id",
        TENANT,
        command_id,
    )
    return [dict(r) for r in rows]


def _commands_url(pairing_id: str) -> str:
    return f"/api/v1/tenants/{TENANT}/pairings/{pairing_id}/commands"


# --- validation at the API --------------------------------------------------------------
@pytest.mark.parametrize(
    "body, explained",
    [
        ({"kind": "format_disk"}, "kind"),
        ({}, "kind"),
        ({"kind": "prompt", "payload": {"text": "hi"}}, "needs a sessionId"),
        ({"kind": "prompt", "sessionId": "ses_1"}, "payload.text"),
        ({"kind": "prompt", "sessionId": "ses_1", "payload": {"text": ""}}, "payload.text"),
        ({"kind": "prompt", "sessionId": "ses_1", "payload": {"txt": "typo"}}, "payload."),
        (
            {
                "kind": "permission.respond",
                "sessionId": "ses_1",
                "payload": {"permissionId": "per_1", "allowed": "yes"},
            },
            "payload.allowed",
        ),
        (
            {
                "kind": "permission.respond",
                "sessionId": "ses_1",
                "payload": {"permissionId": "per_1", "allowed": 1},
            },
            "payload.allowed",
        ),
        (
            {
                "kind": "permission.respond",
                "sessionId": "ses_1",
                "payload": {"permissionId": "per_1"},
            },
            "payload.allowed",
        ),
        (
            {
                "kind": "question.reply",
                "sessionId": "ses_1",
                "payload": {"requestId": "q", "answers": "Blue"},
            },
            "payload.answers",
        ),
        ({"kind": "status", "payload": {"x": 1}}, "takes no payload"),
        ({"kind": "status", "sessionId": "has space"}, "sessionId"),
        ({"kind": "status", "id": "bad.id"}, "id"),
        ({"kind": "status", "unknownField": 1}, "unknownField"),
    ],
)
async def test_invalid_commands_are_explained(http, paired, body, explained):
    response = await http.post(_commands_url(paired.pairing_id), json=body)
    assert response.status_code in (400, 422), response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request", error
    assert explained in error["message"], error
    assert "Traceback" not in response.text


async def test_malformed_json_and_unknown_pairing(http, paired):
    response = await http.post(
        _commands_url(paired.pairing_id),
        content=b"{kind: status",
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["code"] == "invalid_request"
    missing = await http.post(_commands_url("no_such_pairing"), json={"kind": "status"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "pairing.not_found"
    unknown = await http.get(f"{_commands_url(paired.pairing_id)}/no_such_command")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "command.not_found"


async def test_an_unredeemed_pairing_takes_no_commands(http):
    created = await http.post(f"/api/v1/tenants/{TENANT}/pairings", json={"label": "later"})
    pid = created.json()["pairingId"]
    response = await http.post(_commands_url(pid), json={"kind": "status"})
    assert response.status_code == 409, response.text
    assert response.json()["error"]["code"] == "pairing.not_redeemed"


async def test_a_workspace_or_session_off_the_allowlists_is_refused(
    hub, http, operator_nats_url, tmp_path
):
    created, _ = await redeem(http, operator_nats_url, tmp_path / "d", allowedSessionIds=["ses_a"])
    url = _commands_url(created["pairingId"])

    async def refused(body: dict) -> str:
        response = await http.post(url, json=body)
        assert response.status_code == 403, response.text
        return response.json()["error"]["code"]

    assert await refused({"kind": "status", "workspaceId": "elsewhere"}) == (
        "pairing.workspace_not_allowed"
    )
    assert await refused({"kind": "status", "sessionId": "ses_b"}) == "pairing.session_not_allowed"
    allowed = {"id": "cmd-allowed", "kind": "status", "sessionId": "ses_a"}
    assert (await http.post(url, json=allowed)).status_code == 201
    assert (await http.post(url, json={"kind": "status"})).status_code == 201  # no session
    # The allowlists are checked before the id: a repeat no longer allowed is refused.
    patched = await http.patch(
        f"/api/v1/tenants/{TENANT}/pairings/{created['pairingId']}",
        json={"allowedSessionIds": ["ses_c"]},
    )
    assert patched.status_code == 200, patched.text
    assert await refused(allowed) == "pairing.session_not_allowed"
    rows = await hub.pool.fetch(
        "SELECT sequence FROM pairing_commands WHERE tenant = $1 AND pairing_id = $2",
        TENANT,
        created["pairingId"],
    )
    assert sorted(r["sequence"] for r in rows) == [1, 2], "a refusal takes no sequence"


# --- idempotency --------------------------------------------------------------------------
async def test_submit_is_idempotent_by_id(hub, http, paired):
    url = _commands_url(paired.pairing_id)
    body = {
        "id": "cmd-idem-1",
        "kind": "prompt",
        "sessionId": "ses_1",
        "payload": {"text": "hello"},
    }
    first = await http.post(url, json=body)
    assert first.status_code == 201, first.text
    again = await http.post(url, json=body)
    assert again.status_code == 200, again.text
    assert again.json() == first.json() == {"commandId": "cmd-idem-1", "sequence": 1}

    changed = await http.post(url, json={**body, "payload": {"text": "something else"}})
    assert changed.status_code == 409, changed.text
    assert changed.json()["error"]["code"] == "command.conflict"
    other_kind = await http.post(url, json={"id": "cmd-idem-1", "kind": "status"})
    assert other_kind.status_code == 409, other_kind.text

    # The retries took no sequence number and made no second row.
    nxt = await submit(http, paired.pairing_id, "status")
    assert nxt["sequence"] == 2
    count = await hub.pool.fetchval(
        "SELECT count(*) FROM pairing_commands WHERE tenant = $1 AND command_id = 'cmd-idem-1'",
        TENANT,
    )
    assert count == 1


async def test_the_same_command_id_on_another_pairing_conflicts(
    http, paired, operator_nats_url, tmp_path
):
    other, store = await redeem(http, operator_nats_url, tmp_path / "other")
    body = {"id": "cmd-shared", "kind": "status"}
    assert (await http.post(_commands_url(paired.pairing_id), json=body)).status_code == 201
    response = await http.post(_commands_url(other["pairingId"]), json=body)
    assert response.status_code == 409, response.text


# --- delivery -----------------------------------------------------------------------------
async def test_queued_while_offline_then_pushed_one_at_a_time_in_order(hub, http, paired):
    pid = paired.pairing_id
    submitted = [await submit(http, pid, "status") for _ in range(3)]
    assert [s["sequence"] for s in submitted] == [1, 2, 3]
    for s in submitted:
        view = await command(http, pid, s["commandId"])
        assert view["state"] == "queued" and view["status"] == "queued", view
        assert view["attempts"] == 0
    await paired.nothing_pushed()  # offline: nothing goes out

    await _online(http, paired)
    await eventually(lambda: paired.states, 5, what="the pairing state pushed on connect")
    assert paired.states[-1].pairing_id == pid and paired.states[-1].enabled
    seen = []
    for expected in submitted:
        cmd = await paired.next_command()
        seen.append(cmd)
        assert (cmd.id, cmd.sequence) == (expected["commandId"], expected["sequence"])
        assert cmd.pairing_id == pid and cmd.kind.value == "status"
        assert cmd.workspace_id == "local"
        assert len(cmd.lease.lease_token) >= 16
        remaining = (cmd.lease.lease_expires_at - datetime.now(UTC)).total_seconds()
        assert 0 < remaining <= LEASE + 0.5, remaining
        assert (await command(http, pid, cmd.id))["state"] == "leased"
        await paired.nothing_pushed()  # the next waits for this one

        accepted = await paired.ack(cmd, "accepted")
        assert accepted.ok, accepted
        assert (await command(http, pid, cmd.id))["state"] == "accepted"
        await paired.nothing_pushed()  # accepted is not final

        done = await paired.ack(cmd, "completed")
        assert done.ok, done
    await paired.nothing_pushed()
    assert len({c.lease.lease_token for c in seen}) == 3, "a fresh token per lease"

    for s in submitted:
        view = await command(http, pid, s["commandId"])
        assert view["state"] == "done" and view["status"] == "completed", view
        assert view["result"]["message"] == f"completed {s['commandId']}"
        assert view["attempts"] == 1 and view["completedAt"]
    assert (await get_pairing(http, pid))["lastCommandSequence"] == 3
    actions = await hub.pool.fetch(
        "SELECT action FROM audit_log WHERE tenant = $1 AND command_id = $2 ORDER BY id",
        TENANT,
        submitted[0]["commandId"],
    )
    assert [r["action"] for r in actions] == ["command.accepted", "command.completed"]


async def test_a_command_submitted_while_online_is_pushed_at_once(http, paired):
    await _online(http, paired)
    submitted = await submit(http, paired.pairing_id, "status")
    cmd = await paired.next_command()
    assert cmd.id == submitted["commandId"]
    failed = await paired.ack(cmd, "failed")
    assert failed.ok, failed
    view = await command(http, paired.pairing_id, cmd.id)
    assert view["state"] == "done" and view["status"] == "failed"
    # A failed command is final too: the next one is pushed.
    second = await submit(http, paired.pairing_id, "status")
    assert (await paired.next_command()).id == second["commandId"]


async def test_submits_at_once_lease_only_the_first_and_the_rest_go_in_order(hub, http, paired):
    """A submit to an online Desktop with nothing open leases and pushes its command in
    the same statement; submits racing it see that command open and stay queued."""
    await _online(http, paired)
    pid = paired.pairing_id
    submitted = await asyncio.gather(*(submit(http, pid, "status") for _ in range(8)))
    by_sequence = sorted(submitted, key=lambda s: s["sequence"])
    assert [s["sequence"] for s in by_sequence] == list(range(1, 9))
    first = await paired.next_command()
    assert first.id == by_sequence[0]["commandId"]
    await paired.nothing_pushed()
    states = await hub.pool.fetch(
        "SELECT sequence, state, attempts FROM pairing_commands WHERE tenant = $1 "
        "AND pairing_id = $2 ORDER BY sequence",
        TENANT,
        pid,
    )
    assert [(r["state"], r["attempts"]) for r in states] == [("leased", 1)] + [("queued", 0)] * 7
    cmd = first
    for expected in by_sequence[1:]:
        assert (await paired.ack(cmd, "completed")).ok
        cmd = await paired.next_command()
        assert (cmd.id, cmd.sequence) == (expected["commandId"], expected["sequence"])
    assert (await paired.ack(cmd, "completed")).ok
    await paired.nothing_pushed()
    assert (await get_pairing(http, pid))["lastCommandSequence"] == 8


@pytest.mark.parametrize("first", ["final ack", "submit"])
async def test_a_final_ack_racing_a_submit_still_gets_the_next_command_pushed_once(
    hub, http, paired, first
):
    """A final ack says, from the pairing row it locks, whether a later command exists;
    when none does, it skips the `dispatch` after it. A submit racing it on that row
    either commits first (the ack then sees the later command and dispatches it) or
    waits for the ack (then it sees every command before its own final and leases and
    pushes its own). Either way the next command is pushed exactly once, in order."""
    await _online(http, paired)
    pid = paired.pairing_id
    one = await submit(http, pid, "status")
    cmd = await paired.next_command()
    assert cmd.id == one["commandId"]
    dispatched: list[bool] = []  # per final ack: whether its finish ran `dispatch`
    finish = hub.commands.finish

    async def counted(tenant: str, pairing_id: str, row: dict, *, dispatch: bool = True) -> None:
        dispatched.append(dispatch)
        await finish(tenant, pairing_id, row, dispatch=dispatch)

    hub.commands.finish = counted
    lock = await hub.pool.acquire()
    try:
        held = lock.transaction()
        await held.start()
        await lock.execute(  # both statements below now wait for this row lock, in turn
            "SELECT 1 FROM pairings WHERE tenant = $1 AND pairing_id = $2 FOR UPDATE",
            TENANT,
            pid,
        )
        acked: asyncio.Task | None = None
        if first == "final ack":
            acked = asyncio.create_task(paired.ack(cmd, "completed"))
            await waiting_on_a_lock(hub.pool, "WITH cur AS")
        submitted = asyncio.create_task(submit(http, pid, "status"))
        await waiting_on_a_lock(hub.pool, "WITH seq AS")
        if acked is None:
            acked = asyncio.create_task(paired.ack(cmd, "completed"))
            await waiting_on_a_lock(hub.pool, "WITH cur AS")
        await held.rollback()
    finally:
        await hub.pool.release(lock)
    try:
        assert (await acked).ok
        two = await submitted
        nxt = await paired.next_command()
        assert (nxt.id, nxt.sequence) == (two["commandId"], one["sequence"] + 1)
        await paired.nothing_pushed()  # once
        row = await hub.pool.fetchrow(
            "SELECT state, attempts FROM pairing_commands WHERE tenant = $1 AND command_id = $2",
            TENANT,
            nxt.id,
        )
        assert (row["state"], row["attempts"]) == ("leased", 1)
        # The submit that came second leased its own command; the ack that came
        # second found it queued and dispatched it.
        assert dispatched == [first == "submit"]
        assert (await paired.ack(nxt, "completed")).ok
        await paired.nothing_pushed()
        assert dispatched == [first == "submit", False]  # nothing later: no dispatch
    finally:
        del hub.commands.finish
    assert (await get_pairing(http, pid))["lastCommandSequence"] == nxt.sequence


async def test_a_final_ack_to_a_lease_never_accepted_is_audited_as_the_accept_too(
    hub, http, paired
):
    """A Desktop sends no accept for a command it finished at once: its final ack is
    audited as `command.accepted` then the final, in that order. One accepted on its
    own is audited once, not again by its final."""
    await _online(http, paired)

    async def actions(command_id: str) -> list[tuple[str, Any]]:
        rows = await hub.pool.fetch(
            "SELECT action, metadata FROM audit_log WHERE tenant = $1 AND command_id = $2 "
            "ORDER BY id",
            TENANT,
            command_id,
        )
        return [(r["action"], r["metadata"]) for r in rows]

    await submit(http, paired.pairing_id, "status")
    at_once = await paired.next_command()
    assert (await paired.ack(at_once, "failed")).ok
    audited = await actions(at_once.id)
    assert [a for a, _ in audited] == ["command.accepted", "command.failed"]
    implied = audited[0][1] if isinstance(audited[0][1], dict) else json.loads(audited[0][1])
    assert implied == {"outcome": "accepted", "impliedBy": "final", "sequence": at_once.sequence}
    await submit(http, paired.pairing_id, "status")
    accepted = await paired.next_command()
    assert (await paired.ack(accepted, "accepted")).ok
    assert (await paired.ack(accepted, "completed")).ok
    assert [a for a, _ in await actions(accepted.id)] == ["command.accepted", "command.completed"]
    assert (await command(http, paired.pairing_id, at_once.id))["status"] == "failed"


# --- waiting for the result ------------------------------------------------------------------
@pytest.fixture
def slow_recheck(monkeypatch):
    """A waiter's periodic read of the row every 30 s instead of 0.5 s: a waiter that
    answers within a few seconds was woken by the final, however loaded the machine."""
    monkeypatch.setattr(commands_module, "WAIT_RECHECK", 30.0)


async def test_post_with_wait_answers_with_the_result_once_it_is_final(http, paired, slow_recheck):
    await _online(http, paired)
    base = f"/api/v1/tenants/{TENANT}/pairings/{paired.pairing_id}/commands"
    waiting = asyncio.create_task(http.post(base, params={"wait": 10}, json={"kind": "status"}))
    cmd = await paired.next_command()
    await asyncio.sleep(0.2)
    assert not waiting.done()  # held until the command is final
    t0 = time.monotonic()
    assert (await paired.ack(cmd, "completed")).ok
    response = await waiting
    assert time.monotonic() - t0 < 5.0  # woken by the ack, not by a periodic read
    assert response.status_code == 201
    view = response.json()
    assert view["commandId"] == cmd.id and view["sequence"] == cmd.sequence
    assert view["state"] == "done" and view["status"] == "completed"


async def test_get_with_wait_is_woken_by_the_final_ack_or_ends_with_the_wait(http, paired):
    submitted = await submit(http, paired.pairing_id, "status")  # offline: queued
    path = f"/api/v1/tenants/{TENANT}/pairings/{paired.pairing_id}/commands/"
    path += submitted["commandId"]
    t0 = time.monotonic()
    unfinished = (await http.get(path, params={"wait": 1})).json()
    assert 0.9 < time.monotonic() - t0 < 3.0
    assert unfinished["state"] == "queued"  # the wait ran out: the command as it is
    await _online(http, paired)
    cmd = await paired.next_command()
    waiting = asyncio.create_task(http.get(path, params={"wait": 10}))
    await asyncio.sleep(0.2)
    assert (await paired.ack(cmd, "failed")).ok
    view = (await waiting).json()
    assert view["commandId"] == submitted["commandId"]
    assert view["state"] == "done" and view["status"] == "failed"
    # Already final: answered at once, with or without a wait.
    t0 = time.monotonic()
    assert (await http.get(path, params={"wait": 10})).json()["state"] == "done"
    assert time.monotonic() - t0 < 1.0
    assert (await http.get(path, params={"wait": 61})).status_code == 400


async def test_a_final_announced_by_another_replica_wakes_the_waiter(
    hub, http, paired, slow_recheck
):
    """The final ack of a command may reach another hub replica: its notice on
    FINAL_NOTICE wakes this one's waiter, which reads the row (not the notice)."""
    from hub.desktop._commands import FINAL_NOTICE

    await _online(http, paired)
    submitted = await submit(http, paired.pairing_id, "status")
    cmd = await paired.next_command()
    waiting = asyncio.create_task(hub.commands.wait_final(TENANT, paired.pairing_id, cmd.id, 10))
    await asyncio.sleep(0.1)
    # As another replica would: commit the final, then announce it (never this
    # replica's _announce_final, which would wake the waiter with the row itself).
    await hub.pool.execute(
        "UPDATE pairing_commands SET state = 'done', result_status = 'completed' "
        "WHERE tenant = $1 AND command_id = $2",
        TENANT,
        cmd.id,
    )
    t0 = time.monotonic()
    await hub.nc.publish(FINAL_NOTICE, f"{TENANT} {cmd.id}".encode())
    row = await waiting
    assert time.monotonic() - t0 < 5.0  # the notice, not the periodic read
    assert row["command_id"] == submitted["commandId"] and row["state"] == "done"
    assert not hub.commands._waiters  # nothing left registered


async def test_a_waiter_cancelled_as_its_final_lands_ends_at_once(hub, http, paired):
    """A request waiting for a command is cancelled (its client left, the hub stops) in
    the very turn a final wakes it: it must end then, not read on until its deadline
    (3.11's wait_for returned the final and dropped the cancellation)."""
    await _online(http, paired)
    submitted = await submit(http, paired.pairing_id, "status")
    cmd = await paired.next_command()
    known = await hub.commands.get(TENANT, paired.pairing_id, cmd.id)
    # With the row known there is no first read: one turn parks it on its future.
    waiting = asyncio.create_task(
        hub.commands.wait_final(TENANT, paired.pairing_id, cmd.id, 30, known=known)
    )
    await asyncio.sleep(0)
    assert hub.commands._waiters.get((TENANT, cmd.id)), "parked on its future"
    hub.commands._wake(TENANT, cmd.id, None)  # another replica's notice: read the row
    waiting.cancel()  # in the same turn
    try:
        await asyncio.wait({waiting}, timeout=5)
        assert waiting.cancelled(), "the cancellation was dropped: still waiting"
        assert not hub.commands._waiters
        assert submitted["commandId"] == cmd.id
    finally:  # a waiter that dropped it must not outlive the test
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


async def test_a_final_resumes_its_waiting_request_in_the_next_loop_turn(hub, http, paired):
    """The replica that commits a final wakes its own waiters with the row, and the
    waiting request runs in the very next event-loop turn: nothing between the wake
    and the request (as `asyncio.wait_for`'s own callback was) puts it another turn
    back, behind whatever else became ready meanwhile (the ack's answer, the next
    push, the command's events)."""
    await _online(http, paired)
    await submit(http, paired.pairing_id, "status")
    cmd = await paired.next_command()
    row = dict(
        await hub.pool.fetchrow("SELECT * FROM pairing_commands WHERE command_id = $1", cmd.id)
    )
    waiting = asyncio.create_task(
        hub.commands.wait_final(TENANT, paired.pairing_id, cmd.id, 10, known=row)
    )
    await asyncio.sleep(0)  # it registers and waits (the row is known: no read)
    assert not waiting.done()
    hub.commands._wake(TENANT, cmd.id, row | {"state": "done"})  # as _announce_final does
    await asyncio.sleep(0)  # one turn
    assert waiting.done(), "the woken request did not run in the next loop turn"
    assert (await waiting)["state"] == "done"
    assert not hub.commands._waiters  # nothing left registered


# --- ack refusals ---------------------------------------------------------------------------
async def test_a_made_up_token_is_refused_and_audited(hub, http, paired):
    await _online(http, paired)
    submitted = await submit(http, paired.pairing_id, "status")
    cmd = await paired.next_command()
    reply = await paired.ack(cmd, lease_token=secrets.token_urlsafe(24))
    assert not reply.ok and reply.code == "command.stale_lease", reply
    assert reply.reason
    rows = await _rejections(hub, submitted["commandId"])
    assert len(rows) == 1
    assert rows[0]["actor_kind"] == "desktop" and rows[0]["actor_id"] == paired.pairing_id
    assert rows[0]["reason"].startswith("command.stale_lease")
    assert lease_token_absent(rows[0], cmd.lease.lease_token)
    view = await command(http, paired.pairing_id, cmd.id)
    assert view["state"] == "leased", "a refused ack changes nothing"
    assert (await paired.ack(cmd)).ok, "the real token still works"


def lease_token_absent(row: dict, token: str) -> bool:
    return token not in json.dumps(row, default=str)


async def test_an_ack_naming_another_pairing_is_refused(
    hub, http, paired, operator_nats_url, tmp_path
):
    other, store = await redeem(http, operator_nats_url, tmp_path / "other")
    await _online(http, paired)
    submitted = await submit(http, paired.pairing_id, "status")
    cmd = await paired.next_command()
    reply = await paired.ack(cmd, pairing_id=other["pairingId"])
    assert not reply.ok and reply.code == "command.wrong_pairing", reply
    rows = await _rejections(hub, submitted["commandId"])
    assert len(rows) == 1 and rows[0]["reason"].startswith("command.wrong_pairing")
    assert rows[0]["actor_id"] == paired.pairing_id, "the subject names the caller"
    assert rows[0]["metadata"]["claimedPairingId"] == other["pairingId"]
    assert (await command(http, paired.pairing_id, cmd.id))["state"] == "leased"


async def test_a_desktop_cannot_ack_another_pairings_command(
    hub, http, paired, operator_nats_url, tmp_path
):
    other, store = await redeem(http, operator_nats_url, tmp_path / "other")
    intruder = FakeDesktop(operator_nats_url, other["pairingId"], store.creds_path)
    await intruder.connect()
    try:
        await _online(http, paired)
        submitted = await submit(http, paired.pairing_id, "status")
        cmd = await paired.next_command()
        # Its own pairing id, the victim's command and live token: unknown here.
        reply = await intruder.ack(cmd)
        assert not reply.ok and reply.code == "command.unknown", reply
        rows = await _rejections(hub, submitted["commandId"])
        assert [r["actor_id"] for r in rows] == [other["pairingId"]]
        # And the server does not let it publish on the victim's ack subject at all.
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await intruder.nc.request(
                subjects.DEVICE_COMMAND_ACK.build(tenant=TENANT, device_id=paired.pairing_id),
                b"{}",
                timeout=1,
            )
        await eventually(
            lambda: any("permissions violation" in e.lower() for e in intruder.errors),
            5,
            what="a permission error",
        )
        assert (await command(http, paired.pairing_id, cmd.id))["state"] == "leased"
    finally:
        await intruder.close()


async def test_sequence_not_above_the_last_acknowledged_is_refused(hub, http, paired):
    pid = paired.pairing_id
    await _online(http, paired)
    first_id = (await submit(http, pid, "status"))["commandId"]
    first = await paired.next_command()
    assert (await paired.ack(first)).ok
    second_id = (await submit(http, pid, "status"))["commandId"]
    second = await paired.next_command()
    assert second.sequence == first.sequence + 1

    # The live lease, but the sequence of the command already acknowledged.
    reply = await paired.ack(second, sequence=first.sequence)
    assert not reply.ok and reply.code == "command.wrong_sequence", reply
    # A different final ack for the acknowledged command: it is final already.
    reply = await paired.ack(first, "failed")
    assert not reply.ok and reply.code == "command.already_final", reply
    assert (await command(http, pid, first_id))["status"] == "completed"

    # The ledger guard itself (unreachable through ordered delivery alone): with the
    # pairing's last acknowledged sequence at or above the command's, the ack is stale.
    await hub.pool.execute(
        "UPDATE pairings SET last_command_sequence = $2 WHERE tenant = $1 AND pairing_id = $3",
        TENANT,
        second.sequence,
        pid,
    )
    reply = await paired.ack(second)
    assert not reply.ok and reply.code == "command.stale_sequence", reply

    rows = await _rejections(hub, second_id)
    assert [r["reason"].split(":")[0] for r in rows] == [
        "command.wrong_sequence",
        "command.stale_sequence",
    ]
    assert [r["reason"].split(":")[0] for r in await _rejections(hub, first_id)] == [
        "command.already_final"
    ]
    assert (await command(http, pid, second_id))["state"] == "leased"


async def test_a_replayed_identical_final_ack_is_a_no_op(hub, http, paired):
    pid = paired.pairing_id
    await _online(http, paired)
    submitted = await submit(http, pid, "status")
    cmd = await paired.next_command()
    assert (await paired.ack(cmd)).ok
    before = await command(http, pid, cmd.id)
    replay = await paired.ack(cmd)
    assert replay.ok and replay.code is None, replay
    assert await command(http, pid, cmd.id) == before
    completed = await hub.pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE tenant = $1 AND command_id = $2 AND "
        "action = 'command.completed'",
        TENANT,
        submitted["commandId"],
    )
    assert completed == 1, "the replay wrote nothing"
    assert await _rejections(hub, submitted["commandId"]) == []
    # A late "accepted" for a finished command is refused, not applied.
    late = await paired.ack(cmd, "accepted")
    assert not late.ok and late.code == "command.already_final", late


async def test_copies_of_an_ack_at_two_replicas_apply_once(
    hub, http, paired, operator_nats_url, database_url_module, bus_keys
):
    """The Desktop sends an unanswered ack again (`edges.common.ask`), to any replica.
    Two copies at two replicas at once: both answered ok, one applies each ack (one
    audit row), the next command is pushed once. A replica that applies a final ack
    and freezes before pushing the next command: the copy the other replica gets is
    a no-op that pushes it."""
    from hub.bus import Caller

    pid = paired.pairing_id
    await _online(http, paired)
    ids = [(await submit(http, pid, "status"))["commandId"] for _ in range(3)]
    caller = Caller(TENANT, "desktop", pid, {}, "device.command.ack")

    def ack(cmd: DeviceCommand, outcome: str) -> CommandAck:
        result = None
        if outcome == "completed":
            result = CommandResult(ok=True, status="completed", message=f"done {cmd.id}")
        return CommandAck(
            command_id=cmd.id,
            pairing_id=pid,
            sequence=cmd.sequence,
            lease_token=cmd.lease.lease_token,
            outcome=outcome,
            result=result,
        )

    async with running_hub(
        operator_nats_url, database_url_module, keys=bus_keys, command_lease_seconds=LEASE
    ) as other:
        first = await paired.next_command()
        for outcome in ("accepted", "completed"):
            answers = await asyncio.gather(
                hub.commands._ack(caller, ack(first, outcome)),
                other.commands._ack(caller, ack(first, outcome)),
            )
            assert all(a.reply.ok for a in answers), answers
            for answer in answers:
                if answer.after is not None:
                    await answer.after()
        second = await paired.next_command()
        await paired.nothing_pushed()  # once
        assert second.id == ids[1]

        applied = await hub.commands._ack(caller, ack(second, "completed"))
        assert applied.reply.ok  # and this replica freezes: its `after` never runs
        again = await other.commands._ack(caller, ack(second, "completed"))
        assert again.reply.ok and again.after is not None
        await again.after()
        third = await paired.next_command()
        assert third.id == ids[2]
        await paired.nothing_pushed()

    # ids[1] was never accepted on its own: its final implies the accept (audited once).
    for cid, expected in ((ids[0], {"command.accepted": 1}), (ids[1], {"command.accepted": 1})):
        view = await command(http, pid, cid)
        assert view["state"] == "done" and view["attempts"] == 1, view
        rows = await hub.pool.fetch(
            "SELECT action, count(*) AS n FROM audit_log WHERE tenant = $1 AND command_id = $2 "
            "AND action LIKE 'command.%' AND action <> 'command.queued' GROUP BY action",
            TENANT,
            cid,
        )
        assert {r["action"]: r["n"] for r in rows} == {**expected, "command.completed": 1}
        assert await _rejections(hub, cid) == []


async def test_unknown_command_and_missing_result(hub, http, paired):
    await _online(http, paired)
    submitted = await submit(http, paired.pairing_id, "status")
    cmd = await paired.next_command()
    unknown = await paired.ack(cmd, command_id=new_id())
    assert not unknown.ok and unknown.code == "command.unknown", unknown
    bare = await paired.ack(cmd, "completed", result=None)
    assert not bare.ok and bare.code == "command.result_missing", bare
    assert [r["reason"].split(":")[0] for r in await _rejections(hub, submitted["commandId"])] == [
        "command.result_missing"
    ]


# --- leases running out ----------------------------------------------------------------------
async def test_an_expired_lease_is_redelivered_with_a_new_token(hub, http, paired):
    pid = paired.pairing_id
    await _online(http, paired)
    submitted = await submit(http, pid, "status")
    first = await paired.next_command()
    assert (await paired.ack(first, "accepted")).ok  # then the Desktop goes silent

    again = await paired.next_command(timeout=LEASE + 3)
    assert (again.id, again.sequence) == (first.id, first.sequence)
    assert again.lease.lease_token != first.lease.lease_token
    assert again.lease.lease_expires_at > first.lease.lease_expires_at
    assert again.created_at == first.created_at and again.kind == first.kind

    stale = await paired.ack(first)  # the old token, after its lease expired
    assert not stale.ok and stale.code == "command.stale_lease", stale
    rows = await _rejections(hub, submitted["commandId"])
    assert len(rows) == 1 and rows[0]["reason"].startswith("command.stale_lease")

    assert (await paired.ack(again)).ok
    view = await command(http, pid, first.id)
    assert view["state"] == "done" and view["attempts"] == 2
    await paired.nothing_pushed(LEASE / 2)


async def test_the_current_token_after_expiry_is_refused(hub, http, paired):
    """Offline, nobody re-leases: the current token simply runs out."""
    pid = paired.pairing_id
    await _online(http, paired)
    submitted = await submit(http, pid, "status")
    cmd = await paired.next_command()
    await _online(http, paired, online=False)
    wait = (cmd.lease.lease_expires_at - datetime.now(UTC)).total_seconds() + 0.3
    await asyncio.sleep(max(wait, 0))
    await paired.nothing_pushed(0.6)  # the reaper leaves offline Desktops alone

    expired = await paired.ack(cmd)
    assert not expired.ok and expired.code == "command.lease_expired", expired
    rows = await _rejections(hub, submitted["commandId"])
    assert [r["reason"].split(":")[0] for r in rows] == ["command.lease_expired"]
    assert (await command(http, pid, cmd.id))["state"] == "leased"

    await _online(http, paired)  # back online: the same command, a new lease
    again = await paired.next_command()
    assert (again.id, again.sequence) == (cmd.id, cmd.sequence)
    assert again.lease.lease_token != cmd.lease.lease_token
    assert (await paired.ack(again)).ok
    assert (await command(http, pid, cmd.id))["status"] == "completed"


# --- pushes that were lost -------------------------------------------------------------------
# A push is core NATS: the fake taking one and never accepting it is, for the hub, a
# push that did not arrive. It goes again on the same lease, not after the lease.
def _same_lease(again: DeviceCommand, lost: DeviceCommand) -> bool:
    return (again.id, again.sequence, again.lease) == (lost.id, lost.sequence, lost.lease)


async def _finish_once(hub, http, desktop: FakeDesktop, cmd: DeviceCommand) -> None:
    assert (await desktop.ack(cmd)).ok
    view = await command(http, desktop.pairing_id, cmd.id)
    assert view["state"] == "done" and view["attempts"] == 1, view
    assert await _rejections(hub, cmd.id) == []


async def test_a_lost_push_goes_again_once_the_desktop_is_heard_from(lasting):
    hub, http, desktop = lasting
    await _online(http, desktop)
    await submit(http, desktop.pairing_id, "status")
    lost = await desktop.next_command()
    # Nothing says the Desktop could hear it now: no heartbeat since, no reconnect.
    await desktop.nothing_pushed(REPUSH_AFTER.total_seconds() + 1.0)

    heard = time.monotonic()
    await desktop.heartbeat()
    again = await desktop.next_command(timeout=3)
    print(f"re-pushed {time.monotonic() - heard:.2f} s after the heartbeat")
    assert time.monotonic() - heard < 2.0
    assert _same_lease(again, lost)

    assert (await desktop.ack(again, "accepted")).ok
    await asyncio.sleep(REPUSH_AFTER.total_seconds() + 0.1)
    await desktop.heartbeat()
    await desktop.nothing_pushed(1.0)  # accepted: it arrived, never pushed again
    await _finish_once(hub, http, desktop, again)


async def test_a_push_lost_just_before_the_desktop_came_back_goes_again_unasked(lasting):
    """The heartbeat that shows the Desktop back comes within REPUSH_AFTER of the push
    (it may have subscribed just after it): the push goes again once it is that old,
    without waiting for the next heartbeat."""
    hub, http, desktop = lasting
    await _online(http, desktop)
    await submit(http, desktop.pairing_id, "status")
    lost = await desktop.next_command()
    pushed = time.monotonic()
    await desktop.heartbeat()
    again = await desktop.next_command(timeout=4)
    waited = time.monotonic() - pushed
    print(f"re-pushed {waited:.2f} s after the push")
    assert REPUSH_AFTER.total_seconds() - 0.2 < waited < REPUSH_AFTER.total_seconds() + 2.0
    assert _same_lease(again, lost)
    await _finish_once(hub, http, desktop, again)


async def _kick(nats_url: str, keys, victim: nats.aio.client.Client) -> None:
    """Cut one client's connection at the server (a system-account KICK request)."""
    seed = _jwt.new_seed("user")
    user = keys.mint_system_user(
        _jwt.public_key(seed), name="test-kick", pub_allow=["$SYS.REQ.SERVER.*.KICK"]
    )
    nc = await nats.connect(nats_url, **_jwt.nats_auth_options(user, seed))
    try:
        server_id = victim._server_info["server_id"]
        reply = await nc.request(
            f"$SYS.REQ.SERVER.{server_id}.KICK",
            json.dumps({"cid": victim.client_id}).encode(),
            timeout=5,
        )
        assert "error" not in json.loads(reply.data), reply.data
    finally:
        await nc.close()


async def test_pushes_go_again_when_the_hubs_own_connection_is_back(lasting, bus_keys):
    """The hub's connection is cut (its node failed over, say) while the Desktop stays
    on the bus and says nothing: what the hub pushed around the cut goes again when
    its connection is back."""
    hub, http, desktop = lasting
    await _online(http, desktop)
    await submit(http, desktop.pairing_id, "status")
    lost = await desktop.next_command()
    await desktop.nothing_pushed(REPUSH_AFTER.total_seconds() + 1.0)

    reconnects = hub.nc.stats["reconnects"]
    await _kick(hub.settings.nats_url, bus_keys, hub.nc)
    await eventually(
        lambda: hub.nc.stats["reconnects"] > reconnects and hub.nc.is_connected,
        10,
        what="the hub to reconnect",
    )
    back = time.monotonic()
    again = await desktop.next_command(timeout=3)
    print(f"re-pushed {time.monotonic() - back:.2f} s after the hub reconnected")
    assert _same_lease(again, lost)
    assert desktop.nc.is_connected and desktop.errors == [], "the Desktop stayed connected"
    await _finish_once(hub, http, desktop, again)
