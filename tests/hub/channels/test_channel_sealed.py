"""A chat channel as a controller of a sealed Desktop (docs/sealed.md, "Channels"),
end to end: real operator-mode NATS, PostgreSQL, the hub (router, renderer, runtime),
a paired Desktop agent on a real `opencode serve` (the tests' fake model) and the
fake Telegram platform. The Desktop owner enrols the instance with a one-time invite
(`cowork channel enrol INSTANCE LINK`); its chat's commands then arrive signed and
its replies are opened with its keys. An instance not enrolled is refused, and one
the Desktop removed can drive it no more."""

from __future__ import annotations

import json

import pytest
from channelkit import (
    claim_role,
    create_instance,
    next_event_id,
    post_webhook,
    send_text,
    telegram_button_data,
    wait_posted,
    wait_ready,
)
from desktopkit import TENANT, cowork, eventually, get_pairing, pair_and_start
from fakeplatforms import FAKES
from hubkit import client
from opencode_env import OPENCODE_OUTPUT_TIMEOUT, RUN_BASH
from sealedkit import seal

from edges.desktop._sealed import create_invite, load_trust, remove
from edges.desktop._store import DesktopStore

# The timeout covers the module's servers starting too: at load 19 one run took 50 s to
# start them and 33 s in `cowork channel enrol`, and hit 120 s before its first prompt;
# and this one test is the first of its OpenCode (opencode_env.OPENCODE_OUTPUT_TIMEOUT).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

USER = "7"
ENROLLED, STRANGER = "tg-sealed", "tg-unenrolled"


@pytest.fixture(scope="module")
def hub_options():
    return {"command_lease_seconds": 10}


async def test_an_enrolled_channel_drives_a_sealed_desktop_and_others_are_refused(
    hub, opencode, operator_nats_url, tmp_path
):
    async with client(hub, admin=True) as admin:
        desktop = await pair_and_start(
            admin,
            operator_nats_url,
            tmp_path / "desktop",
            opencode.url,
            policy={"remoteApprovals": "remote_allowed"},
        )
        fakes = {ENROLLED: FAKES["telegram"](), STRANGER: FAKES["telegram"]()}
        try:
            for instance, fake in fakes.items():
                await fake.start()
                await create_instance(
                    admin, fake, instance_id=instance, workspace_id=desktop.pairing_id
                )
                await wait_ready(admin, instance)
                await claim_role(
                    admin, hub.http_url, fake, instance, chat_id="100", user_id=USER, role="admin"
                )
            await _drive(hub, admin, desktop, fakes, opencode)
        finally:
            for fake in fakes.values():
                await fake.stop()
            await desktop.stop()


async def _drive(hub, admin, desktop, fakes, opencode) -> None:
    pid, directory = desktop.pairing_id, desktop.agent.store.directory
    local = DesktopStore(directory)
    # The pairing's policy (remote approvals allowed) reaches the Desktop before it is
    # sealed: once sealed, the policy is the Desktop's own.
    await eventually(
        lambda: desktop.agent.state.policy.remote_approvals == "remote_allowed",
        10,
        0.1,
        "the pairing's policy on the Desktop",
    )
    seal(desktop)

    async def reported_sealed() -> bool:  # the hub refuses un-enrolled channels by it
        return (await get_pairing(admin, pid))["trust"] == "sealed"

    await eventually(reported_sealed, 10, 0.1, "the pairing to show trust sealed")

    # The Desktop owner makes an invite; `cowork channel enrol` enrols the instance.
    invite = create_invite(local, 600, hub.http_url)
    env = {"COWORK_ADMIN_TOKEN": hub.test_admin_token}
    code, out, err = await cowork("channel", "enrol", ENROLLED, invite.to_text(), env=env)
    assert code == 0, err
    assert "The hub holds this controller's keys" in out
    view = await admin.get(f"/api/v1/tenants/{TENANT}/channel-instances/{ENROLLED}/controller")
    assert view.status_code == 200, view.text
    controller_id = view.json()["controllerId"]
    assert set(view.json()) == {"instanceId", "pairingId", "controllerId", "fingerprint"}
    assert controller_id in load_trust(local).controllers
    # Keys for another pairing than the instance drives are refused; a bad link is one line.
    keys = {"label": "x", "signingSeed": "A" * 43, "encryptionSeed": "A" * 43}
    wrong = await admin.put(
        f"/api/v1/tenants/{TENANT}/channel-instances/{STRANGER}/controller",
        json={"pairingId": "elsewhere", "keys": keys, "desktopKey": invite.desktop_key},
    )
    assert wrong.status_code == 422, wrong.text
    assert wrong.json()["error"]["code"] == "channel_controller.wrong_pairing"
    code, out, err = await cowork("channel", "enrol", STRANGER, "https://not-a-link", env=env)
    assert code == 2 and err.count("\n") == 1 and "[controller.bad_link]" in err, err

    # A prompt from the enrolled chat runs, signed, and its reply (sealed by the
    # Desktop, opened by the hub with the instance's keys) is streamed into the chat.
    marker = "SEALED-CHAT-hello"
    await send_text(hub.http_url, fakes[ENROLLED], ENROLLED, marker, chat_id="101", user_id=USER)
    await wait_posted(
        fakes[ENROLLED],
        "101",
        lambda p: f"reply to: {marker}" in p.text,
        timeout=OPENCODE_OUTPUT_TIMEOUT,
        what="the opened reply",
    )
    rows = await hub.pool.fetch(
        "SELECT kind, payload, signed FROM pairing_commands WHERE tenant = $1 "
        "AND pairing_id = $2 AND actor_id LIKE $3 ORDER BY sequence",
        TENANT,
        pid,
        f"channel:{ENROLLED}:%",
    )
    assert [r["kind"] for r in rows] == ["create_session", "prompt"], rows
    for row in rows:
        signed = row["signed"] if isinstance(row["signed"], dict) else json.loads(row["signed"])
        assert row["payload"] is None and signed["claims"]["controllerId"] == controller_id
    stored = await hub.pool.fetch(
        "SELECT payload::text AS p FROM workspace_events WHERE tenant = $1 AND workspace_id = $2",
        TENANT,
        pid,
    )
    assert stored and not any(marker in r["p"] for r in stored), "the hub's log is ciphertext"
    refused_so_far = [line for line in local.read_audit() if line["action"] == "command.refused"]
    assert refused_so_far == [], "the Desktop verified the channel's signatures"

    # A tool permission, asked in a sealed event, becomes buttons; the press is a
    # signed permission.respond, and the model's answer after the tool reaches the chat.
    fake = fakes[ENROLLED]
    await send_text(hub.http_url, fake, ENROLLED, f"please {RUN_BASH}", chat_id="103", user_id=USER)
    await wait_posted(
        fake,
        "103",
        lambda p: any("allow" in label.lower() for row in p.buttons for label in row),
        timeout=OPENCODE_OUTPUT_TIMEOUT,  # the bash tool's first use
        what="the permission request with buttons",
    )
    press = fake.signed_button_press(
        telegram_button_data(fake, "103", "allow"),
        chat_id="103",
        user_id=USER,
        event_id=next_event_id(),
    )
    assert (await post_webhook(hub.http_url, ENROLLED, press)).status_code == 200
    await wait_posted(
        fake,
        "103",
        lambda p: opencode.model.after_tool_text in p.text,
        what="the model's answer after the approved tool",
    )
    responded = await hub.pool.fetchrow(
        "SELECT payload, signed->'claims'->>'controllerId' AS signer, result_status "
        "FROM pairing_commands WHERE tenant = $1 AND pairing_id = $2 "
        "AND kind = 'permission.respond'",
        TENANT,
        pid,
    )
    assert responded["payload"] is None and responded["signer"] == controller_id, responded

    # A failure comes back sealed too: opened, the chat is told OpenCode's words.
    patched = await admin.patch(
        f"/api/v1/tenants/{TENANT}/channel-instances/{ENROLLED}",
        json={"defaultAgent": "nosuchagent"},
    )
    assert patched.status_code == 200, patched.text
    await send_text(hub.http_url, fake, ENROLLED, "use no agent", chat_id="104", user_id=USER)
    await wait_posted(fake, "104", lambda p: "Agent not found" in p.text, what="the opened failure")
    assert not any("projection_fence" in p.text for p in fake.chats["104"])

    # A channel the Desktop did not enrol is refused at once, in its chat.
    await send_text(
        hub.http_url, fakes[STRANGER], STRANGER, "let me in", chat_id="102", user_id=USER
    )
    refused = await wait_posted(
        fakes[STRANGER], "102", lambda p: "the Desktop is sealed" in p.text, what="the refusal"
    )
    assert "cowork channel enrol" in refused.text

    # Removed on the Desktop like any controller: its next prompt is refused there.
    remove(local, controller_id)
    await send_text(
        hub.http_url, fakes[ENROLLED], ENROLLED, "after removal", chat_id="101", user_id=USER
    )
    told = await wait_posted(
        fakes[ENROLLED], "101", lambda p: "did not run that" in p.text, what="the refusal"
    )
    assert "is not an enrolled controller" in told.text, told.text
    codes = {line.get("code") for line in local.read_audit() if line["action"] == "command.refused"}
    assert codes == {"sealed.unknown_controller"}
