"""Who may speak on the bus: the operator/account key hierarchy, NATS JWTs, the
permission table derived from the subject taxonomy, and edge credentials.
"""

from __future__ import annotations

from . import _jwt as nats_jwt
from ._bootstrap_guard import BootstrapConnectionGuard
from ._credentials import CredentialError, CredentialService, IssuedCredential
from ._keys import BusKeys, KeyStoreError
from ._permissions import (
    HUB_INBOX_PREFIX,
    HUB_PERMISSIONS,
    EdgeLimits,
    Principal,
    edge_limits,
    permission_table_markdown,
)
from ._routes import add_routes

__all__ = [
    "BootstrapConnectionGuard",
    "BusKeys",
    "CredentialError",
    "CredentialService",
    "EdgeLimits",
    "HUB_INBOX_PREFIX",
    "HUB_PERMISSIONS",
    "IssuedCredential",
    "KeyStoreError",
    "Principal",
    "add_routes",
    "edge_limits",
    "nats_jwt",
    "permission_table_markdown",
]
