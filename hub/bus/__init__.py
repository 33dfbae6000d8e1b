"""The bus request/reply pipeline: gates for the public bootstrap identity and the
one responder every hub request handler runs through.
"""

from __future__ import annotations

from ._bootstrap_limits import (
    LOCKOUT,
    MAX_FAILURES,
    WINDOW,
    BootstrapLockout,
    BootstrapResponder,
    request_source,
)

__all__ = [
    "BootstrapLockout",
    "BootstrapResponder",
    "LOCKOUT",
    "MAX_FAILURES",
    "WINDOW",
    "request_source",
]
