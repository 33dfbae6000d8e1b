"""`cowork channel run`: an instance's outbound transport served from an edge
process with the instance's own credential (from `cowork channel login`), against
the running hub and a fake Telegram: no webhook anywhere, the message is stored,
the hub answers it, and for `transportHost: edge` the edge process delivers the
answer (the hub does not)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
from pathlib import Path

import pytest
from fakeplatforms import FAKES

COWORK = str(Path(sys.executable).parent / "cowork")
# PYTHONPATH (set by tests/conftest.py): the subprocess runs this tree's code.
BASE_ENV = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
pytestmark = pytest.mark.timeout(90)


async def cowork(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        COWORK,
        *args,
        env=env or BASE_ENV,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def settings_file(path: Path, fake, mode: int = 0o600, **settings) -> Path:
    secrets_ = {"botToken": fake.bot_token}  # no webhook secret: it polls
    body = {"kind": "telegram", "settings": {**fake.transport_settings(), **settings}}
    path.write_text(json.dumps({**body, "secrets": secrets_}))
    path.chmod(mode)
    return path


@pytest.fixture
async def telegram():
    fake = FAKES["telegram"]()
    await fake.start()
    yield fake
    await fake.stop()


async def test_an_edge_process_serves_the_instance_with_no_webhook(hub, http, telegram, tmp_path):
    instance = f"tg-edge-{secrets.token_hex(3)}"
    settings = {**telegram.transport_settings(), "transportHost": "edge"}
    created = await http.post(
        "/api/v1/tenants/acme/channel-instances",
        json={
            "instanceId": instance,
            "kind": "telegram",
            "workspaceId": "ws-edge",
            "authority": "cloud_worker",
            "settings": settings,
            "secrets": {"botToken": telegram.bot_token},
        },
    )
    assert created.status_code == 201, created.text
    creds = tmp_path / "edge.creds"
    env = {"COWORK_ADMIN_TOKEN": hub.test_admin_token, **BASE_ENV}
    code, out, err = await cowork(
        "channel", "login", instance, "--creds-out", str(creds), "--hub-url", hub.http_url,
        "--tenant", "acme", env=env,
    )  # fmt: skip
    assert code == 0, err
    assert f"cowork channel run {instance}" in out
    config = settings_file(tmp_path / "tg.json", telegram, transportHost="edge")
    proc = await asyncio.create_subprocess_exec(
        COWORK, "channel", "run", instance, "--nats", hub.settings.nats_servers[0],
        "--creds", str(creds), "--tenant", "acme", "--config", str(config),
        "--lease-seconds", str(hub.settings.partition_lease_seconds),
        env=BASE_ENV, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(20):
            while b"transport connected" not in (line := await proc.stderr.readline()):
                assert line, "the process ended before it connected"
        # A chat user writes to the bot: Telegram hands it to the edge's long poll.
        await telegram.emit(telegram.signed_message("/help", chat_id="42", user_id="42"))
        async with asyncio.timeout(20):
            while not telegram.texts("42"):
                await asyncio.sleep(0.05)
        assert "/claim" in telegram.texts("42")[0]  # the hub's answer to a pending user
        view = (await http.get(f"/api/v1/tenants/acme/channel-instances/{instance}")).json()
        assert view["health"]["transport"]["state"] == "stopped"  # the hub does not poll
        assert telegram.conflicts == 0 and telegram.webhook_deleted >= 1
        webhook = await http.post(f"/webhooks/{instance}", content=b"{}")
        assert webhook.status_code == 404  # it has no webhook to answer
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_the_command_refuses_a_bad_settings_file_in_one_line(hub, telegram, tmp_path):
    creds = tmp_path / "any.creds"
    creds.write_text("not used")
    base = ["channel", "run", "tg-x", "--nats", "nats://127.0.0.1:1", "--creds", str(creds)]
    base += ["--tenant", "acme", "--config"]
    readable = settings_file(tmp_path / "open.json", telegram, mode=0o644)
    code, _, err = await cowork(*base, str(readable))
    assert code == 7 and err.count("\n") == 1 and "chmod 600" in err
    assert telegram.bot_token not in err
    webhook = settings_file(tmp_path / "hook.json", telegram, transport="webhook")
    code, _, err = await cowork(*base, str(webhook))
    assert code == 2 and "transport 'outbound'" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "telegram", "settings": {}, "secrets": {"botToken": ""}}))
    os.chmod(bad, 0o600)
    code, _, err = await cowork(*base, str(bad))
    assert code == 7 and "invalid botToken" in err and err.count("\n") == 1
    email = tmp_path / "email.json"
    email.write_text(json.dumps({"kind": "email", "settings": {}, "secrets": {}}))
    os.chmod(email, 0o600)
    code, _, err = await cowork(*base, str(email))
    assert code == 7 and "no outbound transport" in err


async def test_webhook_secrets_are_needed_unless_the_transport_is_outbound(hub, http, telegram):
    instance = f"tg-sec-{secrets.token_hex(3)}"
    base = f"/api/v1/tenants/acme/channel-instances/{instance}"
    body = {
        "instanceId": instance,
        "kind": "telegram",
        "workspaceId": "ws-sec",
        "authority": "cloud_worker",
        "settings": telegram.transport_settings(),
        "secrets": {"botToken": telegram.bot_token},
    }
    refused = await http.post(
        "/api/v1/tenants/acme/channel-instances",
        json={**body, "settings": telegram.instance_settings()},  # a webhook instance
    )
    assert refused.status_code == 422, refused.text
    assert "missing secret 'webhookSecret'" in refused.json()["error"]["message"]
    assert (await http.post("/api/v1/tenants/acme/channel-instances", json=body)).status_code == 201
    back = await http.patch(base, json={"settings": telegram.instance_settings()})
    assert back.status_code == 422 and "webhookSecret" in back.json()["error"]["message"]
    with_secret = await http.patch(
        base,
        json={
            "settings": telegram.instance_settings(),
            "secrets": {"botToken": telegram.bot_token, "webhookSecret": telegram.webhook_secret},
        },
    )
    assert with_secret.status_code == 200, with_secret.text
