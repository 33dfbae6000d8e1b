"""Approval/question tokens against real PostgreSQL: hashed, single use, expiring,
bound to their chat, siblings invalidated."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from hub.channels._actions import TOKEN_PREFIX, ActionTokens, looks_like_token
from hub.core._db import create_pool, migrate

N = 16


@pytest.fixture
async def pool(database_url):
    pool = await create_pool(database_url, min_size=2, max_size=N + 4)
    async with pool.acquire() as conn:
        await migrate(conn)
        for binding, chat in (("b1", "chat-1"), ("b2", "chat-2")):
            await conn.execute(
                "INSERT INTO channel_bindings (tenant, binding_id, instance_id, workspace_id, "
                "chat_id, session_id) VALUES ('acme', $1, 'telegram', 'ws1', $2, 'ses_1')",
                binding,
                chat,
            )
    yield pool
    await pool.close()


async def issue(
    tokens: ActionTokens,
    pool,
    *,
    action="allow",
    request="per_1",
    binding="b1",
    kind="permission",
    ttl=600,
    answer=None,
) -> str:
    async with pool.acquire() as conn:
        return await tokens.issue(
            conn,
            tenant="acme",
            instance_id="telegram",
            binding_id=binding,
            workspace_id="ws1",
            session_id="ses_1",
            kind=kind,
            request_id=request,
            action=action,
            answer=answer,
            ttl_seconds=ttl,
        )


async def consume(
    tokens: ActionTokens,
    pool,
    token: str,
    *,
    tenant="acme",
    instance="telegram",
    chat="chat-1",
    user="u1",
):
    async with pool.acquire() as conn:
        return await tokens.consume(
            conn, tenant, token, instance_id=instance, chat_id=chat, user_id=user
        )


async def test_token_is_short_url_safe_and_stored_only_hashed(pool):
    tokens = ActionTokens(pool)
    token = await issue(tokens, pool)
    assert token.startswith(TOKEN_PREFIX) and looks_like_token(token)
    assert len(token.encode()) <= 64  # Telegram callback_data
    assert all(c.isalnum() or c in "-_" for c in token)
    rows = await pool.fetch("SELECT * FROM channel_action_tokens")
    assert len(rows) == 1
    assert bytes(rows[0]["token_hash"]) == hashlib.sha256(token.encode()).digest()
    assert token not in repr([dict(r) for r in rows])


async def test_single_use_under_concurrent_consumers(pool):
    tokens = ActionTokens(pool)
    token = await issue(tokens, pool)
    results = await asyncio.gather(*(consume(tokens, pool, token, user=f"u{i}") for i in range(N)))
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    won = winners[0]
    assert (won["request_id"], won["action"], won["binding_id"]) == ("per_1", "allow", "b1")
    assert won["used_by"] in {f"u{i}" for i in range(N)}
    assert await consume(tokens, pool, token) is None


async def test_allow_and_deny_pressed_at_once_one_wins(pool):
    tokens = ActionTokens(pool)
    allow = await issue(tokens, pool, action="allow")
    deny = await issue(tokens, pool, action="deny")
    results = await asyncio.gather(
        *(consume(tokens, pool, t, user=f"u{i}") for i, t in enumerate([allow, deny] * (N // 2)))
    )
    assert len([r for r in results if r is not None]) == 1


async def test_consuming_one_invalidates_its_siblings(pool):
    tokens = ActionTokens(pool)
    allow = await issue(tokens, pool, action="allow")
    deny = await issue(tokens, pool, action="deny")
    other_chat = await issue(tokens, pool, action="allow", binding="b2")
    other_request = await issue(tokens, pool, action="allow", request="per_2")
    assert (await consume(tokens, pool, deny))["action"] == "deny"
    assert await consume(tokens, pool, allow) is None
    assert await consume(tokens, pool, other_chat, chat="chat-2") is None
    assert (await consume(tokens, pool, other_request))["request_id"] == "per_2"


async def test_expired_token_is_refused(pool):
    tokens = ActionTokens(pool)
    token = await issue(tokens, pool, ttl=1)
    await pool.execute("UPDATE channel_action_tokens SET expires_at = now() - interval '1 s'")
    assert await consume(tokens, pool, token) is None


async def test_wrong_chat_instance_or_tenant_is_refused_and_does_not_burn_it(pool):
    tokens = ActionTokens(pool)
    token = await issue(tokens, pool)
    assert await consume(tokens, pool, token, chat="chat-2") is None
    assert await consume(tokens, pool, token, instance="slack") is None
    assert await consume(tokens, pool, token, tenant="other") is None
    assert (await consume(tokens, pool, token))["action"] == "allow"


async def test_unknown_or_malformed_tokens_are_none(pool):
    tokens = ActionTokens(pool)
    await issue(tokens, pool)
    assert await consume(tokens, pool, "xx" + "A" * 20) is None  # unknown prefix
    assert await consume(tokens, pool, TOKEN_PREFIX + "A" * 20) is None  # unknown token
    assert await consume(tokens, pool, "") is None


async def test_question_answer_is_returned(pool):
    tokens = ActionTokens(pool)
    token = await issue(
        tokens, pool, kind="question", action="answer", request="que_1", answer=[["Blue"]]
    )
    got = await consume(tokens, pool, token)
    assert (got["kind"], got["action"], got["answer"]) == ("question", "answer", [["Blue"]])


async def test_invalid_action_for_kind_is_refused(pool):
    tokens = ActionTokens(pool)
    with pytest.raises(ValueError):
        await issue(tokens, pool, kind="permission", action="answer")
