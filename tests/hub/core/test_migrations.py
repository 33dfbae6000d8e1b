"""Versioned, idempotent migrations that are safe under hubs starting together."""

import asyncio

import asyncpg
import pytest

from hub.core import _db


async def test_migrations_apply_once_then_are_a_no_op(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        assert await _db.current_version(conn) == 0
        first = await _db.migrate(conn)
        assert first == list(range(1, _db.head_version() + 1))
        assert await _db.migrate(conn) == []
        assert await _db.current_version(conn) == _db.head_version()
    finally:
        await conn.close()


async def test_concurrent_migrations_apply_each_version_exactly_once(database_url):
    conns = [await asyncpg.connect(database_url) for _ in range(6)]
    try:
        results = await asyncio.gather(*(_db.migrate(c) for c in conns))
        applied = sorted(v for r in results for v in r)
        assert applied == list(range(1, _db.head_version() + 1))
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == applied
    finally:
        for c in conns:
            await c.close()


async def test_a_changed_migration_is_refused(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await _db.migrate(conn)
        await conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(_db.MigrationError, match="changed after it was applied"):
            await _db.migrate(conn)
    finally:
        await conn.close()


async def test_a_database_newer_than_the_hub_is_refused(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await _db.migrate(conn)
        await conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')"
        )
        with pytest.raises(_db.MigrationError, match="upgrade the hub"):
            await _db.migrate(conn)
    finally:
        await conn.close()


async def test_audit_log_is_append_only(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        await _db.migrate(conn)
        await conn.execute(
            "INSERT INTO audit_log (action, actor_kind, actor_id) "
            "VALUES ('pairing.created', 'admin', 'a1')"
        )
        for sql in (
            "UPDATE audit_log SET reason = 'rewritten'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(sql)
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 1
    finally:
        await conn.close()
