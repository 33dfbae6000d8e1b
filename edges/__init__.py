"""Outbound edge agents: the paired Desktop and the Standalone Team Gateway.

Edges dial out only; they never import `hub` internals or the database.
Public face so far: the edge's own bus credential and its refresh.
"""

from ._credentials import (
    CredentialRefreshError,
    EdgeCredentials,
    new_user_seed,
    refresh_forever,
    refresh_once,
)

__all__ = ["CredentialRefreshError", "EdgeCredentials", "new_user_seed", "refresh_forever",
           "refresh_once"]
