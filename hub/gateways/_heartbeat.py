"""A Gateway's heartbeat: it records the Gateway's liveness, load and versions and
moves the registration between active, unhealthy and paused.

Heartbeats run on the hub's one batching heartbeat writer (`hub.core.BeatWriter`),
as Desktop presence does: the handler notes the beat and waits for its flush,
which applies every Gateway's latest beat in one conditional UPDATE (rows locked
in key order), audits the transitions in the same statement (no transaction open
between statements for a frozen replica to hold registration rows in) and
answers each beat with its registration's state. A thousand Gateways cost a few
statements a second, not one awaited round trip each. Two beats from one Gateway
inside one flush are coalesced: the later one is written; the earlier one is
answered with the later one's refusal, or else as stale (as is, at once, a beat
whose sequence is not after the one noted), so `heartbeatsAccepted` counts
exactly the beats answered with a state.
A beat the hub would write more than two of its intervals after the Gateway sent
it (its envelope time) or after the hub took it is dropped, counted
(`cowork_presence_heartbeats_late_total{principal="gateway"}`) and refused as
`gateway.late_heartbeat`: a late beat never revives a Gateway the sweep marked
unhealthy. Transitions are bounded by the per-Gateway heartbeat rate limit and
coalesced per flush, so a flapping Gateway cannot turn into an audit flood.

The UPDATE's WHERE excludes revoked rows, so a heartbeat racing a revoke either
commits first or is refused (see `_gateways_admin`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg

from schemas import GatewayHeartbeat, GatewayHeartbeatReply, scrub_secrets, scrub_text

from ..core import BeatWriter, BusUptime, HubMetrics, LateBeat, Superseded
from . import _versions as _gateway_versions
from ._common import GatewayError, missing_or_ended

RegistrationKey = tuple[str, str]  # (tenant, registration id)


def desired_status(beat: GatewayHeartbeat) -> tuple[str, str | None]:
    """The status a heartbeat asks for (a draining registration stays draining)."""
    verdict = _gateway_versions.check(beat.versions)
    if not verdict.ok:
        return "paused", verdict.reason()
    if beat.health == "unhealthy":
        detail = f": {scrub_text(beat.last_error)[:200]}" if beat.last_error else ""
        return "unhealthy", f"the Gateway reports itself unhealthy{detail}"
    return "active", None


def _versions_doc(beat_versions: Any) -> dict | None:
    return beat_versions.model_dump(mode="json", by_alias=True) if beat_versions else None


def _row_of(key: RegistrationKey, beat: GatewayHeartbeat) -> dict:
    """One beat as a row of the batched UPDATE's input."""
    status, reason = desired_status(beat)
    return {
        "tenant": key[0],
        "registration_id": key[1],
        "liveness": beat.liveness,
        "mode": str(beat.mode),
        "health": beat.health,
        "current_load": beat.current_load,
        "active_work_ids": list(beat.active_work_ids),
        "heartbeat_sequence": beat.heartbeat_sequence,
        "heartbeat_interval": beat.interval_seconds,
        "last_error": scrub_text(beat.last_error)[:4096] if beat.last_error else None,
        "versions": _versions_doc(beat.versions),
        "status": status,
        "status_reason": reason,
        # What a transition's audit row says, scrubbed here as AuditLog.record
        # scrubs a reason and metadata (the statement writes the row itself).
        "audit_reason": scrub_text(reason) if reason else reason,
        "audit_versions": scrub_secrets(_versions_doc(beat.versions)),
    }


class GatewayHeartbeats:
    def __init__(
        self, pool: asyncpg.Pool, metrics: HubMetrics | None = None, bus: BusUptime | None = None
    ) -> None:
        self._pool = pool
        late = metrics.presence_late.labels("gateway").inc if metrics else (lambda n: None)
        self.beats: BeatWriter[RegistrationKey, GatewayHeartbeat] = BeatWriter(
            "gateway-heartbeat-writer",
            self._write,
            on_late=late,
            bus=bus,
        )

    def start(self) -> None:
        self.beats.start()

    async def stop(self) -> None:
        await self.beats.stop()

    async def heartbeat(
        self,
        tenant: str,
        reg_id: str,
        beat: GatewayHeartbeat,
        *,
        sent_at: datetime | None = None,
    ) -> GatewayHeartbeatReply:
        """Apply one heartbeat with the next flush (no rate limit here: the bus handler
        applies it) or raise GatewayError: revoked/retired/pending registrations, stale
        sequences and late beats."""
        key = (tenant, reg_id)
        noted = self.beats.pending(key)
        if noted is not None and noted.heartbeat_sequence >= beat.heartbeat_sequence:
            raise _stale(beat, noted.heartbeat_sequence)
        try:
            return await self.beats.beat(key, beat, interval=beat.interval_seconds, sent_at=sent_at)
        except Superseded:
            raise GatewayError(
                "gateway.stale_heartbeat",
                f"heartbeatSequence {beat.heartbeat_sequence} was replaced by a later "
                "heartbeat from this Gateway before it was written",
                status=409,
            ) from None
        except LateBeat:
            raise GatewayError(
                "gateway.late_heartbeat",
                "the heartbeat reached the hub too late to count (more than two intervals "
                "after it was sent, or the Gateway's clock is far off): the next one will",
                status=409,
                retry_after=beat.interval_seconds,
            ) from None

    async def _write(
        self, chunk: list[tuple[RegistrationKey, GatewayHeartbeat]]
    ) -> dict[RegistrationKey, GatewayHeartbeatReply | GatewayError]:
        """Every beat of one flush in one statement, the transitions audited in it: no
        transaction is left open between statements, so a replica frozen mid-flush
        (SIGSTOP) holds no registration row that claims and renewals need."""
        rows = [_row_of(key, beat) for key, beat in chunk]
        results: dict[RegistrationKey, GatewayHeartbeatReply | GatewayError] = {}
        for row in await self._pool.fetch(_HEARTBEATS, rows):
            key = (row["tenant"], row["registration_id"])
            results[key] = GatewayHeartbeatReply(
                state=row["status"],
                reason=row["status_reason"],
                drain_deadline=row["drain_deadline"],
            )
        missed = [(key, beat) for key, beat in chunk if key not in results]
        if missed:
            results.update(await self._refusals(missed))
        return results

    async def _refusals(
        self, missed: list[tuple[RegistrationKey, GatewayHeartbeat]]
    ) -> dict[RegistrationKey, GatewayError]:
        """Why the heartbeat UPDATE matched no row, for each beat it missed."""
        found = await self._pool.fetch(
            "SELECT tenant, registration_id, status, heartbeat_sequence, public_key "
            "FROM gateway_registrations g JOIN unnest($1::text[], $2::text[]) "
            "AS m(tenant, registration_id) USING (tenant, registration_id)",
            [key[0] for key, _ in missed],
            [key[1] for key, _ in missed],
        )
        by_key = {(r["tenant"], r["registration_id"]): r for r in found}
        return {key: _refusal(by_key.get(key), key[1], beat) for key, beat in missed}


def _stale(beat: GatewayHeartbeat, accepted: int) -> GatewayError:
    return GatewayError(
        "gateway.stale_heartbeat",
        f"heartbeatSequence {beat.heartbeat_sequence} is not after the last "
        f"accepted one ({accepted})",
        status=409,
    )


def _refusal(row: Any, reg_id: str, beat: GatewayHeartbeat) -> GatewayError:
    refusal = missing_or_ended(row, reg_id, "the registration is {status}: heartbeats are refused")
    if refusal is not None:
        return refusal
    if row["status"] == "pending":
        return GatewayError.pending()
    if row["public_key"] is None:
        return GatewayError(
            "gateway.not_registered",
            "the credential was rotated or expired: register again",
            status=409,
        )
    return _stale(beat, row["heartbeat_sequence"])


# Rows locked in key order (the beats come sorted): two replicas' flushes never
# deadlock each other. clock_timestamp(): after the row lock (see _gateways_admin).
# `audited`: a beat that changed the state, health or versions is audited as
# GatewayAudit.record writes it (actor the Gateway; paused when it moved to paused).
_HEARTBEATS = """
    WITH beat AS (
        SELECT * FROM jsonb_to_recordset($1::jsonb) AS b(
            tenant text, registration_id text, liveness text, mode text, health text,
            current_load integer, active_work_ids text[], heartbeat_sequence bigint,
            heartbeat_interval real, last_error text, versions jsonb, status text,
            status_reason text, audit_reason text, audit_versions jsonb)),
    old AS (
        SELECT g.tenant, g.registration_id, g.status, g.health, g.versions
        FROM gateway_registrations g JOIN beat USING (tenant, registration_id)
        ORDER BY g.tenant, g.registration_id FOR UPDATE OF g),
    moved AS (
        UPDATE gateway_registrations g SET
            liveness = b.liveness, mode = b.mode, health = b.health,
            current_load = b.current_load, active_work_ids = b.active_work_ids,
            heartbeat_sequence = b.heartbeat_sequence, heartbeat_interval = b.heartbeat_interval,
            last_error = b.last_error, versions = b.versions,
            heartbeats_accepted = g.heartbeats_accepted + 1, last_heartbeat_at = clock_timestamp(),
            status = CASE WHEN g.status = 'draining' THEN 'draining' ELSE b.status END,
            status_reason = CASE WHEN g.status = 'draining' THEN g.status_reason
                                 ELSE b.status_reason END,
            updated_at = now()
        FROM beat b, old
        WHERE g.tenant = b.tenant AND g.registration_id = b.registration_id
          AND old.tenant = g.tenant AND old.registration_id = g.registration_id
          AND g.status NOT IN ('revoked', 'retired', 'pending')
          AND g.heartbeat_sequence < b.heartbeat_sequence AND g.public_key IS NOT NULL
        RETURNING g.tenant, g.registration_id, g.status, g.status_reason, g.drain_deadline,
                  g.health, g.versions, old.status AS old_status, old.health AS old_health,
                  old.versions AS old_versions),
    audited AS (
        INSERT INTO audit_log (tenant, action, actor_kind, actor_id, target_kind, target_id,
                               reason, metadata)
        SELECT m.tenant,
               CASE WHEN m.status = 'paused' AND m.old_status <> 'paused'
                    THEN 'gateway.registration.paused'
                    ELSE 'gateway.registration.heartbeat' END,
               'gateway', m.registration_id, 'gateway_registration', m.registration_id,
               -- draining keeps the hub's own drain text ("drained by <actor>: ...")
               CASE WHEN m.status = 'draining' THEN m.status_reason ELSE b.audit_reason END,
               jsonb_build_object('from', m.old_status, 'to', m.status, 'health', m.health,
                                  'versions', b.audit_versions)
        FROM moved m JOIN beat b USING (tenant, registration_id)
        WHERE m.old_status IS DISTINCT FROM m.status OR m.old_health IS DISTINCT FROM m.health
           OR m.old_versions IS DISTINCT FROM m.versions)
    -- (not the versions: two JSON documents a beat the hub would decode for nothing)
    SELECT tenant, registration_id, status, status_reason, drain_deadline FROM moved"""
