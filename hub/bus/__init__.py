"""The bus request/reply pipeline: the one responder every hub request handler runs
through (`BusResponder`, `Route`), and the bootstrap gates for the public identity.
"""

from __future__ import annotations

from ._bootstrap_limits import LOCKOUT, MAX_FAILURES, WINDOW, BootstrapLockout
from ._responder import Answer, BusResponder, Caller, Route, request_source

__all__ = [
    "LOCKOUT",
    "MAX_FAILURES",
    "WINDOW",
    "Answer",
    "BootstrapLockout",
    "BusResponder",
    "Caller",
    "Route",
    "request_source",
]
