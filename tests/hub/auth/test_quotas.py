"""Quotas per edge and per stream (issue 14, item 7), enforced by NATS itself.

Real hub, operator-mode NATS and PostgreSQL: a Desktop's user JWT carries its
payload and subscription limits, and the server refuses what exceeds them. The
hub's streams are declared with byte and message-size limits: a flood ages out
the flooder's oldest history instead of filling the store and refusing others.
"""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest
from desktopkit import TENANT, desktop_event, events, eventually, redeem

from edges.local import NatsServer
from hub import HubSettings
from hub.auth import Principal, nats_jwt
from hub.core import streams
from schemas import PrincipalKind, subjects

pytestmark = pytest.mark.timeout(120)

DESKTOP_PAYLOAD = 16 * 1024
GATEWAY_PAYLOAD = 48 * 1024
CHANNEL_PAYLOAD = 24 * 1024
SUBSCRIPTIONS = 12
MAX_BYTES = 1024 * 1024  # the smallest stream_max_bytes allowed
MAX_MSG = 8 * 1024


@pytest.fixture(scope="module")
def hub_options() -> dict:
    return {
        "desktop_max_payload_bytes": DESKTOP_PAYLOAD,
        "gateway_max_payload_bytes": GATEWAY_PAYLOAD,
        "channel_max_payload_bytes": CHANNEL_PAYLOAD,
        "edge_max_subscriptions": SUBSCRIPTIONS,
    }


def _event(pid: str, text: str) -> bytes:
    return desktop_event(pid, {"type": "quota", "text": text})[1]


async def _connect(url: str, store, pid: str, errors: list[str]) -> nats.NATS:
    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    return await nats.connect(
        url,
        user_credentials=str(store.creds_path),
        inbox_prefix=subjects.inbox_prefix(TENANT, "desktop", pid),
        error_cb=on_error,
        allow_reconnect=False,
    )


async def test_a_desktop_over_its_payload_limit_is_refused_by_the_server(
    hub, http, operator_nats_server, operator_nats_url, tmp_path
):
    _, store = await redeem(http, operator_nats_url, tmp_path / "d", allowedWorkspaceIds=["ws1"])
    pid = store.load_pairing().pairing_id
    claims = nats_jwt.decode(store.creds_path.read_text().split("-----")[2].strip(), verify=False)
    assert claims["nats"]["payload"] == DESKTOP_PAYLOAD
    assert claims["nats"]["subs"] == SUBSCRIPTIONS
    subject = subjects.DEVICE_EVENT.build(tenant=TENANT, device_id=pid, event_kind="session")

    errors: list[str] = []
    nc = await _connect(operator_nats_url, store, pid, errors)
    big = _event(pid, "x" * DESKTOP_PAYLOAD)  # its own subject, a valid event, too large
    assert len(big) > DESKTOP_PAYLOAD
    try:
        with pytest.raises(Exception):  # nats-py: the server closed the connection
            await nc.jetstream().publish(subject, big, timeout=3)
        line = await _server_logged(operator_nats_server, claims["sub"], "maximum payload exceeded")
        assert line[-1].endswith(f"vs {DESKTOP_PAYLOAD}")
    finally:
        await nc.close()

    # The same Desktop, under the limit, is stored and projected; the large one never was.
    errors.clear()
    nc = await _connect(operator_nats_url, store, pid, errors)
    try:
        ack = await nc.jetstream().publish(subject, _event(pid, "small"), timeout=5)
        assert ack.stream == "CW_DEVICE_EVENTS"
    finally:
        await nc.close()
    texts = await eventually(lambda: _texts(http, pid), timeout=10, what="the small event")
    assert [len(t) for t in texts] == [len("small")]


async def test_a_desktop_cannot_hold_more_subscriptions_than_its_limit(
    hub, http, operator_nats_server, operator_nats_url, tmp_path
):
    _, store = await redeem(http, operator_nats_url, tmp_path / "d", allowedWorkspaceIds=["ws1"])
    pid = store.load_pairing().pairing_id
    user = nats_jwt.decode(store.creds_path.read_text().split("-----")[2].strip(), verify=False)
    inbox = subjects.inbox_prefix(TENANT, "desktop", pid)
    errors: list[str] = []
    nc = await _connect(operator_nats_url, store, pid, errors)
    try:
        for i in range(SUBSCRIPTIONS + 5):  # its own inbox: allowed, only too many
            if nc.is_closed:
                break
            await nc.subscribe(f"{inbox}.many{i}")
            await nc.flush(timeout=2)
    except Exception:
        pass
    finally:
        await nc.close()
    await _server_logged(operator_nats_server, user["sub"], "maximum subscriptions exceeded")


async def test_each_edge_kind_gets_its_own_limits(hub):
    """Issued through the hub's credential service, as pairing, Gateway registration
    and channel hosting do."""
    expected = {
        PrincipalKind.DESKTOP: DESKTOP_PAYLOAD,
        PrincipalKind.GATEWAY: GATEWAY_PAYLOAD,
        PrincipalKind.CHANNEL: CHANNEL_PAYLOAD,
        PrincipalKind.VIEWER: 4096,  # publishes nothing
    }
    for kind, payload in expected.items():
        principal = Principal(kind, TENANT, f"q{uuid.uuid4().hex[:10]}", workspaces=("ws1",))
        seed = nats_jwt.new_seed("user")
        issued = await hub.credentials.issue(principal, nats_jwt.public_key(seed))
        claims = nats_jwt.decode(issued.user_jwt, verify=False)["nats"]
        assert (claims["payload"], claims["subs"]) == (payload, SUBSCRIPTIONS), kind


async def _texts(http, pid: str) -> list[str] | None:
    items = [e["payload"].get("text") for e in await events(http, pid)]
    return items or None


async def _server_logged(server, user: str, text: str) -> list[str]:
    """The server's log lines about `user` saying `text` (it names the refused user
    and the limit; nats-py often sees only the closed socket)."""
    log = server.store_dir / "nats.log"
    return await eventually(
        lambda: [x for x in log.read_text().splitlines() if f"jwt:{user}" in x and text in x],
        timeout=5,
        what=f"the server's {text!r}",
    )


# --- streams: bounded bytes, bounded messages, a flood ages out only old history ------------
async def test_streams_are_declared_with_the_configured_limits(tmp_path, monkeypatch):
    monkeypatch.setenv("COWORK_STREAM_MAX_BYTES", str(MAX_BYTES))
    monkeypatch.setenv("COWORK_STREAM_MAX_MSG_SIZE", str(MAX_MSG))
    limits = HubSettings().stream_limits()
    assert (limits.max_bytes, limits.max_msg_size) == (MAX_BYTES, MAX_MSG)

    server = NatsServer(store_dir=tmp_path / "js", port=0)
    await server.start()
    nc = await nats.connect(server.url)
    try:
        js = nc.jetstream()
        await streams.declare(js)  # the defaults first: a later declare updates them
        await streams.declare(js, limits=limits)
        names = sorted(streams.POLICIES) + [streams.bucket_stream(b) for b in streams.KV_BUCKETS]
        for name in names:
            config = (await js.stream_info(name)).config
            assert (config.max_bytes, config.max_msg_size) == (MAX_BYTES, MAX_MSG), name

        def subject(tenant: str, device: str) -> str:
            return subjects.DEVICE_EVENT.build(tenant=tenant, device_id=device, event_kind="s")

        first = await js.publish(subject("flood", "d1"), b"a" * 7000)
        for _ in range(200):  # 1.4 MB into a 1 MiB stream: never refused, oldest dropped
            await js.publish(subject("flood", "d1"), b"a" * 7000)
        quiet = await js.publish(subject("quiet", "d2"), b"still here")
        state = (await js.stream_info("CW_DEVICE_EVENTS")).state
        assert state.bytes <= MAX_BYTES
        assert state.first_seq > first.seq  # the flooder's oldest went first
        kept = await js.get_msg("CW_DEVICE_EVENTS", quiet.seq)
        assert kept.data == b"still here"
        with pytest.raises(nats.js.errors.APIError) as refused:
            await js.publish(subject("flood", "d1"), b"a" * 9000)
        assert "maximum" in str(refused.value).lower()
    finally:
        await nc.close()
        await asyncio.wait_for(server.stop(), 10)
