"""👀 on a received prompt: the router asks for it where the platform has reactions,
and the delivery runtime treats it as best effort (one attempt, never retried,
never dead-lettered, skipped without the capability).

The runtime tests use the recording test provider of test_channel_runtime; the
router tests use the router kit of test_channel_router against a real hub.
"""

from __future__ import annotations

import dataclasses

import nats
import pytest
from routerkit import TENANT as ROUTER_TENANT
from routerkit import Kit
from test_channel_runtime import (
    FAKE_CAPS,
    TENANT,
    FakeProvider,
    config,
    deliver,
    new_id,
    prepare,
    runtime_for,
    until,
    watch_receipts,
)

import channels
from channels import DeliveryFailed
from channels._registry import PROVIDERS
from schemas import ChannelOutbound, ChannelTarget, DeliveryType, Envelope, Source, subjects

REACTING = dataclasses.replace(FAKE_CAPS, reactions=True)


# --- the delivery runtime -----------------------------------------------------------------
@pytest.fixture
def fake_kind(monkeypatch):
    monkeypatch.setitem(PROVIDERS, "fake", FakeProvider)


@pytest.fixture
async def running(nats_url, fake_kind):
    """start(caps) -> (provider, receipts, instance id, js, runtime)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    runtimes = []

    async def start(caps):
        iid = new_id()
        await prepare(js, iid)
        receipts = await watch_receipts(nc, iid)
        runtime = runtime_for(nats_url, backoff_base_seconds=0.05, backoff_cap_seconds=0.2)
        runtimes.append(runtime)
        await runtime.apply(config(iid, caps=caps))
        return FakeProvider.built[iid], receipts, iid, js, runtime

    yield start
    for runtime in runtimes:
        await runtime.stop()
    await nc.close()


async def react(js, iid: str, delivery_id: str, *, chat: str = "c1", message: str = "pm-1") -> None:
    msg = ChannelOutbound(
        delivery_id=delivery_id,
        idempotency_key=delivery_id,
        type=DeliveryType.REACTION,
        reaction="👀",
        target=ChannelTarget(chat_id=chat, message_id=message),
    )
    data = Envelope.wrap(
        msg,
        source=Source(principal_kind="hub", principal_id="hub"),
        tenant=TENANT,
        workspace=f"ws-{iid}",
    ).encode()
    await js.publish(subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=iid), data)


async def test_a_reaction_is_sent_once_and_a_reserved_one_is_a_duplicate(running):
    provider, receipts, iid, js, runtime = await running(REACTING)
    await react(js, iid, "re-1")
    await until(lambda: receipts, what="reaction receipt")
    await react(js, iid, "re-1")
    await until(lambda: len(receipts) == 2, what="duplicate receipt")
    assert [(d.type, d.reaction, d.target.message_id) for d in provider.sent] == [
        (DeliveryType.REACTION, "👀", "pm-1")
    ]
    assert [r.status.value for r in receipts] == ["sent", "duplicate"]
    assert runtime.health(iid)["delivered"] == 0  # a reaction is not a delivered message


@pytest.mark.parametrize(
    "failure",
    [
        DeliveryFailed("try later", code="fake.busy"),  # retryable for a message
        DeliveryFailed("no such message", code="fake.gone", permanent=True),
        DeliveryFailed("slow down", code="rate_limited", retry_after=0.1),
    ],
)
async def test_a_failed_reaction_is_neither_retried_nor_dead_lettered(running, failure):
    provider, receipts, iid, js, runtime = await running(REACTING)
    provider.failures.append(failure)
    await react(js, iid, "rf-1")
    await deliver(js, iid, "after-rf", text="the answer")  # same lane: not held up
    await until(lambda: receipts, what="receipt of the text")
    assert [key for _, key in provider.attempt_times] == ["rf-1", "after-rf"]  # one attempt
    assert [(r.delivery_id, r.status.value) for r in receipts] == [("after-rf", "sent")]
    health = runtime.health(iid)
    assert health["deadLettered"] == 0 and health["state"] == "ready"


async def test_reactions_are_skipped_where_the_platform_has_none(running):
    provider, receipts, iid, js, _ = await running(FAKE_CAPS)
    assert not FAKE_CAPS.reactions
    await react(js, iid, "rs-1")
    await deliver(js, iid, "after-rs", text="next")
    await until(lambda: receipts, what="receipt of the text")
    assert [d.delivery_id for d in provider.sent] == ["after-rs"]
    assert [r.delivery_id for r in receipts] == ["after-rs"]


# --- the router -------------------------------------------------------------------------------
@pytest.fixture
async def kit(hub):
    return Kit(hub)


TELEGRAM_CAPS = channels.PROVIDERS["telegram"].capabilities


def reactions_of(deliveries: list[ChannelOutbound]) -> list[ChannelOutbound]:
    return [d for d in deliveries if d.type == DeliveryType.REACTION]


async def test_a_submitted_prompt_gets_eyes_where_the_platform_has_reactions(kit, http):
    inst = await kit.instance(http, capabilities=TELEGRAM_CAPS)
    await kit.role(inst, "u1", "member")
    await kit.hub.pool.execute(
        "INSERT INTO channel_bindings (tenant, binding_id, instance_id, workspace_id, chat_id, "
        "session_id) VALUES ($1, $2, $3, $4, 'c1', 'ses_r')",
        ROUTER_TENANT,
        f"b-{inst['instance_id']}",
        inst["instance_id"],
        inst["workspace_id"],
    )
    inbound = await kit.send(inst, "look into it")
    got = await kit.replies(inst, 2)  # the reaction, then the "Desktop is offline" notice
    [reaction] = reactions_of(got)
    assert reaction.reaction == "👀"
    assert reaction.target.chat_id == "c1" and reaction.target.user_id == "u1"
    assert reaction.target.message_id == inbound.provider_message_id
    assert got[0] is reaction  # acknowledged before any reply
    assert got[1].type == DeliveryType.TEXT and "offline" in (got[1].text or "")
    # the same message processed again (a crash before its ack) reacts once
    await kit.hub.pool.execute(
        "UPDATE channel_inbound_claims SET status = 'claimed' WHERE "
        "tenant = $1 AND provider_event_id = $2",
        ROUTER_TENANT,
        inbound.provider_event_id,
    )
    await kit.publish(inst, inbound, msg_id="again-" + inbound.id[:30])
    await kit.processed(inst, inbound)
    rows = await kit.hub.pool.fetch(
        "SELECT type FROM channel_deliveries WHERE instance_id = $1 AND type = 'reaction'",
        inst["instance_id"],
    )
    assert len(rows) == 1


async def test_a_prompt_that_waited_for_its_session_gets_eyes_when_submitted(kit, http):
    inst = await kit.instance(http, authority="cloud_worker", capabilities=TELEGRAM_CAPS)
    await kit.role(inst, "u1", "member")
    inbound = await kit.send(inst, "summarise the repo")
    [reaction] = reactions_of(await kit.replies(inst, 1))
    assert reaction.target.message_id == inbound.provider_message_id

    paired = await kit.instance(http, capabilities=TELEGRAM_CAPS)
    await kit.role(paired, "u1", "member")
    waiting = await kit.send(paired, "first question")
    assert reactions_of(await kit.replies(paired, 1, timeout=1.0)) == []  # not submitted yet
    create = (await kit.commands(paired))[0]
    await kit.complete(create, {"ok": True, "status": "completed", "session": {"id": "s-w"}})
    reactions = reactions_of(await kit.replies(paired, 2))
    assert [r.target.message_id for r in reactions] == [waiting.provider_message_id]


async def test_no_reaction_without_the_capability_a_message_id_or_a_prompt(kit, http):
    plain = dataclasses.replace(TELEGRAM_CAPS, reactions=False)
    inst = await kit.instance(http, authority="cloud_worker", capabilities=plain)
    await kit.role(inst, "u1", "member")
    await kit.send(inst, "summarise the repo")
    await kit.no_reply(inst)  # accepted as edge work, answered with nothing

    reacting = await kit.instance(http, authority="cloud_worker", capabilities=TELEGRAM_CAPS)
    await kit.role(reacting, "u1", "member")
    no_id = kit.inbound(reacting, "from a slash command").model_copy(
        update={"provider_message_id": None}
    )
    await kit.publish(reacting, no_id)
    await kit.processed(reacting, no_id)
    await kit.send(reacting, "/status")  # a chat command, not a prompt
    got = await kit.replies(reacting, 2, timeout=2.0)
    assert reactions_of(got) == [] and len(got) == 1  # only /status's answer
