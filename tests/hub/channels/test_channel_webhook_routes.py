"""The public webhook routes on a real hub: a platform's signed request for an
enabled instance lands on that instance's inbound subject; disabled, deleted and
unknown instances answer 404; the body cap is the channel limit (not the admin
API's 1 MiB) and every refusal is a JSON error."""

from __future__ import annotations

import itertools
import json

import pytest
from hubkit import client
from test_channel_instances import BASE, TENANT, telegram_body

from schemas import ChannelInbound, decode, subjects

LIMIT = 2 * 1024 * 1024  # above the hub's 1 MiB client_max_size on purpose
_update_ids = itertools.count(1000)


@pytest.fixture(scope="module")
def hub_options() -> dict:
    return {"channel_body_limit_bytes": LIMIT, "trusted_proxies": "127.0.0.1, 10.9.0.0/16"}


def telegram_update(text: str, chat_id: int = 42) -> dict:
    update_id = next(_update_ids)
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": 1_700_000_000,
            "text": text,
            "chat": {"id": chat_id, "type": "private"},
            "from": {"id": 7, "is_bot": False, "first_name": "Ada"},
        },
    }


async def post_update(hub, instance_id: str, secret: str, update: dict, **headers: str):
    async with client(hub) as anonymous:  # platforms carry no admin bearer
        return await anonymous.post(
            f"/webhooks/{instance_id}",
            content=json.dumps(update).encode(),
            headers={
                "Content-Type": "application/json",
                "X-Telegram-Bot-Api-Secret-Token": secret,
                **headers,
            },
        )


async def last_inbound(hub, instance_id: str, workspace: str) -> ChannelInbound:
    subject = subjects.CHANNEL_INBOUND.build(
        tenant=TENANT, instance_id=instance_id, workspace_id=workspace
    )
    msg = await hub.js.get_last_msg("CW_CHANNEL_INBOUND", subject)
    return decode(msg.data, ChannelInbound).data


async def test_signed_update_lands_on_the_instances_inbound_subject(hub, http):
    body = telegram_body("tg-hook", "ws-hook")
    assert (await http.post(BASE, json=body)).status_code == 201
    r = await post_update(
        hub, "tg-hook", body["secrets"]["webhookSecret"], telegram_update("hello from the chat")
    )
    assert r.status_code == 200, r.text
    inbound = await last_inbound(hub, "tg-hook", "ws-hook")
    assert inbound.text == "hello from the chat"
    assert inbound.provider == "tg-hook" and inbound.workspace_id == "ws-hook"
    health = (await http.get(f"{BASE}/tg-hook")).json()["health"]
    assert health["inboundAccepted"] >= 1


async def test_wrong_secret_is_401_json(hub, http):
    body = telegram_body("tg-hook-auth", "ws-auth")
    assert (await http.post(BASE, json=body)).status_code == 201
    r = await post_update(hub, "tg-hook-auth", "whs_wrong", telegram_update("forged"))
    assert r.status_code == 401
    assert r.json()["error"]["code"]
    assert body["secrets"]["webhookSecret"] not in r.text


async def test_disabled_deleted_and_unknown_instances_answer_404(hub, http):
    body = telegram_body("tg-hook-off", "ws-off")
    secret = body["secrets"]["webhookSecret"]
    assert (await http.post(BASE, json=body)).status_code == 201
    assert (await post_update(hub, "tg-hook-off", secret, telegram_update("on"))).status_code == 200

    assert (await http.patch(f"{BASE}/tg-hook-off", json={"enabled": False})).status_code == 200
    r = await post_update(hub, "tg-hook-off", secret, telegram_update("while off"))
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "channel.unknown_instance"
    assert (await last_inbound(hub, "tg-hook-off", "ws-off")).text == "on"

    assert (await http.patch(f"{BASE}/tg-hook-off", json={"enabled": True})).status_code == 200
    r = await post_update(hub, "tg-hook-off", secret, telegram_update("on again"))
    assert r.status_code == 200
    assert (await last_inbound(hub, "tg-hook-off", "ws-off")).text == "on again"

    assert (await http.delete(f"{BASE}/tg-hook-off")).status_code == 204
    r = await post_update(hub, "tg-hook-off", secret, telegram_update("after delete"))
    assert r.status_code == 404

    for path in ("/webhooks/never-created", "/webhooks/Not%20An%20Id"):
        async with client(hub) as anonymous:
            r = await anonymous.post(path, content=b"{}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "channel.unknown_instance"


async def test_body_cap_is_the_channel_limit_with_a_json_413(hub, http):
    body = telegram_body("tg-hook-big", "ws-big")
    secret = body["secrets"]["webhookSecret"]
    assert (await http.post(BASE, json=body)).status_code == 201

    # Over the admin API's 1 MiB but under the channel limit: read and parsed.
    update = telegram_update("x" * (1536 * 1024))
    r = await post_update(hub, "tg-hook-big", secret, update)
    assert r.status_code != 413, r.text

    r = await post_update(hub, "tg-hook-big", secret, telegram_update("y" * (LIMIT + 10)))
    assert r.status_code == 413
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "channel.body_too_large"


async def test_metrics_count_instances_by_state(hub, http):
    body = telegram_body("tg-hook-metrics", "ws-metrics", enabled=False)
    assert (await http.post(BASE, json=body)).status_code == 201
    r = await http.get("/metrics")
    lines = [
        line
        for line in r.text.splitlines()
        if line.startswith('cowork_channel_instances{state="disabled"}')
    ]
    assert lines and float(lines[0].split()[-1]) >= 1


async def test_behind_a_trusted_proxy_one_client_cannot_lock_the_platform_out(hub, http):
    body = telegram_body("tg-proxy", "ws-proxy")
    assert (await http.post(BASE, json=body)).status_code == 201
    secret = body["secrets"]["webhookSecret"]
    attacker = {"X-Forwarded-For": "198.51.100.66, 10.9.1.1"}  # through two of our proxies
    for _ in range(10):
        r = await post_update(hub, "tg-proxy", "whs_wrong", telegram_update("x"), **attacker)
        assert r.status_code == 401
    r = await post_update(hub, "tg-proxy", secret, telegram_update("x"), **attacker)
    assert r.status_code == 429 and r.json()["error"]["code"] == "channel.locked_out"
    # the platform, through the same proxy, is another source: still served
    r = await post_update(
        hub,
        "tg-proxy",
        secret,
        telegram_update("from the platform"),
        **{"X-Forwarded-For": "203.0.113.10"},
    )
    assert r.status_code == 200, r.text


def test_forwarded_headers_count_only_from_trusted_proxies():
    import ipaddress

    from aiohttp.test_utils import make_mocked_request

    from hub.http._app import client_address

    trusted = [ipaddress.ip_network("10.0.0.0/8")]

    def source(remote: str, forwarded: str | None, networks=trusted) -> str:
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        request = make_mocked_request("POST", "/webhooks/x", headers=headers)
        return client_address(request.clone(remote=remote), networks)

    assert source("198.51.100.1", "203.0.113.9") == "198.51.100.1"  # not our proxy: ignored
    assert source("10.0.0.5", "203.0.113.9") == "203.0.113.9"
    assert source("10.0.0.5", "1.2.3.4, 203.0.113.9, 10.0.0.7") == "203.0.113.9"  # forged left
    assert source("10.0.0.5", "not-an-ip") == "10.0.0.5"
    assert source("10.0.0.5", None) == "10.0.0.5"
    assert source("10.0.0.5", "203.0.113.9", []) == "10.0.0.5"  # no setting: the socket


async def test_another_tenants_edge_cannot_pre_empt_a_platform_message(hub, http):
    """JetStream dedupes per stream: an edge of tenant `evil` publishes first, into its
    own inbound subject, with the (public) message id of acme's next Telegram update.
    The signed update still gets its 200 *and* is stored."""
    from hubkit import connect_principal

    from channels._provider import message_id
    from hub.auth._permissions import Principal
    from schemas import ChannelTarget, Envelope, PrincipalKind, Source

    body = telegram_body("tg-forge", "ws-forge")
    assert (await http.post(BASE, json=body)).status_code == 201
    secret = body["secrets"]["webhookSecret"]
    first = telegram_update("first")
    assert (await post_update(hub, "tg-forge", secret, first)).status_code == 200
    seen = await last_inbound(hub, "tg-forge", "ws-forge")
    assert seen.provider_event_id == str(first["update_id"])  # public, guessable

    target = telegram_update("the real one")
    forged_id = message_id(TENANT, "tg-forge", seen.event_type, str(target["update_id"]))
    evil = Principal(PrincipalKind.CHANNEL, "evil", "cli-evil", workspaces=("ws-evil",))
    edge = await connect_principal(hub, evil)
    try:
        decoy = seen.model_copy(
            update={
                "id": forged_id,
                "provider": "cli-evil",
                "workspace_id": "ws-evil",
                "text": "decoy",
                "target": ChannelTarget(chat_id="1"),
            }
        )
        env = Envelope.wrap(
            decoy, source=Source(principal_kind="channel", principal_id="cli-evil"), tenant="evil"
        )
        ack = await edge.nc.jetstream(timeout=5).publish(
            subjects.CHANNEL_INBOUND.build(
                tenant="evil", instance_id="cli-evil", workspace_id="ws-evil"
            ),
            env.encode(),
            headers={"Nats-Msg-Id": forged_id},
        )
        assert not ack.duplicate
    finally:
        await edge.close()
    r = await post_update(hub, "tg-forge", secret, target)
    assert r.status_code == 200
    assert (await last_inbound(hub, "tg-forge", "ws-forge")).text == "the real one"
