"""Outbound edge agents: the paired Desktop and the Standalone Team Gateway.

Edges dial out only; they never import `hub` internals or the database.

Desktop: `pair()` redeems a one-time code and stores the credential in a
`DesktopStore`; `DesktopAgent` serves it (commands in, redacted OpenCode
events out); `OpenCodeClient` is the one module that talks to OpenCode.

Gateway: `register()` exchanges a registration credential for the Gateway's NATS
identity, kept in a `GatewayStore`; `GatewayAgent` heartbeats, syncs metadata
and runs Cloud-owned work on the Gateway's OpenCode under a lease.
"""

from .common import (
    CredentialRefreshError,
    EdgeCredentials,
    OpenCodeClient,
    OpenCodeError,
    RedactionPolicy,
    new_user_seed,
    redact,
    redact_event,
    refresh_forever,
    refresh_once,
)
from .desktop import (
    DesktopAgent,
    DesktopStore,
    PairingFailed,
    StoreError,
    notify_hub_of_revocation,
    pair,
    revoke_locally,
)
from .gateway import GatewayAgent, GatewayStore, GatewayStoreError, RegistrationFailed, register

__all__ = [
    "CredentialRefreshError",
    "DesktopAgent",
    "DesktopStore",
    "EdgeCredentials",
    "GatewayAgent",
    "GatewayStore",
    "GatewayStoreError",
    "OpenCodeClient",
    "OpenCodeError",
    "PairingFailed",
    "RedactionPolicy",
    "RegistrationFailed",
    "StoreError",
    "new_user_seed",
    "notify_hub_of_revocation",
    "pair",
    "redact",
    "redact_event",
    "refresh_forever",
    "refresh_once",
    "register",
    "revoke_locally",
]
