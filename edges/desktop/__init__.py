"""The paired Desktop agent: pairing, the command runner under local policy,
the redacted event relay through an on-disk outbox, and `cowork desktop`.
"""

from __future__ import annotations

from ._agent import DesktopAgent, PairingFailed, notify_hub_of_revocation, pair, revoke_locally
from ._cli import add_desktop_commands, run_desktop
from ._relay import session_of
from ._store import DesktopStore, StoreError

__all__ = [
    "DesktopAgent",
    "DesktopStore",
    "PairingFailed",
    "StoreError",
    "add_desktop_commands",
    "notify_hub_of_revocation",
    "pair",
    "revoke_locally",
    "run_desktop",
    "session_of",
]
