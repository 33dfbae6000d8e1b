"""The authorization matrix, enforced by a real nats-server in operator mode.

For each principal kind x each subject family x {own, same-tenant other
principal, other tenant}, the expected allow/deny is asserted both ways: an
allowed publish is delivered and raises no violation; a denied publish is
reported by the server as a permissions violation and is not delivered; an
allowed subscription receives, a denied one receives nothing and is reported.
"""

import asyncio
import json

import nats.js.errors
import pytest
from desktopkit import eventually
from hubkit import connect_principal, running_hub

from hub.auth._permissions import Principal
from hub.core import flushed
from schemas import CredentialScope, PrincipalKind, subjects

KINDS = ("desktop", "gateway", "channel", "viewer", "admin")

# Which targets each principal kind may reach, per family:
#   own    - only subjects naming itself (in its own tenant, its own workspaces)
#   tenant - any subject of its own tenant in that family
#   -      - nothing
# The other tenant is never reachable, by anyone.
#                             desktop   gateway   channel   viewer    admin
PUBLISH = {
    "pairing.redeem": ("-", "-", "-", "-", "-"),
    "pairing.revoke": ("own", "-", "-", "-", "-"),
    "auth.refresh": ("own", "own", "own", "-", "-"),
    "device.command": ("-", "-", "-", "-", "-"),
    "device.command_ack": ("own", "-", "-", "-", "-"),
    "device.event": ("own", "-", "-", "-", "-"),
    "presence": ("own", "own", "own", "-", "-"),
    "gateway.register": ("-", "-", "-", "-", "-"),
    "gateway.heartbeat": ("-", "own", "-", "-", "-"),
    "gateway.capabilities": ("-", "own", "-", "-", "-"),
    "gateway.sync": ("-", "own", "-", "-", "-"),
    "work.offer": ("-", "-", "-", "-", "-"),
    "work.claim": ("-", "own", "-", "-", "-"),
    "work.renew": ("-", "own", "-", "-", "-"),
    "work.output": ("-", "own", "-", "-", "-"),
    "workspace.event": ("-", "-", "-", "-", "-"),
    "channel.inbound": ("-", "-", "own", "-", "-"),
    "channel.outbound": ("-", "-", "-", "-", "-"),
    "channel.receipt": ("-", "-", "own", "-", "-"),
    "audit": ("own", "own", "own", "-", "-"),
    "deadletter": ("-", "-", "-", "-", "-"),
    "deadletter.system": ("-", "-", "-", "-", "-"),
}
SUBSCRIBE = {
    "pairing.redeem": ("-", "-", "-", "-", "-"),
    "pairing.revoke": ("-", "-", "-", "-", "-"),
    "auth.refresh": ("-", "-", "-", "-", "-"),
    "device.command": ("own", "-", "-", "-", "-"),
    "device.command_ack": ("-", "-", "-", "-", "-"),
    "device.event": ("-", "-", "-", "-", "-"),
    "presence": ("-", "-", "-", "-", "tenant"),
    "gateway.register": ("-", "-", "-", "-", "-"),
    "gateway.heartbeat": ("-", "-", "-", "-", "-"),
    "gateway.capabilities": ("-", "-", "-", "-", "-"),
    "gateway.sync": ("-", "-", "-", "-", "-"),
    "work.offer": ("-", "tenant", "-", "-", "-"),
    "work.claim": ("-", "-", "-", "-", "-"),
    "work.renew": ("-", "-", "-", "-", "-"),
    "work.output": ("-", "-", "-", "-", "-"),
    "workspace.event": ("-", "-", "-", "own", "tenant"),
    "channel.inbound": ("-", "-", "-", "-", "-"),
    "channel.outbound": ("-", "-", "-", "-", "-"),
    "channel.receipt": ("-", "-", "-", "-", "-"),
    "audit": ("-", "-", "-", "-", "tenant"),
    "deadletter": ("-", "-", "-", "-", "tenant"),
    "deadletter.system": ("-", "-", "-", "-", "-"),
}
TARGETS = ("own", "same_tenant_other", "other_tenant")
ALLOWED = {"own": {"own"}, "tenant": {"own", "same_tenant_other"}, "-": set()}

TENANT, OTHER_TENANT = "acme", "globex"
WAIT = 10.0  # upper bound for what crosses nats-server on a loaded machine
ID_PARAMS = {"principal_id", "device_id", "pairing_id", "registration_id", "instance_id"}
FIXED = {"event_kind": "session", "scope": "health", "work_kind": "prompt", "origin": "audit"}


def principal_of(kind: str) -> Principal:
    return Principal(
        PrincipalKind(kind),
        TENANT,
        f"{kind}-1",
        workspaces=("ws1",),
        scopes=frozenset(CredentialScope),
    )


def subject_for(family: subjects.SubjectFamily, principal: Principal, target: str) -> str:
    values = {}
    for param in family.params:
        if param == "tenant":
            values[param] = OTHER_TENANT if target == "other_tenant" else TENANT
        elif param == "principal_kind":
            values[param] = str(principal.kind)
        elif param in ID_PARAMS:
            values[param] = "someone-else" if target == "same_tenant_other" else principal.id
        elif param == "workspace_id":
            values[param] = "ws9" if target == "same_tenant_other" else "ws1"
        else:
            values[param] = FIXED[param]
    return family.build(**values)


def expected(table: dict, family: str, kind: str, target: str) -> bool:
    return target in ALLOWED[table[family][KINDS.index(kind)]]


def test_the_table_covers_every_family_and_never_crosses_tenants():
    assert set(PUBLISH) == set(SUBSCRIBE) == set(subjects.BY_NAME)
    for table in (PUBLISH, SUBSCRIBE):
        for family, row in table.items():
            assert len(row) == len(KINDS) and set(row) <= set(ALLOWED), family


def _mismatches(table, kind, cases, arrived, denied) -> list[str]:
    """Each case where what the server did (delivered, reported a violation) is not
    what `table` allows `kind`: allowed means delivered and no violation, denied the
    opposite."""
    verb = "pub" if table is PUBLISH else "sub"
    found = []
    for family, target, subject in cases:
        allowed = expected(table, family, kind, target)
        got, violated = arrived(family, target, subject), denied(subject)
        if allowed != got or allowed == violated:
            found.append(
                f"{kind} {verb} {target:18} {subject}: expected "
                f"{'allow' if allowed else 'deny'}, delivered={got}, violation={violated}"
            )
    return found


async def _settled(failures) -> None:
    """Assert the table holds. What is still missing (a delivery, or a violation the
    server reports) gets up to WAIT seconds on a loaded machine; a wrong delivery or a
    wrong report fails at once, as it never goes away."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while (found := failures()) and asyncio.get_running_loop().time() < deadline:
        if any(_wrong(line) for line in found):
            break
        await asyncio.sleep(0.05)
    assert found == [], "\n".join(found)


def _wrong(line: str) -> bool:
    """A failure that waiting cannot cure: a denied one delivered, or an allowed one
    reported as a violation."""
    return ("expected deny" in line and "delivered=True" in line) or (
        "expected allow" in line and "violation=True" in line
    )


@pytest.fixture(scope="module")
async def matrix_hub(operator_nats_url, database_url_module, bus_keys):
    async with running_hub(operator_nats_url, database_url_module, keys=bus_keys) as hub:
        yield hub


@pytest.mark.parametrize("kind", KINDS)
async def test_publish_matrix(matrix_hub, kind):
    principal = principal_of(kind)
    edge = await connect_principal(matrix_hub, principal)
    hub_nc = matrix_hub.nc
    cases = [(f.name, t, subject_for(f, principal, t)) for f in subjects.FAMILIES for t in TARGETS]
    received: set[str] = set()

    async def collect(msg):
        received.add(msg.data.decode())

    sub = await hub_nc.subscribe("cw.>", cb=collect)
    await flushed(hub_nc)
    try:
        for family, target, subject in cases:
            await edge.nc.publish(subject, f"{family}|{target}".encode())
        await flushed(edge.nc)

        def failures() -> list[str]:
            return _mismatches(
                PUBLISH,
                kind,
                cases,
                lambda family, target, _: f"{family}|{target}" in received,
                edge.publish_denied,
            )

        await asyncio.sleep(0.5)  # time for a wrong delivery to show
        await _settled(failures)
    finally:
        await sub.unsubscribe()
        await edge.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_subscribe_matrix(matrix_hub, kind):
    principal = principal_of(kind)
    edge = await connect_principal(matrix_hub, principal)
    cases = [(f.name, t, subject_for(f, principal, t)) for f in subjects.FAMILIES for t in TARGETS]
    received: dict[str, int] = {}
    try:
        for _, _, subject in cases:

            async def collect(msg, subject=subject):
                received[subject] = received.get(subject, 0) + 1

            await edge.nc.subscribe(subject, cb=collect)
        await flushed(edge.nc)  # the server has every SUB, and has reported the denied
        for _, _, subject in cases:
            await matrix_hub.nc.publish(subject, b"probe")
        await flushed(matrix_hub.nc)

        def failures() -> list[str]:
            return _mismatches(
                SUBSCRIBE,
                kind,
                cases,
                lambda _family, _target, subject: received.get(subject, 0) > 0,
                edge.subscribe_denied,
            )

        await asyncio.sleep(0.5)  # time for a wrong delivery to show
        await _settled(failures)
    finally:
        await edge.close()


async def test_edges_reach_only_their_own_durable_consumer(matrix_hub):
    from nats.js.api import AckPolicy, ConsumerConfig

    js = matrix_hub.js
    stream = subjects.EDGE_CONSUMERS["channel"]
    # Fresh ids: the matrix tests above left probe messages on other principals' subjects.
    mine = Principal(PrincipalKind.CHANNEL, TENANT, "chan-8", workspaces=("ws1",))
    theirs = Principal(PrincipalKind.CHANNEL, TENANT, "chan-9", workspaces=("ws1",))
    for p in (mine, theirs):
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=subjects.edge_consumer("channel", p.id),
                ack_policy=AckPolicy.EXPLICIT,
                filter_subject=subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=p.id),
            ),
        )
    await js.publish(subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=mine.id), b"out-1")
    await js.publish(
        subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=theirs.id), b"out-2"
    )
    edge = await connect_principal(matrix_hub, mine)
    try:
        edge_js = edge.nc.jetstream(timeout=2)
        own = await edge_js.pull_subscribe_bind(
            subjects.edge_consumer("channel", mine.id), stream=stream
        )
        (msg,) = await own.fetch(1, timeout=5)
        assert msg.data == b"out-1"
        await msg.ack()
        other = await edge_js.pull_subscribe_bind(
            subjects.edge_consumer("channel", theirs.id), stream=stream
        )
        with pytest.raises(Exception):
            await other.fetch(1, timeout=1)
        with pytest.raises(Exception):  # no JetStream API beyond its own consumer
            await edge_js.streams_info()
        await flushed(edge.nc)
        await eventually(
            lambda: (
                edge.publish_denied(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.channel-chan-9")
                and edge.publish_denied("$JS.API.STREAM.LIST")
            ),
            WAIT,
            what="both JetStream API publishes reported as violations",
        )
    finally:
        await edge.close()


async def test_no_instance_can_roll_up_or_purge_the_shared_sent_ledger(matrix_hub):
    """One `Nats-Rollup: all` (or a KV purge, which is a `sub` rollup) on an instance's
    own key is refused: every tenant's entries stay."""
    from channels.runtime._ledger import Sent
    from channels.runtime._sent_store import SentStore

    hub_kv = await matrix_hub.js.key_value("CW_CHANNEL_SENT")
    victim = Principal(PrincipalKind.CHANNEL, OTHER_TENANT, "chan-v", workspaces=("ws1",))
    other = await connect_principal(matrix_hub, victim)
    try:
        await SentStore(other.nc.jetstream(timeout=2), OTHER_TENANT, victim.id).put(
            "d1", Sent(parts=[["v1", "victim"]], text="victim", complete=True)
        )
    finally:
        await other.close()
    attacker = Principal(PrincipalKind.CHANNEL, TENANT, "chan-a", workspaces=("ws1",))
    edge = await connect_principal(matrix_hub, attacker)
    try:
        edge_js = edge.nc.jetstream(timeout=2)
        own = f"$KV.CW_CHANNEL_SENT.{TENANT}.chan-a.d1"
        await edge_js.publish(own, b"{}")  # a plain put of its own key is fine
        for rollup in ("all", "sub"):
            with pytest.raises(nats.js.errors.APIError):
                await edge_js.publish(
                    own, b"", headers={"Nats-Rollup": rollup, "KV-Operation": "PURGE"}
                )
        entry = await hub_kv.get(f"{OTHER_TENANT}.chan-v.d1")
        assert json.loads(entry.value)["text"] == "victim"
        assert (await hub_kv.get(f"{TENANT}.chan-a.d1")).value == b"{}"
    finally:
        await edge.close()


async def test_a_channel_instance_puts_and_gets_only_its_own_sent_ledger_keys(matrix_hub):
    """The durable sent-ledger (KV bucket CW_CHANNEL_SENT): an instance's own keys
    `<tenant>.<instance>.*` through the runtime's own store, nobody else's."""
    from nats.js.kv import KeyValue

    from channels.runtime._ledger import Sent
    from channels.runtime._sent_store import SentStore

    hub_kv = await matrix_hub.js.key_value("CW_CHANNEL_SENT")  # the hub reads, never writes
    theirs = Principal(PrincipalKind.CHANNEL, TENANT, "chan-7", workspaces=("ws1",))
    other = await connect_principal(matrix_hub, theirs)
    try:
        await SentStore(other.nc.jetstream(timeout=2), TENANT, theirs.id).put(
            "d1", Sent(parts=[["t1", "theirs"]], text="theirs", complete=True)
        )
    finally:
        await other.close()
    theirs_before = (await hub_kv.get(f"{TENANT}.chan-7.d1")).value
    assert json.loads(theirs_before)["text"] == "theirs"
    mine = Principal(PrincipalKind.CHANNEL, TENANT, "chan-6", workspaces=("ws1",))
    edge = await connect_principal(matrix_hub, mine)
    try:
        edge_js = edge.nc.jetstream(timeout=1)
        store = SentStore(edge_js, TENANT, mine.id, timeout=1.0)
        await store.put("d1", Sent(parts=[["m1", "hi"]], text="hi", complete=True))
        record = await store.get("d1")
        assert record is not None and record.provider_message_ids == ["m1"]
        assert record.parts == [("m1", "hi")] and record.text == "hi" and record.complete
        assert await store.get("never-sent") is None  # a miss is an answer, not an outage
        assert json.loads((await hub_kv.get(f"{TENANT}.chan-6.d1")).value)["text"] == "hi"

        raw = KeyValue(
            name="CW_CHANNEL_SENT",
            stream="KV_CW_CHANNEL_SENT",
            pre="$KV.CW_CHANNEL_SENT.",
            js=edge_js,
            direct=True,
        )
        for key in (f"{TENANT}.chan-7.d1", f"{OTHER_TENANT}.chan-6.d1"):
            with pytest.raises(Exception):
                await raw.put(key, b"forged")
            with pytest.raises(Exception):
                await raw.get(key)
        with pytest.raises(Exception):  # no stream info, no listing, no watching
            await edge_js.key_value("CW_CHANNEL_SENT")
        await flushed(edge.nc)  # every -ERR comes before the last PONG (hub.core._flush)
        for key in (f"{TENANT}.chan-7.d1", f"{OTHER_TENANT}.chan-6.d1"):
            assert edge.publish_denied(f"$KV.CW_CHANNEL_SENT.{key}")
            assert edge.publish_denied(
                f"$JS.API.DIRECT.GET.KV_CW_CHANNEL_SENT.$KV.CW_CHANNEL_SENT.{key}"
            )
        assert edge.publish_denied("$JS.API.STREAM.INFO.KV_CW_CHANNEL_SENT")
        assert (await hub_kv.get(f"{TENANT}.chan-7.d1")).value == theirs_before
        assert edge.errors == [] or all("violation" in e.lower() for e in edge.errors)
    finally:
        await edge.close()
