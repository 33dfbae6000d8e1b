"""Everything a registered Gateway keeps on disk, in its state directory (0700).

    gateway.creds   its NATS credential, a standard .creds file (0600)
    gateway.json    tenant, registration id, display name, kind, scopes, sync scopes,
                    hub URLs, when it registered, and whether it was revoked (0600)
    audit.jsonl     local append-only audit log: registration, claims, refusals
    gateway.db      SQLite: the journal of claimed work, and the heartbeat counter

The journal is what makes a lease run at most once: a lease is recorded before
its OpenCode session starts, so a Gateway that crashes never runs that lease
again (after a restart it only aborts the orphaned OpenCode session). It also
lets an operator, or a test, see which lease token a dead Gateway was holding.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..common import StateDirectory, now_iso, state_dir_from_env, write_private

# Journal states: claimed -> running -> completed | failed | lost | stopped;
# claimed/running found at start-up -> interrupted.
LIVE_STATES = ("claimed", "running")
FINAL_STATES = ("completed", "failed", "lost", "stopped", "interrupted", "refused")


class GatewayStoreError(RuntimeError):
    """The state directory is missing, unreadable or not registered (one-line message)."""


def default_state_dir() -> Path:
    return state_dir_from_env("COWORK_GATEWAY_STATE_DIR", "gateway")


@dataclass
class GatewayFile:
    """gateway.json, kept camelCase on disk like the hub's API."""

    tenant: str
    registration_id: str
    display_name: str
    kind: str
    scopes: list[str]
    sync_scopes: list[str]
    hub_urls: list[str]
    registered_at: str
    credential_expires_at: str | None = None
    heartbeat_interval_seconds: float | None = None
    state: str | None = None  # the hub's last word on the registration
    revoked: bool = False
    revoked_at: str | None = None
    revoke_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {_camel(k): v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GatewayFile:
        known = {f.name for f in fields(cls)}
        values = {_snake(k): v for k, v in data.items()}
        return cls(**{k: v for k, v in values.items() if k in known})


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


@dataclass
class JournalEntry:
    work_id: str
    attempt: int
    lease_token: str
    kind: str
    state: str
    started_at: str
    updated_at: str
    session_id: str | None
    last_sequence: int | None
    detail: str | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS work (
    work_id TEXT NOT NULL, attempt INTEGER NOT NULL, lease_token TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL, state TEXT NOT NULL, started_at TEXT NOT NULL,
    updated_at TEXT NOT NULL, session_id TEXT, last_sequence INTEGER, detail TEXT,
    PRIMARY KEY (work_id, attempt));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


# Heartbeat sequences reserved on disk at a time: a minute of the wall-clock floor's
# milliseconds (see GatewayStore.next_heartbeat_sequence).
HEARTBEAT_BLOCK = 60_000


class GatewayStore(StateDirectory):
    db_name = "gateway.db"
    # FULL: a journalled lease must survive power loss, or it could run twice.
    db_synchronous = "FULL"
    db_schema = _SCHEMA
    # The last heartbeat sequence handed out, and the last one reserved on disk.
    _beat_last = 0
    _beat_reserved = 0

    # --- files --------------------------------------------------------------------------
    @property
    def creds_path(self) -> Path:
        return self.directory / "gateway.creds"

    @property
    def gateway_path(self) -> Path:
        return self.directory / "gateway.json"

    def is_registered(self) -> bool:
        return self.gateway_path.exists()

    def load(self) -> GatewayFile:
        try:
            data = json.loads(self.gateway_path.read_text())
            return GatewayFile.from_json(data)
        except FileNotFoundError:
            raise GatewayStoreError(
                f"this Gateway is not registered ({self.gateway_path} does not exist); run "
                "`cowork gateway register --hub nats://HOST:PORT --credential-file FILE`"
            ) from None
        except (ValueError, TypeError) as exc:
            raise GatewayStoreError(f"{self.gateway_path} is damaged: {exc}") from None

    def save(self, gateway: GatewayFile) -> None:
        self.ensure_dir()
        write_private(self.gateway_path, json.dumps(gateway.to_json(), indent=2))

    # --- work journal ---------------------------------------------------------------------
    def journal_claim(self, work_id: str, attempt: int, lease_token: str, kind: str) -> bool:
        """Record a lease before it runs; False if this lease was seen before."""
        now = now_iso()
        with self._lock:
            try:
                self.db.execute(
                    "INSERT INTO work (work_id, attempt, lease_token, kind, state, started_at, "
                    "updated_at) VALUES (?, ?, ?, ?, 'claimed', ?, ?)",
                    (work_id, attempt, lease_token, kind, now, now),
                )
            except sqlite3.IntegrityError:
                return False
        return True

    def journal_update(
        self,
        lease_token: str,
        *,
        state: str | None = None,
        session_id: str | None = None,
        last_sequence: int | None = None,
        detail: str | None = None,
    ) -> None:
        sets: list[str] = ["updated_at = ?"]
        values: list[str | int] = [now_iso()]
        for column, value in (
            ("state", state),
            ("session_id", session_id),
            ("last_sequence", last_sequence),
            ("detail", detail),
        ):
            if value is not None:
                sets.append(f"{column} = ?")
                values.append(value)
        with self._lock:
            self.db.execute(
                f"UPDATE work SET {', '.join(sets)} WHERE lease_token = ?", (*values, lease_token)
            )

    def journal(self, work_id: str | None = None) -> list[JournalEntry]:
        query = (
            "SELECT work_id, attempt, lease_token, kind, state, started_at, updated_at, "
            "session_id, last_sequence, detail FROM work"
        )
        params: tuple = ()
        if work_id is not None:
            query, params = query + " WHERE work_id = ?", (work_id,)
        with self._lock:
            rows = self.db.execute(query + " ORDER BY started_at, attempt", params).fetchall()
        return [JournalEntry(*row) for row in rows]

    def interrupt_live(self) -> list[JournalEntry]:
        """At start-up: leases a previous process left running are never resumed."""
        live = [e for e in self.journal() if e.state in LIVE_STATES]
        for entry in live:
            self.journal_update(
                entry.lease_token,
                state="interrupted",
                detail="the Gateway stopped while this lease ran",
            )
        return live

    def work_session_ids(self) -> set[str]:
        """OpenCode sessions that belong to Cloud-owned work (never synced as metadata)."""
        with self._lock:
            rows = self.db.execute("SELECT session_id FROM work WHERE session_id IS NOT NULL")
            return {row[0] for row in rows.fetchall()}

    def journal_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self.db.execute("SELECT state, count(*) FROM work GROUP BY state").fetchall()
        return dict(rows)

    # --- heartbeat sequence -------------------------------------------------------------------
    def heartbeat_sequence_reserved(self, floor: int) -> bool:
        """Whether the next sequence is already reserved on disk (taking it writes
        nothing): callers on an event loop take the other ones off it."""
        return max(self._beat_last + 1, floor) <= self._beat_reserved

    def next_heartbeat_sequence(self, floor: int) -> int:
        """Strictly increasing across restarts (the hub refuses a sequence it has seen);
        `floor` (wall-clock milliseconds) keeps it ahead after a fresh state directory.

        Sequences are reserved on disk in blocks of HEARTBEAT_BLOCK before any of a
        block is handed out, and a restart starts after the last reserved one: a
        Gateway writes (and syncs) its sequence about once a minute, not once a beat,
        and never sends a number it may have sent before a crash. The price: after a
        restart its sequences may run up to a block ahead of the wall clock, as
        consecutive numbers until the clock catches up. One agent per state
        directory (as for the credential and the journal)."""
        with self._lock:
            value = max(self._beat_last + 1, floor)
            if value > self._beat_reserved:
                db = self.db
                db.execute("BEGIN IMMEDIATE")
                row = db.execute("SELECT value FROM counters WHERE name = 'heartbeat'").fetchone()
                value = max(value, (row[0] if row else 0) + 1)
                reserved = value + HEARTBEAT_BLOCK - 1
                db.execute(
                    "INSERT INTO counters (name, value) VALUES ('heartbeat', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    (reserved,),
                )
                db.execute("COMMIT")
                self._beat_reserved = reserved
            self._beat_last = value
        return value
