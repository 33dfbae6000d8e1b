"""Delivery receipts through a running hub's ReceiptIngest: delivery rows, dead
letters with reasons, in-chat notices (never about a notice)."""

from __future__ import annotations

import asyncio
import itertools
import time

from hub.channels._outbox import delivery_id
from schemas import (
    ChannelOutbound,
    ChannelReceipt,
    ChannelTarget,
    DeadLetter,
    Envelope,
    Source,
    decode,
    subjects,
)

_counter = itertools.count(1)


class Instance:
    def __init__(self, hub) -> None:
        self.hub, self.id = hub, f"rcpt-{next(_counter)}"

    async def queue(self, *, notice: bool = False, kind: str = "text") -> str:
        """A delivery the hub recorded and published for this instance."""
        did = delivery_id("acme", self.id, next(_counter))
        await self.hub.channel_outbox.send(
            "acme",
            self.id,
            ChannelOutbound(
                delivery_id=did,
                idempotency_key=did,
                type=kind,
                target=ChannelTarget(chat_id="chat-9", thread_id="th-1"),
                text=None if kind == "typing" else "hi",
                notice=notice,
            ),
        )
        return did

    async def receipt(
        self, did: str, status: str, *, attempts=1, source: str | None = None, **fields
    ) -> None:
        receipt = ChannelReceipt(delivery_id=did, status=status, attempts=attempts, **fields)
        env = Envelope.wrap(
            receipt,
            source=Source(principal_kind="channel", principal_id=source or self.id),
            tenant="acme",
        )
        await self.publish(env.encode())

    async def publish(self, raw: bytes) -> None:
        await self.hub.js.publish(
            subjects.CHANNEL_RECEIPT.build(tenant="acme", instance_id=self.id), raw
        )

    async def row(self, did: str) -> dict:
        return dict(
            await self.hub.pool.fetchrow(
                "SELECT * FROM channel_deliveries WHERE tenant = 'acme' AND delivery_id = $1", did
            )
        )

    async def until_row(self, did: str, check, timeout: float = 8.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            row = await self.row(did)
            if check(row):
                return row
            assert time.monotonic() < deadline, row
            await asyncio.sleep(0.05)

    async def outbound(self) -> list[ChannelOutbound]:
        sub = await self.hub.js.pull_subscribe(
            subjects.CHANNEL_OUTBOUND.build(tenant="acme", instance_id=self.id),
            durable=f"t-{self.id}",
            stream="CW_CHANNEL_OUTBOUND",
        )
        got = []
        try:
            for msg in await sub.fetch(batch=50, timeout=1):
                got.append(decode(msg.data, ChannelOutbound).data)
                await msg.ack()
        except TimeoutError:
            pass
        return got


async def dead_letters(hub, family, durable: str) -> list[DeadLetter]:
    sub = await hub.js.pull_subscribe(
        subjects.dead_letter_subject("acme", family), durable=durable, stream="CW_DEADLETTER"
    )
    try:
        return [decode(m.data, DeadLetter).data for m in await sub.fetch(batch=50, timeout=1)]
    except TimeoutError:
        return []


async def test_sent_receipt_stores_the_provider_message_id(hub):
    inst = Instance(hub)
    did = await inst.queue()
    await inst.receipt(did, "sent", provider_message_id="m-1", attempts=2)
    row = await inst.until_row(did, lambda r: r["status"] == "sent")
    assert (row["provider_message_id"], row["attempts"], row["error"]) == ("m-1", 2, None)


async def test_a_late_retrying_never_overwrites_sent(hub):
    inst = Instance(hub)
    did = await inst.queue()
    await inst.receipt(did, "retrying", attempts=1, error="429 slow down", code="rate_limited")
    row = await inst.until_row(did, lambda r: r["status"] == "retrying")
    assert row["error"] == "429 slow down"
    await inst.receipt(did, "sent", attempts=2, provider_message_ids=["c-1", "c-2"])
    await inst.until_row(did, lambda r: r["status"] == "sent")
    await inst.receipt(did, "retrying", attempts=1, error="stale")
    marker = await inst.queue()  # receipts of one instance are applied in order
    await inst.receipt(marker, "sent")
    await inst.until_row(marker, lambda r: r["status"] == "sent")
    row = await inst.row(did)
    assert (row["status"], row["provider_message_id"], row["attempts"], row["error"]) == (
        "sent",
        "c-1",
        2,
        None,
    )


async def test_dead_lettered_delivery_is_set_aside_and_the_chat_is_told(hub):
    inst = Instance(hub)
    did = await inst.queue()
    await inst.receipt(
        did,
        "dead_lettered",
        attempts=3,
        code="telegram.chat_not_found",
        error="Bad Request: chat not found",
    )
    await inst.until_row(did, lambda r: r["status"] == "dead_lettered")
    notice_id = delivery_id("acme", "dead-notice", did)
    notice = await inst.until_row(notice_id, lambda r: r is not None)
    assert notice["notice"] is True and notice["chat_id"] == "chat-9"
    out = await inst.outbound()
    [sent] = [d for d in out if d.delivery_id == notice_id]
    assert sent.text == "⚠️ A message could not be delivered: Bad Request: chat not found"
    assert sent.notice and sent.target.thread_id == "th-1"
    letters = await dead_letters(hub, subjects.CHANNEL_OUTBOUND, f"dl-{inst.id}")
    [letter] = [x for x in letters if did in x.original_payload]
    assert (letter.code, letter.reason, letter.attempts) == (
        "telegram.chat_not_found",
        "Bad Request: chat not found",
        3,
    )
    # the same receipt again (redelivery) neither dead-letters nor notifies twice
    await inst.receipt(
        did,
        "dead_lettered",
        attempts=3,
        code="telegram.chat_not_found",
        error="Bad Request: chat not found",
    )
    marker = await inst.queue()
    await inst.receipt(marker, "sent")
    await inst.until_row(marker, lambda r: r["status"] == "sent")
    again = await dead_letters(hub, subjects.CHANNEL_OUTBOUND, f"dl-{inst.id}")
    assert [x for x in again if did in x.original_payload] == []


async def test_no_notice_about_a_dead_notice(hub):
    inst = Instance(hub)
    did = await inst.queue(notice=True)
    await inst.receipt(did, "dead_lettered", attempts=3, error="blocked by user")
    await inst.until_row(did, lambda r: r["status"] == "dead_lettered")
    await asyncio.sleep(0.3)
    assert (
        await hub.pool.fetchval(
            "SELECT count(*) FROM channel_deliveries WHERE tenant = 'acme' AND delivery_id = $1",
            delivery_id("acme", "dead-notice", did),
        )
        == 0
    )
    letters = await dead_letters(hub, subjects.CHANNEL_OUTBOUND, f"dl-{inst.id}")
    assert [x.reason for x in letters if did in x.original_payload] == ["blocked by user"]


async def test_invalid_or_foreign_receipts_are_dead_lettered_with_a_reason(hub):
    inst = Instance(hub)
    did = await inst.queue()
    await inst.publish(b'{"not": "an envelope"}')
    await inst.receipt(did, "sent", provider_message_id="forged", source="someone-else")
    other = Instance(hub)  # a receipt for another instance's delivery is unknown here
    await other.receipt(did, "sent", provider_message_id="forged")
    deadline = time.monotonic() + 15
    letters: list[DeadLetter] = []
    while time.monotonic() < deadline and len(letters) < 3:
        letters = await dead_letters(
            hub, subjects.CHANNEL_RECEIPT, f"rx-{inst.id}-{len(letters)}-{time.monotonic_ns()}"
        )
        letters = [
            x for x in letters if inst.id in x.original_subject or other.id in x.original_subject
        ]
        await asyncio.sleep(0.2)
    codes = sorted(x.code for x in letters)
    assert "contract.principal_mismatch" in codes
    assert "receipt.unknown_delivery" in codes
    assert any(
        c.startswith("contract.") and c != "contract.principal_mismatch" or c.startswith("envelope")
        for c in codes
    ), codes
    assert all(x.reason for x in letters)
    row = await inst.row(did)
    assert (row["status"], row["provider_message_id"]) == ("queued", None)


async def test_another_tenants_edge_cannot_pre_empt_a_receipt(hub):
    """Receipts of every tenant share one stream (one duplicate window) and carry
    `Nats-Msg-Id: <deliveryId>.<status>`. Delivery ids are keyed with the hub's
    secret, so the id an outsider can derive from public values is not the real
    one: its pre-emptive publish does not swallow the real receipt."""
    import hashlib

    from hubkit import connect_principal

    from hub.auth._permissions import Principal
    from schemas import PrincipalKind

    inst = Instance(hub)
    n = next(_counter)
    guessed = "d-" + hashlib.sha256(f"acme\x1f{inst.id}\x1f{n}".encode()).hexdigest()[:40]
    did = delivery_id("acme", inst.id, n)
    assert did != guessed  # what the renderer would make is not computable outside the hub
    evil = Principal(PrincipalKind.CHANNEL, "evil", "cli-evil", workspaces=("ws-evil",))
    edge = await connect_principal(hub, evil)
    try:
        forged = ChannelReceipt(delivery_id=guessed, status="sent", attempts=1)
        env = Envelope.wrap(
            forged, source=Source(principal_kind="channel", principal_id="cli-evil"), tenant="evil"
        )
        await edge.nc.jetstream(timeout=5).publish(
            subjects.CHANNEL_RECEIPT.build(tenant="evil", instance_id="cli-evil"),
            env.encode(),
            headers={"Nats-Msg-Id": f"{guessed}.sent"},
        )
    finally:
        await edge.close()
    await hub.channel_outbox.send(
        "acme",
        inst.id,
        ChannelOutbound(
            delivery_id=did,
            idempotency_key=did,
            type="text",
            target=ChannelTarget(chat_id="chat-9"),
            text="hi",
        ),
    )
    receipt = ChannelReceipt(delivery_id=did, status="sent", attempts=1, provider_message_id="m-9")
    env = Envelope.wrap(
        receipt, source=Source(principal_kind="channel", principal_id=inst.id), tenant="acme"
    )
    ack = await hub.js.publish(
        subjects.CHANNEL_RECEIPT.build(tenant="acme", instance_id=inst.id),
        env.encode(),
        headers={"Nats-Msg-Id": f"{did}.sent"},
    )
    assert not ack.duplicate
    row = await inst.until_row(did, lambda r: r["status"] == "sent")
    assert row["provider_message_id"] == "m-9"
