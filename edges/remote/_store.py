"""What a controller keeps on disk, in its state directory (0700):

    controller.json  its Ed25519 and X25519 private keys and label (0600)
    remote.db        SQLite: each pairing it was enrolled on (hub, tenant, the Desktop's
                     key and fingerprint) and its next command sequence there
    audit.jsonl      what it asked for

The sequence is taken (and stored) before a command is signed, so no two commands
of this controller carry the same one, even across a crash of the process.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from schemas import SealError

from ..common import ControllerKeys, StateDirectory, state_dir_from_env, write_private


class RemoteStoreError(RuntimeError):
    """No keys yet, or no such pairing (one-line message)."""


def default_state_dir() -> Path:
    return state_dir_from_env("COWORK_REMOTE_STATE_DIR", "remote")


@dataclass(frozen=True)
class PairingLink:
    pairing_id: str
    tenant: str
    hub_url: str
    desktop_key: str | None
    desktop_fingerprint: str | None


class ControllerStore(StateDirectory):
    db_name = "remote.db"
    # A sequence handed out survives this process crashing (WAL, NORMAL). Power lost
    # just after could hand one out again: the Desktop then refuses that command
    # (`sealed.replayed`), which is safe; an fsync per command would cost milliseconds.
    db_synchronous = "NORMAL"
    db_schema = """
        CREATE TABLE IF NOT EXISTS pairings (
            pairing_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, hub_url TEXT NOT NULL,
            desktop_key TEXT, desktop_fingerprint TEXT,
            next_sequence INTEGER NOT NULL DEFAULT 1);
    """

    @property
    def keys_path(self) -> Path:
        return self.directory / "controller.json"

    def create_keys(self, label: str) -> ControllerKeys:
        if self.keys_path.exists():
            raise RemoteStoreError(f"{self.keys_path} exists already; this controller has keys")
        self.ensure_dir()
        keys = ControllerKeys.generate(label)
        write_private(self.keys_path, json.dumps(keys.to_json(), indent=2))
        self.audit("controller.keys_created", controllerId=keys.controller_id)
        return keys

    def load_keys(self) -> ControllerKeys:
        try:
            return ControllerKeys.from_json(json.loads(self.keys_path.read_text()))
        except FileNotFoundError:
            raise RemoteStoreError(
                f"no controller keys in {self.directory}; run `cowork remote init` first"
            ) from None
        except (ValueError, SealError) as exc:
            raise RemoteStoreError(f"{self.keys_path} is damaged: {exc}") from None

    def save_link(self, link: PairingLink) -> None:
        with self._lock:
            self.db.execute(
                "INSERT INTO pairings (pairing_id, tenant, hub_url, desktop_key, "
                "desktop_fingerprint) VALUES (?, ?, ?, ?, ?) ON CONFLICT (pairing_id) DO UPDATE "
                "SET tenant = excluded.tenant, hub_url = excluded.hub_url, "
                "desktop_key = excluded.desktop_key, "
                "desktop_fingerprint = excluded.desktop_fingerprint",
                (
                    link.pairing_id,
                    link.tenant,
                    link.hub_url,
                    link.desktop_key,
                    link.desktop_fingerprint,
                ),
            )

    def link(self, pairing_id: str | None) -> PairingLink:
        with self._lock:
            rows = self.db.execute(
                "SELECT pairing_id, tenant, hub_url, desktop_key, desktop_fingerprint "
                "FROM pairings WHERE ? IS NULL OR pairing_id = ?",
                (pairing_id, pairing_id),
            ).fetchall()
        if not rows:
            which = f"pairing {pairing_id}" if pairing_id else "any pairing"
            raise RemoteStoreError(f"not enrolled on {which}; run `cowork remote enrol` first")
        if len(rows) > 1:
            raise RemoteStoreError(
                "this controller is enrolled on several pairings: pass --pairing"
            )
        return PairingLink(*rows[0])

    def take_sequence(self, pairing_id: str) -> int:
        with self._lock:
            row = self.db.execute(
                "UPDATE pairings SET next_sequence = next_sequence + 1 WHERE pairing_id = ? "
                "RETURNING next_sequence - 1",
                (pairing_id,),
            ).fetchone()
        if row is None:
            raise RemoteStoreError(f"no enrolment for pairing {pairing_id}")
        return int(row[0])
