"""PostgreSQL: the connection pool and the versioned SQL migrations.

Migrations are `hub/core/migrations/NNNN_name.sql`, applied in order, each in its own
transaction, under a session advisory lock so that hubs starting at the same
time apply each one exactly once. An applied file whose text changed is an
error: history is never rewritten silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from ._logging import kv

log = logging.getLogger("cowork.hub.db")

# Any constant works; it only has to be the same for every hub of a database.
_MIGRATION_LOCK = 0x636F776F726B  # "cowork"
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def like_escaped(text: str) -> str:
    """`text` matched literally inside a LIKE/ILIKE pattern (`ESCAPE '\\'`): a list's
    "a part of the label" filter."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class JsonbText(bytes):
    """JSON text already encoded (e.g. by pydantic-core's `to_json`, about 4x faster
    than `json.dumps` for an event payload), written to a jsonb column as it is;
    any other value is encoded by `json.dumps`. PostgreSQL parses and checks it
    either way."""


def _jsonb(value: object) -> bytes:
    return b"\x01" + (value if type(value) is JsonbText else json.dumps(value).encode())


class MigrationError(RuntimeError):
    """The database's migration history does not match this hub's migrations."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("hub.core").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationError(f"migration versions must be 1..N without gaps, found {versions}")
    return found


def head_version() -> int:
    return len(load_migrations())


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply every pending migration; returns the versions this call applied."""
    migrations = load_migrations()
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY, name text NOT NULL,
                   checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:04d}_{migration.name} was changed "
                        "after it was applied; add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(migration.version)
            log.info("db.migration_applied", **kv(version=migration.version, name=migration.name))
        unknown = sorted(set(applied) - {m.version for m in migrations})
        if unknown:
            raise MigrationError(
                f"database has migrations {unknown} this hub does not know: it is older than "
                "the database; upgrade the hub"
            )
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied_now


async def current_version(conn: asyncpg.Connection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary format, so COPY (copy_records_to_table) can write jsonb columns too:
    # version byte 1, then the JSON text.
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        format="binary",
        encoder=_jsonb,
        decoder=lambda data: json.loads(data[1:]),
    )


# A transaction left open by a hub that stopped between statements (frozen, cut
# off) would hold its locks until its connection died: the server ends it instead.
# The hub's transactions never wait on anything but the database inside.
IDLE_IN_TRANSACTION_MS = 5000


async def _keep_session(conn: asyncpg.Connection) -> None:
    """What a connection goes back to the pool with: asyncpg's default reset sends
    one more query per release (`SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`), a round trip on every pool call's critical path. The
    hub leaves no session state behind: no SET but SET LOCAL, no LISTEN, no cursor
    outside a transaction, and the one session advisory lock (`migrate`) is
    released in a finally. asyncpg still rolls back a transaction left open before
    it calls this."""


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=30,
        server_settings={"idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS)},
    )
