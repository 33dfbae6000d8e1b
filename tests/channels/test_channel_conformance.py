"""One conformance suite for every channel provider, run against its fake platform.

Each provider's declared capabilities are checked both ways: what it claims
works end to end against a fake speaking the platform's real formats, and what
it does not claim is refused cleanly (DeliveryFailed, permanent) rather than
half-done. A kind in channels.PROVIDERS without a fake in FAKES fails here.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fakeplatforms import FAKES, FakePlatform, webhook_request
from pydantic import ValidationError

import channels
from channels import (
    Capabilities,
    DeliveryFailed,
    InstanceConfig,
    ProviderSettings,
    VerificationFailed,
    WebhookResult,
)
from schemas import ChannelButton, ChannelFile, ChannelOutbound, ChannelTarget, DeliveryType

KINDS = sorted(channels.PROVIDERS)
TENANT = "acme"
WORKSPACE = "ws1"


@dataclass
class Rig:
    kind: str
    fake: FakePlatform
    config: InstanceConfig
    provider: Any
    http: httpx.AsyncClient

    @property
    def caps(self) -> Capabilities:
        return self.provider.capabilities

    @property
    def chat(self) -> str:  # the suite's chat "100" as the platform names it
        return self.fake.chat_ref("100")

    @property
    def user(self) -> str:  # the suite's user "7" as the platform names it
        return self.fake.user_ref("7")


def make_config(kind: str, fake: FakePlatform, instance_id: str) -> InstanceConfig:
    cls = channels.PROVIDERS[kind]
    return InstanceConfig(
        tenant=TENANT,
        instance_id=instance_id,
        kind=kind,
        workspace_id=WORKSPACE,
        settings=cls.settings_model.model_validate(fake.instance_settings()),
        secrets=cls.secrets_model.model_validate(fake.instance_secrets()),
    )


async def started_fake(kind: str) -> FakePlatform:
    if kind not in FAKES:
        pytest.fail(
            f"provider kind {kind!r} has no fake platform in tests/kits/fakeplatforms FAKES"
        )
    fake = FAKES[kind]()
    await fake.start()
    return fake


@pytest.fixture(params=KINDS)
async def rig(request: pytest.FixtureRequest):
    kind = request.param
    fake = await started_fake(kind)
    try:
        async with httpx.AsyncClient() as http:
            config = make_config(kind, fake, f"{kind}-test")
            provider = channels.PROVIDERS[kind](config, http)
            if hasattr(provider, "refresh_keys"):  # the runtime's probe fetches them
                await provider.refresh_keys()
            yield Rig(kind, fake, config, provider, http)
    finally:
        await fake.stop()


def outbound(rig: Rig, **fields: Any) -> ChannelOutbound:
    delivery_id = "d" + uuid.uuid4().hex[:20]
    fields.setdefault("type", "text")
    fields.setdefault("target", ChannelTarget(chat_id=rig.chat))
    return ChannelOutbound(delivery_id=delivery_id, idempotency_key=delivery_id, **fields)


def accepted(rig: Rig, request) -> WebhookResult:
    if rig.caps.inbound != "outbound":  # an outbound transport's connection is the proof
        rig.provider.verify(request)
    return rig.provider.parse(request)


def only_message(result: WebhookResult):
    assert isinstance(result, WebhookResult)
    assert len(result.messages) == 1, result.messages
    return result.messages[0]


async def refused_permanently(rig: Rig, delivery: ChannelOutbound) -> DeliveryFailed:
    with pytest.raises(DeliveryFailed) as caught:
        await rig.provider.send(delivery)
    assert caught.value.permanent, caught.value
    return caught.value


def takes_webhooks(rig: Rig) -> bool:
    """Whether the kind receives HTTP requests; if not, its declared refusal of every
    one is asserted here (the caller then has no signature to check)."""
    request = rig.fake.signed_message("hello")
    if rig.caps.inbound == "stdin":  # a local process's stdin: every HTTP request refused
        rig.provider.verify(request)  # the stdin line itself
        as_http = webhook_request(request.body, {"Content-Type": "application/json"})
        with pytest.raises(VerificationFailed) as caught:
            rig.provider.verify(as_http)
        assert caught.value.code == "cli.no_webhook", caught.value
        return False
    if rig.caps.inbound == "outbound":  # its outbound transport's connection is the proof
        with pytest.raises(VerificationFailed) as caught:
            rig.provider.verify(request)
        assert "receives no webhooks" in caught.value.message, caught.value
        return False
    return True


# --- declarations --------------------------------------------------------------------------
def test_capabilities_are_sane(rig: Rig) -> None:
    caps, cls = rig.caps, channels.PROVIDERS[rig.kind]
    assert cls.kind == rig.kind
    assert isinstance(caps, Capabilities)
    assert caps.max_text_length > 0 and caps.max_file_bytes >= 0
    try:  # a delivery must be able to carry a full-length text
        outbound(rig, text="x" * caps.max_text_length)
    except ValidationError:
        pytest.fail(f"max_text_length {caps.max_text_length} exceeds a delivery's text limit")
    assert "plain" in caps.parse_modes and caps.parse_modes <= {"plain", "markdown", "html"}
    assert caps.interaction_ack in ("none", "optional", "required")
    assert caps.rate_limit in ("none", "retry_after", "fixed_backoff")
    assert caps.inbound in ("webhook", "stdin", "outbound")
    if caps.inbound == "outbound":
        assert rig.kind in channels.TRANSPORTS, "an outbound-only kind needs its transport"
    if caps.buttons is not None:
        assert caps.buttons.max_count >= 1 and caps.buttons.max_rows >= 1
        assert caps.buttons.max_token_bytes >= 1
    if caps.inbound == "webhook":
        assert caps.verification.strip(), "a webhook provider must say how it verifies"
    for model in (cls.settings_model, cls.secrets_model):
        assert issubclass(model, ProviderSettings)
    # A provider calling a platform API lets its base be pointed elsewhere (fakes,
    # proxies); unset, it is the real platform.
    api_base = cls.settings_model.model_fields.get("api_base")
    if rig.fake.authenticates_api:
        assert api_base is not None, "settings need an api_base"
    if api_base is not None and not api_base.is_required():  # required: a homeserver
        assert api_base.default is None or str(api_base.default).startswith("https://")


def test_settings_and_secrets_are_strict(rig: Rig) -> None:
    cls = channels.PROVIDERS[rig.kind]
    with pytest.raises(ValidationError):
        cls.settings_model.model_validate({**rig.fake.instance_settings(), "surprise": 1})
    secrets = rig.fake.instance_secrets()
    with pytest.raises(ValidationError):
        cls.secrets_model.model_validate({**secrets, "surprise": "x"})
    required = [
        name for name, field in cls.secrets_model.model_fields.items() if field.is_required()
    ]
    for name in required:
        alias = cls.secrets_model.model_fields[name].alias or name
        without = {k: v for k, v in secrets.items() if k not in (name, alias)}
        with pytest.raises(ValidationError):
            cls.secrets_model.model_validate(without)
    shown = repr(rig.config.secrets) + str(rig.config.secrets)
    for value in secrets.values():
        if isinstance(value, str) and len(value) >= 8:
            assert value not in shown, "a secret shows in the model's repr"


# --- inbound ---------------------------------------------------------------------------------
def test_signed_message_parses(rig: Rig) -> None:
    message = only_message(
        accepted(
            rig, rig.fake.signed_message("hello there", chat_id="100", user_id="7", event_id="41")
        )
    )
    assert message.provider == rig.config.instance_id
    assert message.provider_kind == rig.kind
    assert message.workspace_id == WORKSPACE
    assert message.target.chat_id == rig.chat
    one_to_one = message.target.is_direct and message.sender.provider_user_id == rig.chat
    sender = rig.chat if one_to_one else rig.user  # 1:1 platforms: the chat is the user
    assert message.sender.provider_user_id == sender
    assert message.target.user_id in (None, sender)
    assert message.text == "hello there"
    event_id = rig.fake.event_ref("41")
    assert message.provider_event_id == event_id
    assert message.id == channels.message_id(
        TENANT, rig.config.instance_id, message.event_type, event_id
    )
    assert not message.is_command
    other = only_message(accepted(rig, rig.fake.signed_message("hello there", event_id="42")))
    assert other.id != message.id


def test_thread_is_parsed_when_declared(rig: Rig) -> None:
    message = only_message(accepted(rig, rig.fake.signed_message("in a thread", thread_id="55")))
    if not rig.caps.threads:  # no threads: the message lands in its chat, unthreaded
        assert message.target.thread_id is None
        assert message.target.chat_id == rig.chat and message.text == "in a thread"
        return
    assert message.target.thread_id == rig.fake.thread_ref("55")


def test_status_parses_as_a_command(rig: Rig) -> None:
    message = only_message(accepted(rig, rig.fake.signed_message("/status now", event_id="43")))
    assert message.is_command
    assert message.command == "status"
    assert message.command_args == ["now"]


def test_tampered_or_unsigned_requests_are_refused(rig: Rig) -> None:
    if not takes_webhooks(rig):
        return
    request = rig.fake.signed_message("hello")
    rig.provider.verify(request)
    if rig.fake.signs_body:
        with pytest.raises(VerificationFailed):
            rig.provider.verify(rig.fake.tampered(request))
    unsigned = {k: v for k, v in request.headers.items() if k.lower() == "content-type"}
    with pytest.raises(VerificationFailed):
        rig.provider.verify(webhook_request(request.body, unsigned, now=request.now))


async def test_instances_do_not_accept_each_others_requests(rig: Rig) -> None:
    if not takes_webhooks(rig):
        return
    other_fake = await started_fake(rig.kind)
    try:
        other = channels.PROVIDERS[rig.kind](
            make_config(rig.kind, other_fake, f"{rig.kind}-other"), rig.http
        )
        if hasattr(other, "refresh_keys"):
            await other.refresh_keys()
        with pytest.raises(VerificationFailed):
            other.verify(rig.fake.signed_message("for the first instance"))
        with pytest.raises(VerificationFailed):
            rig.provider.verify(other_fake.signed_message("for the second instance"))
        other.verify(other_fake.signed_message("its own"))
    finally:
        await other_fake.stop()


# --- outbound --------------------------------------------------------------------------------
async def test_send_text_reaches_the_platform(rig: Rig) -> None:
    result = await rig.provider.send(outbound(rig, text="hello chat"))
    assert result.provider_message_id
    assert rig.fake.texts(rig.chat) == ["hello chat"]


async def test_text_at_exactly_the_limit_is_accepted(rig: Rig) -> None:
    text = ("word " * rig.caps.max_text_length)[: rig.caps.max_text_length - 1] + "!"
    assert len(text) == rig.caps.max_text_length
    await rig.provider.send(outbound(rig, text=text))
    assert rig.fake.texts(rig.chat) == [text]
    await refused_permanently(rig, outbound(rig, text=text + "!"))


async def test_edit_changes_the_message_when_declared(rig: Rig) -> None:
    sent = await rig.provider.send(outbound(rig, text="draft"))
    edit = outbound(rig, type="edit", text="final", edit_message_id=sent.provider_message_id)
    if not rig.caps.edit:
        await refused_permanently(rig, edit)
        return
    await rig.provider.send(edit)
    [posted] = rig.fake.chats[rig.chat]
    assert posted.text == "final" and posted.edits == 1


async def test_buttons_arrive_and_a_press_parses_back(rig: Rig) -> None:
    rows = [
        [
            ChannelButton(label="Approve", token="tok-approve", style="success"),
            ChannelButton(label="Deny", token="tok-deny", style="danger"),
        ]
    ]
    delivery = outbound(rig, type="buttons", text="Run the tool?", buttons=rows)
    if rig.caps.buttons is None:
        await refused_permanently(rig, delivery)
        assert rig.fake.signed_button_press("tok-approve") is None
        return
    await rig.provider.send(delivery)
    [posted] = rig.fake.chats[rig.chat]
    assert posted.buttons == [["Approve", "Deny"]]
    press = only_message(accepted(rig, rig.fake.signed_button_press("tok-deny", event_id="44")))
    assert press.event_type == "interaction"
    assert press.interaction is not None and press.interaction.token == "tok-deny"
    assert press.interaction.kind == "button"
    assert press.sender.provider_user_id in (
        rig.user,
        rig.chat if press.target.is_direct else rig.user,
    )
    too_long = "x" * (rig.caps.buttons.max_token_bytes + 1)
    await refused_permanently(
        rig,
        outbound(
            rig,
            type="buttons",
            text="?",
            buttons=[[ChannelButton(label="Too long", token=too_long)]],
        ),
    )


async def test_answering_an_interaction_when_declared(rig: Rig) -> None:
    press = rig.fake.signed_button_press("tok-1", event_id="45")
    interaction = only_message(accepted(rig, press)).interaction if press else None
    delivery = outbound(
        rig,
        type="answer_interaction",
        text="Done",
        interaction=interaction or {"id": "i1", "token": "t", "kind": "button"},
    )
    if rig.caps.interaction_ack == "none":
        await refused_permanently(rig, delivery)
        return
    await rig.provider.send(delivery)
    assert rig.fake.answered == [interaction.id]


async def test_typing_when_declared(rig: Rig) -> None:
    delivery = outbound(rig, type="typing")
    if not rig.caps.typing:
        await refused_permanently(rig, delivery)
        return
    await rig.provider.send(delivery)
    assert rig.fake.typing == [rig.chat]


async def reaction_target(rig: Rig) -> ChannelTarget:
    """A user's message to react to, as the router names it (the inbound target with
    the platform's message id); Discord's slash commands carry no message id, so
    there a message the bot posted stands in."""
    message = only_message(accepted(rig, rig.fake.signed_message("look at this", event_id="46")))
    if message.provider_message_id:
        return message.target.model_copy(update={"message_id": message.provider_message_id})
    sent = await rig.provider.send(outbound(rig, text="posted"))
    return ChannelTarget(chat_id=rig.chat, message_id=sent.provider_message_id)


async def test_reaction_when_declared(rig: Rig) -> None:
    target = await reaction_target(rig)
    delivery = outbound(rig, type="reaction", reaction="👀", target=target)
    if not rig.caps.reactions:
        await refused_permanently(rig, delivery)
        assert rig.fake.reactions == []
        return
    await rig.provider.send(delivery)
    expected = (
        target.thread_id if rig.kind == "discord" and target.thread_id else target.chat_id,
        target.message_id,
        rig.fake.reaction_ref("👀"),
    )
    assert rig.fake.reactions == [expected]
    # a re-served reaction is not a failure and shows once
    await rig.provider.send(delivery)
    assert rig.fake.reactions == [expected]
    assert rig.fake.texts(rig.chat) in ([], ["posted"])  # a reaction is not a message


async def test_reaction_without_a_message_id_is_refused(rig: Rig) -> None:
    """The contract requires the message id; a delivery built without validation
    must still be refused cleanly, never sent half-formed."""
    delivery = ChannelOutbound.model_construct(
        delivery_id="d-no-message",
        idempotency_key="d-no-message",
        type=DeliveryType.REACTION,
        target=ChannelTarget(chat_id=rig.chat),
        reaction="👀",
    )
    before = len(rig.fake.calls)
    await refused_permanently(rig, delivery)
    assert rig.fake.reactions == [] and len(rig.fake.calls) == before


async def test_file_upload_when_declared(rig: Rig) -> None:
    content = b"report contents\n" * 10
    delivery = outbound(
        rig,
        type="file",
        text="the report",
        file=ChannelFile(
            filename="report.txt",
            mime_type="text/plain",
            content_base64=base64.b64encode(content).decode(),
        ),
    )
    if not rig.caps.file_upload:
        await refused_permanently(rig, delivery)
        return
    before = len(rig.fake.calls)
    await rig.provider.send(delivery)
    assert len(rig.fake.calls) > before
    assert "report.txt" in repr(rig.fake.calls[before:])


async def test_rate_limit_carries_retry_after(rig: Rig) -> None:
    if rig.caps.rate_limit == "none":
        # Declared: no platform limit to honour. A burst goes out at once, whole
        # and in order, with nothing asking to wait.
        for n in range(50):
            await rig.provider.send(outbound(rig, text=f"burst {n}"))
        assert rig.fake.texts(rig.chat) == [f"burst {n}" for n in range(50)]
        return
    rig.fake.fail_next(429, retry_after=7)
    with pytest.raises(DeliveryFailed) as caught:
        await rig.provider.send(outbound(rig, text="hi"))
    assert not caught.value.permanent
    if rig.caps.rate_limit == "retry_after":
        assert caught.value.retry_after == 7
    await rig.provider.send(outbound(rig, text="hi again"))
    assert rig.fake.texts(rig.chat) == ["hi again"]


async def test_server_error_is_retryable(rig: Rig) -> None:
    if not rig.fake.injects_failures:  # a terminal: its output failing is the outage
        await output_fails_retryably(rig)
        return
    rig.fake.fail_next(500)
    with pytest.raises(DeliveryFailed) as caught:
        await rig.provider.send(outbound(rig, text="hi"))
    assert not caught.value.permanent


async def test_client_error_is_permanent(rig: Rig) -> None:
    if not rig.fake.injects_failures:
        # A terminal answers no 4xx: what it cannot show (here a reaction) is the
        # refusal, permanent, and nothing is written.
        target = ChannelTarget(chat_id=rig.chat, message_id="m1")
        delivery = outbound(rig, type="reaction", reaction="👀", target=target)
        failure = await refused_permanently(rig, delivery)
        assert rig.fake.texts(rig.chat) == []
    else:
        rig.fake.fail_next(400)
        failure = await refused_permanently(rig, outbound(rig, text="hi"))
    for value in rig.fake.instance_secrets().values():
        assert value not in str(failure), "a secret leaked into an error message"


async def output_fails_retryably(rig: Rig) -> None:
    """The CLI's documented outage: its output closed or unwritable is a retryable
    failure (`transport.error`), and the next send to a working output goes out."""
    closed = io.StringIO()
    closed.close()
    broken = channels.PROVIDERS[rig.kind](rig.config, rig.http, output=closed)
    with pytest.raises(DeliveryFailed) as caught:
        await broken.send(outbound(rig, text="hi"))
    assert not caught.value.permanent and caught.value.code == "transport.error"
    await rig.provider.send(outbound(rig, text="hi again"))
    assert rig.fake.texts(rig.chat) == ["hi again"]


async def test_probe(rig: Rig) -> None:
    detail = await rig.provider.probe()
    assert isinstance(detail, str) and detail
    if rig.fake.authenticates_api:
        other_fake = FAKES[rig.kind]()  # not started: only its (different) secrets are used
        cls = channels.PROVIDERS[rig.kind]
        wrong = InstanceConfig(
            tenant=TENANT,
            instance_id=f"{rig.kind}-wrong",
            kind=rig.kind,
            workspace_id=WORKSPACE,
            settings=rig.config.settings,
            secrets=cls.secrets_model.model_validate(other_fake.instance_secrets()),
        )
        with pytest.raises(DeliveryFailed) as caught:
            await cls(wrong, rig.http).probe()
        assert caught.value.permanent


# --- platform rules for reactions -----------------------------------------------------------
async def test_reaction_emoji_a_platform_cannot_show_is_refused_before_calling_it() -> None:
    """Telegram allows only a fixed set of reaction emoji (✅ is not one); Slack takes
    names, and an emoji without a known name cannot be sent."""
    for kind, emoji in (("telegram", "✅"), ("slack", "🦜")):
        fake = await started_fake(kind)
        try:
            async with httpx.AsyncClient() as http:
                config = make_config(kind, fake, f"{kind}-emoji")
                rig = Rig(kind, fake, config, channels.PROVIDERS[kind](config, http), http)
                failure = await refused_permanently(
                    rig,
                    outbound(
                        rig,
                        type="reaction",
                        reaction=emoji,
                        target=ChannelTarget(chat_id=rig.chat, message_id="1700000000.000001"),
                    ),
                )
                assert failure.code == "delivery.invalid"
                assert fake.calls == [] and fake.reactions == []
        finally:
            await fake.stop()


def test_signal_envelopes_carry_groups_attachments_and_skip_receipts() -> None:
    """signal-cli's envelopes: a group message with an attachment, a direct one, and
    the receipts and the bot's own sync messages that are nothing for a workspace."""
    fake = FAKES["signal"]()
    fake.base_url = "http://127.0.0.1:9"
    provider = channels.PROVIDERS["signal"](make_config("signal", fake, "signal-unit"), None)
    group = json.loads(fake.signed_message("see the file", event_id="5").body)
    group["envelope"]["dataMessage"]["attachments"] = [
        {"id": "att1", "contentType": "image/png", "filename": "shot.png", "size": 2048}
    ]
    [message] = provider.parse(webhook_request(json.dumps(group).encode(), {})).messages
    assert message.target.chat_id == "group.g100" and not message.target.is_direct
    [attachment] = message.attachments
    assert (attachment.provider_file_id, attachment.filename, attachment.size_bytes) == (
        "att1",
        "shot.png",
        2048,
    )
    direct = fake.signed_message("hi", chat_id="7", user_id="7", event_id="6")
    [dm] = provider.parse(direct).messages
    assert dm.target.is_direct and dm.target.chat_id == fake.user_ref("7")
    receipt = {"envelope": {"source": "+15550000007", "receiptMessage": {"isRead": True}}}
    assert provider.parse(webhook_request(json.dumps(receipt).encode(), {})).messages == []
    own = json.loads(fake.signed_message("echo", event_id="8").body)
    own["envelope"]["sourceNumber"] = own["envelope"]["source"] = "+15550000000"
    assert provider.parse(webhook_request(json.dumps(own).encode(), {})).messages == []
