"""Local server processes a single machine runs: nats-server (JetStream, standalone
or leaf) and embedded PostgreSQL as supervised children, and their supervision.
Used by `cowork up`, the Gateway appliance and the tests; needs the `local` extra.
"""

from __future__ import annotations

from ._postgres import EmbeddedPostgres
from ._servers import (
    ChildProcess,
    EmbeddedError,
    NatsServer,
    deadline_passed,
    ensure_port_free,
    ensure_writable_dir,
    free_port,
    lock_dir,
    nats_server_binary,
    url_host,
)
from ._supervise import run_until_stopped, say, step, stop_on_signals, supervise_children

__all__ = [
    "ChildProcess",
    "EmbeddedError",
    "EmbeddedPostgres",
    "NatsServer",
    "deadline_passed",
    "ensure_port_free",
    "ensure_writable_dir",
    "free_port",
    "lock_dir",
    "nats_server_binary",
    "run_until_stopped",
    "say",
    "step",
    "stop_on_signals",
    "supervise_children",
    "url_host",
]
