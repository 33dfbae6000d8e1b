"""The outbound transports (channels TRANSPORTS), each against its fake platform
speaking the documented protocol, through the real runtime and a real NATS:
what arrives is stored once and in order across cuts, resumes and restarts;
429 and 5xx are waited out; one connection per instance among processes; the
state shows in the instance's health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from fakeplatforms import FAKES, FakePlatform

import channels
from channels import ChannelRuntime, InstanceConfig, RuntimeOptions
from hub.core import _streams
from schemas import ChannelInbound, decode, subjects

KINDS = sorted(channels.TRANSPORTS)
TENANT = "acme"
WORKSPACE = "ws1"


def options(holder: str, **extra: Any) -> RuntimeOptions:
    return RuntimeOptions(
        backoff_base_seconds=0.05,
        backoff_cap_seconds=0.5,
        transport_holder=holder,
        msg_id_key=b"k" * 32,  # one key for every process: as hub replicas share theirs
        **extra,
    )


class Rig:
    def __init__(self, kind: str, fake: FakePlatform, nc: Any, nats_url: str) -> None:
        self.kind, self.fake, self.nc, self.nats_url = kind, fake, nc, nats_url
        self.instance_id = f"{kind}-{uuid.uuid4().hex[:8]}"
        self.runtimes: list[ChannelRuntime] = []
        self.stored: list[ChannelInbound] = []
        self.event = 100

    def config(self, **settings: Any) -> InstanceConfig:
        cls = channels.PROVIDERS[self.kind]
        return InstanceConfig(
            tenant=TENANT,
            instance_id=self.instance_id,
            kind=self.kind,
            workspace_id=WORKSPACE,
            settings=cls.settings_model.model_validate(
                {**self.fake.transport_settings(), **settings}
            ),
            secrets=cls.secrets_model.model_validate(self.fake.instance_secrets()),
        )

    async def runtime(
        self, holder: str = "test-a", *, settle: bool = True, **settings: Any
    ) -> ChannelRuntime:
        """A process running the instance; `settle`: once its transport is connected
        or in standby (a first Matrix sync starts from "now": later is new)."""

        async def connect(cfg: InstanceConfig):
            return await nats.connect(self.nats_url)

        runtime = ChannelRuntime(connect=connect, options=options(holder), deliver_all=False)
        self.runtimes.append(runtime)
        await runtime.start()
        await runtime.apply(self.config(**settings))
        if settle:
            await self.until(
                lambda: self.transport(runtime)["state"] in ("connected", "standby"),
                "the transport to settle",
            )
        return runtime

    async def watch(self) -> None:
        """Everything the instance stored, from the stream (duplicates dropped there)."""
        subject = subjects.CHANNEL_INBOUND.build(
            tenant=TENANT, instance_id=self.instance_id, workspace_id=WORKSPACE
        )

        async def on(msg):
            self.stored.append(decode(msg.data, ChannelInbound).data)

        await self.nc.jetstream().subscribe(subject, cb=on, ordered_consumer=True)

    async def say(self, text: str, chat: str = "100") -> None:
        self.event += 1
        await self.fake.emit(self.fake.signed_message(text, chat_id=chat, event_id=str(self.event)))

    def texts(self) -> list[str]:
        return [m.text for m in self.stored]

    async def until(self, predicate, what: str, timeout: float = 8.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                health = [r.health(self.instance_id) for r in self.runtimes]
                raise AssertionError(
                    f"timed out waiting for {what}; stored {self.texts()}; health {health}"
                )
            await asyncio.sleep(0.02)

    def transport(self, runtime: ChannelRuntime) -> dict[str, Any]:
        return runtime.health(self.instance_id)["transport"]


@contextlib.asynccontextmanager
async def rig_for(kind: str, nats_url: str) -> AsyncIterator[Rig]:
    """A started fake of `kind`, the streams, and a watch on the instance's stream;
    every runtime the test made is stopped after."""
    fake = FAKES[kind]()
    await fake.start()
    nc = await nats.connect(nats_url)
    await _streams.declare(nc.jetstream())
    rig = Rig(kind, fake, nc, nats_url)
    await rig.watch()
    try:
        yield rig
    finally:
        for runtime in rig.runtimes:
            await runtime.stop()
        await nc.close()
        await fake.stop()


@pytest.fixture(params=KINDS)
async def rig(request, nats_url):
    async with rig_for(request.param, nats_url) as made:
        yield made


async def test_a_message_arrives_once_and_health_says_connected(rig: Rig) -> None:
    runtime = await rig.runtime()
    await rig.say("hello")
    await rig.until(lambda: rig.texts() == ["hello"], "the message")
    health = runtime.health(rig.instance_id)
    assert health["transport"]["state"] == "connected", health
    assert health["transport"]["name"] == channels.TRANSPORTS[rig.kind].name
    assert health["transport"]["accepted"] == 1
    assert health["inboundAccepted"] == 1
    stored = rig.stored[0]
    assert stored.provider == rig.instance_id and stored.workspace_id == WORKSPACE
    assert stored.sender.provider_user_id == rig.fake.user_ref("7")


async def test_a_cut_mid_stream_loses_and_duplicates_nothing(rig: Rig) -> None:
    runtime = await rig.runtime()
    await rig.say("one")
    await rig.until(lambda: rig.texts() == ["one"], "the first message")
    rig.fake.drop_next()
    for n in range(2, 7):
        await rig.say(f"m{n}")
    await rig.until(lambda: len(rig.stored) >= 6, "the messages after the cut")
    await asyncio.sleep(0.3)  # nothing more comes
    assert rig.texts() == ["one", "m2", "m3", "m4", "m5", "m6"]  # once each, in order
    assert rig.transport(runtime)["reconnects"] >= 1


async def test_order_per_conversation_holds(rig: Rig) -> None:
    await rig.runtime()
    for n in range(20):
        await rig.say(f"a{n}", chat="100")
        await rig.say(f"b{n}", chat="200")
    await rig.until(lambda: len(rig.stored) >= 40, "40 messages")
    by_chat: dict[str, list[str]] = {}
    for msg in rig.stored:
        by_chat.setdefault(msg.target.chat_id, []).append(msg.text)
    assert by_chat[rig.fake.chat_ref("100")] == [f"a{n}" for n in range(20)]
    assert by_chat[rig.fake.chat_ref("200")] == [f"b{n}" for n in range(20)]


@pytest.mark.parametrize("status", [429, 502])
async def test_rate_limits_and_platform_errors_are_waited_out(rig: Rig, status: int) -> None:
    runtime = await rig.runtime()
    await rig.say("before")
    await rig.until(lambda: rig.texts() == ["before"], "the first message")
    rig.fake.drop_next()  # the connection ends; reconnecting meets the failure
    rig.fake.fail_after_drop(status, retry_after=1.0 if status == 429 else None)
    failed_at = time.monotonic()
    await rig.say("after")
    await rig.until(lambda: rig.texts() == ["before", "after"], "the message after the error")
    transport = rig.transport(runtime)
    assert transport["lastError"] and str(status) in transport["lastError"], transport
    if status == 429:  # retry_after honoured: not before the second is up
        assert time.monotonic() - failed_at >= 0.9


async def test_a_new_process_resumes_from_the_durable_cursor(rig: Rig) -> None:
    first = await rig.runtime("test-a")
    await rig.say("one")
    await rig.until(lambda: rig.texts() == ["one"], "the first message")
    await first.stop()
    await rig.say("while nobody listens")
    await rig.runtime("test-b")
    await rig.until(lambda: len(rig.stored) >= 2, "the message sent meanwhile")
    await asyncio.sleep(0.3)
    assert rig.texts() == ["one", "while nobody listens"]


async def test_one_connection_per_instance_among_processes(rig: Rig) -> None:
    a = await rig.runtime("edge gw1")
    await rig.until(lambda: rig.transport(a)["state"] == "connected", "a connected")
    b = await rig.runtime("hub replica r2")
    await rig.until(lambda: rig.transport(b)["state"] == "standby", "b in standby")
    assert rig.transport(b)["holder"] == "edge gw1"
    await rig.say("to whoever holds it")
    await rig.until(lambda: len(rig.stored) == 1, "the message")
    await a.stop()  # hands the lease back: b takes over within a third of a TTL
    await rig.until(lambda: rig.transport(b)["state"] == "connected", "b took over", 6.0)
    await rig.say("after the handover")
    await rig.until(lambda: len(rig.stored) == 2, "the message after the handover")
    assert rig.fake.conflicts == 0
    assert rig.texts() == ["to whoever holds it", "after the handover"]


async def test_a_button_press_arrives_as_an_interaction(rig: Rig) -> None:
    """Where the platform has no buttons (declared: `buttons` none), approvals
    carry text fallbacks, and the typed `/approve <token>` arrives as that command."""
    press = rig.fake.signed_button_press("ca-token-1", event_id="77")
    await rig.runtime()
    if press is None:
        assert channels.PROVIDERS[rig.kind].capabilities.buttons is None
        await rig.say("/approve ca-token-1")
        await rig.until(lambda: len(rig.stored) == 1, "the typed approval")
        typed = rig.stored[0]
        assert typed.interaction is None and typed.is_command
        assert (typed.command, typed.command_args) == ("approve", ["ca-token-1"])
        return
    await rig.fake.emit(press)
    await rig.until(lambda: len(rig.stored) == 1, "the press")
    assert rig.stored[0].interaction is not None
    assert rig.stored[0].interaction.token == "ca-token-1"


async def test_webhooks_are_refused_for_an_outbound_instance(rig: Rig) -> None:
    runtime = await rig.runtime()
    assert runtime._webhook_instance(rig.instance_id) is None


# --- Discord's Gateway: its own session rules --------------------------------------------
@pytest.fixture
async def gateway(nats_url):
    async with rig_for("discord", nats_url) as made:
        yield made


async def test_gateway_identifies_with_the_message_content_intent(gateway: Rig) -> None:
    runtime = await gateway.runtime()
    await gateway.until(lambda: gateway.transport(runtime)["state"] == "connected", "ready")
    intents = gateway.fake.identified_intents[0]
    assert intents & (1 << 15) and intents & (1 << 9) and intents & (1 << 12)


async def test_gateway_reconnect_request_resumes_and_replays(gateway: Rig) -> None:
    runtime = await gateway.runtime()
    await gateway.say("one")
    await gateway.until(lambda: gateway.texts() == ["one"], "the first message")
    await gateway.fake.send_op(7)  # RECONNECT
    await gateway.say("two")
    await gateway.until(lambda: gateway.texts() == ["one", "two"], "the message after it")
    assert gateway.fake.identifies == 1 and gateway.fake.resumes >= 1
    assert gateway.transport(runtime)["state"] == "connected"


async def test_gateway_invalid_session_identifies_anew(gateway: Rig) -> None:
    await gateway.runtime()
    await gateway.say("one")
    await gateway.until(lambda: gateway.texts() == ["one"], "the first message")
    gateway.fake.invalidate_session()
    await gateway.fake.send_op(7)  # the resume that follows is refused: op 9, d=false
    await gateway.until(lambda: gateway.fake.identifies == 2, "a new session", 10.0)
    await gateway.say("two")
    await gateway.until(lambda: gateway.texts() == ["one", "two"], "the message after it")


async def test_gateway_without_heartbeat_acks_is_a_zombie_and_resumes(gateway: Rig) -> None:
    await gateway.runtime()
    await gateway.until(lambda: gateway.fake.heartbeats >= 1, "a heartbeat")
    gateway.fake.ack_heartbeats = False
    await gateway.until(lambda: gateway.fake.resumes >= 1, "a resume after missed acks")
    gateway.fake.ack_heartbeats = True
    await gateway.say("still here")
    await gateway.until(lambda: gateway.texts() == ["still here"], "the message")


async def test_gateway_bad_token_is_permanent_and_shown(gateway: Rig) -> None:
    gateway.fake.gateway_token = "a-token-the-instance-does-not-have"
    runtime = await gateway.runtime(settle=False)
    await gateway.until(
        lambda: "4004" in (gateway.transport(runtime)["lastError"] or ""),
        "the refusal in health",
    )
    await asyncio.sleep(0.3)
    # Permanent: retried after the backoff cap (0.5 s here), not at once.
    assert gateway.fake.refused_logins <= 2
    assert runtime.health(gateway.instance_id)["state"] == "degraded"


async def test_gateway_interaction_is_stored_then_acknowledged(gateway: Rig) -> None:
    await gateway.runtime()
    await gateway.fake.emit(gateway.fake.signed_button_press("ca-tok", event_id="555"))
    await gateway.until(lambda: "555" in gateway.fake.answered, "the callback")
    assert [m.interaction.token for m in gateway.stored if m.interaction] == ["ca-tok"]
    callback = [body for op, body in gateway.fake.calls if op == "interaction callback"]
    assert callback == [{"type": 6}]  # deferred update, as the webhook answers


# --- Slack's Socket Mode -------------------------------------------------------------------
@pytest.fixture
async def socket_mode(nats_url):
    async with rig_for("slack", nats_url) as made:
        yield made


async def test_socket_mode_acknowledges_stored_envelopes_and_refreshes(socket_mode: Rig) -> None:
    rig = socket_mode
    await rig.runtime()
    await rig.say("one")
    await rig.until(lambda: rig.texts() == ["one"] and not rig.fake.unacked, "one, acked")
    await rig.fake.request_refresh()  # `disconnect`: a new connection, a new URL
    await rig.until(lambda: rig.fake.connections == 2, "the new connection")
    await rig.say("two")
    await rig.until(lambda: rig.texts() == ["one", "two"], "the message after the refresh")
    await rig.until(lambda: not rig.fake.unacked, "every envelope acknowledged")
    assert len(rig.fake.acked) == 2 and rig.fake.conflicts == 0


async def test_socket_mode_without_an_app_token_is_permanent(socket_mode: Rig) -> None:
    rig = socket_mode
    secrets = rig.fake.instance_secrets()
    rig.fake.instance_secrets = lambda: {k: v for k, v in secrets.items() if k != "appToken"}
    runtime = await rig.runtime(settle=False)
    await rig.until(
        lambda: "appToken" in (rig.transport(runtime)["lastError"] or ""), "the refusal"
    )


# --- Matrix's /sync -----------------------------------------------------------------------
@pytest.fixture
async def homeserver(nats_url):
    async with rig_for("matrix", nats_url) as made:
        yield made


async def test_matrix_starts_from_now_joins_invites_and_skips_its_own_echo(
    homeserver: Rig,
) -> None:
    rig, fake = homeserver, homeserver.fake
    await fake.emit(fake.signed_message("history before the bot", event_id="1"))
    await rig.runtime()
    assert fake.syncs[0] is None  # the first sync only finds where "now" is
    fake.invite("!new:fake.test")
    await rig.until(lambda: fake.joined == ["!new:fake.test"], "the invitation joined")
    own = json.loads(fake.signed_message("my own reply", event_id="2").body)
    own["event"]["sender"] = fake.user_id
    fake.log.append(own)
    await rig.say("a new message")
    await rig.until(lambda: rig.texts() == ["a new message"], "only the new message")
    await asyncio.sleep(0.2)
    assert rig.texts() == ["a new message"]


# --- stopping: a swallowed cancel ------------------------------------------------------------
class _SwallowsOneCancel:
    """A transport whose first cancel is lost, as httpx's is when it lands while anyio
    opens a connection (agronholm/anyio#1214): its loop would poll on."""

    name = "swallows-one-cancel"
    swallowed = 0

    def __init__(self, provider: Any, http: Any) -> None:
        pass

    async def run(self, sink: Any) -> None:
        sink.report("polling", connected=True)
        while True:
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if _SwallowsOneCancel.swallowed:
                    raise
                _SwallowsOneCancel.swallowed += 1
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()


async def test_a_transport_that_loses_a_cancel_is_still_stopped(nats_url, monkeypatch) -> None:
    monkeypatch.setitem(channels.TRANSPORTS, "telegram", _SwallowsOneCancel)
    async with rig_for("telegram", nats_url) as rig:
        runtime = await rig.runtime()
        assert rig.transport(runtime)["name"] == "swallows-one-cancel"
        started = time.monotonic()
        await asyncio.wait_for(runtime.stop(), 10)
        assert _SwallowsOneCancel.swallowed == 1
        assert time.monotonic() - started < 3, "the cancel was not repeated soon"
