"""Approval and question messages show their outcome, in place, once.

The renderer records every approval/question message it sends
(`channel_approval_messages`, keyed by its delivery id) and stamps that
delivery id on the message's tokens. When a token is consumed, every message
showing the same request (it may be shown in several chats) is edited to the
outcome ("✅ Allowed by Ann", ...) without its buttons; when all tokens of a
message expired unused, a sweep edits it to "⌛ Expired: nothing was approved".
`settled_at` makes each message change once, in the same transaction that
queues the edit. Platforms that cannot edit get nothing more: the answer to
the button press (or the router's reply) already confirmed the action.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import asyncpg

from schemas import ChannelOutbound, ChannelTarget, DeliveryType

from ..core import kv
from ._outbox import ChannelOutbox, delivery_id

log = logging.getLogger("cowork.hub.channels.approvals")
EXPIRED = "⌛ Expired: nothing was approved"
SWEEP_BATCH = 100


def outcome_text(kind: str, action: str, who: str, answer: str = "") -> str:
    """What an approval message says once it was acted on."""
    if kind == "permission":
        return f"✅ Allowed by {who}" if action == "allow" else f"🚫 Denied by {who}"
    if action == "reject":
        return f"🚫 Rejected by {who}"
    answer = " ".join(answer.split())
    return f"💬 Answered by {who}: {answer[:500]}"


async def record_approval_message(
    conn: asyncpg.Connection,
    tenant: str,
    delivery: str,
    instance_id: str,
    binding_id: str,
    prompt: str,
) -> None:
    await conn.execute(
        "INSERT INTO channel_approval_messages (tenant, delivery_id, instance_id, binding_id, "
        "prompt) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, delivery_id) DO NOTHING",
        tenant,
        delivery,
        instance_id,
        binding_id,
        prompt,
    )


class ApprovalOutcomes:
    def __init__(
        self, pool: asyncpg.Pool, outbox: ChannelOutbox, instance: Callable[[str], dict | None]
    ) -> None:
        self._pool, self._outbox, self._instance = pool, outbox, instance

    async def settle(self, tenant: str, request: dict[str, Any], text: str) -> int:
        """Show `text` on every still-open message of the consumed token's request;
        how many edits were queued."""
        async with self._pool.acquire() as conn, conn.transaction():
            messages = await conn.fetch(
                _SETTLE_REQUEST,
                tenant,
                request["workspace_id"],
                request["session_id"],
                request["request_id"],
                text,
            )
            return await self._edit(conn, tenant, messages, text)

    async def sweep_expired(self) -> int:
        """Settle messages whose tokens all expired unused; how many edits were queued."""
        queued = 0
        async with self._pool.acquire() as conn, conn.transaction():
            messages = await conn.fetch(_SETTLE_EXPIRED, EXPIRED, SWEEP_BATCH)
            for m in messages:
                queued += await self._edit(conn, m["tenant"], [m], EXPIRED)
        return queued

    async def _edit(
        self, conn: asyncpg.Connection, tenant: str, messages: list[asyncpg.Record], outcome: str
    ) -> int:
        queued = 0
        for m in messages:
            inst = self._instance(m["instance_id"])
            caps = inst.get("capabilities") if inst else None
            if (
                inst is None
                or inst.get("tenant") != tenant
                or inst.get("enabled") is False
                or caps is None
                or not caps.edit
            ):
                continue  # nothing more to send: the interaction answer confirmed it
            binding = await conn.fetchrow(
                "SELECT chat_id, thread_key, is_direct FROM channel_bindings WHERE tenant = $1 "
                "AND binding_id = $2",
                tenant,
                m["binding_id"],
            )
            if binding is None:
                continue
            shown = await conn.fetchval(
                "SELECT provider_message_id FROM channel_deliveries WHERE tenant = $1 "
                "AND delivery_id = $2",
                tenant,
                m["delivery_id"],
            )
            text = _with_prompt(m["prompt"], outcome, caps.max_text_length)
            edit_id = delivery_id(tenant, "approval-outcome", m["delivery_id"])
            await self._outbox.send(
                tenant,
                m["instance_id"],
                ChannelOutbound(
                    delivery_id=edit_id,
                    idempotency_key=edit_id,
                    type=DeliveryType.EDIT,
                    text=text,
                    edit_of_delivery_id=m["delivery_id"],
                    edit_message_id=shown,
                    target=ChannelTarget(
                        chat_id=binding["chat_id"],
                        is_direct=binding["is_direct"],
                        thread_id=binding["thread_key"] or None,
                    ),
                ),
                conn=conn,
            )
            queued += 1
            log.info(
                "channel.approval_settled",
                **kv(instance=m["instance_id"], delivery=m["delivery_id"]),
            )
        return queued


def _with_prompt(prompt: str, outcome: str, limit: int) -> str:
    """The request as it was shown, then its outcome (the prompt shortened to fit)."""
    room = max(0, limit - len(outcome) - 2)
    if len(prompt) > room:
        prompt = prompt[: max(0, room - 1)] + "…" if room > 1 else ""
    return f"{prompt}\n\n{outcome}" if prompt else outcome


_SETTLE_REQUEST = """
    UPDATE channel_approval_messages m SET settled_at = now(), outcome = $5
    WHERE m.tenant = $1 AND m.settled_at IS NULL AND m.delivery_id IN (
        SELECT t.delivery_id FROM channel_action_tokens t
        WHERE t.tenant = $1 AND t.workspace_id = $2 AND t.session_id = $3
          AND t.request_id = $4 AND t.delivery_id IS NOT NULL)
    RETURNING m.tenant, m.delivery_id, m.instance_id, m.binding_id, m.prompt"""

# Open messages that have tokens, none of them used and none still valid.
_SETTLE_EXPIRED = """
    UPDATE channel_approval_messages m SET settled_at = now(), outcome = $1
    WHERE (m.tenant, m.delivery_id) IN (
        SELECT o.tenant, o.delivery_id FROM channel_approval_messages o
        WHERE o.settled_at IS NULL
          AND EXISTS (SELECT 1 FROM channel_action_tokens t
                      WHERE t.tenant = o.tenant AND t.delivery_id = o.delivery_id)
          AND NOT EXISTS (SELECT 1 FROM channel_action_tokens t
                          WHERE t.tenant = o.tenant AND t.delivery_id = o.delivery_id
                            AND (t.used_at IS NOT NULL OR t.expires_at > now()))
        ORDER BY o.created_at LIMIT $2 FOR UPDATE SKIP LOCKED)
    RETURNING m.tenant, m.delivery_id, m.instance_id, m.binding_id, m.prompt"""
