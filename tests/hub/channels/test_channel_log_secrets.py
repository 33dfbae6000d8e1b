"""No chat platform secret reaches the hub's log. Telegram puts the bot token in
every Bot API URL, and the HTTP client logs each request URL at info: the
process's logging configuration (the one `cowork up`, `cowork hub serve` and the
edges use) must keep those lines out, at every level."""

from __future__ import annotations

import io
import logging

import pytest
from channelkit import claim_role, create_instance, wait_posted, wait_ready
from desktopkit import TENANT, api
from fakeplatforms import FAKES
from hubkit import client

from hub.core._logging import configure_logging

pytestmark = [pytest.mark.timeout(90)]


@pytest.fixture
def hub_log():
    """The process log as `cowork up --log-level debug` writes it."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging("debug", "json", stream)
    yield stream
    root.handlers[:], level = saved
    root.setLevel(level)


async def test_a_telegram_delivery_never_logs_the_bot_token(hub, hub_log):
    fake = FAKES["telegram"]()
    await fake.start()
    try:
        async with client(hub, admin=True) as admin:
            await create_instance(
                admin,
                fake,
                instance_id="tg-logscan",
                workspace_id="ws-log",
                authority="cloud_worker",
            )
            await wait_ready(admin, "tg-logscan")
            # A claim answered in the chat: inbound webhook, router, a delivery out.
            await claim_role(
                admin, hub.http_url, fake, "tg-logscan", chat_id="300", user_id="31", role="member"
            )
            await wait_posted(fake, "300", lambda p: bool(p.text), what="the claim's answer")
            await api(admin, "GET", f"/api/v1/tenants/{TENANT}/channel-instances/tg-logscan")
    finally:
        await fake.stop()
    operations = [op for op, _ in fake.calls]
    assert "sendMessage" in operations, operations
    log = hub_log.getvalue()
    assert "cowork.hub" in log  # the capture saw the hub's own records
    assert fake.bot_token not in log
    assert fake.bot_token.split(":", 1)[1] not in log
    assert fake.webhook_secret not in log
