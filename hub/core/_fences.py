"""Fencing tokens in PostgreSQL for work done under a partition lease.

A lease (hub/core/_leases.py) says who should work a partition; it cannot stop a
holder that lost it without knowing (a process frozen, cut off from NATS, or a
write slower than the lease's margin) from writing late, behind the new holder's
writes. The store refuses such a write instead: the new holder raises the
partition's token (migration 0009) before it starts, and each write checks, in
the statement that writes (`fence_token_sql`), that the token is still its
holder's."""

from __future__ import annotations

import asyncpg

from ._deadletter import Fenced

LOCK_TIMEOUT_MS = 500


async def raise_fence(pool: asyncpg.Pool, consumer: str, token: int) -> None:
    """Make `token` the partition's; waits for a write in flight under the old
    token (it holds the row FOR SHARE). Fenced if a later holder's is there."""
    async with pool.acquire() as conn, conn.transaction():
        # Not long: the lease step waits on this. An old holder stuck mid-write is
        # cut off by the server (idle_in_transaction_session_timeout) and the lease
        # is tried again next tick (LockNotAvailableError: the take fails).
        await conn.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
        raised = await conn.fetchval(
            "INSERT INTO partition_fences (consumer, token) VALUES ($1, $2) "
            "ON CONFLICT (consumer) DO UPDATE SET token = EXCLUDED.token "
            "WHERE partition_fences.token <= EXCLUDED.token RETURNING token",
            consumer,
            token,
        )
    if raised is None:
        raise Fenced(f"{consumer}: a later holder's token is in place")


def fence_token_sql(consumer_param: str) -> str:
    """The partition's token, its row locked FOR SHARE until the transaction ends, so
    a new holder's raise_fence waits for the write rather than race it: a writer
    reads it in the statement (or transaction) that writes, and writes only if it
    is its own token (the projector's `append_new(..., fence=...)`).
    `consumer_param`: the statement's parameter naming the consumer."""
    return f"SELECT token FROM partition_fences WHERE consumer = {consumer_param} FOR SHARE"
