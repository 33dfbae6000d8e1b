"""Paired Desktops: pairings and redemption, durable commands with leases,
presence, and their HTTP routes.
"""

from __future__ import annotations

from ._bootstrap import PairingRedemption
from ._commands import CommandService
from ._pairing import PairingError, PairingService
from ._presence import DesktopPresence
from ._routes import STATUSES as PAIRING_STATUSES
from ._routes import add_routes

__all__ = [
    "PAIRING_STATUSES",
    "CommandService",
    "DesktopPresence",
    "PairingError",
    "PairingRedemption",
    "PairingService",
    "add_routes",
]
