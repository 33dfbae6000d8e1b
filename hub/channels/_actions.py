"""Approval and question tokens carried by chat buttons (and the /approve, /deny,
/answer, /reject text fallbacks).

A token is short (it must fit Telegram's 64-byte `callback_data`), random and
URL-safe; only its SHA-256 is stored, so a database reader cannot press
anybody's buttons, and lookup by hash makes the comparison constant-time by
construction. A token is single use, expires (10 min by default), is only
good in the chat and instance it was rendered to, and consuming one token of a
request (Allow) invalidates its siblings (Deny, and the tokens of the same
request shown in other chats).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from typing import Any

import asyncpg

TOKEN_PREFIX = "ca"  # "channel action": lets the router tell a token from other text
_TOKEN_BYTES = 15  # 120 bits -> 20 base64url characters, 22 with the prefix
ACTIONS = {"permission": frozenset({"allow", "deny"}), "question": frozenset({"answer", "reject"})}
DEFAULT_TTL_SECONDS = 600


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def looks_like_token(text: str) -> bool:
    """A cheap syntactic check (prefix and length); says nothing about validity."""
    return (
        isinstance(text, str)
        and text.startswith(TOKEN_PREFIX)
        and len(text) == len(TOKEN_PREFIX) + 20
    )


def new_token() -> str:
    raw = base64.urlsafe_b64encode(secrets.token_bytes(_TOKEN_BYTES)).decode().rstrip("=")
    return TOKEN_PREFIX + raw


class ActionTokens:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def issue(
        self,
        conn: asyncpg.Connection,
        *,
        tenant: str,
        instance_id: str,
        binding_id: str,
        workspace_id: str,
        session_id: str,
        kind: str,
        request_id: str,
        action: str,
        answer: list | None = None,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
        delivery_id: str | None = None,
    ) -> str:
        """A new token for one button (on the approval message `delivery_id`, whose
        outcome is shown once it is used or expired); the token itself is returned
        once, never stored."""
        if action not in ACTIONS.get(kind, ()):
            raise ValueError(f"action {action!r} is not valid for a {kind!r} request")
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        token = new_token()
        await conn.execute(
            "INSERT INTO channel_action_tokens (token_hash, tenant, instance_id, binding_id, "
            "workspace_id, session_id, kind, request_id, action, answer, expires_at, "
            "delivery_id) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, "
            "now() + make_interval(secs => $11), $12)",
            token_hash(token),
            tenant,
            instance_id,
            binding_id,
            workspace_id,
            session_id,
            kind,
            request_id,
            action,
            answer,
            float(ttl_seconds),
            delivery_id,
        )
        return token

    async def consume(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        token: str,
        *,
        instance_id: str,
        chat_id: str,
        user_id: str,
    ) -> dict[str, Any] | None:
        """The token's request and action if it is valid here and now, marking it (and
        its siblings) used; None when unknown, used, expired or from another chat."""
        if not looks_like_token(token):
            return None  # unknown prefix: never an approval
        digest = token_hash(token)
        async with conn.transaction():
            head = await conn.fetchrow(
                "SELECT workspace_id, session_id, request_id FROM channel_action_tokens "
                "WHERE token_hash = $1 AND tenant = $2",
                digest,
                tenant,
            )
            if head is None:
                return None
            # Lock every token of the request in one order first: two people pressing
            # Allow and Deny at once then queue instead of deadlocking.
            await conn.execute(
                "SELECT 1 FROM channel_action_tokens WHERE tenant = $1 AND workspace_id = $2 "
                "AND session_id = $3 AND request_id = $4 ORDER BY token_hash FOR UPDATE",
                tenant,
                head["workspace_id"],
                head["session_id"],
                head["request_id"],
            )
            row = await conn.fetchrow(_CONSUME, digest, tenant, instance_id, chat_id, user_id)
            if row is None:
                return None
            await conn.execute(
                "UPDATE channel_action_tokens SET used_at = now(), used_by = $5 "
                "WHERE tenant = $1 AND workspace_id = $2 AND session_id = $3 "
                "AND request_id = $4 AND used_at IS NULL",
                tenant,
                head["workspace_id"],
                head["session_id"],
                head["request_id"],
                f"superseded:{user_id}"[:256],
            )
        result = dict(row)
        if isinstance(result.get("answer"), str):  # a pool without the jsonb codec
            result["answer"] = json.loads(result["answer"])
        return result


# One statement: whoever updates the row first wins; everyone else matches nothing.
_CONSUME = """
    UPDATE channel_action_tokens t SET used_at = now(), used_by = $5
    FROM channel_bindings b
    WHERE t.token_hash = $1 AND t.tenant = $2 AND t.instance_id = $3
      AND t.used_at IS NULL AND t.expires_at > now()
      AND b.tenant = t.tenant AND b.binding_id = t.binding_id AND b.chat_id = $4
    RETURNING t.tenant, t.instance_id, t.binding_id, t.workspace_id, t.session_id, t.kind,
              t.request_id, t.action, t.answer, t.expires_at, t.used_at, t.used_by,
              t.delivery_id"""
