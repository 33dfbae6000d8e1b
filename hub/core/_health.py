"""The health center: one look at everything the hub depends on, each component
with a state, the reason and the fix. `/readyz` is its first four checks (NATS,
PostgreSQL, migrations, streams); the admin API and the console show all of it.

States: `ready`; `action_required` (works, but an operator must act: dead letters
waiting, a credential about to expire); `degraded` (works, worse than it should:
redeliveries, a failing loop); `offline` (cannot be reached); `unknown` (cannot be
told now, e.g. stream details while NATS is away).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from . import _db as db
from . import _streams as streams
from ._background import LOOPS

State = Literal["ready", "action_required", "degraded", "offline", "unknown"]
# Worst first: the overall state is the worst of its components'.
SEVERITY: tuple[State, ...] = ("offline", "degraded", "action_required", "unknown", "ready")
# A credential this close to its expiry asks for a rotation.
EXPIRY_AHEAD = timedelta(days=7)
# A loop that has not worked for this long (and has failed since) is degraded.
LOOP_STALE_SECONDS = 120.0


@dataclass
class Component:
    name: str
    group: str
    state: State
    reason: str
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state in ("ready", "action_required")

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group": self.group,
            "state": self.state,
            "reason": self.reason,
            "fix": self.fix,
            "details": self.details,
        }


def overall(components: list[Component]) -> State:
    if not components:
        return "unknown"
    return min((c.state for c in components), key=SEVERITY.index)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@dataclass
class HealthSources:
    """What the health center looks at (the hub's own connections)."""

    nc: NATS | None
    js: JetStreamContext | None
    pool: asyncpg.Pool | None
    timeout: float
    partitions: int = 1
    system_nc: NATS | None = None


async def readiness(src: HealthSources) -> list[Component]:
    """The checks `/readyz` answers by: NATS, PostgreSQL, migrations, streams."""
    nats_ok = bool(src.nc and src.nc.is_connected)
    nats = (
        Component("nats", "nats", "ready", "connected")
        if nats_ok
        else Component(
            "nats",
            "nats",
            "offline",
            "disconnected",
            "start nats-server (or check COWORK_NATS_URL); the hub reconnects by itself",
        )
    )
    db_checks, stream_check = await asyncio.gather(_database(src), _streams_present(src, nats_ok))
    return [nats, *db_checks, stream_check]


async def _database(src: HealthSources) -> list[Component]:
    try:
        async with asyncio.timeout(src.timeout):
            if src.pool is None:
                raise RuntimeError("the hub is not started: no database pool")
            async with src.pool.acquire() as conn:
                version = await db.current_version(conn)
    except Exception as exc:
        return [
            Component(
                "postgres",
                "postgres",
                "offline",
                f"unreachable: {_one_line(exc)}",
                "start PostgreSQL (or check COWORK_DATABASE_URL); the hub reconnects by itself",
            ),
            Component("migrations", "postgres", "unknown", "unknown (database unreachable)"),
        ]
    head = db.head_version()
    migrations = (
        Component("migrations", "postgres", "ready", f"at {version}, head is {head}")
        if version == head
        else Component(
            "migrations",
            "postgres",
            "action_required",
            f"at {version}, head is {head}",
            "restart the hub: it applies its migrations as it starts",
        )
    )
    migrations.details = {"version": version, "head": head}
    return [Component("postgres", "postgres", "ready", "reachable"), migrations]


async def _streams_present(src: HealthSources, nats_ok: bool) -> Component:
    if not nats_ok or src.js is None:
        return Component("streams", "nats", "unknown", "unknown (NATS disconnected)")
    try:
        async with asyncio.timeout(src.timeout):
            missing = await streams.missing_streams(src.js)
    except Exception as exc:
        return Component(
            "streams",
            "nats",
            "offline",
            f"cannot query JetStream: {_one_line(exc)}",
            "check that the NATS server runs with JetStream enabled",
        )
    if missing:
        return Component(
            "streams",
            "nats",
            "action_required",
            f"missing {', '.join(missing)}",
            "restart the hub: it declares its streams as it starts",
        )
    return Component("streams", "nats", "ready", "present")


async def full_report(src: HealthSources) -> list[Component]:
    """Everything: readiness, the NATS servers and leaf connections, JetStream, each
    stream and hub consumer, dead letters, the background loops, credentials."""
    ready = await readiness(src)
    nats_ok = ready[0].state == "ready"
    parts: list[Awaitable[list[Component]]] = [
        _servers(src, nats_ok),
        _jetstream(src, nats_ok),
        _dead_letters(src, nats_ok),
        _credentials(src),
    ]
    found = await asyncio.gather(*parts)
    return ready + [c for part in found for c in part] + _loops()


def _unknown_without_nats(name: str, group: str) -> Component:
    return Component(name, group, "unknown", "unknown (NATS disconnected)")


async def _servers(src: HealthSources, nats_ok: bool) -> list[Component]:
    """Each NATS server (asked over the system account when the hub has it: every
    node of a cluster answers), and their leaf node connections."""
    if not nats_ok or src.nc is None:
        return [_unknown_without_nats("nats.servers", "nats")]
    info = getattr(src.nc, "_server_info", {}) or {}
    if src.system_nc is None or not src.system_nc.is_connected:
        name = info.get("server_name") or info.get("server_id", "?")
        return [
            Component(
                f"nats.server.{name}",
                "nats",
                "ready",
                f"connected to {name} (version {info.get('version', '?')})",
                details={"cluster": info.get("cluster"), "connectUrls": info.get("connect_urls")},
            )
        ]
    try:
        statsz, leafz = await asyncio.gather(
            _ping(src.system_nc, "$SYS.REQ.SERVER.PING.STATSZ", src.timeout),
            _ping(src.system_nc, "$SYS.REQ.SERVER.PING.LEAFZ", src.timeout),
        )
    except Exception as exc:  # the system connection went away mid-question
        return [Component("nats.servers", "nats", "unknown", _one_line(exc))]
    out = []
    for reply in statsz:
        server = reply.get("server", {})
        stats = reply.get("statsz", {})
        name = server.get("name") or server.get("id", "?")
        out.append(
            Component(
                f"nats.server.{name}",
                "nats",
                "ready",
                f"up, version {server.get('ver', '?')}, {stats.get('connections', 0)} connections",
                details={
                    "cluster": server.get("cluster"),
                    "connections": stats.get("connections"),
                    "routes": len(stats.get("routes") or []),
                    "jetstream": server.get("jetstream"),
                },
            )
        )
    leaves = [leaf for reply in leafz for leaf in (reply.get("data", {}).get("leafs") or [])]
    out.append(
        Component(
            "nats.leafnodes",
            "nats",
            "ready",
            f"{len(leaves)} leaf node connection(s)",
            details={
                "leafs": [
                    {"name": leaf.get("name"), "account": leaf.get("account"), "ip": leaf.get("ip")}
                    for leaf in leaves
                ]
            },
        )
    )
    if not statsz:
        out.insert(
            0,
            Component(
                "nats.servers",
                "nats",
                "unknown",
                "no server answered the system account's ping",
                "check the system account's permissions",
            ),
        )
    return out


async def _ping(nc: NATS, subject: str, timeout: float) -> list[dict[str, Any]]:
    """Every server's answer to a $SYS ping, gathered for a short while."""
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        try:
            replies.append(json.loads(msg.data))
        except ValueError:
            pass

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(subject, b"", reply=inbox)
        await asyncio.sleep(min(0.3, timeout))
    finally:
        await sub.unsubscribe()
    return replies


async def _jetstream(src: HealthSources, nats_ok: bool) -> list[Component]:
    if not nats_ok or src.js is None:
        return [_unknown_without_nats("jetstream", "jetstream")]
    js = src.js
    try:
        async with asyncio.timeout(src.timeout):
            account = await js.account_info()
    except Exception as exc:
        return [
            Component(
                "jetstream",
                "jetstream",
                "offline",
                f"JetStream does not answer: {_one_line(exc)}",
                "check that the NATS server runs with JetStream enabled",
            )
        ]
    out = [
        Component(
            "jetstream",
            "jetstream",
            "ready",
            "answering",
            details={"streams": account.streams, "storage": account.storage},
        )
    ]
    names = sorted(streams.POLICIES) + [streams.bucket_stream(b) for b in streams.KV_BUCKETS]
    for name in names:
        out.append(await _stream(js, name, src.timeout))
    for spec in streams.hub_consumers(src.partitions):
        out.append(await _consumer(js, spec, src.timeout))
    return out


async def _stream(js: JetStreamContext, name: str, timeout: float) -> Component:
    try:
        async with asyncio.timeout(timeout):
            info = await js.stream_info(name)
    except NotFoundError:
        return Component(
            f"stream.{name}",
            "streams",
            "action_required",
            "missing",
            "restart the hub: it declares its streams",
        )
    except Exception as exc:
        return Component(f"stream.{name}", "streams", "unknown", _one_line(exc))
    state = info.state
    return Component(
        f"stream.{name}",
        "streams",
        "ready",
        f"{state.messages} messages",
        details={
            "messages": state.messages,
            "bytes": state.bytes,
            "consumers": state.consumer_count,
        },
    )


async def _consumer(js: JetStreamContext, spec: Any, timeout: float) -> Component:
    name = f"consumer.{spec.durable}"
    try:
        async with asyncio.timeout(timeout):
            info = await js.consumer_info(spec.stream, spec.durable)
    except NotFoundError:
        return Component(
            name, "consumers", "action_required", "missing", "restart the hub: it declares it"
        )
    except Exception as exc:
        return Component(name, "consumers", "unknown", _one_line(exc))
    last = info.delivered.last_active if info.delivered else None
    details = {
        "stream": spec.stream,
        "pending": info.num_pending,
        "ackPending": info.num_ack_pending,
        "redelivered": info.num_redelivered,
        "lastActive": last.isoformat() if isinstance(last, datetime) else last,
    }
    pending, ack_pending = info.num_pending or 0, info.num_ack_pending or 0
    if ack_pending >= spec.max_ack_pending:
        return Component(
            name,
            "consumers",
            "degraded",
            f"{ack_pending} messages in flight, its limit: nothing more is delivered",
            "check the hub's logs for the failing handler (the database may be away)",
            details,
        )
    if info.num_redelivered:
        return Component(
            name,
            "consumers",
            "degraded",
            f"{info.num_redelivered} redelivered, {pending} pending",
            "check the hub's logs: a handler is failing and messages come back",
            details,
        )
    return Component(name, "consumers", "ready", f"{pending} pending", details=details)


async def _dead_letters(src: HealthSources, nats_ok: bool) -> list[Component]:
    if not nats_ok or src.js is None:
        return [_unknown_without_nats("deadletters", "deadletters")]
    try:
        async with asyncio.timeout(src.timeout):
            info = await src.js.stream_info("CW_DEADLETTER", subjects_filter="cw.>")
    except Exception as exc:
        return [Component("deadletters", "deadletters", "unknown", _one_line(exc))]
    counts: dict[str, int] = {}
    for subject, count in (info.state.subjects or {}).items():
        origin = subject.rsplit(".", 1)[-1]
        counts[origin] = counts.get(origin, 0) + count
    if not counts:
        return [Component("deadletters", "deadletters", "ready", "none waiting")]
    return [
        Component(
            f"deadletters.{origin}",
            "deadletters",
            "action_required",
            f"{count} dead letter(s) from {origin}",
            "read the reasons under Dead letters, then replay or discard them",
            {"count": count},
        )
        for origin, count in sorted(counts.items())
    ]


def _loops() -> list[Component]:
    now = time.time()
    out = []
    for status in sorted(LOOPS.values(), key=lambda s: s.name):
        details = {
            "lastRun": _at(status.last_run),
            "lastError": status.last_error,
            "lastErrorAt": _at(status.last_error_at),
            "failing": status.failing,
        }
        name = f"loop.{status.name}"
        if status.failing:
            stale = status.last_run is None or now - status.last_run > LOOP_STALE_SECONDS
            out.append(
                Component(
                    name,
                    "loops",
                    "degraded",
                    f"failing ({status.failing} times): {status.last_error}",
                    "check the hub's logs and what the error names (database, NATS)"
                    if stale
                    else "it retries by itself; check the hub's logs if it persists",
                    details,
                )
            )
        elif status.last_run is None:
            out.append(Component(name, "loops", "unknown", "not run yet", details=details))
        else:
            out.append(Component(name, "loops", "ready", "running", details=details))
    return out


def _at(stamp: float | None) -> str | None:
    return datetime.fromtimestamp(stamp, UTC).isoformat() if stamp else None


async def _credentials(src: HealthSources) -> list[Component]:
    """Gateway registration credentials that expire soon (or have expired)."""
    if src.pool is None:
        return []
    try:
        async with asyncio.timeout(src.timeout):
            rows = await src.pool.fetch(
                "SELECT tenant, registration_id, credential_expires_at FROM gateway_registrations"
                " WHERE status NOT IN ('revoked', 'retired') AND credential_expires_at < $1"
                " ORDER BY credential_expires_at LIMIT 100",
                datetime.now(UTC) + EXPIRY_AHEAD,
            )
    except Exception as exc:
        return [Component("credentials", "credentials", "unknown", _one_line(exc))]
    if not rows:
        return [
            Component(
                "credentials",
                "credentials",
                "ready",
                f"none expire within {EXPIRY_AHEAD.days} days",
            )
        ]
    return [
        Component(
            f"credentials.gateway.{r['tenant']}.{r['registration_id']}",
            "credentials",
            "action_required",
            f"the Gateway credential expires at {r['credential_expires_at'].isoformat()}",
            "rotate it (Gateways, Rotate) and give the Gateway the new credential",
            {"tenant": r["tenant"], "registrationId": r["registration_id"]},
        )
        for r in rows
    ]
