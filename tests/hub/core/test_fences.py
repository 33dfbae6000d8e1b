"""Fencing tokens in a real PostgreSQL: a holder whose partition lease moved on has
its write refused, a new holder waits for the old holder's write in flight (so it
lands first, not after), and an old holder stuck mid-write cannot hold the new one
up for longer than the lock timeout."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from hub.core import Fenced, db, fence_token_sql, raise_fence


@pytest.fixture
async def pool(database_url):
    pool = await db.create_pool(database_url, min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await db.migrate(conn)
    try:
        yield pool
    finally:
        await pool.close()


async def check_fence(conn, consumer: str, token: int) -> None:
    """A writer's check in its transaction, as the projector's statement makes it
    (hub/workspaces/_log.py): the fence row FOR SHARE, Fenced unless it is `token`."""
    current = await conn.fetchval(fence_token_sql("$1"), consumer)
    if current != token:
        raise Fenced(f"{consumer}: token {token} is not the partition's ({current})")


async def _writes(pool, token: int) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await check_fence(conn, "p0", token)


async def test_a_later_token_refuses_an_earlier_holders_writes(pool):
    await raise_fence(pool, "p0", 5)
    await _writes(pool, 5)
    await raise_fence(pool, "p0", 9)  # another replica took the lease
    with pytest.raises(Fenced):
        await _writes(pool, 5)
    await _writes(pool, 9)
    with pytest.raises(Fenced):  # an old holder cannot take the fence back
        await raise_fence(pool, "p0", 7)
    await raise_fence(pool, "p0", 9)  # the holder itself, again: fine
    with pytest.raises(Fenced):  # a partition nobody fenced: nobody's write
        await _check_unfenced(pool)


async def _check_unfenced(pool) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await check_fence(conn, "never-fenced", 1)


async def test_a_new_holder_waits_for_the_old_holders_write_in_flight(pool):
    await raise_fence(pool, "p0", 5)
    order: list[str] = []
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await check_fence(conn, "p0", 5)  # the old holder mid-write
        taking = asyncio.create_task(raise_fence(pool, "p0", 9))
        await asyncio.sleep(0.2)
        assert not taking.done(), "the new holder went ahead of a write in flight"
        order.append("old write committed")
        await tx.commit()
    await taking
    order.append("new holder fenced")
    assert order == ["old write committed", "new holder fenced"]
    with pytest.raises(Fenced):
        await _writes(pool, 5)


async def test_an_old_holder_stuck_mid_write_holds_the_new_one_up_briefly(pool):
    await raise_fence(pool, "p0", 5)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await check_fence(conn, "p0", 5)
        started = asyncio.get_running_loop().time()
        with pytest.raises(asyncpg.exceptions.LockNotAvailableError):
            await raise_fence(pool, "p0", 9)
        assert asyncio.get_running_loop().time() - started < 2.0
        await tx.rollback()
    await raise_fence(pool, "p0", 9)  # the next try, once it is gone
