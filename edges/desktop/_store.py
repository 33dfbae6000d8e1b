"""Everything a paired Desktop keeps on disk, in its state directory (0700).

    desktop.creds   its NATS credential, a standard .creds file (0600)
    pairing.json    tenant, pairing id, hub URLs, the last pairing state, revoked flag (0600)
    audit.jsonl     local append-only audit log: every command and pairing change
    desktop.db      SQLite: the event outbox, the journal of handled commands and
                    each controller's last sequence (sealed pairings, see _sealed.py)

The journal is what makes a command run at most once: a command is recorded
as started before it runs and as done (with its result) after, so a Desktop
that crashes and gets the command again never runs it twice. The outbox holds
events until JetStream has acknowledged them, bounded by `max_outbox` (past
it the oldest are dropped, and the relay logs how many).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..common import StateDirectory, now_iso, state_dir_from_env, write_private

DEFAULT_MAX_OUTBOX = 200_000


class StoreError(RuntimeError):
    """The state directory is missing, unreadable or not paired (one-line message)."""


def default_state_dir() -> Path:
    return state_dir_from_env("COWORK_DESKTOP_STATE_DIR", "desktop")


@dataclass
class PairingFile:
    tenant: str
    pairing_id: str
    label: str
    hub_urls: list[str]
    device_name: str
    paired_at: str
    state: dict[str, Any] = field(default_factory=dict)  # the last pairing.state, camelCase
    revoked: bool = False
    revoked_at: str | None = None
    revoke_reason: str | None = None


class DesktopStore(StateDirectory):
    db_name = "desktop.db"
    db_synchronous = "NORMAL"  # survives a crash of this process
    db_schema = """
        CREATE TABLE IF NOT EXISTS outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, subject TEXT NOT NULL,
            msg_id TEXT NOT NULL, data BLOB NOT NULL);
        CREATE TABLE IF NOT EXISTS commands (
            id TEXT PRIMARY KEY, sequence INTEGER NOT NULL, kind TEXT NOT NULL,
            phase TEXT NOT NULL, result TEXT, updated_at TEXT NOT NULL);
        -- last_command_sequence() reads max(sequence) before every command
        CREATE INDEX IF NOT EXISTS commands_sequence ON commands (sequence);
        -- sealed pairings: the replay window, the last sequence taken from each controller
        CREATE TABLE IF NOT EXISTS controller_sequences (
            controller_id TEXT PRIMARY KEY, last INTEGER NOT NULL);
    """

    def __init__(self, directory: Path, *, max_outbox: int = DEFAULT_MAX_OUTBOX) -> None:
        super().__init__(directory)
        self.max_outbox = max_outbox

    # --- files --------------------------------------------------------------------------
    @property
    def creds_path(self) -> Path:
        return self.directory / "desktop.creds"

    def is_paired(self) -> bool:
        return (self.directory / "pairing.json").exists()

    def load_pairing(self) -> PairingFile:
        path = self.directory / "pairing.json"
        try:
            return PairingFile(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise StoreError(
                f"this Desktop is not paired ({path} does not exist); "
                "run `cowork desktop pair CODE --hub nats://HOST:PORT`"
            ) from None
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{path} is damaged: {exc}") from None

    def save_pairing(self, pairing: PairingFile) -> None:
        self.ensure_dir()
        write_private(self.directory / "pairing.json", json.dumps(asdict(pairing), indent=2))

    # --- outbox ---------------------------------------------------------------------------
    def outbox_append(self, items: list[tuple[str, str, bytes]]) -> int:
        """(subject, message id, data) in order; past the bound the oldest rows are
        dropped. Returns how many were dropped."""
        with self._lock:
            db = self.db
            db.execute("BEGIN")
            db.executemany("INSERT INTO outbox (subject, msg_id, data) VALUES (?, ?, ?)", items)
            over = self._outbox_count(db) - self.max_outbox
            if over > 0:
                db.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                    (over,),
                )
            db.execute("COMMIT")
        return max(over, 0)

    @staticmethod
    def _outbox_count(db: sqlite3.Connection) -> int:
        """Exact without a scan: rows only leave from the head and AUTOINCREMENT never
        reuses a seq. (Two subqueries: SQLite answers each from the index; count(*)
        scanned the table on every append, quadratic while the hub is away.)"""
        low, high = db.execute(
            "SELECT (SELECT min(seq) FROM outbox), (SELECT max(seq) FROM outbox)"
        ).fetchone()
        return 0 if low is None else high - low + 1

    def outbox_peek(self, limit: int) -> list[tuple[int, str, str, bytes]]:
        with self._lock:
            return self.db.execute(
                "SELECT seq, subject, msg_id, data FROM outbox ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()

    def outbox_remove_through(self, seq: int) -> None:
        with self._lock:
            self.db.execute("DELETE FROM outbox WHERE seq <= ?", (seq,))

    def outbox_size(self) -> int:
        with self._lock:
            return self._outbox_count(self.db)

    # --- command journal -----------------------------------------------------------------------
    def command_record(self, command_id: str) -> tuple[str, dict | None] | None:
        with self._lock:
            row = self.db.execute(
                "SELECT phase, result FROM commands WHERE id = ?", (command_id,)
            ).fetchone()
        if row is None:
            return None
        return row[0], (json.loads(row[1]) if row[1] else None)

    def command_started(self, command_id: str, sequence: int, kind: str) -> None:
        with self._lock:
            self.db.execute(
                "INSERT INTO commands (id, sequence, kind, phase, updated_at) "
                "VALUES (?, ?, ?, 'started', ?)",
                (command_id, sequence, kind, now_iso()),
            )

    def command_done(self, command_id: str, result: dict) -> None:
        with self._lock:
            self.db.execute(
                "UPDATE commands SET phase = 'done', result = ?, updated_at = ? WHERE id = ?",
                (json.dumps(result), now_iso(), command_id),
            )

    def last_command_sequence(self) -> int:
        with self._lock:
            value = self.db.execute("SELECT max(sequence) FROM commands").fetchone()[0]
        return int(value or 0)

    # --- controllers' replay window (sealed pairings) ------------------------------------------
    def controller_sequence(self, controller_id: str) -> int:
        with self._lock:
            row = self.db.execute(
                "SELECT last FROM controller_sequences WHERE controller_id = ?", (controller_id,)
            ).fetchone()
        return int(row[0]) if row else 0

    def advance_controller(self, controller_id: str, sequence: int) -> bool:
        """Take `sequence` if it is above the last one taken from this controller."""
        with self._lock:
            cursor = self.db.execute(
                "INSERT INTO controller_sequences (controller_id, last) VALUES (?, ?) "
                "ON CONFLICT (controller_id) DO UPDATE SET last = excluded.last "
                "WHERE controller_sequences.last < excluded.last",
                (controller_id, sequence),
            )
            return cursor.rowcount > 0
