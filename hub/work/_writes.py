"""Lease-fenced outputs of edge work: events, statuses and the final result.

One statement per write (`_WRITE`, its own transaction): lock the registration
row FOR SHARE (a revoke waits for it or is seen by it), lock the work row (so
writes to one item serialise), check the lease token against the DB clock, then
apply the sequence rules:

- a stored sequence with identical kind and body is a no-op (a worker's retry);
  with other content it is `work.sequence_conflict`;
- new sequences may arrive out of order (a worker pipelines its writes); the
  primary key keeps them unique;
- `result` / `fail` are final: every sequence below must be present
  (`work.sequence_gap`, retryable) and none above; afterwards only an identical
  replay by the same token is accepted (`work.already_final` otherwise).

Why one statement: a replica that stops between statements of an open
transaction (SIGSTOP, a VM paused, a GC stall) keeps its row locks until
PostgreSQL's idle-in-transaction timeout ends its session (5 s), and every other
replica's claim of that Gateway's work waits on the registration row meanwhile.
A statement the server has received completes and commits without its client.

The statement writes only when every rule passes; it returns what it saw (the
registration, the work row, the stored sequence), and when it wrote nothing the
same rules in Python (`registration_refusal`, `check_holder`, `_is_replay`,
`_check_writable`) name the refusal. A rule that passes in Python but not in SQL
is a race: the stored sequence is read from the statement's snapshot, taken
before it waited for the work row lock, so a writer of the same sequence that
committed meanwhile is not seen, and the insert's ON CONFLICT DO NOTHING
declines instead; the statement then runs again in a new snapshot, which sees it.

Every output is also projected into the workspace event log of its sessionRef
(`append_steps`: under that workspace's cursor row lock, in the same statement,
so the workspace sequence stays gapless and unique beside Desktop events), then
sent to live tails after the commit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS

from schemas import (
    EDGE_WORK_REFUSED_TRUST,
    CredentialScope,
    Source,
    WorkOutput,
    WorkspaceEvent,
    check_token,
)

from ..core import AuditLog, HubMetrics, body_hash
from ..workspaces import append_events, append_steps, lock_cursor, publish_live
from ._common import EDGE_KINDS, TERMINAL, EdgeWorkError, check_holder, registration_refusal

FINAL_STATE = {"result": "completed", "fail": "failed"}
FINAL_STATES = frozenset(FINAL_STATE.values()) | {"cancelled", "dead_lettered"}
# Events are audited only through the work's status/result: a run can emit
# hundreds of events a second, and each is already durable with its attempt and
# registration in edge_work_outputs; auditing every one would double the write
# volume and bury the state changes a reviewer looks for.
AUDITED_KINDS = frozenset({"status", "result", "fail"})
_GAP_RETRY_SECONDS = 0.2
# A write that lost a race runs again in a new snapshot, which sees the winner;
# a third loss in a row would mean the rules in SQL and Python disagree.
_RACE_RUNS = 3
_WRITE_SCOPE = CredentialScope.EDGE_WRITE_FENCED_OUTPUT.value
_REFUSED_TRUST = [str(getattr(t, "value", t)) for t in EDGE_WORK_REFUSED_TRUST]


class FencedWriter:
    def __init__(
        self, pool: asyncpg.Pool, audit: AuditLog, nc: NATS, metrics: HubMetrics, source: Source
    ) -> None:
        self._pool, self._audit, self._nc = pool, audit, nc
        self._metrics, self._source = metrics, source

    async def write(self, tenant: str, reg_id: str, out: WorkOutput) -> bool:
        """Apply one output; False when it was an identical replay."""
        written, event = await self._apply(tenant, reg_id, out)
        if event is not None:
            await publish_live(self._nc, self._source, tenant, event.workspace_id, [event])
        return written

    async def _apply(
        self, tenant: str, reg_id: str, out: WorkOutput
    ) -> tuple[bool, WorkspaceEvent | None]:
        """Whether the output was stored (False: a replay), and the workspace event
        it was projected as (None if that event id was in the log already)."""
        kind = str(out.kind)
        digest = body_hash({"kind": kind, "body": out.body})
        occurred_at = datetime.now(UTC)
        args = (
            *(tenant, reg_id, out.work_id, out.sequence, out.lease_token, kind, out.body),
            digest,
            _error_text(out.body) if kind == "fail" else None,
            FINAL_STATE.get(kind),
            kind in AUDITED_KINDS,
            occurred_at,
            _session_of(out.body),
            *(_WRITE_SCOPE, list(EDGE_KINDS), _REFUSED_TRUST, list(TERMINAL)),
        )
        for _ in range(_RACE_RUNS):
            row = await self._pool.fetchrow(_WRITE, *args)
            if row["written"]:
                return True, _event(out, row, occurred_at)
            if _refuse(row, reg_id, out, kind, digest):
                return False, None
        raise EdgeWorkError("hub.error", "the output could not be decided")


def _refuse(row: asyncpg.Record, reg_id: str, out: WorkOutput, kind: str, digest: bytes) -> bool:
    """Why the statement wrote nothing, from what it saw: True for a replay, a
    refusal raised, False when every rule passes (a race lost: run it again)."""
    reg = _part(row, "reg_", ("status", "kind", "trust_model", "scopes"))
    refusal = registration_refusal(reg, CredentialScope.EDGE_WRITE_FENCED_OUTPUT, "output")
    if refusal is not None:
        raise refusal
    work = _part(row, "work_", _WORK_FIELDS)
    check_holder(work, reg_id, out.lease_token, out.work_id)
    assert work is not None  # (check_holder refuses a missing work row)
    stored = _part(row, "stored_", ("kind", "body_hash"))
    if _is_replay(work, stored, kind, digest):
        return True
    _check_writable(work, out, stored)
    return False


def _part(row: asyncpg.Record, prefix: str, names: tuple[str, ...]) -> dict[str, Any] | None:
    """The columns `prefix` + name of `row` as a dict by name; None when the row the
    statement read for them did not exist (its `prefix`found is false)."""
    if not row[f"{prefix}found"]:
        return None
    return {name: row[prefix + name] for name in names}


def _event(out: WorkOutput, row: asyncpg.Record, occurred_at: datetime) -> WorkspaceEvent | None:
    """The workspace event the statement appended, if it did."""
    if row["event_sequence"] is None:
        return None
    return WorkspaceEvent(
        workspace_id=row["event_workspace"],
        sequence=row["event_sequence"],
        event_id=f"{out.work_id}-{out.sequence}",
        type=f"work.{out.kind}",
        session_id=row["event_session"],
        occurred_at=occurred_at,
        payload={
            "workId": out.work_id,
            "sequence": out.sequence,
            "attempt": row["attempt"],
            "body": out.body,
        },
    )


def _session_of(body: Any) -> str | None:
    """The OpenCode session an output names: a result's `sessionId`, or an event's
    `properties.sessionID` (also under `info` or `part`); None when none is valid."""
    if not isinstance(body, dict):
        return None
    raw_props = body.get("properties")
    props = raw_props if isinstance(raw_props, dict) else {}
    nested = [n for n in (props.get(k) for k in ("info", "part")) if isinstance(n, dict)]
    info_id = nested[0].get("id") if nested and "info" in props else None
    session_info = info_id if isinstance(info_id, str) and info_id.startswith("ses") else None
    for candidate in (
        body.get("sessionId"),
        props.get("sessionID"),
        *(n.get("sessionID") for n in nested),
        session_info,
    ):
        if isinstance(candidate, str):
            try:
                return check_token(candidate, "sessionId")
            except ValueError:
                continue
    return None


async def project_outcome(
    conn: asyncpg.Connection, tenant: str, work: Any, kind: str, reason: str
) -> None:
    """The end of work that no Gateway reported (dead-lettered, cancelled), as a
    `work.<kind>` event in its sessionRef's workspace: a chat bound there says it
    once, in words. Call inside the transaction that ended the work."""
    ref = work["session_ref"]
    workspace = ref["workspaceId"]
    last = await lock_cursor(conn, tenant, workspace)
    event = WorkspaceEvent(
        workspace_id=workspace,
        sequence=last + 1,
        event_id=f"{work['work_id']}-{kind}",
        type=f"work.{kind}",
        session_id=ref.get("sessionId"),
        occurred_at=datetime.now(UTC),
        payload={
            "workId": work["work_id"],
            "attempt": work["attempts"],
            "body": {"reason": reason},
        },
    )
    await append_events(conn, tenant, workspace, "hub", ["hub"], [event])


def _is_replay(
    work: Mapping[str, Any], stored: Mapping[str, Any] | None, kind: str, digest: bytes
) -> bool:
    """The token holder re-sending what is stored, while its lease runs or after
    it finished the work (its final reply may have been lost)."""
    same = stored is not None and stored["kind"] == kind and stored["body_hash"] == digest
    return same and (work["live"] or work["state"] in FINAL_STATES)


def _check_writable(
    work: Mapping[str, Any], out: WorkOutput, stored: Mapping[str, Any] | None
) -> None:
    """Everything but an identical replay (already handled) after the token check."""
    if work["state"] in FINAL_STATES:
        raise EdgeWorkError("work.already_final", f"the work is already {work['state']}")
    if work["state"] != "leased" or not work["live"]:
        raise EdgeWorkError("work.stale_lease", "the lease has expired")
    if stored is not None:
        raise EdgeWorkError(
            "work.sequence_conflict", f"sequence {out.sequence} is stored with different content"
        )
    if str(out.kind) not in FINAL_STATE:
        return
    if work["last_sequence"] > out.sequence:
        raise EdgeWorkError(
            "work.final_not_last",
            f"outputs up to {work['last_sequence']} exist: the final output "
            "must have the highest sequence",
        )
    missing = out.sequence - 1 - work["output_count"]
    if missing > 0:
        raise EdgeWorkError(
            "work.sequence_gap",
            f"{missing} of the sequences below {out.sequence} are missing; send them first",
            retry_after=_GAP_RETRY_SECONDS,
        )


def _error_text(body: dict) -> str:
    for key in ("error", "message", "reason"):
        if isinstance(body.get(key), str) and body[key]:
            return body[key][:4096]
    return json.dumps(body, sort_keys=True)[:4096]


_WORK_FIELDS = (
    "state",
    "owner",
    "lease_token",
    "attempts",
    "session_ref",
    "last_sequence",
    "output_count",
    "live",
)

# The whole write in one statement. Parameters: $1 tenant, $2 registration, $3 work
# id, $4 sequence, $5 lease token, $6 kind, $7 body, $8 body hash, $9 a fail's error
# text, $10 the final state a result or fail sets (else NULL), $11 audited, $12 the
# event's time, $13 the session the body names, $14 the write scope, $15 edge kinds,
# $16 refused trust models, $17 terminal registration statuses.
# - reg: the registration FOR SHARE (a revoke waits for this write or is seen by it).
# - work: the work row FOR UPDATE (writes to one item serialise), only under a
#   registration that may write at all (its InitPlan runs first: registration row,
#   then work row, the order every writer takes them in).
# - prior: the sequence as stored (in the snapshot; see the module docstring).
# - ok: the caller holds the live lease (token compared as SHA-256 digests, so the
#   time says nothing about it), the sequence is new, and a final output is the
#   highest with none missing below it.
# - output / touched / ended / audited: the output row (nothing if a racing writer
#   stored this sequence first), the work row's counters, status and final state, the
#   lease's end, and for statuses and finals the audit row as AuditLog.record writes
#   it (gateway.edge.write_fenced_output: kind, sequence and attempt as metadata,
#   nothing for the scrubber to find).
# - input and append_steps: the output as a workspace event of its sessionRef.
_WRITE = (
    """
    WITH reg AS (
        SELECT status, kind, trust_model, scopes FROM gateway_registrations
        WHERE tenant = $1 AND registration_id = $2 FOR SHARE),
    work AS (
        SELECT state, owner, lease_token, attempts, session_ref, last_sequence, output_count,
               coalesce(lease_expires_at > now(), false) AS live
        FROM edge_work
        WHERE tenant = $1 AND work_id = $3
          AND EXISTS (SELECT 1 FROM reg WHERE status <> ALL($17::text[])
                        AND kind = ANY($15::text[]) AND trust_model <> ALL($16::text[])
                        AND $14::text = ANY(scopes))
        FOR UPDATE),
    prior AS (
        SELECT kind, body_hash FROM edge_work_outputs
        WHERE tenant = $1 AND work_id = $3 AND sequence = $4),
    ok AS (
        SELECT attempts, session_ref FROM work
        WHERE owner = $2 AND state = 'leased' AND live
          AND sha256(convert_to(lease_token, 'UTF8')) = sha256(convert_to($5::text, 'UTF8'))
          AND NOT EXISTS (SELECT 1 FROM prior)
          AND ($10::text IS NULL OR (last_sequence <= $4 AND output_count >= $4 - 1))),
    output AS (
        INSERT INTO edge_work_outputs (tenant, work_id, sequence, kind, body, body_hash,
                                       attempt, registration_id)
        SELECT $1, $3, $4, $6, $7, $8, attempts, $2 FROM ok
        ON CONFLICT (tenant, work_id, sequence) DO NOTHING
        RETURNING attempt),
    touched AS (
        UPDATE edge_work SET last_sequence = greatest(last_sequence, $4),
            output_count = output_count + 1,
            -- A final output ends the lease: the view shows the end, not "running".
            status = CASE WHEN $10::text IS NOT NULL THEN jsonb_build_object('state', $10::text)
                          WHEN $6 = 'status' THEN $7::jsonb ELSE status END,
            lease_expires_at = CASE WHEN $10::text IS NULL THEN lease_expires_at END,
            result = CASE WHEN $6 = 'result' THEN $7::jsonb ELSE result END,
            error = coalesce($9::text, error),
            state = coalesce($10::text, state),
            completed_at = CASE WHEN $10::text IS NULL THEN completed_at ELSE now() END,
            updated_at = now()
        FROM output WHERE tenant = $1 AND work_id = $3),
    ended AS (
        UPDATE edge_work_leases l SET ended_at = now(), outcome = $10::text
        FROM output o
        WHERE $10::text IS NOT NULL AND l.tenant = $1 AND l.work_id = $3
          AND l.attempt = o.attempt AND l.ended_at IS NULL),
    audited AS (
        INSERT INTO audit_log (tenant, action, actor_kind, actor_id, target_kind, target_id,
                               workspace_id, session_id, metadata)
        SELECT $1, 'gateway.edge.write_fenced_output', 'gateway', $2, 'edge_work', $3,
               k.session_ref ->> 'workspaceId', k.session_ref ->> 'sessionId',
               jsonb_build_object('kind', $6::text, 'sequence', $4::bigint,
                                  'attempt', o.attempt)
        FROM output o, ok k WHERE $11::boolean),
    event AS (
        SELECT $1::text AS tenant, k.session_ref ->> 'workspaceId' AS workspace_id,
               $3 || '-' || $4 AS event_id, $2::text AS source_id, 'work.' || $6 AS type,
               coalesce(nullif(k.session_ref ->> 'sessionId', ''), $13::text) AS session_id,
               NULL::text AS command_id, $12::timestamptz AS occurred_at,
               jsonb_build_object('workId', $3::text, 'sequence', $4::bigint,
                                  'attempt', o.attempt, 'body', $7::jsonb) AS payload,
               1::bigint AS ord
        FROM output o, ok k),"""
    + append_steps("event", "'gateway'")
    + """
    SELECT EXISTS (SELECT 1 FROM output) AS written,
           (SELECT attempt FROM output) AS attempt,
           (SELECT sequence FROM numbered) AS event_sequence,
           (SELECT workspace_id FROM numbered) AS event_workspace,
           (SELECT session_id FROM numbered) AS event_session,
           EXISTS (SELECT 1 FROM reg) AS reg_found,
           r.status AS reg_status, r.kind AS reg_kind, r.trust_model AS reg_trust_model,
           r.scopes AS reg_scopes,
           EXISTS (SELECT 1 FROM work) AS work_found,
           w.state AS work_state, w.owner AS work_owner, w.lease_token AS work_lease_token,
           w.attempts AS work_attempts, w.session_ref AS work_session_ref,
           w.last_sequence AS work_last_sequence, w.output_count AS work_output_count,
           w.live AS work_live,
           EXISTS (SELECT 1 FROM prior) AS stored_found,
           p.kind AS stored_kind, p.body_hash AS stored_body_hash
    FROM (SELECT 1) one LEFT JOIN reg r ON true LEFT JOIN work w ON true
         LEFT JOIN prior p ON true"""
)
