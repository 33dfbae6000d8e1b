"""Chat identity: pending users are refused politely, claim codes promote them
(single use, expiring, hashed, rate limited), and admins list and change roles."""

from __future__ import annotations

import hashlib

import pytest
from routerkit import TENANT, Kit

from hub.channels._identity import CLAIM_ALPHABET, normalise_code

BASE = f"/api/v1/tenants/{TENANT}"


@pytest.fixture
async def kit(hub):
    return Kit(hub)


async def claim_code(http, role: str = "member", **extra) -> dict:
    r = await http.post(f"{BASE}/channel-claim-codes", json={"role": role, **extra})
    assert r.status_code == 201, r.text
    return r.json()


async def test_claim_code_shape_and_only_its_hash_is_stored(kit, http):
    body = await claim_code(http, "approver")
    code = body["code"]
    assert len(code) == 12 and code[4] == code[9] == "-"
    assert all(ch in CLAIM_ALPHABET for ch in code.replace("-", ""))
    assert body["role"] == "approver" and body["expiresAt"]
    rows = await kit.hub.pool.fetch("SELECT * FROM channel_claim_codes")
    assert any(
        r["code_hash"] == hashlib.sha256(code.replace("-", "").encode()).digest() for r in rows
    )
    assert code not in str([dict(r) for r in rows])
    audit = await kit.hub.pool.fetch(
        "SELECT * FROM audit_log WHERE action = 'channel.claim_code_created'"
    )
    assert audit and code not in str([dict(r) for r in audit])
    assert normalise_code(code.lower().replace("-", " ")) == code.replace("-", "")


async def test_claim_code_requests_are_validated(http):
    for body in ({"role": "pending"}, {"role": "emperor"}, {}):
        r = await http.post(f"{BASE}/channel-claim-codes", json=body)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
    r = await http.post(
        f"{BASE}/channel-claim-codes", json={"role": "member", "instanceId": "tg-missing"}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "channel_instance.not_found"


async def test_pending_user_is_refused_then_claims_and_prompts(kit, http):
    inst = await kit.instance(http)
    inbound = await kit.send(inst, "hi, can I use this?", user="newbie")
    text = await kit.reply(inst)
    assert "claim code" in text and "/claim CODE" in text
    assert (await kit.claim(inst, inbound))["outcome"] == "refused"
    assert await kit.commands(inst) == []
    refused = await kit.hub.pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE action = 'channel.command_refused' "
        "AND target_id = $1",
        f"{inst['instance_id']}/newbie",
    )
    assert refused == 1

    code = (await claim_code(http, "member", instanceId=inst["instance_id"]))["code"]
    await kit.send(inst, f"/claim {code.lower()}", user="newbie")
    assert (await kit.reply(inst)).startswith("Welcome! Your role is now member.")
    role = await kit.hub.pool.fetchval(
        "SELECT role FROM channel_users WHERE instance_id = $1 AND provider_user_id = 'newbie'",
        inst["instance_id"],
    )
    assert role == "member"
    await kit.send(inst, "now it works", user="newbie")
    assert [c["kind"] for c in await kit.commands(inst)] == ["create_session"]
    redeemed = await kit.hub.pool.fetchrow(
        "SELECT * FROM audit_log WHERE action = 'channel.claim_code_redeemed' AND target_id = $1",
        f"{inst['instance_id']}/newbie",
    )
    assert redeemed["metadata"]["role"] == "member"


async def test_used_expired_and_foreign_codes_are_refused(kit, http):
    inst = await kit.instance(http)
    other = await kit.instance(http)
    code = (await claim_code(http, "admin"))["code"]
    await kit.send(inst, f"/claim {code}", user="alice")
    assert "admin" in await kit.reply(inst)
    await kit.send(inst, f"/claim {code}", user="mallory")  # reused
    assert "not valid" in await kit.reply(inst)

    expired = (await claim_code(http, "admin"))["code"]
    await kit.hub.pool.execute(
        "UPDATE channel_claim_codes SET expires_at = now() - interval '1 second' "
        "WHERE code_hash = $1",
        hashlib.sha256(expired.replace("-", "").encode()).digest(),
    )
    await kit.send(inst, f"/claim {expired}", user="mallory")
    assert "not valid" in await kit.reply(inst)

    scoped = (await claim_code(http, "member", instanceId=other["instance_id"]))["code"]
    await kit.send(inst, f"/claim {scoped}", user="mallory")
    assert "not valid" in await kit.reply(inst)
    for guess in ("NOT-A-CODE", "ABCD-EFGH-JK"):
        await kit.send(inst, f"/claim {guess}", user="mallory")
        assert "not valid" in await kit.reply(inst)
    role = await kit.hub.pool.fetchval(
        "SELECT role FROM channel_users WHERE instance_id = $1 AND provider_user_id = 'mallory'",
        inst["instance_id"],
    )
    assert role == "pending"
    # Five attempts spent: the next one is refused without even looking at the code.
    fresh = (await claim_code(http, "member"))["code"]
    await kit.send(inst, f"/claim {fresh}", user="mallory")
    assert "Too many claim attempts" in await kit.reply(inst)


async def test_admin_lists_and_changes_roles(kit, http):
    inst = await kit.instance(http)
    await kit.send(inst, "hello", user="bob")
    await kit.reply(inst)
    r = await http.get(f"{BASE}/channel-instances/{inst['instance_id']}/users")
    assert r.status_code == 200
    users = r.json()["users"]
    assert [(u["providerUserId"], u["role"], u["displayName"]) for u in users] == [
        ("bob", "pending", "BOB")
    ]
    r = await http.patch(
        f"{BASE}/channel-instances/{inst['instance_id']}/users/bob", json={"role": "approver"}
    )
    assert r.status_code == 200 and r.json()["role"] == "approver"
    audit = await kit.hub.pool.fetchrow(
        "SELECT * FROM audit_log WHERE action = 'channel.user_promoted' AND target_id = $1",
        f"{inst['instance_id']}/bob",
    )
    assert audit["metadata"]["from"] == "pending" and audit["metadata"]["to"] == "approver"
    r = await http.patch(
        f"{BASE}/channel-instances/{inst['instance_id']}/users/nobody", json={"role": "member"}
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "channel_user.not_found"
    r = await http.patch(
        f"{BASE}/channel-instances/{inst['instance_id']}/users/bob", json={"role": "god"}
    )
    assert r.status_code == 422
    r = await http.get(f"{BASE}/channel-instances/tg-unknown/users")
    assert r.status_code == 404
    # The approver may approve but still not prompt.
    await kit.send(inst, "run something", user="bob")
    assert "may not send prompts" in await kit.reply(inst)


async def test_pending_user_is_told_how_to_get_access_once_per_interval(kit, http):
    """A stranger's plain messages get the access help once per 10 minutes (spam
    protection), each refusal is still audited, and /help always answers."""
    inst = await kit.instance(http)
    first = await kit.send(inst, "hello?", user="stranger")
    assert "/claim CODE" in await kit.reply(inst)
    second = await kit.send(inst, "hello again?", user="stranger")
    third = await kit.send(inst, "anyone?", user="stranger")
    await kit.no_reply(inst)
    for inbound in (first, second, third):
        assert (await kit.claim(inst, inbound))["outcome"] == "refused"
    refused = await kit.hub.pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE action = 'channel.command_refused' "
        "AND target_id = $1",
        f"{inst['instance_id']}/stranger",
    )
    assert refused == 3
    await kit.send(inst, "/help", user="stranger")  # asked explicitly: answered
    assert "/claim CODE" in await kit.reply(inst)
    await kit.send(inst, "hi", user="someone_else")  # the interval is per user
    assert "/claim CODE" in await kit.reply(inst)

    # Once the interval has passed, the next plain message is answered again.
    await kit.hub.pool.execute(
        "UPDATE channel_users SET access_help_sent_at = now() - interval '11 minutes' "
        "WHERE instance_id = $1 AND provider_user_id = 'stranger'",
        inst["instance_id"],
    )
    await kit.send(inst, "still there?", user="stranger")
    assert "/claim CODE" in await kit.reply(inst)
    await kit.send(inst, "and now?", user="stranger")
    await kit.no_reply(inst)
