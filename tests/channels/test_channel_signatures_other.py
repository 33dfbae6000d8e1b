"""Inbound verification vectors for WhatsApp, email and the generic signed webhook,
plus what each verified request becomes (ids, chats, threads, interactions)."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from fakeplatforms import webhook_request
from fakeplatforms.email import FakeEmail
from fakeplatforms.webhook import FakeWebhook
from fakeplatforms.whatsapp import FakeWhatsApp

from channels import BadRequest, InstanceConfig, VerificationFailed, provider_class


def build(kind: str, fake, **settings):
    cls = provider_class(kind)
    config = InstanceConfig(
        tenant="acme",
        instance_id=f"{kind}-sig",
        kind=kind,
        workspace_id="ws1",
        settings=cls.settings_model.model_validate({**fake.instance_settings(), **settings}),
        secrets=cls.secrets_model.model_validate(fake.instance_secrets()),
    )
    return cls(config, httpx.AsyncClient())


# --- WhatsApp ---------------------------------------------------------------------------------
@pytest.fixture
def whatsapp():
    fake = FakeWhatsApp()
    return fake, build("whatsapp", fake)


def test_whatsapp_valid_signature_parses_a_direct_text_message(whatsapp):
    fake, provider = whatsapp
    request = fake.signed_message("hello there", chat_id="4915550001", event_id="77")
    provider.verify(request)
    [msg] = provider.parse(request).messages
    assert msg.provider_event_id == "wamid.IN77"
    assert (msg.target.chat_id, msg.target.is_direct, msg.sender.provider_user_id) == (
        "4915550001",
        True,
        "4915550001",
    )
    assert msg.sender.display_name == "Ada Lovelace"
    assert msg.text == "hello there" and msg.provider_kind == "whatsapp"


@pytest.mark.parametrize("mutate", ["tampered", "wrong_secret", "missing", "no_prefix"])
def test_whatsapp_bad_signatures_are_refused(whatsapp, mutate):
    fake, provider = whatsapp
    request = fake.signed_message("hello")
    if mutate == "tampered":
        request = fake.tampered(request)
    elif mutate == "wrong_secret":
        request = webhook_request(
            request.body, {"X-Hub-Signature-256": fake.sign(request.body, "not-the-app-secret")}
        )
    elif mutate == "missing":
        request = webhook_request(request.body, {})
    else:
        digest = request.headers["X-Hub-Signature-256"].removeprefix("sha256=")
        request = webhook_request(request.body, {"X-Hub-Signature-256": digest})
    with pytest.raises(VerificationFailed) as caught:
        provider.verify(request)
    assert caught.value.status == 401


def test_whatsapp_subscribe_check_echoes_the_challenge_only_for_the_right_token(whatsapp):
    fake, provider = whatsapp
    answer = provider.handshake(fake.subscribe_check(fake.verify_token, "8723461"))
    assert (answer.status, answer.body, answer.content_type) == (200, b"8723461", "text/plain")
    with pytest.raises(VerificationFailed):
        provider.handshake(fake.subscribe_check(fake.verify_token + "x"))
    with pytest.raises(VerificationFailed):
        provider.handshake(fake.subscribe_check(""))
    # A POST (or a GET that is no subscribe check) is not a handshake.
    assert provider.handshake(fake.signed_message("hi")) is None


def test_whatsapp_button_and_list_replies_become_interactions_statuses_nothing(whatsapp):
    fake, provider = whatsapp
    [press] = provider.parse(fake.signed_button_press("tok-approve-1", chat_id="49")).messages
    assert press.event_type == "interaction" and press.interaction.token == "tok-approve-1"
    listed = fake.event(
        [
            {
                "from": "49",
                "id": "wamid.L1",
                "timestamp": "1",
                "type": "interactive",
                "interactive": {
                    "type": "list_reply",
                    "list_reply": {"id": "tok-row-4", "title": "Four"},
                },
            }
        ]
    )
    [row] = provider.parse(fake.signed(listed)).messages
    assert row.interaction.token == "tok-row-4"
    statuses = fake.event(
        [],
        statuses=[
            {"id": "wamid.OUT1", "status": "delivered", "timestamp": "1", "recipient_id": "49"}
        ],
    )
    result = provider.parse(fake.signed(statuses))
    assert result.messages == [] and result.status == 200


def test_whatsapp_malformed_events_are_bad_requests(whatsapp):
    fake, provider = whatsapp
    for body in (
        b"not json",
        b'{"object": "page"}',
        fake.event([{"from": "49", "type": "text", "text": {"body": "no id"}}]),
    ):
        with pytest.raises(BadRequest):
            provider.parse(fake.signed(body))


# --- email --------------------------------------------------------------------------------------
@pytest.fixture
def email():
    fake = FakeEmail()
    fake.smtp_port = 2525  # never dialled in these tests
    return fake, build("email", fake)


@pytest.mark.parametrize("token,scheme", [(None, "Bearer"), (None, "bearer")])
def test_email_right_bearer_is_accepted(email, token, scheme):
    fake, provider = email
    provider.verify(fake.relay_request({"messageId": "<a@b>"}, token=token, scheme=scheme))


@pytest.mark.parametrize(
    "token,scheme", [("wrong-secret-value-123", "Bearer"), ("", "Bearer"), (None, "Basic")]
)
def test_email_wrong_or_missing_bearer_is_refused(email, token, scheme):
    fake, provider = email
    with pytest.raises(VerificationFailed):
        provider.verify(fake.relay_request({"messageId": "<a@b>"}, token=token, scheme=scheme))


def test_email_reply_threads_on_references_and_strips_the_quote(email):
    fake, provider = email
    request = fake.relay_request(
        {
            "messageId": "<reply-2@mail.example.com>",
            "from": "Ada <ADA@Example.COM>",
            "to": "bot@cowork.test",
            "subject": "Re: Build status",
            "text": "Ship it.\n\nOn Mon, 1 Dec 2026 at 10:00, Bot <bot@cowork.test> wrote:\n"
            "> The build is green.\n",
            "inReplyTo": "<root-1@cowork.test>",
            "references": "<root-1@cowork.test>",
            "attachments": [{"filename": "log.txt", "contentType": "text/plain", "size": 12}],
        }
    )
    provider.verify(request)
    [msg] = provider.parse(request).messages
    assert msg.target.chat_id == "ada@example.com"
    assert msg.target.thread_id == "<root-1@cowork.test>"
    assert msg.provider_event_id == "<reply-2@mail.example.com>"
    assert msg.text == "Ship it." and "The build is green." in msg.raw_text
    assert msg.attachments[0].filename == "log.txt"
    # A new conversation is its own thread.
    [first] = provider.parse(fake.signed_message("hi", event_id="9")).messages
    assert first.target.thread_id == first.provider_event_id == "<msg9@mail.example.com>"


def test_email_bodies_missing_fields_are_bad_requests(email):
    fake, provider = email
    for mail in (
        {"from": "a@b.c"},
        {"messageId": "<x@y>", "from": "not an address"},
        {"messageId": "no-brackets", "from": "a@b.c"},
    ):
        with pytest.raises(BadRequest):
            provider.parse(fake.relay_request(mail))


# --- generic signed webhook ----------------------------------------------------------------------
@pytest.fixture
def hook():
    fake = FakeWebhook()
    fake.base_url = "http://127.0.0.1:9"
    return fake, build("webhook", fake)


def test_webhook_valid_signature_and_replay_gives_the_same_message_id(hook):
    fake, provider = hook
    first = fake.signed_message("deploy please", chat_id="room-1", event_id="e-5", thread_id="t-9")
    provider.verify(first)
    [msg] = provider.parse(first).messages
    assert (msg.provider_event_id, msg.target.chat_id, msg.target.thread_id) == (
        "evt-e-5",
        "room-1",
        "t-9",
    )
    replay = webhook_request(first.body, dict(first.headers))
    provider.verify(replay)
    [again] = provider.parse(replay).messages
    assert again.id == msg.id


@pytest.mark.parametrize(
    "mutate", ["tampered", "wrong_secret", "missing", "past", "future", "bad_timestamp"]
)
def test_webhook_bad_requests_are_refused(hook, mutate):
    fake, provider = hook
    payload = {"id": "e1", "chatId": "c", "userId": "u", "text": "hi"}
    now = time.time()
    if mutate == "tampered":
        request = fake.tampered(fake.signed_body(payload))
    elif mutate == "wrong_secret":
        request = fake.signed_body(payload, secret="some-other-secret-value")
    elif mutate == "missing":
        request = webhook_request(json.dumps(payload).encode(), {})
    elif mutate == "past":
        request = fake.signed_body(payload, timestamp=now - 301, now=now)
    elif mutate == "future":
        request = fake.signed_body(payload, timestamp=now + 301, now=now)
    else:
        signed = fake.signed_body(payload)
        request = webhook_request(signed.body, {**signed.headers, "X-Cowork-Timestamp": "soon"})
    with pytest.raises(VerificationFailed):
        provider.verify(request)


def test_webhook_skew_within_the_window_is_accepted(hook):
    fake, provider = hook
    now = time.time()
    provider.verify(
        fake.signed_body(
            {"id": "e1", "chatId": "c", "userId": "u", "text": "x"}, timestamp=now - 299, now=now
        )
    )


def test_webhook_interaction_and_command_and_bad_bodies(hook):
    fake, provider = hook
    [press] = provider.parse(fake.signed_button_press("tok-1")).messages
    assert press.event_type == "interaction" and press.interaction.token == "tok-1"
    [command] = provider.parse(fake.signed_message("/status now")).messages
    assert command.is_command and command.command == "status" and command.command_args == ["now"]
    with pytest.raises(BadRequest):
        provider.parse(fake.signed_body({"id": "e1", "text": "no chat"}))
