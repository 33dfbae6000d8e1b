"""Poison input: what PostgreSQL cannot store never wedges a consumer, never costs
another message (or another tenant) anything, and never becomes a 500.

Real hub, operator-mode NATS and PostgreSQL. A Desktop's events are published
with its own credential (from a real redemption), as a modified Desktop would.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass

import nats
import pytest
from desktopkit import TENANT, create_pairing, desktop_event, events, eventually, redeem

from hub.core import streams
from hub.core._deadletter import GIVE_UP_AFTER, DeadLetters, StorageAway
from hub.core._metrics import HubMetrics
from hub.core._streams import declare
from schemas import AuditRecord, Envelope, Source, subjects
from schemas._storable import storable_text, unstorable, unstorable_json

pytestmark = pytest.mark.timeout(120)

LOG = logging.getLogger("tests.poison")
EMOJI_LABEL = "😀" * 200  # 200 characters, 800 bytes: the columns check 512 bytes
GATEWAY = {"kind": "edge_worker", "trustModel": "self_hosted_same_operator"}


# --- the contract ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, bad",
    [
        (rb'{"a": "x\u0000y"}', True),
        (rb'{"a": {"b": [1, {"c": "\u0000"}]}}', True),
        (rb'{"\u0000": 1}', True),
        (rb'{"a": "\\u0000"}', False),  # an escaped backslash: the text "\u0000", storable
        (rb'{"a": "\\\u0000"}', True),  # a backslash, then a NUL
        (rb'{"a": "\u00e9\ud83d\ude00"}', False),
    ],
)
def test_the_contract_finds_nul_at_any_depth(raw, bad):
    assert (unstorable_json(raw) is not None) is bad


def test_lone_surrogates_and_nul_in_python_values():
    assert "a.1.b" in unstorable({"a": [1, {"b": "x\ud800"}]})
    assert unstorable({"a": ["fine", "é😀"]}) is None
    assert storable_text("a\x00b\udc00c😀") == "a\ufffdb\ufffdc😀"


# --- the admin API: 422 with the reason, never a 500 -----------------------------------------
@pytest.mark.parametrize(
    "path, body, where",
    [
        ("pairings", {"label": "bad\u0000label"}, "label"),
        ("pairings", {"label": EMOJI_LABEL}, "label"),
        (
            "work",
            {
                "kind": "prompt",
                "sessionRef": {"workspaceId": "ws1"},
                "payload": {"text": "hi", "deep": {"x": ["\u0000"]}},
            },
            "payload.deep.x.0",
        ),
        ("gateway-registrations", {"displayName": EMOJI_LABEL, **GATEWAY}, "displayName"),
        ("gateway-registrations", {"displayName": "g\u0000", **GATEWAY}, "displayName"),
    ],
)
async def test_unstorable_admin_input_is_a_422_with_where(http, path, body, where):
    response = await http.post(f"/api/v1/tenants/{TENANT}/{path}", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and where in error["message"], error


async def test_an_unstorable_label_patch_is_refused_and_changes_nothing(http):
    pid = (await create_pairing(http))["pairingId"]
    for label in ("x\u0000", EMOJI_LABEL):
        response = await http.patch(
            f"/api/v1/tenants/{TENANT}/pairings/{pid}", json={"label": label}
        )
        assert response.status_code == 422 and "label" in response.json()["error"]["message"]
    assert (await http.get(f"/api/v1/tenants/{TENANT}/pairings/{pid}")).json()[
        "label"
    ] == "test laptop"
    for title in ("t\u0000", EMOJI_LABEL):  # a command's payload (a session title)
        response = await http.post(
            f"/api/v1/tenants/{TENANT}/pairings/{pid}/commands",
            json={"kind": "create_session", "payload": {"title": title}},
        )
        assert response.status_code == 422 and "title" in response.json()["error"]["message"], (
            response.text
        )


# --- the projector ---------------------------------------------------------------------------
async def _desktop(http, operator_nats_url, tmp_path):
    created, store = await redeem(
        http, operator_nats_url, tmp_path / "d", allowedWorkspaceIds=["ws1"]
    )
    pairing = store.load_pairing()
    nc = await nats.connect(
        operator_nats_url,
        user_credentials=str(store.creds_path),
        inbox_prefix=subjects.inbox_prefix(TENANT, "desktop", pairing.pairing_id),
    )
    return pairing.pairing_id, nc


async def _letter_about(dead, pid: str) -> dict:
    """The first dead letter whose original subject names this pairing."""
    while True:
        letter = json.loads((await dead.next_msg(timeout=5)).data)["data"]
        if f".{pid}." in letter["originalSubject"]:
            return letter


def _event(pid: str, payload: dict) -> bytes:
    return desktop_event(pid, payload)[1]


async def test_a_nul_event_is_dead_lettered_and_the_desktop_keeps_projecting(
    hub, http, operator_nats_url, tmp_path
):
    pid, nc = await _desktop(http, operator_nats_url, tmp_path)
    dead = await hub.js.subscribe(
        subjects.dead_letter_subject(TENANT, subjects.DEVICE_EVENT), ordered_consumer=True
    )
    try:
        js = nc.jetstream()
        subject = subjects.DEVICE_EVENT.build(tenant=TENANT, device_id=pid, event_kind="session")
        for i in range(20):  # a flood of poison, then one honest event
            await js.publish(subject, _event(pid, {"type": "tool", "output": f"bin\u0000{i}"}))
        await js.publish(subject, _event(pid, {"type": "after", "text": "fine"}))

        items = await eventually(lambda: _types(http, pid), timeout=5, what="the honest event")
        assert items == ["after"]
        letter = await _letter_about(dead, pid)  # the tenant's stream is shared by tests
        assert letter["code"] == "contract.unstorable_text"
        assert "payload.output" in letter["reason"] and "NUL" in letter["reason"]
        for spec in streams.hub_consumers(hub.settings.event_partitions):
            if spec.stream == "CW_DEVICE_EVENTS":  # every projector consumer: nothing to retry
                info = await hub.js.consumer_info(spec.stream, spec.durable)
                assert info.num_ack_pending == 0 and info.num_pending == 0, spec.durable
    finally:
        await dead.unsubscribe()
        await nc.close()


async def _types(http, pid: str) -> list[str]:
    return [e["payload"].get("type") for e in await events(http, pid)]


# --- audit: a poison record costs only itself --------------------------------------------------
def _audit(tenant: str, pid: str, **fields) -> bytes:
    record = AuditRecord(action="pairing.connected", actor_kind="desktop", actor_id=pid, **fields)
    return Envelope.wrap(
        record, source=Source(principal_kind="desktop", principal_id=pid), tenant=tenant
    ).encode()


async def test_a_poison_audit_record_never_takes_other_tenants_records_with_it(hub, http):
    js = hub.js
    tenants = [f"aud{uuid.uuid4().hex[:8]}" for _ in range(3)]
    dead = await js.subscribe(
        subjects.dead_letter_subject(tenants[0], subjects.AUDIT), ordered_consumer=True
    )
    try:
        for tenant in tenants:  # in one fetch batch: the poison one first
            if tenant == tenants[0]:
                await js.publish(
                    subjects.AUDIT.build(
                        tenant=tenant, principal_kind="desktop", principal_id="p1"
                    ),
                    _audit(tenant, "p1", reason="a\u0000b"),
                )
            await js.publish(
                subjects.AUDIT.build(tenant=tenant, principal_kind="desktop", principal_id="p1"),
                _audit(tenant, "p1", reason="honest"),
            )

        async def stored() -> bool:
            for tenant in tenants:
                rows = (await http.get(f"/api/v1/tenants/{tenant}/audit")).json()["items"]
                if [r["reason"] for r in rows] != ["honest"]:
                    return False
            return True

        await eventually(stored, timeout=5, what="every tenant's honest record")
        letter = json.loads((await dead.next_msg(timeout=5)).data)["data"]
        assert letter["code"] == "contract.unstorable_text" and "reason" in letter["reason"]
    finally:
        await dead.unsubscribe()


# --- the write fallback itself, against a real table and a real consumer ----------------------
@dataclass
class Scratch:
    name: str
    js: object
    pool: object
    dead: DeadLetters

    @property
    def subjects(self) -> str:
        return f"scratch.{self.name}.>"


@pytest.fixture
async def scratch(hub, nats_url):
    """A stream and consumer of their own (on the plain test server, where the bus
    streams are declared as the hub declares them), a table, and the hub's
    dead-letter writer on that bus."""
    name = f"scratch_{uuid.uuid4().hex[:8]}"
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await declare(js)
    await js.add_stream(name=name.upper(), subjects=[f"scratch.{name}.>"])
    await hub.pool.execute(f"CREATE TABLE {name} (v text NOT NULL)")
    try:
        yield Scratch(name, js, hub.pool, DeadLetters(js, HubMetrics(), "hub-test"))
    finally:
        await js.delete_stream(name.upper())
        await hub.pool.execute(f"DROP TABLE {name}")
        await nc.close()


async def _letter(dead, name: str) -> dict:
    """The next dead letter of this test's scratch subjects (the system queue is shared)."""
    while True:
        letter = json.loads((await dead.next_msg(timeout=5)).data)["data"]
        if letter["originalSubject"].startswith(f"scratch.{name}."):
            return letter


async def _consumer(scratch: Scratch, max_deliver: int = -1):
    return await scratch.js.pull_subscribe(
        scratch.subjects,
        durable=f"c{scratch.name}",
        stream=scratch.name.upper(),
        config=nats.js.api.ConsumerConfig(max_deliver=max_deliver, ack_wait=30),
    )


async def test_a_batch_the_database_refuses_is_retried_one_by_one(scratch):
    name = scratch.name
    for value in ["one", "two\x00", "three"]:  # the driver sends the NUL; PostgreSQL refuses it
        await scratch.js.publish(f"scratch.{name}.p1", value.encode())
    dead = await scratch.js.subscribe(
        subjects.dead_letter_subject(None, subjects.AUDIT), ordered_consumer=True
    )
    sub = await _consumer(scratch)
    msgs = await sub.fetch(3, timeout=5)

    async def write(batch: list[str]) -> int:
        async with scratch.pool.acquire() as conn, conn.transaction():
            await conn.executemany(f"INSERT INTO {name} VALUES ($1)", [(v,) for v in batch])
        return len(batch)

    written = await scratch.dead.write_batch(
        subjects.AUDIT, -1, [(m, m.data.decode()) for m in msgs], write, LOG, delay=0.1
    )
    assert [len(done) for done, _ in written] == [1, 1]
    for done, _ in written:
        for msg in done:
            await msg.ack()
    assert sorted(r["v"] for r in await scratch.pool.fetch(f"SELECT v FROM {name}")) == [
        "one",
        "three",
    ]
    letter = await _letter(dead, name)
    assert letter["code"] == "storage.refused" and letter["originalPayload"] == "two\x00"
    with pytest.raises(nats.errors.TimeoutError):  # the poison was acked with its letter
        await sub.fetch(1, timeout=0.5)
    await dead.unsubscribe()


@pytest.mark.parametrize(
    "max_deliver, error, letters_after",
    [
        (3, ConnectionResetError("database away"), 3),  # transient: on the last delivery
        (-1, RuntimeError("a bug"), GIVE_UP_AFTER),  # neither data nor transient: gives up
    ],
)
async def test_a_failing_write_is_dead_lettered_never_dropped(
    scratch, max_deliver, error, letters_after
):
    name = scratch.name
    await scratch.js.publish(f"scratch.{name}.p1", b"innocent")
    dead = await scratch.js.subscribe(
        subjects.dead_letter_subject(None, subjects.AUDIT), ordered_consumer=True
    )
    sub = await _consumer(scratch, max_deliver)

    async def write(batch):
        raise error

    for attempt in range(1, letters_after + 1):
        (msg,) = await sub.fetch(1, timeout=5)
        assert msg.metadata.num_delivered == attempt
        assert (
            await scratch.dead.write_batch(
                subjects.AUDIT, max_deliver, [(msg, None)], write, LOG, delay=0.05
            )
            == []
        )
    letter = await _letter(dead, name)
    assert letter["code"] == "storage.failed" and letter["attempts"] == letters_after
    assert letter["originalPayload"] == "innocent" and str(error) in letter["reason"]
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(1, timeout=0.5)
    await dead.unsubscribe()


async def test_an_ordered_write_that_fails_by_surprise_is_held_then_set_aside_never_naked(
    scratch,
):
    """With `hold` (the projector: order matters), a failure that is neither a data
    error nor transient holds the batch GIVE_UP_AFTER times, then the item that still
    fails is dead-lettered, never naked: a nak would bring it back behind newer ones."""
    name = scratch.name
    for value in (b"first", b"second"):
        await scratch.js.publish(f"scratch.{name}.p1", value)
    dead = await scratch.js.subscribe(
        subjects.dead_letter_subject(None, subjects.AUDIT), ordered_consumer=True
    )
    sub = await _consumer(scratch)
    msgs = await sub.fetch(2, timeout=5)
    items = [(m, m.data.decode()) for m in msgs]

    async def write(batch: list[str]) -> int:
        if "first" in batch:
            raise RuntimeError("a surprise")
        return len(batch)

    for _ in range(GIVE_UP_AFTER - 1):
        with pytest.raises(StorageAway):
            await scratch.dead.write_batch(
                subjects.AUDIT, -1, items, write, LOG, delay=0.05, hold=True
            )
    written = await scratch.dead.write_batch(
        subjects.AUDIT, -1, items, write, LOG, delay=0.05, hold=True
    )
    assert [[m.data for m in done] for done, _ in written] == [[b"second"]]
    letter = await _letter(dead, name)
    assert letter["code"] == "storage.failed" and letter["originalPayload"] == "first"
    await written[0][0][0].ack()
    with pytest.raises(nats.errors.TimeoutError):  # nothing comes back: not naked
        await sub.fetch(1, timeout=1.0)
    await dead.unsubscribe()
