"""The conformance suite's runtime half: every provider in `channels.PROVIDERS`,
through the real channel runtime and a real JetStream, against its fake
platform. A streamed reply (a message, then an edit of it) shows as the
capability declares it: edited in place where `edit` is declared, else only the
new suffix sent as a message of its own (the documented degradation); either way
each delivery gets a `sent` receipt naming the platform's message ids. The CLI
is served by its own local process, never by the hosted runtime (declared:
inbound `stdin`): the runtime holds its deliveries for that process
(`tests/channels/test_channel_cli.py` checks its printing, edits and receipts)."""

from __future__ import annotations

import nats
import pytest
from test_channel_conformance import KINDS, make_config, started_fake
from test_channel_runtime import (
    TENANT,
    deliver,
    new_id,
    prepare,
    runtime_for,
    until,
    watch_receipts,
)

import channels
from schemas import DeliveryType, subjects


@pytest.mark.parametrize("kind", KINDS)
async def test_a_streamed_reply_and_its_receipts(kind: str, nats_url) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    fake = await started_fake(kind)
    iid = new_id(kind)
    await prepare(js, iid)
    receipts = await watch_receipts(nc, iid)
    runtime = runtime_for(nats_url, backoff_base_seconds=0.05, backoff_cap_seconds=0.2)
    try:
        config = make_config(kind, fake, iid)
        assert config.tenant == TENANT
        await runtime.apply(config)
        assert runtime.health(iid)["state"] == "ready", runtime.health(iid)
        chat = fake.chat_ref("100")
        await deliver(js, iid, "r-1", chat=chat, text="Hello")
        if channels.PROVIDERS[kind].capabilities.inbound == "stdin":
            assert "cowork channel cli" in runtime.health(iid)["detail"]
            info = await js.consumer_info(
                "CW_CHANNEL_OUTBOUND", subjects.edge_consumer("channel", iid)
            )
            assert info.num_pending + info.num_ack_pending == 1  # waiting for its process
            assert receipts == [] and fake.chats == {}
            return
        await until(lambda: len(receipts) == 1, 8, "the first receipt")
        await deliver(
            js, iid, "r-2", chat=chat, type=DeliveryType.EDIT, text="Hello world",
            edit_of_delivery_id="r-1",
        )  # fmt: skip
        await until(lambda: len(receipts) == 2, 8, "the edit's receipt")
        first, edit = receipts
        assert (first.delivery_id, edit.delivery_id) == ("r-1", "r-2")
        assert {first.status.value, edit.status.value} == {"sent"}, receipts
        posted = fake.chats[chat]
        assert first.provider_message_ids == [posted[0].message_id]
        if channels.PROVIDERS[kind].capabilities.edit:
            assert [(p.text, p.edits) for p in posted] == [("Hello world", 1)]
        else:
            assert [p.text.strip() for p in posted] == ["Hello", "world"]
            assert edit.provider_message_ids == [posted[1].message_id]
    finally:
        await runtime.stop()
        await fake.stop()
        await nc.close()
