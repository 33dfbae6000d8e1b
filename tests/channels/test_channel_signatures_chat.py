"""Signature vectors for the chat providers (Telegram, Slack, Discord), and the
webhook answers each platform requires. A request is accepted only when valid;
a replay verifies (the platform retries that way) and maps to the same message
id, so the durable dedupe downstream drops it."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fakeplatforms import FAKES, webhook_request
from fakeplatforms.discord import FakeDiscord
from fakeplatforms.slack import FakeSlack
from fakeplatforms.telegram import FakeTelegram

import channels
from channels import InstanceConfig, VerificationFailed
from schemas import ChannelOutbound, ChannelTarget


def provider_for(fake, instance_id: str | None = None, http: httpx.AsyncClient | None = None):
    cls = channels.PROVIDERS[fake.kind]
    config = InstanceConfig(
        tenant="acme",
        instance_id=instance_id or f"{fake.kind}-test",
        kind=fake.kind,
        workspace_id="ws1",
        settings=cls.settings_model.model_validate(fake.instance_settings()),
        secrets=cls.secrets_model.model_validate(fake.instance_secrets()),
    )
    return cls(config, http or httpx.AsyncClient())


def with_headers(request, **changes: str | None):
    headers = dict(request.headers)
    for name, value in changes.items():
        name = name.replace("_", "-")
        headers = {k: v for k, v in headers.items() if k.lower() != name.lower()}
        if value is not None:
            headers[name] = value
    return webhook_request(request.body, headers, now=request.now)


def refused(provider, request) -> None:
    with pytest.raises(VerificationFailed):
        provider.verify(request)


def assert_replay_is_the_same_message(provider, request) -> None:
    provider.verify(request)
    first = provider.parse(request).messages
    provider.verify(request)
    again = provider.parse(request).messages
    assert first and [m.id for m in first] == [m.id for m in again]


# --- Telegram --------------------------------------------------------------------------------
def test_telegram_secret_token_vectors() -> None:
    fake, other = FakeTelegram(), FakeTelegram()
    provider = provider_for(fake)
    valid = fake.signed_message("hi", event_id="10")
    provider.verify(valid)
    refused(provider, other.signed_message("hi"))  # another bot's secret
    refused(provider, with_headers(valid, X_Telegram_Bot_Api_Secret_Token=None))
    refused(provider, with_headers(valid, X_Telegram_Bot_Api_Secret_Token=""))
    secret = fake.webhook_secret
    refused(provider, with_headers(valid, X_Telegram_Bot_Api_Secret_Token=secret[:-1]))
    refused(provider, with_headers(valid, X_Telegram_Bot_Api_Secret_Token=secret + "x"))
    refused(
        provider,
        with_headers(
            valid,
            X_Telegram_Bot_Api_Secret_Token=secret.upper()
            if secret != secret.upper()
            else secret.lower(),
        ),
    )
    # Telegram's header does not cover the body: a changed body still verifies
    # (transport is TLS); that is the platform's design, declared by the fake.
    provider.verify(fake.tampered(valid))
    assert_replay_is_the_same_message(provider, valid)


def test_telegram_unsupported_updates_are_acknowledged_without_messages() -> None:
    fake = FakeTelegram()
    provider = provider_for(fake)
    request = webhook_request(
        json.dumps({"update_id": 5, "poll": {"id": "1"}}).encode(),
        {"X-Telegram-Bot-Api-Secret-Token": fake.webhook_secret},
    )
    provider.verify(request)
    result = provider.parse(request)
    assert result.status == 200 and result.messages == []


def test_telegram_commands_for_another_bot_are_ignored() -> None:
    fake = FakeTelegram()
    provider = provider_for(fake)
    ours = provider.parse(fake.signed_message(f"/status@{fake.bot_username} now")).messages[0]
    assert (ours.command, ours.command_args, ours.text) == ("status", ["now"], "/status now")
    assert provider.parse(fake.signed_message("/status@some_other_bot")).messages == []


# --- Slack -------------------------------------------------------------------------------------
def test_slack_signature_vectors() -> None:
    fake, other = FakeSlack(), FakeSlack()
    provider = provider_for(fake)
    now = time.time()
    valid = fake.signed_message("hi", event_id="Ev10")
    provider.verify(valid)
    refused(provider, fake.tampered(valid))
    refused(provider, other.signed_message("hi"))  # wrong signing secret
    body = valid.body
    refused(provider, fake.sign(body, "application/json", timestamp=now - 301, now=now))
    refused(provider, fake.sign(body, "application/json", timestamp=now + 301, now=now))
    provider.verify(fake.sign(body, "application/json", timestamp=now - 299, now=now))
    provider.verify(fake.sign(body, "application/json", timestamp=now + 299, now=now))
    refused(provider, with_headers(valid, X_Slack_Signature=None))
    refused(provider, with_headers(valid, X_Slack_Request_Timestamp=None))
    refused(provider, with_headers(valid, X_Slack_Request_Timestamp="12abc"))
    signature = valid.headers["X-Slack-Signature"]
    refused(provider, with_headers(valid, X_Slack_Signature=signature.removeprefix("v0=")))
    refused(provider, with_headers(valid, X_Slack_Signature=signature.upper()))
    # The timestamp is signed: moving it (to dodge the skew check) breaks the signature.
    moved = str(int(valid.headers["X-Slack-Request-Timestamp"]) + 1)
    refused(provider, with_headers(valid, X_Slack_Request_Timestamp=moved))
    assert_replay_is_the_same_message(provider, valid)


def test_slack_url_verification_echoes_the_challenge() -> None:
    fake = FakeSlack()
    provider = provider_for(fake)
    request = fake.signed_url_verification("3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P")
    provider.verify(request)
    result = provider.parse(request)
    assert result.messages == [] and result.status == 200
    assert result.body == b"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"


def test_slack_bot_messages_and_edits_are_not_prompts() -> None:
    fake = FakeSlack()
    provider = provider_for(fake)
    base = {"type": "message", "channel": "C1", "user": "U1", "text": "x", "ts": "1.1"}
    for event in ({**base, "bot_id": "B1"}, {**base, "subtype": "message_changed"}):
        assert provider.parse(fake.signed_event(event, "Ev1")).messages == []
    shared = provider.parse(
        fake.signed_event(
            {
                **base,
                "subtype": "file_share",
                "files": [{"id": "F1", "name": "a.txt", "mimetype": "text/plain", "size": 3}],
            },
            "Ev2",
        )
    ).messages
    assert [a.filename for a in shared[0].attachments] == ["a.txt"]
    mention = provider.parse(
        fake.signed_event(
            {**base, "type": "app_mention", "text": "<@U0BOT> what now?", "thread_ts": "1.0"}, "Ev3"
        )
    ).messages[0]
    assert mention.text == "what now?" and mention.target.thread_id == "1.0"


def test_slack_prompt_slash_command_is_a_prompt() -> None:
    fake = FakeSlack()
    message = provider_for(fake).parse(fake.signed_message("/ask how are you", event_id="t1"))
    [ask] = message.messages
    assert ask.event_type == "command" and not ask.is_command and ask.text == "how are you"
    assert ask.provider_event_id == "t1"


# --- Discord ---------------------------------------------------------------------------------
def test_discord_signature_vectors() -> None:
    fake, other = FakeDiscord(), FakeDiscord()
    provider = provider_for(fake)
    valid = fake.signed_message("hi", event_id="10")
    provider.verify(valid)
    refused(provider, fake.tampered(valid))
    refused(provider, other.signed_message("hi"))  # another application's key
    moved = str(int(valid.headers["X-Signature-Timestamp"]) + 1)
    refused(provider, with_headers(valid, X_Signature_Timestamp=moved))  # timestamp is signed
    for bad in ("zz" * 64, "abc", "", "00" * 64, "00" * 65):
        refused(provider, with_headers(valid, X_Signature_Ed25519=bad))
    refused(provider, with_headers(valid, X_Signature_Timestamp=None))
    # Correctly signed but old (a captured request replayed): refused like Slack's and
    # the webhook kind's, more than 5 minutes either way.
    now = time.time()
    for skew in (-2 * 86400, -3600, -301, 301):
        refused(provider, fake.signed_message("hi", event_id="10", timestamp=now + skew))
    for skew in (-299, 299):
        provider.verify(fake.signed_message("hi", event_id="10", timestamp=now + skew))
    refused(provider, with_headers(fake.signed_message("hi"), X_Signature_Timestamp="12abc"))
    assert_replay_is_the_same_message(provider, valid)


def test_discord_answers_ping_command_and_component() -> None:
    fake = FakeDiscord()
    provider = provider_for(fake)
    pong = provider.parse(fake.signed_ping())
    assert json.loads(pong.body) == {"type": 1} and pong.messages == []
    assert pong.content_type == "application/json"
    command = provider.parse(fake.signed_message("/status now", event_id="11"))
    assert json.loads(command.body) == {"type": 5}
    assert command.messages[0].interaction.response_token.startswith("itok-11-")
    press = provider.parse(fake.signed_button_press("tok", event_id="12"))
    assert json.loads(press.body) == {"type": 6}
    assert press.messages[0].target.message_id == "900"
    thread = provider.parse(fake.signed_message("hi", thread_id="77")).messages[0]
    assert (thread.target.chat_id, thread.target.thread_id) == ("77", "77")


async def test_discord_answer_falls_back_to_the_deferred_response() -> None:
    fake = FakeDiscord()
    await fake.start()
    try:
        async with httpx.AsyncClient() as http:
            provider = provider_for(fake, http=http)
            press = provider.parse(fake.signed_button_press("tok", event_id="13")).messages[0]
            fake.deferred.add(press.interaction.id)  # the webhook answer already deferred it
            await provider.send(
                ChannelOutbound(
                    delivery_id="d1",
                    idempotency_key="d1",
                    type="answer_interaction",
                    target=ChannelTarget(chat_id="100"),
                    text="Approved",
                    interaction=press.interaction,
                )
            )
            assert fake.original_edits == [(press.interaction.response_token, "Approved")]
            # A re-sent delivery carries the same nonce: Discord keeps one message.
            text = ChannelOutbound(
                delivery_id="d2",
                idempotency_key="d2",
                type="text",
                target=ChannelTarget(chat_id="100"),
                text="once",
            )
            first = await provider.send(text)
            again = await provider.send(text)
            assert first.provider_message_id == again.provider_message_id
            assert fake.texts("100") == ["once"]
    finally:
        await fake.stop()


def test_chat_fakes_are_registered() -> None:
    assert {
        "telegram": FakeTelegram,
        "slack": FakeSlack,
        "discord": FakeDiscord,
    }.items() <= FAKES.items()
