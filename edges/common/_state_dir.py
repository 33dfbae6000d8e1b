"""What every edge agent's state directory has in common, whatever it stores.

A directory only its owner can enter (0700) that holds private files (0600,
replaced atomically so a crash never leaves half a credential or half a JSON
file), an append-only local audit log (`audit.jsonl`) and one SQLite database
opened on first use. `DesktopStore` and `GatewayStore` add what they keep.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def state_dir_from_env(env_var: str, agent: str) -> Path:
    """`$env_var`, else `$XDG_STATE_HOME/cowork/<agent>` (XDG's default when unset)."""
    env = os.environ.get(env_var)
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cowork" / agent


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def write_private(path: Path, text: str) -> None:
    """Write `text` readable by the owner only, atomically (temp file, fsync, rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StateDirectory:
    """The directory, its audit log and its database; subclasses name the database
    file, how durable its writes must be, and its schema."""

    db_name: str
    db_synchronous: str  # SQLite's PRAGMA synchronous: what a write must survive
    db_schema: str

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._db: sqlite3.Connection | None = None
        # One connection for the store, used from more than one thread
        # (check_same_thread=False): statements that belong together hold this lock.
        self._lock = threading.Lock()

    @property
    def audit_path(self) -> Path:
        return self.directory / "audit.jsonl"

    def ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def audit(self, action: str, **fields: Any) -> None:
        """Append one line to the local audit log (never rewritten)."""
        self.ensure_dir()
        line = json.dumps({"at": now_iso(), "action": action, **fields}, default=str)
        fd = os.open(self.audit_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")

    def read_audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.ensure_dir()
            db = sqlite3.connect(
                self.directory / self.db_name, check_same_thread=False, isolation_level=None
            )
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.db_synchronous}")
            db.executescript(self.db_schema)
            self._db = db
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
