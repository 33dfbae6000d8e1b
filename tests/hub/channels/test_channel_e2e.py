"""Chat platforms as workspace surfaces, end to end: real operator-mode NATS, real
PostgreSQL, the real hub (channel runtime, router, renderer, receipts), a paired
Desktop agent on a real `opencode serve` (the tests' fake model), and fake
Telegram / Slack servers speaking the platforms' own APIs.

What a chat user does is what the tests do: they get a role with a claim code
sent from the chat, their messages arrive as the platform's signed webhook
requests on the hub's public `/webhooks/{instanceId}` route, and what they see is
what the fake platform's chat shows (messages, edits, buttons).
"""

from __future__ import annotations

import json

import pytest
from channelkit import (
    chat_dump,
    claim_role,
    create_instance,
    emit_text,
    instance_view,
    next_event_id,
    post_webhook,
    send_text,
    telegram_button_data,
    wait_posted,
    wait_ready,
)
from desktopkit import TENANT, events, eventually, opencode_events, pair_and_start
from fakeplatforms import FAKES
from hubkit import client
from opencode_env import BASH_OUTPUT, RUN_BASH, SLOW

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

USER = "7"  # the chat user, on both platforms
TELEGRAM, SLACK = "telegram-e2e", "slack-e2e"
# Instances receiving over the hub's outbound transports: no webhook at all.
POLLING, GATEWAY = "telegram-poll-e2e", "discord-gw-e2e"
TEAMS = "teams-e2e"  # Bot Framework activities on the webhook route, JWT-verified


@pytest.fixture(scope="module")
def hub_options():
    return {"command_lease_seconds": 10}


@pytest.fixture(scope="module")
async def admin(hub):
    async with client(hub, admin=True) as http:
        yield http


@pytest.fixture(scope="module")
async def desktop(hub, admin, opencode, operator_nats_url, tmp_path_factory):
    """A paired Desktop whose approvals may be answered remotely (from a chat)."""
    running = await pair_and_start(
        admin,
        operator_nats_url,
        tmp_path_factory.mktemp("desktop"),
        opencode.url,
        policy={"remoteApprovals": "remote_allowed", "remoteQuestions": "remote_allowed"},
    )
    yield running
    if not running.task.done():
        await running.stop()


async def _platform(
    kind: str, instance_id: str, hub, admin, desktop, role: str, outbound: bool = False
):
    fake = FAKES[kind]()
    await fake.start()
    extra = {"settings": fake.transport_settings()} if outbound else {}
    await create_instance(
        admin, fake, instance_id=instance_id, workspace_id=desktop.pairing_id, **extra
    )
    await wait_ready(admin, instance_id)
    await claim_role(
        admin,
        hub.http_url,
        fake,
        instance_id,
        chat_id=_chat(kind, "claim"),
        user_id=USER,
        role=role,
        outbound=outbound,
    )
    return fake


@pytest.fixture(scope="module")
async def telegram(hub, admin, desktop):
    # admin: may prompt and approve
    fake = await _platform("telegram", TELEGRAM, hub, admin, desktop, "admin")
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def slack(hub, admin, desktop):
    fake = await _platform("slack", SLACK, hub, admin, desktop, "member")
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def teams(hub, admin, desktop):
    fake = await _platform("teams", TEAMS, hub, admin, desktop, "member")
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def polling(hub, admin, desktop):
    fake = await _platform("telegram", POLLING, hub, admin, desktop, "member", outbound=True)
    yield fake
    await fake.stop()


@pytest.fixture(scope="module")
async def gateway(hub, admin, desktop):
    fake = await _platform("discord", GATEWAY, hub, admin, desktop, "member", outbound=True)
    yield fake
    await fake.stop()


def _chat(kind: str, name: str) -> str:
    """One chat per test (one session binding each), in the platform's id style."""
    number = {"claim": 100, "stream": 101, "approve": 103, "dup": 104, "refused": 105}[name]
    return f"C{number:07d}" if kind == "slack" else str(number)


async def _prompt_commands(hub, pairing_id: str, text: str) -> list:
    return await hub.pool.fetch(
        "SELECT command_id FROM pairing_commands WHERE tenant = $1 AND pairing_id = $2 "
        "AND kind = 'prompt' AND payload->>'text' = $3",
        TENANT,
        pairing_id,
        text,
    )


async def _streamed_reply(fake, chat: str, reply: str) -> None:
    """The reply arrived streamed: one message, edited until it held the full text."""
    final = await wait_posted(
        fake, chat, lambda p: reply in p.text, what=f"the full reply {reply!r}"
    )
    holding = [p for p in fake.chats[chat] if "reply to:" in p.text]
    assert holding == [final], chat_dump(fake, chat)
    assert final.edits > 0, f"the reply was never edited (not streamed):\n{chat_dump(fake, chat)}"


async def test_telegram_prompt_streams_the_reply_into_one_edited_message(
    hub, telegram, desktop, opencode
):
    chat = _chat("telegram", "stream")
    text = f"{SLOW} hello from telegram"  # ~40 deltas over 2 s: several throttled edits
    await send_text(hub.http_url, telegram, TELEGRAM, text, chat_id=chat, user_id=USER)
    reply = opencode.model.reply_for(text).ljust(opencode.model.slow_chunks, ".")
    await _streamed_reply(telegram, chat, reply)
    operations = [op for op, _ in telegram.calls]
    assert "sendMessage" in operations and "editMessageText" in operations
    assert len(await _prompt_commands(hub, desktop.pairing_id, text)) == 1


async def test_slack_prompt_streams_the_reply_with_post_and_update(hub, slack, desktop, opencode):
    chat = _chat("slack", "stream")
    text = f"{SLOW} hello from slack"
    await send_text(hub.http_url, slack, SLACK, text, chat_id=chat, user_id=USER)
    reply = opencode.model.reply_for(text).ljust(opencode.model.slow_chunks, ".")
    await _streamed_reply(slack, chat, reply)
    operations = [op for op, _ in slack.calls]
    assert "chat.postMessage" in operations and "chat.update" in operations


async def test_permission_is_approved_from_a_telegram_button_once(
    hub, admin, telegram, desktop, opencode
):
    chat, pid = _chat("telegram", "approve"), desktop.pairing_id
    await send_text(
        hub.http_url, telegram, TELEGRAM, f"please {RUN_BASH}", chat_id=chat, user_id=USER
    )
    asked = await wait_posted(
        telegram,
        chat,
        lambda p: any("allow" in label.lower() for row in p.buttons for label in row),
        what="the permission request with Allow/Deny buttons",
    )
    labels = [label.lower() for row in asked.buttons for label in row]
    assert any("deny" in label for label in labels), chat_dump(telegram, chat)
    allow = telegram_button_data(telegram, chat, "allow")

    press = telegram.signed_button_press(
        allow, chat_id=chat, user_id=USER, event_id=next_event_id()
    )
    assert (await post_webhook(hub.http_url, TELEGRAM, press)).status_code == 200

    async def tool_ran() -> bool:
        parts = opencode_events(await events(admin, pid), "message.part.updated")
        return any(BASH_OUTPUT in json.dumps(p) and '"completed"' in json.dumps(p) for p in parts)

    await eventually(tool_ran, 30, 0.1, "the approved bash tool to complete")
    await wait_posted(
        telegram,
        chat,
        lambda p: opencode.model.after_tool_text in p.text,
        what="the model's answer after the tool",
    )
    replied = opencode_events(await events(admin, pid), "permission.replied")
    assert len(replied) == 1

    # The same button again (a new callback query from the platform): single use.
    answered_before = len(telegram.answered)
    again = telegram.signed_button_press(
        allow, chat_id=chat, user_id=USER, event_id=next_event_id()
    )
    assert (await post_webhook(hub.http_url, TELEGRAM, again)).status_code == 200
    await eventually(
        lambda: len(telegram.answered) > answered_before,
        15,
        what="the hub to answer the second press",
    )
    answers = [body for op, body in telegram.calls if op == "answerCallbackQuery"]
    assert "nothing was approved" in answers[-1].get("text", ""), answers
    responds = await hub.pool.fetch(
        "SELECT command_id FROM pairing_commands WHERE tenant = $1 AND pairing_id = $2 "
        "AND kind = 'permission.respond'",
        TENANT,
        pid,
    )
    assert len(responds) == 1, responds
    assert len(opencode_events(await events(admin, pid), "permission.replied")) == 1


async def test_duplicate_webhook_delivery_makes_one_prompt(hub, telegram, desktop, opencode):
    chat = _chat("telegram", "dup")
    text = "hello twice"
    update = telegram.signed_message(text, chat_id=chat, user_id=USER, event_id=next_event_id())
    for _ in range(2):  # the platform retried: the same update, byte for byte
        assert (await post_webhook(hub.http_url, TELEGRAM, update)).status_code == 200
    reply = opencode.model.reply_for(text)
    await wait_posted(telegram, chat, lambda p: reply in p.text, what="the reply")

    # The router handles inbound messages in order, so by the time the first
    # copy's reply is in the chat a second copy would have been submitted too.
    assert len(await _prompt_commands(hub, desktop.pairing_id, text)) == 1
    claims = await hub.pool.fetch(
        "SELECT message_id FROM channel_inbound_claims WHERE tenant = $1 AND instance_id = $2 "
        "AND provider_event_id = $3",
        TENANT,
        TELEGRAM,
        str(_update_id(update)),
    )
    assert len(claims) == 1
    assert sum(1 for p in telegram.chats[chat] if reply in p.text) == 1, chat_dump(telegram, chat)


async def test_teams_activity_with_a_published_key_reaches_the_workspace_and_is_answered(
    hub, teams, desktop, opencode
):
    """The Bot Framework's signed activity on the hub's real webhook route: the
    token checked against the keys the (fake) Bot Framework publishes, the prompt
    in the workspace, the streamed reply out through the connector API."""
    chat = _chat("teams", "stream")
    text = f"{SLOW} hello from teams"
    await send_text(hub.http_url, teams, TEAMS, text, chat_id=chat, user_id=USER)
    reply = opencode.model.reply_for(text).ljust(opencode.model.slow_chunks, ".")
    await _streamed_reply(teams, teams.chat_ref(chat), reply)
    operations = [op for op, _ in teams.calls]
    assert "send" in operations and "update" in operations  # POST, then PUT edits
    assert len(await _prompt_commands(hub, desktop.pairing_id, text)) == 1


async def test_teams_tokens_not_from_the_bot_framework_are_refused_at_the_route(
    hub, teams, desktop, opencode
):
    """A token signed by a key the Bot Framework does not publish, for another
    bot (audience), or expired: each refused at the route with a 4xx and its
    reason, and nothing reaches the workspace."""
    chat = _chat("teams", "refused")
    bad = {
        "unpublished-key": ({"key": teams.unpublished}, "signature.unknown_key"),
        "wrong-audience": (
            {"audience": "00000000-0000-0000-0000-000000000000"},
            "signature.invalid",
        ),
        "expired": ({"expires_in": -400}, "signature.stale"),
    }
    refused = {}
    for case, (token, code) in bad.items():
        text = f"never prompted: {case}"
        message = teams.signed_message(text, chat_id=chat, user_id=USER, event_id=next_event_id())
        published = teams.kid
        if case == "unpublished-key":  # its own key, under a kid never published
            teams.kid = "kid-never-published"
        try:
            request = teams.signed_activity(json.loads(message.body), **token)
        finally:
            teams.kid = published
        response = await post_webhook(hub.http_url, TEAMS, request)
        assert 400 <= response.status_code < 500, (case, response.text)
        refused[case] = response.json()["error"]
        assert refused[case]["code"] == code and refused[case]["message"], (case, refused)
    # A good activity after them, in the same chat, is answered: the router takes
    # a chat's messages in order, so a refused one that got through would have
    # been prompted first.
    after = "hello after the refused ones"
    await send_text(hub.http_url, teams, TEAMS, after, chat_id=chat, user_id=USER)
    reply = opencode.model.reply_for(after)
    await wait_posted(teams, teams.chat_ref(chat), lambda p: reply in p.text, what="the reply")
    for case in bad:
        assert await _prompt_commands(hub, desktop.pairing_id, f"never prompted: {case}") == []
    assert [p.text for p in teams.chats[teams.chat_ref(chat)] if "never prompted" in p.text] == []


def _update_id(request) -> int:
    return json.loads(request.body)["update_id"]


async def _outbound_reply(hub, admin, desktop, opencode, fake, instance: str) -> None:
    """A message over the hub's outbound transport gets its streamed reply; nothing
    posts to the hub's webhook route."""
    chat = _chat(fake.kind, "stream")
    text = f"{SLOW} hello over {instance}"
    await emit_text(fake, text, chat_id=chat, user_id=USER)
    reply = opencode.model.reply_for(text).ljust(opencode.model.slow_chunks, ".")
    await _streamed_reply(fake, chat, reply)
    assert len(await _prompt_commands(hub, desktop.pairing_id, text)) == 1
    view = await instance_view(admin, instance)
    transport = view["health"]["transport"]
    assert transport["state"] == "connected", transport
    assert transport["holder"].startswith("hub replica"), transport
    assert fake.conflicts == 0


async def test_telegram_by_long_polling_gets_its_streamed_reply(
    hub, admin, polling, desktop, opencode
):
    await _outbound_reply(hub, admin, desktop, opencode, polling, POLLING)
    assert polling.webhook_deleted >= 1  # getUpdates needs the webhook unset


async def test_discord_channel_message_over_the_gateway_gets_its_streamed_reply(
    hub, admin, gateway, desktop, opencode
):
    await _outbound_reply(hub, admin, desktop, opencode, gateway, GATEWAY)
    assert gateway.identifies == 1  # one session, held by one replica
