"""The lean JetStream publish behind webhook ingress (channels/runtime/_jetstream.py) and
the spliced envelope (schemas.EnvelopeTemplate): an accepted webhook is a
message the stream acknowledged, every other outcome is a 503, and the bytes
on the bus are exactly what `Envelope.wrap(...).encode()` gives."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from unittest import mock

import nats
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from desktopkit import eventually
from nats.js.api import DiscardPolicy, StreamConfig
from test_channel_runtime import FakeProvider, config, new_id, prepare, runtime_for

import schemas._envelope as envelope_module
from channels._registry import PROVIDERS
from channels.runtime._jetstream import JetStreamPublisher, PubAck, PublishFailed, check_ack
from edges.local import NatsServer
from schemas import (
    ChannelInbound,
    ChannelSender,
    ChannelTarget,
    ContractError,
    Envelope,
    EnvelopeTemplate,
    Source,
    decode,
    subjects,
)
from schemas import new_id as envelope_id

GOOD = {"X-Fake-Secret": "s3cret-value"}


@pytest.fixture(autouse=True)
def fake_kind(monkeypatch):
    monkeypatch.setitem(PROVIDERS, "fake", FakeProvider)


@pytest.fixture
async def nc(nats_url):
    client = await nats.connect(nats_url)
    yield client
    await client.close()


async def stream(nc, subject: str, **limits) -> str:
    name = "T" + new_id("s").replace("-", "_").upper()
    await nc.jetstream().add_stream(StreamConfig(name=name, subjects=[subject], **limits))
    return name


# --- the ack check ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers, data, fragment",
    [
        ({"Status": "503"}, b"", "no responders"),
        ({"Status": "408", "Description": "Request Timeout"}, b"", "status 408"),
        (None, b"not json", "not JSON"),
        (None, b"[1]", "not a JSON object"),
        (
            None,
            b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}',
            "maximum messages exceeded",
        ),
        (None, b'{"error":"nope"}', "refused"),
        (None, b'{"stream":"S"}', "not a stream acknowledgement"),
        (None, b'{"stream":"S","seq":true}', "not a stream acknowledgement"),
        (None, b'{"stream":"","seq":3}', "not a stream acknowledgement"),
        (None, b'{"seq":3}', "not a stream acknowledgement"),
        (None, b'{"stream":"S","seq":0}', "not a stream acknowledgement"),
        (None, b'{"stream":"S","seq":1,"error":{"code":500}}', "refused"),
    ],
)
def test_anything_but_a_pub_ack_is_a_failed_publish(headers, data, fragment):
    with pytest.raises(PublishFailed) as info:
        check_ack(headers, data)
    assert fragment in info.value.reason


@pytest.mark.parametrize(
    "data, ack",
    [
        (b'{"stream":"S","seq":7}', PubAck("S", 7, False)),
        (b'{"stream":"S","seq":7,"duplicate":true}', PubAck("S", 7, True)),
        (b'{"stream":"S","domain":"hub","seq":7}', PubAck("S", 7, False)),
        (b'{ "seq": 7, "stream": "S", "duplicate": false }', PubAck("S", 7, False)),
        (b'{"stream":"S.x","seq":7,"duplicate":true}', PubAck("S.x", 7, True)),
    ],
)
def test_a_pub_ack_is_read_with_its_duplicate_flag(data, ack):
    assert check_ack(None, data) == ack


# --- the publisher against a real JetStream -------------------------------------------------
async def test_publishes_are_stored_acknowledged_and_deduplicated(nc):
    subject = f"jsp.{new_id()}"
    name = await stream(nc, subject)
    publisher = JetStreamPublisher(nc, timeout=2)
    acks = await asyncio.gather(
        *(publisher.publish(subject, f"m{i}".encode(), f"id-{i}") for i in range(200))
    )
    assert {a.stream for a in acks} == {name} and not any(a.duplicate for a in acks)
    assert sorted(a.seq for a in acks) == list(range(1, 201))
    again = await publisher.publish(subject, b"retry", "id-7")
    assert again.duplicate and again.seq == acks[7].seq
    stored = await nc.jetstream().get_msg(name, acks[7].seq)
    assert stored.data == b"m7" and stored.headers["Nats-Msg-Id"] == "id-7"
    assert (await nc.jetstream().stream_info(name)).state.messages == 200
    await publisher.close()


async def test_no_stream_is_a_failed_publish(nc):
    publisher = JetStreamPublisher(nc, timeout=2)
    with pytest.raises(PublishFailed, match="no responders"):
        await publisher.publish(f"nostream.{new_id()}", b"x", "id-1")
    await publisher.close()


async def test_a_refusing_stream_is_a_failed_publish(nc):
    subject = f"full.{new_id()}"
    await stream(nc, subject, max_msgs=1, discard=DiscardPolicy.NEW)
    publisher = JetStreamPublisher(nc, timeout=2)
    await publisher.publish(subject, b"first", "id-1")
    with pytest.raises(PublishFailed, match="refused"):
        await publisher.publish(subject, b"second", "id-2")
    await publisher.close()


async def test_no_ack_in_time_is_a_failed_publish_and_late_acks_are_ignored(nc):
    subject = f"silent.{new_id()}"
    replies: list = []

    async def silent(msg):  # a responder that answers only after the timeout
        replies.append(msg.reply)

    await nc.subscribe(subject, cb=silent)
    publisher = JetStreamPublisher(nc, timeout=0.2)
    started = asyncio.get_running_loop().time()
    with pytest.raises(PublishFailed, match="no acknowledgement within 0.2 s"):
        await publisher.publish(subject, b"x", "id-1")
    assert 0.2 <= asyncio.get_running_loop().time() - started < 3.0  # loaded machine: lag
    await eventually(lambda: replies, what="the silent responder to get the request")
    await nc.publish(replies[0], b'{"stream":"S","seq":1}')  # too late: nobody waits
    await nc.flush()
    assert publisher._pending == {}
    await publisher.close()


async def test_a_closed_connection_fails_pending_and_later_publishes(nats_url):
    client = await nats.connect(nats_url)
    subject = f"gone.{new_id()}"

    async def never_answers(msg):
        pass

    await client.subscribe(subject, cb=never_answers)
    closed = []
    publisher = JetStreamPublisher(client, timeout=5, on_closed=closed.append)
    waiting = asyncio.ensure_future(publisher.publish(subject, b"x", "id-1"))
    await asyncio.sleep(0.05)
    await client.close()
    with pytest.raises(PublishFailed, match="connection is closed"):
        await asyncio.wait_for(waiting, 2)
    assert closed == [publisher] and publisher.closed
    with pytest.raises(PublishFailed):
        await publisher.publish(subject, b"y", "id-2")


async def test_a_publisher_shares_the_connections_inbox_prefix():
    """Channel principals may subscribe only under their own inbox prefix."""
    server_nc = mock.AsyncMock()
    server_nc.new_inbox = mock.Mock(return_value="_INBOX.acme.channel.tg1.ABC")
    server_nc.is_closed = False
    publisher = JetStreamPublisher(server_nc, timeout=1)
    await publisher._start()
    assert server_nc.subscribe.await_args.args[0] == "_INBOX.acme.channel.tg1.ABC.*"
    await publisher.close()


# --- ingress: 503 unless stored ------------------------------------------------------------
async def serve(runtime) -> TestClient:
    app = web.Application()
    app.add_routes(runtime.routes())
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


def update(event_id: str) -> bytes:
    return json.dumps({"events": [{"id": event_id, "text": "hi"}]}).encode()


async def test_ingress_answers_503_when_no_stream_or_a_full_stream_refuses(tmp_path):
    server = NatsServer(store_dir=tmp_path, port=0)  # its own: the stream is deleted here
    await server.start()
    control = await nats.connect(server.url)
    js = control.jetstream()
    iid = new_id()
    runtime = runtime_for(server.url, publish_timeout_seconds=1.0)
    client = None
    try:
        await prepare(js, iid)
        await js.delete_stream("CW_CHANNEL_INBOUND")
        await runtime.apply(config(iid))
        client = await serve(runtime)
        response = await client.post(f"/webhooks/{iid}", headers=GOOD, data=update("e1"))
        assert response.status == 503 and response.headers["Retry-After"] == "1"
        assert (await response.json())["error"]["code"] == "channel.publish_failed"

        await js.add_stream(
            StreamConfig(
                name="CW_CHANNEL_INBOUND",
                subjects=[subjects.CHANNEL_INBOUND.filter()],
                max_msgs=1,
                discard=DiscardPolicy.NEW,
            )
        )
        assert (
            await client.post(f"/webhooks/{iid}", headers=GOOD, data=update("e1"))
        ).status == 200
        refused = await client.post(f"/webhooks/{iid}", headers=GOOD, data=update("e2"))
        assert refused.status == 503
        assert runtime.health(iid)["inboundAccepted"] == 1
        assert runtime.health(iid)["inboundRejected"] == 2
    finally:
        if client is not None:
            await client.close()
        await runtime.stop()
        await control.close()
        await server.stop()


async def test_a_replaced_instance_publishes_on_its_new_connection(nats_url, nc):
    js = nc.jetstream()
    iid = new_id()
    await prepare(js, iid)
    runtime = runtime_for(nats_url)
    await runtime.apply(config(iid))
    client = await serve(runtime)
    try:
        assert (
            await client.post(f"/webhooks/{iid}", headers=GOOD, data=update("r1"))
        ).status == 200
        await runtime.apply(config(iid, revision=2))  # new Instance, new connection
        assert (
            await client.post(f"/webhooks/{iid}", headers=GOOD, data=update("r2"))
        ).status == 200
        subject = subjects.CHANNEL_INBOUND.build(
            tenant="acme", instance_id=iid, workspace_id=f"ws-{iid}"
        )
        last = await js.get_last_msg("CW_CHANNEL_INBOUND", subject)
        assert decode(last.data, ChannelInbound).data.provider_event_id == "r2"
    finally:
        await client.close()
        await runtime.stop()


# --- the envelope ----------------------------------------------------------------------------
def _alphabet_loop(value: int) -> str:
    """The original, obviously right new_id encoding: 26 base-32 digits, MSB first."""
    return "".join(
        "0123456789abcdefghjkmnpqrstvwxyz"[(value >> shift) & 31] for shift in range(125, -1, -5)
    )


@pytest.mark.parametrize(
    "ms, rand",
    [
        (0, 0),
        (2**48 - 1, 2**80 - 1),
        (1764000000123, 1),
        (1764000000124, 2**79),
        (123456789, 987654321),
    ],
)
def test_new_id_digits_are_unchanged(ms, rand):
    with (
        mock.patch.object(envelope_module.time, "time_ns", return_value=ms * 1_000_000 + 7),
        mock.patch.object(envelope_module, "_random_bits80", return_value=rand),
    ):
        assert envelope_id() == _alphabet_loop(ms << 80 | rand)


def test_new_ids_are_time_ordered_across_milliseconds():
    ids = []
    for ms in (1764000000000, 1764000000001, 1764000000002):
        with mock.patch.object(envelope_module.time, "time_ns", return_value=ms * 1_000_000):
            ids.append(envelope_id())
    assert ids == sorted(ids) and len({i[:10] for i in ids}) == 3


SOURCE = Source(principal_kind="channel", principal_id="tg-1")


def inbound(**over) -> ChannelInbound:
    fields = dict(
        id="in-abc",
        provider_event_id="42",
        provider="tg-1",
        provider_kind="telegram",
        workspace_id="ws-1",
        target=ChannelTarget(chat_id="100", thread_id="7"),
        sender=ChannelSender(provider_user_id="7", display_name='Zoë "q" \\ ✓'),
        text="héllo\n</script>\u2028",
        command_args=["a"],
        received_at=datetime(2026, 12, 2, 10, 0, 0, 123, UTC),
    )
    return ChannelInbound(**{**fields, **over})


@pytest.mark.parametrize(
    "tenant, workspace, when",
    [
        ("acme", "ws-1", datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC)),
        ("acme", None, datetime(2026, 12, 2, 10, 0, 0, 500, UTC)),
        (None, None, datetime(2026, 12, 2, 10, 0, 0, 123456, UTC)),
    ],
)
def test_template_bytes_equal_the_envelope_encoding(tenant, workspace, when):
    msg = inbound()
    template = EnvelopeTemplate(ChannelInbound, source=SOURCE, tenant=tenant, workspace=workspace)
    spliced = template.encode(msg, id="env-1", time=when)
    assert (
        spliced
        == Envelope.wrap(
            msg, source=SOURCE, tenant=tenant, workspace=workspace, id="env-1", time=when
        ).encode()
    )
    back = decode(spliced, ChannelInbound)
    assert back.data == msg and back.tenant == tenant and back.source == SOURCE


def test_template_fills_id_and_time_and_checks_what_it_is_given():
    template = EnvelopeTemplate(ChannelInbound, source=SOURCE, tenant="acme", workspace="ws-1")
    one, two = (decode(template.encode(inbound()), ChannelInbound) for _ in range(2))
    assert one.id != two.id and len(one.id) == 26 and one.time.tzinfo is not None
    with pytest.raises(TypeError):
        template.encode(schemas_ack())
    with pytest.raises(ValueError):
        template.encode(inbound(), id="a.b")  # not a subject-safe id
    for bad in ({"tenant": "system"}, {"tenant": "A.B"}, {"workspace": "ws.*"}):
        with pytest.raises(ValueError):
            EnvelopeTemplate(ChannelInbound, source=SOURCE, **bad)
    with pytest.raises(ContractError):  # what decode refuses stays refused
        decode(template.encode(inbound())[:-1], ChannelInbound)


def schemas_ack():
    from schemas import AckReply

    return AckReply(ok=True)
