"""Foundation every room stands on: the database and its migrations, streams and
consumers, background loops, dead letters, the audit log, metrics, logging,
settings, the refusal type, the rate limiter, the batching heartbeat writer
(Desktop presence and Gateway heartbeats), the bus uptime their sweeps ask
before they conclude from silence, and the partition leases that give
each ordered partition one worker among the hub's replicas.
"""

from __future__ import annotations

from . import _db as db
from . import _deadletter_admin as dead_letter_admin
from . import _health as health
from . import _streams as streams
from ._audit import AuditLog
from ._audit_ingest import AuditIngest
from ._background import BackgroundTask, every, pull_forever
from ._beats import BeatWriter, LateBeat, Superseded
from ._bus_uptime import BusUptime
from ._db import JsonbText, like_escaped
from ._deadletter import (
    TRANSIENT,
    DeadLetters,
    Fenced,
    Rejected,
    StorageAway,
    deliveries,
    is_transient,
    parse_and_decode,
)
from ._fences import fence_token_sql, raise_fence
from ._flush import flushed
from ._idempotency import body_hash
from ._lanes import LanePolicy, Lanes
from ._leases import PartitionLeases
from ._logging import LogBudget, configure_logging, kv
from ._metrics import HubMetrics
from ._nats_batch import publish_all
from ._nats_headers import install as install_fast_nats_headers
from ._rate_limit import RateLimiter
from ._refusals import Refusal, ack_refusal
from ._settings import HubSettings, LogFormat, LogLevel
from ._streams import hub_consumer

__all__ = [
    "LanePolicy",
    "Lanes",
    "AuditIngest",
    "AuditLog",
    "BackgroundTask",
    "BeatWriter",
    "BusUptime",
    "DeadLetters",
    "Fenced",
    "HubMetrics",
    "HubSettings",
    "JsonbText",
    "like_escaped",
    "LateBeat",
    "LogBudget",
    "LogFormat",
    "LogLevel",
    "RateLimiter",
    "Refusal",
    "PartitionLeases",
    "Rejected",
    "StorageAway",
    "Superseded",
    "is_transient",
    "TRANSIENT",
    "ack_refusal",
    "body_hash",
    "configure_logging",
    "db",
    "dead_letter_admin",
    "deliveries",
    "every",
    "fence_token_sql",
    "flushed",
    "health",
    "install_fast_nats_headers",
    "publish_all",
    "hub_consumer",
    "is_transient",
    "kv",
    "parse_and_decode",
    "pull_forever",
    "raise_fence",
    "streams",
]
