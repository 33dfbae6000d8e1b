"""The Gateway appliance's leaf node and outbox, against real nats-servers.

Cloud here is an operator-mode (JWT) nats-server that also listens for leaf
nodes, with a real hub on it. The Gateway's own nats-server (GatewayLeafServer)
dials out to it with the Gateway's `.creds`, in its own JetStream domain. The
store-and-forward test stops Cloud, keeps appending outputs on the appliance,
restarts Cloud on the same port and store, and checks every output reaches the
Cloud side once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import nats
import nats.errors
import pytest
from gatewaykit import issue_gateway_credential

from edges import EdgeCredentials
from edges.gateway._leaf import GatewayLeafServer, cloud_leaf_urls, gateway_domain
from edges.gateway._outbox import (
    LOCAL_PREFIX,
    JetStreamOutbox,
    MemoryOutbox,
    OutboxError,
    forward,
)
from edges.local import EmbeddedError, NatsServer, free_port, nats_server_binary
from hub.auth import _jwt
from hub.auth._permissions import HUB_PERMISSIONS, Principal, permissions_for
from hub.core import flushed
from schemas import (
    AckReply,
    CredentialScope,
    Envelope,
    PrincipalKind,
    Source,
    WorkClaimReply,
    WorkClaimRequest,
    WorkOutput,
    decode,
    subjects,
)

pytestmark = pytest.mark.timeout(180)

TENANT = "acme"
TOKEN = "t" * 32


def output(seq: int, work_id: str = "work1", **body: object) -> WorkOutput:
    return WorkOutput(
        work_id=work_id, lease_token=TOKEN, kind="event", sequence=seq, body={"n": seq, **body}
    )


async def wait_for(check, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------
# MemoryOutbox
# --------------------------------------------------------------------------


async def test_memory_outbox_order_and_done():
    box = MemoryOutbox(max_items=10)
    for n in range(1, 4):
        await box.append(output(n))
    items = box.pending().__aiter__()
    first = await items.__anext__()
    assert first.output.sequence == 1
    # No done(): the same output again, so a retrying forwarder cannot reorder.
    assert (await items.__anext__()) is first
    await first.done()
    await first.done()  # idempotent: removes one output only
    second = await items.__anext__()
    assert second.output.sequence == 2 and len(box) == 2
    await second.done()
    third = await items.__anext__()
    await third.done()
    assert len(box) == 0
    waiting = asyncio.ensure_future(items.__anext__())
    await asyncio.sleep(0.05)
    assert not waiting.done()  # blocks until an append
    await box.append(output(4))
    assert (await asyncio.wait_for(waiting, 2)).output.sequence == 4
    await items.aclose()


async def test_memory_outbox_is_bounded():
    box = MemoryOutbox(max_items=2)
    await box.append(output(1))
    await box.append(output(2))
    blocked = asyncio.ensure_future(box.append(output(3)))
    await asyncio.sleep(0.05)
    assert not blocked.done() and len(box) == 2  # back-pressure, nothing dropped
    items = box.pending().__aiter__()
    await (await items.__anext__()).done()
    await asyncio.wait_for(blocked, 2)
    assert [o.sequence for o in box._items] == [2, 3]
    await items.aclose()
    with pytest.raises(ValueError):
        MemoryOutbox(max_items=0)


async def test_forward_retries_in_order_and_drops_refused():
    box = MemoryOutbox()
    for n in range(1, 6):
        await box.append(output(n))
    sent: list[int] = []
    fail_next = {2: 2}  # Cloud unreachable twice while sending #2

    async def send(out: WorkOutput) -> bool:
        sent.append(out.sequence)
        if fail_next.get(out.sequence, 0) > 0:
            fail_next[out.sequence] -= 1
            if out.sequence == 2 and fail_next[2] == 1:
                raise nats.errors.NoRespondersError
            return False
        return True  # accepted or refused for good: leaves the outbox

    task = asyncio.create_task(forward(box, send, max_backoff=0.05))
    try:
        await wait_for(lambda: _true(len(box) == 0), 5, "outbox drained")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sent == [1, 2, 2, 2, 3, 4, 5]


async def test_forward_says_an_outage_once_and_its_end_once(caplog):
    """Cloud away for many attempts: one info line when sending starts failing, one
    when it works again; the repeats only at debug."""
    import logging

    caplog.set_level(logging.DEBUG, logger="cowork.edges.gateway_outbox")
    box = MemoryOutbox()
    await box.append(output(1))
    failures = {"left": 8}

    async def send(out: WorkOutput) -> bool:
        if failures["left"]:
            failures["left"] -= 1
            raise nats.errors.NoRespondersError
        return True

    task = asyncio.create_task(forward(box, send, max_backoff=0.01))
    try:
        await wait_for(lambda: _true(len(box) == 0), 5, "outbox drained")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    info = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len([m for m in info if "outbox_send_retry" in m]) == 1, info
    assert [m for m in info if "working again" in m] == [
        "gateway.outbox_send: working again after 8 failed attempts"
    ], info


async def _true(value: bool) -> bool:
    return value


# --------------------------------------------------------------------------
# Cloud (operator mode + leaf-node listener) and a hub on it
# --------------------------------------------------------------------------


class Cloud:
    """Cloud's nats-server: fixed ports and store, so a restart is the same server."""

    def __init__(self, root: Path, keys) -> None:
        self.leaf_port = free_port()
        leaf = f'leafnodes {{\n  listen: "127.0.0.1:{self.leaf_port}"\n}}\n'
        self.server = NatsServer(
            store_dir=root / "cloud-nats",
            port=free_port(),
            server_name="cloud",
            extra_config=keys.server_config(root / "resolver") + leaf,
        )

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def leaf_urls(self) -> list[str]:
        return cloud_leaf_urls([self.url], self.leaf_port)


@pytest.fixture(scope="module")
async def cloud(tmp_path_factory, bus_keys):
    c = Cloud(tmp_path_factory.mktemp("cloud"), bus_keys)
    await c.server.start()
    try:
        yield c
    finally:
        await c.server.stop()


def mint_gateway_creds(keys, directory: Path, registration_id: str) -> Path:
    """A Gateway credential minted from the operator keys with the Gateway's real
    permissions (what the hub's CredentialService issues), as a .creds file. The
    transport tests use it so no hub answers on the Gateway's subjects."""
    seed = _jwt.new_seed("user")
    perms = permissions_for(
        Principal(PrincipalKind.GATEWAY, TENANT, registration_id, scopes=frozenset(CredentialScope))
    )
    user_jwt, _ = keys.mint_user(
        _jwt.public_key(seed),
        name=f"gateway:{TENANT}:{registration_id}",
        pub_allow=list(perms.pub_allow),
        sub_allow=list(perms.sub_allow),
        ttl_seconds=3600,
    )
    path = directory / "gateway.creds"
    EdgeCredentials(user_jwt, seed).write_creds_file(path)
    return path


async def issued_gateway_creds(
    hub, directory: Path, registration_id: str, scopes: list[str]
) -> Path:
    """The Gateway's NATS credential issued by the hub, written as a .creds file."""
    jwt, seed = await issue_gateway_credential(hub, TENANT, registration_id, scopes)
    path = directory / "gateway.creds"
    EdgeCredentials(jwt, seed).write_creds_file(path)
    return path


class Appliance:
    def __init__(self, leaf: GatewayLeafServer, registration_id: str) -> None:
        self.leaf = leaf
        self.registration_id = registration_id

    async def connect(self) -> nats.aio.client.Client:
        inbox = subjects.inbox_prefix(TENANT, "gateway", self.registration_id)
        return await nats.connect(
            self.leaf.url,
            inbox_prefix=inbox,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
        )


@pytest.fixture(scope="module")
async def appliance(tmp_path_factory, cloud, bus_keys):
    root = tmp_path_factory.mktemp("appliance")
    reg = "reg" + secrets.token_hex(4)
    creds = mint_gateway_creds(bus_keys, root, reg)
    leaf = GatewayLeafServer(
        store_dir=root / "nats",
        cloud_urls=cloud.leaf_urls,
        credentials=creds,
        domain=gateway_domain(reg),
        port=free_port(),
        monitor_port=free_port(),
    )
    await leaf.start()
    assert await leaf.wait_linked(10), "the leaf did not connect to Cloud"
    try:
        yield Appliance(leaf, reg)
    finally:
        await leaf.stop()


@contextlib.asynccontextmanager
async def cloud_client(cloud, keys, *, permissions=HUB_PERMISSIONS, inbox="_INBOX.hub"):
    """A Cloud-side connection minted from the operator keys (hub rights unless given)."""
    seed = _jwt.new_seed("user")
    user_jwt, _ = keys.mint_user(
        _jwt.public_key(seed),
        name="test:cloud-side",
        pub_allow=list(permissions.pub_allow),
        sub_allow=list(permissions.sub_allow),
        allow_responses=permissions.allow_responses or None,
        ttl_seconds=3600,
    )
    nc = await nats.connect(
        cloud.url,
        inbox_prefix=inbox,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        **_jwt.nats_auth_options(user_jwt, seed),
    )
    try:
        yield nc
    finally:
        await nc.close()


async def leaf_linked(appliance: Appliance, cloud_nc, subject: str) -> None:
    """Wait until a request from the appliance crosses the leaf and is answered."""
    nc = await appliance.connect()
    try:

        async def answered() -> bool:
            try:
                await nc.request(subject, b"{}", timeout=0.5)
                return True
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                return False

        await wait_for(answered, 20, f"a reply across the leaf on {subject}")
    finally:
        await nc.close()


# --------------------------------------------------------------------------
# The leaf node: authentication, routing, permissions, domains
# --------------------------------------------------------------------------


async def test_leaf_dials_out_with_gateway_creds_and_request_reply_crosses(
    appliance, cloud, bus_keys
):
    reg = appliance.registration_id
    subject = subjects.WORK_CLAIM.build(tenant=TENANT, registration_id=reg)
    async with cloud_client(cloud, bus_keys) as hub_side:

        async def ok(msg):
            await msg.respond(b"claimed")

        sub = await hub_side.subscribe(subject, cb=ok)
        await leaf_linked(appliance, hub_side, subject)
        nc = await appliance.connect()
        try:
            # The reply comes back to the Gateway's private inbox across the leaf.
            reply = await nc.request(subject, b"{}", timeout=2)
            assert reply.data == b"claimed"
            assert reply.subject.startswith(f"_INBOX.{TENANT}.gateway.{reg}.")
        finally:
            await nc.close()
            await sub.unsubscribe()


async def test_offers_reach_the_leaf(appliance, cloud, bus_keys):
    offers: list[bytes] = []
    nc = await appliance.connect()
    try:

        async def on_offer(msg):
            offers.append(msg.data)

        await nc.subscribe(subjects.WORK_OFFER.filter(tenant=TENANT), cb=on_offer)
        await flushed(nc)
        offer = subjects.WORK_OFFER.build(tenant=TENANT, work_kind="prompt")
        async with cloud_client(cloud, bus_keys) as hub_side:

            async def arrived() -> bool:
                await hub_side.publish(offer, b"nudge")
                await hub_side.flush()
                await asyncio.sleep(0.1)
                return bool(offers)

            await wait_for(arrived, 10, "an offer on the leaf")
    finally:
        await nc.close()
    assert set(offers) == {b"nudge"}


async def test_leaf_forwards_only_what_the_gateway_may_send(appliance, cloud, bus_keys):
    """Local-only subjects and other Gateways' subjects never reach Cloud."""
    from hub.auth._permissions import Permissions

    spy_rights = Permissions(pub_allow=(), sub_allow=(">",))
    other = subjects.WORK_OUTPUT.build(tenant=TENANT, registration_id="someone-else")
    own = subjects.GATEWAY_HEARTBEAT.build(tenant=TENANT, registration_id=appliance.registration_id)
    seen: list[str] = []
    async with cloud_client(cloud, bus_keys, permissions=spy_rights, inbox="_INBOX.spy") as spy:

        async def record(msg):
            seen.append(msg.subject)

        for subject in (f"{LOCAL_PREFIX}.>", "cw.>"):
            await spy.subscribe(subject, cb=record)
        await flushed(spy)
        nc = await appliance.connect()
        try:

            async def own_arrived() -> bool:
                await nc.publish(own, b"beat")
                await nc.publish(f"{LOCAL_PREFIX}.work1", b"private")
                await nc.publish(other, b"impersonation")
                await nc.flush()
                await asyncio.sleep(0.1)
                return own in seen

            await wait_for(own_arrived, 10, "the Gateway's own heartbeat subject at Cloud")
        finally:
            await nc.close()
    assert not [s for s in seen if s.startswith(LOCAL_PREFIX)]
    assert other not in seen


async def test_local_jetstream_has_its_own_domain(appliance, cloud, bus_keys):
    from nats.js.api import StreamConfig

    async with cloud_client(cloud, bus_keys) as hub_side:
        cloud_js = hub_side.jetstream()
        await cloud_js.add_stream(StreamConfig(name="CLOUD_ONLY", subjects=["cw.acme.test.>"]))
        nc = await appliance.connect()
        try:
            info = await nc.jetstream(domain=appliance.leaf.domain).account_info()
            assert info.domain == gateway_domain(appliance.registration_id)
            # The local, domain-less API is the leaf's own JetStream, not Cloud's.
            local = nc.jetstream()
            assert (await local.account_info()).domain == appliance.leaf.domain
            box = await fresh_outbox(nc, appliance)
            local_names = [s.config.name async for s in _streams(local)]
            assert box.stream in local_names and "CLOUD_ONLY" not in local_names
        finally:
            await nc.close()
        cloud_names = [s.config.name async for s in _streams(cloud_js)]
        assert "CLOUD_ONLY" in cloud_names and box.stream not in cloud_names


async def _streams(js):
    for info in await js.streams_info():
        yield info


def test_leaf_config_refuses_non_loopback_and_bad_domains(tmp_path):
    creds = tmp_path / "x.creds"
    with pytest.raises(EmbeddedError, match="loopback"):
        GatewayLeafServer(
            store_dir=tmp_path,
            cloud_urls=["nats-leaf://h:7422"],
            credentials=creds,
            domain="gw-x",
            host="0.0.0.0",
        )
    with pytest.raises(EmbeddedError, match="domain"):
        GatewayLeafServer(
            store_dir=tmp_path, cloud_urls=["nats-leaf://h:7422"], credentials=creds, domain="gw.x"
        )
    with pytest.raises(EmbeddedError, match="belongs to Cloud"):
        GatewayLeafServer(
            store_dir=tmp_path, cloud_urls=["nats-leaf://h:7422"], credentials=creds, domain="hub"
        )
    with pytest.raises(EmbeddedError, match="must not carry credentials"):
        GatewayLeafServer(
            store_dir=tmp_path,
            cloud_urls=["nats-leaf://u:p@h:7422"],
            credentials=creds,
            domain="gw-x",
        )
    assert cloud_leaf_urls(["nats://hub.example.com:4222", "tls://[::1]:4222"]) == [
        "nats-leaf://hub.example.com:7422",
        "tls://[::1]:7422",
    ]


async def test_leaf_start_needs_the_credentials(tmp_path):
    leaf = GatewayLeafServer(
        store_dir=tmp_path,
        cloud_urls=["nats-leaf://127.0.0.1:1"],
        credentials=tmp_path / "missing.creds",
        domain="gw-x",
        port=0,
    )
    with pytest.raises(EmbeddedError, match="cowork gateway register"):
        await leaf.start()
    assert not leaf.running


# --------------------------------------------------------------------------
# JetStreamOutbox on the leaf's JetStream
# --------------------------------------------------------------------------


async def fresh_outbox(nc, appliance: Appliance) -> JetStreamOutbox:
    stream = "OUTBOX_" + secrets.token_hex(4).upper()
    # One test, one stream and subject space (work-queue streams may not overlap).
    box = JetStreamOutbox.on(
        nc, appliance.leaf.domain, stream=stream, subject_prefix=f"{LOCAL_PREFIX}.{stream.lower()}"
    )
    await box.ensure()
    return box


async def test_jetstream_outbox_order_ack_and_dedupe(appliance):
    nc = await appliance.connect()
    try:
        box = await fresh_outbox(nc, appliance)
        await box.ensure()  # idempotent
        for n in range(1, 6):
            await box.append(output(n, work_id=f"w{n % 2}"))
        await box.append(output(3, work_id="w1"))  # a retried append: stored once
        assert await box.count() == 5
        items = box.pending().__aiter__()
        got = []
        for _ in range(2):
            item = await items.__anext__()
            assert (await items.__anext__()) is item  # not done: the same again
            got.append(item.output.sequence)
            await item.done()
        assert got == [1, 2] and await box.count() == 3
        await items.aclose()
        # A corrupt entry (never written by append) is dropped, not retried forever.
        await nc.jetstream(domain=appliance.leaf.domain).publish(
            f"{box.subject_prefix}.w9", b"not json", stream=box.stream
        )
        await box.append(output(6, work_id="w0"))
        items = box.pending().__aiter__()
        rest = []
        for _ in range(4):
            item = await items.__anext__()
            rest.append(item.output.sequence)
            await item.done()
        await items.aclose()
        assert rest == [3, 4, 5, 6] and await box.count() == 0
    finally:
        await nc.close()


async def test_jetstream_outbox_refuses_oversize(appliance):
    nc = await appliance.connect()
    try:
        box = await fresh_outbox(nc, appliance)
        with pytest.raises(OutboxError, match="exceeds"):
            await box.append(output(1, blob="x" * (1024 * 1024)))
        assert await box.count() == 0
    finally:
        await nc.close()


async def test_jetstream_outbox_survives_process_and_server_restart(appliance):
    nc = await appliance.connect()
    box = await fresh_outbox(nc, appliance)
    for n in range(1, 5):
        await box.append(output(n))
    items = box.pending().__aiter__()
    first = await items.__anext__()
    await first.done()
    held = await items.__anext__()  # delivered, never done: the process "dies" here
    assert held.output.sequence == 2
    await nc.close()
    await appliance.leaf.stop()
    await appliance.leaf.start()  # same port and store dir
    nc = await appliance.connect()
    try:
        reopened = JetStreamOutbox.on(
            nc, appliance.leaf.domain, stream=box.stream, subject_prefix=box.subject_prefix
        )
        await reopened.ensure()
        assert await reopened.count() == 3
        items = reopened.pending().__aiter__()
        seen = []
        for _ in range(3):
            # Comes back at once (the consumer is reset), not after the ack wait.
            item = await asyncio.wait_for(items.__anext__(), 3)
            seen.append(item.output.sequence)
            await item.done()
        await items.aclose()
        assert seen == [2, 3, 4]
    finally:
        await nc.close()


# --------------------------------------------------------------------------
# Store and forward across a Cloud outage
# --------------------------------------------------------------------------


def hub_sender(nc, registration_id: str, replies: list[AckReply]):
    """What the agent's forwarder does: one WORK_OUTPUT request per output. Any
    well-formed answer is final for that output (accepted, replayed or refused);
    no responders or a timeout means Cloud is away, so the output stays."""
    subject = subjects.WORK_OUTPUT.build(tenant=TENANT, registration_id=registration_id)
    source = Source(principal_kind="gateway", principal_id=registration_id)

    async def send(out: WorkOutput) -> bool:
        env = Envelope.wrap(out, source=source, tenant=TENANT)
        msg = await nc.request(subject, env.encode(), timeout=2)
        replies.append(decode(msg.data, AckReply).data)
        return True

    return send


async def claim_across_leaf(nc, registration_id: str, work_id: str) -> WorkClaimReply:
    subject = subjects.WORK_CLAIM.build(tenant=TENANT, registration_id=registration_id)
    env = Envelope.wrap(
        WorkClaimRequest(work_kinds=["prompt"], work_id=work_id),
        source=Source(principal_kind="gateway", principal_id=registration_id),
        tenant=TENANT,
    ).encode()
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        try:
            raw = (await nc.request(subject, env, timeout=2)).data
            return decode(raw, WorkClaimReply).data
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_store_and_forward_to_the_hub_across_a_cloud_outage(
    tmp_path_factory, bus_keys, database_url_module
):
    from edgeworkkit import EDGE_SCOPES, add_registration, enqueue_body
    from hubkit import client, running_hub

    root = tmp_path_factory.mktemp("outage")
    cloud = Cloud(root, bus_keys)
    await cloud.server.start()
    try:
        # A generous lease: the outage must not expire it.
        async with (
            running_hub(
                cloud.url, database_url_module, keys=bus_keys, work_lease_seconds=60
            ) as hub,
            client(hub, admin=True) as http,
        ):
            reg = await add_registration(hub.pool, TENANT)
            creds = await issued_gateway_creds(hub, root, reg, EDGE_SCOPES)
            leaf = GatewayLeafServer(
                store_dir=root / "leaf",
                cloud_urls=cloud.leaf_urls,
                credentials=creds,
                domain=gateway_domain(reg),
                port=free_port(),
                monitor_port=free_port(),
            )
            await leaf.start()
            try:
                await _run_outage(hub, http, cloud, Appliance(leaf, reg), enqueue_body())
            finally:
                await leaf.stop()
    finally:
        await cloud.server.stop()


async def _run_outage(hub, http, cloud: Cloud, appliance: Appliance, work: dict) -> None:
    reg, leaf = appliance.registration_id, appliance.leaf
    created = await http.post(f"/api/v1/tenants/{TENANT}/work", json=work)
    assert created.status_code == 201, created.text
    work_id = created.json()["workId"]
    assert await leaf.wait_linked(10)
    nc = await appliance.connect()
    replies: list[AckReply] = []
    box = JetStreamOutbox.on(nc, leaf.domain)  # the appliance's real outbox stream
    await box.ensure()
    forwarder = asyncio.create_task(forward(box, hub_sender(nc, reg, replies), max_backoff=0.5))
    try:
        claim = await claim_across_leaf(nc, reg, work_id)
        assert claim.work_id == work_id and claim.lease_seconds == 60
        first = claim.next_sequence
        last = first + 40
        outputs = [
            WorkOutput(
                work_id=work_id,
                lease_token=claim.lease_token,
                kind="event",
                sequence=n,
                body={"n": n},
            )
            for n in range(first, last)
        ]
        outputs.append(
            WorkOutput(
                work_id=work_id,
                lease_token=claim.lease_token,
                kind="result",
                sequence=last,
                body={"text": "done"},
            )
        )
        for out in outputs[:5]:
            await box.append(out)
        await wait_for(lambda: _stored_count(hub, work_id, 5), 20, "outputs before the outage")

        await cloud.server.stop()
        assert not await leaf.cloud_linked()
        for out in outputs[5:]:  # the appliance keeps accepting, durably, while Cloud is down
            await box.append(out)
        await asyncio.sleep(1.0)
        assert await box.count() == len(outputs) - 5
        assert await _stored(hub, work_id) == list(range(first, first + 5))

        await cloud.server.start()  # same port and store dir
        await wait_for(lambda: _count_is(box, 0), 60, "the outbox to drain after the outage")
    finally:
        forwarder.cancel()
        await asyncio.gather(forwarder, return_exceptions=True)
        await nc.close()
    assert all(r.ok for r in replies), [r for r in replies if not r.ok]
    # Every output once, gapless, in append order, with the content that was sent.
    rows = await hub.pool.fetch(
        "SELECT sequence, kind, body FROM edge_work_outputs WHERE tenant = $1 AND work_id = $2 "
        "ORDER BY recorded_at, sequence",
        TENANT,
        work_id,
    )
    assert [r["sequence"] for r in rows] == [o.sequence for o in outputs]
    assert [json.loads(r["body"]) if isinstance(r["body"], str) else r["body"] for r in rows] == [
        o.body for o in outputs
    ]
    view = (await http.get(f"/api/v1/tenants/{TENANT}/work/{work_id}")).json()
    assert view["state"] == "completed" and view["result"] == {"text": "done"}
    assert [e["sequence"] for e in view["events"]] == [o.sequence for o in outputs]


async def _stored(hub, work_id: str) -> list[int]:
    rows = await hub.pool.fetch(
        "SELECT sequence FROM edge_work_outputs WHERE tenant = $1 "
        "AND work_id = $2 ORDER BY sequence",
        TENANT,
        work_id,
    )
    return [r["sequence"] for r in rows]


async def _stored_count(hub, work_id: str, n: int) -> bool:
    return len(await _stored(hub, work_id)) == n


async def _count_is(box: JetStreamOutbox, n: int) -> bool:
    try:
        return await box.count() == n
    except Exception:  # the local server answering slowly while the leaf reconnects
        return False


# --------------------------------------------------------------------------
# The committed config template, run with the real nats-server
# --------------------------------------------------------------------------


async def test_deploy_template_runs_as_a_leaf(cloud, bus_keys, tmp_path):
    conf = Path(__file__).resolve().parents[3] / "deploy" / "nats" / "gateway-leaf.conf"
    reg = "tpl" + secrets.token_hex(3)
    port = free_port()
    env = dict(
        os.environ,
        NATS_CLIENT_PORT=str(port),
        NATS_STORE_DIR=str(tmp_path / "js"),
        GATEWAY_JS_DOMAIN=gateway_domain(reg),
        CLOUD_LEAF_URL=cloud.leaf_urls[0],
        GATEWAY_CREDS=str(mint_gateway_creds(bus_keys, tmp_path, reg)),
    )
    proc = await asyncio.create_subprocess_exec(
        str(nats_server_binary()),
        "-c",
        str(conf),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    subject = subjects.GATEWAY_CAPABILITIES.build(tenant=TENANT, registration_id=reg)
    try:
        async with cloud_client(cloud, bus_keys) as hub_side:

            async def ok(msg):
                await msg.respond(b"ok")

            await hub_side.subscribe(subject, cb=ok)
            await flushed(hub_side)
            nc = await _connect_eventually(
                f"nats://127.0.0.1:{port}", subjects.inbox_prefix(TENANT, "gateway", reg)
            )
            try:
                info = await nc.jetstream(domain=gateway_domain(reg)).account_info()
                assert info.domain == gateway_domain(reg)

                async def answered() -> bool:
                    try:
                        return (await nc.request(subject, b"{}", timeout=0.5)).data == b"ok"
                    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                        return False

                await wait_for(answered, 20, "a reply across the template's leaf connection")
            finally:
                await nc.close()
        # Loopback only, whatever the environment says.
        assert "host: 127.0.0.1" in conf.read_text()
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _connect_eventually(url: str, inbox: str):
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        try:
            return await nats.connect(
                url, inbox_prefix=inbox, allow_reconnect=False, connect_timeout=1
            )
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


# --------------------------------------------------------------------------
# `cowork gateway up`, run as a user runs it: a real subprocess, then Ctrl-C
# --------------------------------------------------------------------------

GATEWAY_UP = [sys.executable, "-m", "hub.cli", "gateway", "up"]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("COWORK_", "OPENCODE_"))}


def registered_state_dir(keys, directory: Path, cloud: Cloud, registration_id: str) -> Path:
    """A state directory as `cowork gateway register` leaves it."""
    from datetime import datetime

    from edges.gateway._store import GatewayFile, GatewayStore

    store = GatewayStore(directory)
    store.save(
        GatewayFile(
            tenant=TENANT,
            registration_id=registration_id,
            display_name="appliance one",
            kind="edge_worker",
            scopes=sorted(s.value for s in CredentialScope),
            sync_scopes=[],
            hub_urls=[cloud.url],
            registered_at=datetime.now(UTC).isoformat(),
        )
    )
    created = mint_gateway_creds(keys, directory, registration_id)
    assert created == store.creds_path
    return directory


def test_gateway_up_refuses_without_registration(tmp_path):
    proc = subprocess.run(
        GATEWAY_UP + ["--state-dir", str(tmp_path / "none"), "--nats-port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
    )
    assert proc.returncode == 1
    assert "not registered" in proc.stderr and "cowork gateway register" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_gateway_up_runs_the_appliance_and_stops_cleanly(cloud, bus_keys, tmp_path):
    import asyncpg
    import psutil

    reg = "up" + secrets.token_hex(3)
    state = registered_state_dir(bus_keys, tmp_path / "state", cloud, reg)
    port = free_port()
    heartbeat = subjects.GATEWAY_HEARTBEAT.build(tenant=TENANT, registration_id=reg)
    beats: list[bytes] = []
    async with cloud_client(cloud, bus_keys) as hub_side:

        async def on_beat(msg):
            beats.append(msg.data)

        await hub_side.subscribe(heartbeat, cb=on_beat)
        await flushed(hub_side)
        proc = subprocess.Popen(
            GATEWAY_UP
            + [
                "--state-dir",
                str(state),
                "--nats-port",
                str(port),
                "--cloud-leaf-url",
                cloud.leaf_urls[0],
                "--opencode",
                "http://127.0.0.1:9",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_clean_env(),
        )
        descendants: set[int] = set()
        try:
            env_file = state / "appliance.env"

            async def up() -> bool:
                assert proc.poll() is None, proc.stdout.read()
                descendants.update(p.pid for p in psutil.Process(proc.pid).children(True))
                return env_file.exists() and bool(beats)

            # The agent's heartbeat reaching Cloud proves: leaf up, linked, agent on the leaf.
            await wait_for(up, 90, "the appliance to come up and heartbeat through the leaf")
            assert env_file.stat().st_mode & 0o777 == 0o600
            name, _, dsn = env_file.read_text().strip().splitlines()[-1].partition("=")
            assert name == "COWORK_GATEWAY_DATABASE_URL"
            db = await asyncpg.connect(dsn)
            assert await db.fetchval("SELECT 1") == 1
            await db.close()
            nc = await nats.connect(f"nats://127.0.0.1:{port}")
            try:
                local = nc.jetstream(domain=gateway_domain(reg))
                assert (await local.account_info()).domain == gateway_domain(reg)
                assert (await local.stream_info("CW_GATEWAY_OUTBOX")).config.subjects == [
                    f"{LOCAL_PREFIX}.>"
                ]
            finally:
                await nc.close()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                code = await asyncio.to_thread(proc.wait, 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    output = proc.stdout.read()
    assert code == 0, output
    for line in (
        f"leaf NATS on 127.0.0.1:{port}",
        f"JetStream domain gw-{reg}",
        "Cloud link to",
        "connected",
        "PostgreSQL (embedded) ... ready",
        "gateway agent",
        "cowork gateway is up",
        "Stopped.",
    ):
        assert line in output, output
    assert descendants, "nats-server and postgres should have been children"
    alive = [
        pid
        for pid in descendants
        if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    ]
    assert not alive, f"left running: {alive}"


# --------------------------------------------------------------------------
# The gateway agent on the leaf: a real OpenCode run that spans a Cloud outage
# --------------------------------------------------------------------------


async def test_agent_run_spans_a_cloud_outage(
    tmp_path_factory, bus_keys, database_url_module, opencode
):
    """The agent claims through the leaf, Cloud goes down while OpenCode streams, the
    events and the result wait in the leaf's outbox, and reach the hub in order."""
    from edgeworkkit import EDGE_SCOPES, add_registration, enqueue_body
    from hubkit import client, running_hub
    from opencode_env import SLOW

    from edges.gateway._agent import GatewayAgent
    from edges.gateway._store import GatewayStore

    root = tmp_path_factory.mktemp("agent-outage")
    cloud = Cloud(root, bus_keys)
    await cloud.server.start()
    try:
        async with (
            running_hub(
                cloud.url, database_url_module, keys=bus_keys, work_lease_seconds=60
            ) as hub,
            client(hub, admin=True) as http,
        ):
            reg = await add_registration(hub.pool, TENANT)
            state = registered_state_dir(bus_keys, root / "state", cloud, reg)
            await issued_gateway_creds(hub, state, reg, EDGE_SCOPES)  # the hub's own issue
            store = GatewayStore(state)
            leaf = GatewayLeafServer(
                store_dir=state / "nats",
                cloud_urls=cloud.leaf_urls,
                credentials=store.creds_path,
                domain=gateway_domain(reg),
                port=free_port(),
                monitor_port=free_port(),
            )
            await leaf.start()
            box_nc = await nats.connect(leaf.url)
            box = JetStreamOutbox.on(box_nc, leaf.domain)
            await box.ensure()
            agent = GatewayAgent(
                store, opencode.url, nats_url=leaf.url, outbox=box, heartbeat_interval=1.0
            )
            running = asyncio.create_task(agent.run())
            try:
                await asyncio.wait_for(agent.connected.wait(), 20)
                created = await http.post(
                    f"/api/v1/tenants/{TENANT}/work", json=enqueue_body(f"{SLOW} tell a story")
                )
                work_id = created.json()["workId"]
                # The run has started at the hub (its `running` status arrived) ...
                await wait_for(
                    lambda: _stored_count_at_least(hub, work_id, 1), 30, "the run to start"
                )
                await cloud.server.stop()  # ... and Cloud goes away mid-stream.
                await wait_for(
                    lambda: _count_at_least(box, 3),
                    20,
                    "outputs kept on the appliance during the outage",
                )
                await asyncio.sleep(3.0)  # the fake model's slow stream finishes locally
                at_hub_before = await _stored(hub, work_id)
                await cloud.server.start()
                await wait_for(
                    lambda: _work_state(http, work_id, "completed"),
                    60,
                    "the work to complete after the outage",
                )
            finally:
                agent.stop()
                await asyncio.wait_for(running, 20)
                await box_nc.close()
                await leaf.stop()
            view = (await http.get(f"/api/v1/tenants/{TENANT}/work/{work_id}")).json()
    finally:
        await cloud.server.stop()
    sequences = [e["sequence"] for e in view["events"]]
    assert sequences == list(range(1, len(sequences) + 1))  # gapless, once each
    assert view["events"][-1]["kind"] == "result" and view["state"] == "completed"
    assert len(at_hub_before) < len(sequences)  # part of the run went through the outbox
    assert {e["registrationId"] for e in view["events"]} == {reg}


async def _stored_count_at_least(hub, work_id: str, n: int) -> bool:
    return len(await _stored(hub, work_id)) >= n


async def _count_at_least(box: JetStreamOutbox, n: int) -> bool:
    try:
        return await box.count() >= n
    except Exception:
        return False


async def _work_state(http, work_id: str, state: str) -> bool:
    reply = await http.get(f"/api/v1/tenants/{TENANT}/work/{work_id}")
    return reply.status_code == 200 and reply.json()["state"] == state


def test_deploy_template_documents_every_variable():
    import re

    conf = Path(__file__).resolve().parents[3] / "deploy" / "nats" / "gateway-leaf.conf"
    text = conf.read_text()
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    header = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    used = set(re.findall(r"\$([A-Z][A-Z0-9_]*)", code))
    assert used == {
        "NATS_CLIENT_PORT",
        "NATS_STORE_DIR",
        "GATEWAY_JS_DOMAIN",
        "CLOUD_LEAF_URL",
        "GATEWAY_CREDS",
    }
    assert all(var in header for var in used)
    assert 'deny_exports: ["gwlocal.>"]' in code


async def test_leaf_restart_keeps_its_port(cloud, bus_keys, tmp_path):
    """A supervisor restart must come back where the agent and the outbox reconnect."""
    creds = mint_gateway_creds(bus_keys, tmp_path, "restart1")
    leaf = GatewayLeafServer(
        store_dir=tmp_path / "nats",
        cloud_urls=cloud.leaf_urls,
        credentials=creds,
        domain="gw-restart1",
        port=0,
    )
    await leaf.start()
    try:
        url = leaf.url
        await leaf.kill()  # a crash
        await leaf.start()
        assert leaf.url == url
    finally:
        await leaf.stop()


# --------------------------------------------------------------------------
# Registering again while the appliance runs
# --------------------------------------------------------------------------


async def test_registering_again_hands_over_the_key_and_the_old_appliance_says_so(
    tmp_path_factory, bus_keys, database_url_module, opencode
):
    """A second `cowork gateway register` (another state dir) gets its credential even
    though the hub revokes the running appliance's key in the middle of the exchange;
    the old appliance, whose leaf Cloud now refuses, says why and exits 3."""
    from desktopkit import cowork
    from gateway_agent_kit import create_registration, get_registration
    from hubkit import client, running_hub

    from schemas import parse_creds

    root = tmp_path_factory.mktemp("reregister")
    cloud = Cloud(root, bus_keys)
    await cloud.server.start()
    proc = None
    try:
        async with (
            running_hub(cloud.url, database_url_module, keys=bus_keys) as hub,
            client(hub, admin=True) as http,
        ):
            created = await create_registration(http, "edge_worker", name="rack 9")
            reg, env = (
                created["registrationId"],
                {"COWORK_GATEWAY_CREDENTIAL": created["credential"]},
            )
            first, second = root / "first", root / "second"
            code, _, err = await cowork(
                "gateway",
                "register",
                "--hub",
                cloud.url,
                "--opencode",
                opencode.url,
                "--state-dir",
                str(first),
                env=env,
            )
            assert code == 0, err
            proc = subprocess.Popen(
                GATEWAY_UP
                + [
                    "--state-dir",
                    str(first),
                    "--nats-port",
                    str(free_port()),
                    "--cloud-leaf-url",
                    cloud.leaf_urls[0],
                    "--opencode",
                    opencode.url,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=_clean_env(),
            )

            async def heartbeating() -> bool:
                assert proc.poll() is None, proc.stdout.read()
                return (await get_registration(http, reg)).get("lastHeartbeatAt") is not None

            await wait_for(heartbeating, 90, "the appliance to heartbeat through its leaf")

            code, out, err = await cowork(
                "gateway",
                "register",
                "--hub",
                cloud.url,
                "--opencode",
                opencode.url,
                "--state-dir",
                str(second),
                env=env,
            )
            assert code == 0, err  # before: "the hub did not answer within 10 s"
            assert reg in out
            new_jwt, _ = parse_creds((second / "gateway.creds").read_text())
            new_key = _jwt.decode(new_jwt, verify=False)["sub"]
            live = await hub.pool.fetch(
                "SELECT public_key FROM bus_credentials WHERE kind = 'gateway' "
                "AND principal_id = $1 AND revoked_at IS NULL",
                reg,
            )
            assert [r["public_key"] for r in live] == [new_key]  # the key the CLI holds

            code = await asyncio.to_thread(proc.wait, 60)
            output = proc.stdout.read()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        await cloud.server.stop()
    assert code == 3, output
    assert "Cloud refuses this Gateway's credential" in output, output
    assert "cowork gateway register" in output and "Traceback" not in output
