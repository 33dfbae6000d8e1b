"""Lease-fenced outputs of edge work: events, statuses and the final result.

One short transaction per write: lock the registration row FOR SHARE (a revoke
waits for it or is seen by it), lock the work row (so writes to one item
serialise), check the lease token in constant time against the DB clock, then
apply the sequence rules:

- a stored sequence with identical kind and body is a no-op (a worker's retry);
  with other content it is `work.sequence_conflict`;
- new sequences may arrive out of order (a worker pipelines its writes); the
  primary key keeps them unique;
- `result` / `fail` are final: every sequence below must be present
  (`work.sequence_gap`, retryable) and none above; afterwards only an identical
  replay by the same token is accepted (`work.already_final` otherwise).

Every output is also projected into the workspace event log of its sessionRef
(under that workspace's cursor row lock, in the same transaction, so the
workspace sequence stays gapless and unique beside Desktop events), then sent to
live tails after the commit.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS

from schemas import (
    AuditRecord,
    CredentialScope,
    PrincipalKind,
    Source,
    WorkOutput,
    WorkspaceEvent,
    check_token,
)

from ..core import AuditLog, HubMetrics, body_hash
from ..workspaces import append_events, lock_cursor, publish_live
from ._common import EdgeWorkError, check_holder, registration_refusal

FINAL_STATE = {"result": "completed", "fail": "failed"}
FINAL_STATES = frozenset(FINAL_STATE.values()) | {"cancelled", "dead_lettered"}
# Events are audited only through the work's status/result: a run can emit
# hundreds of events a second, and each is already durable with its attempt and
# registration in edge_work_outputs; auditing every one would double the write
# volume and bury the state changes a reviewer looks for.
AUDITED_KINDS = frozenset({"status", "result", "fail"})
_GAP_RETRY_SECONDS = 0.2


class FencedWriter:
    def __init__(
        self, pool: asyncpg.Pool, audit: AuditLog, nc: NATS, metrics: HubMetrics, source: Source
    ) -> None:
        self._pool, self._audit, self._nc = pool, audit, nc
        self._metrics, self._source = metrics, source

    async def write(self, tenant: str, reg_id: str, out: WorkOutput) -> bool:
        """Apply one output; False when it was an identical replay."""
        projected = await self._apply(tenant, reg_id, out)
        if projected is None:
            return False
        workspace, event = projected
        await publish_live(self._nc, self._source, tenant, workspace, [event])
        return True

    async def _apply(
        self, tenant: str, reg_id: str, out: WorkOutput
    ) -> tuple[str, WorkspaceEvent] | None:
        kind = str(out.kind)
        digest = body_hash({"kind": kind, "body": out.body})
        async with self._pool.acquire() as conn, conn.transaction():
            reg = await conn.fetchrow(
                "SELECT status, kind, trust_model, scopes FROM gateway_registrations "
                "WHERE tenant = $1 AND registration_id = $2 FOR SHARE",
                tenant,
                reg_id,
            )
            refusal = registration_refusal(reg, CredentialScope.EDGE_WRITE_FENCED_OUTPUT, "output")
            if refusal is not None:
                raise refusal
            work = await conn.fetchrow(_LOCK_WORK, tenant, out.work_id)
            check_holder(work, reg_id, out.lease_token, out.work_id)
            stored = await conn.fetchrow(
                "SELECT kind, body_hash FROM edge_work_outputs WHERE tenant = $1 "
                "AND work_id = $2 AND sequence = $3",
                tenant,
                out.work_id,
                out.sequence,
            )
            if _is_replay(work, stored, kind, digest):
                return None
            _check_writable(work, out, stored)
            await self._store(conn, tenant, reg_id, out, work, digest)
            return await self._project(conn, tenant, reg_id, out, work)

    async def _store(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        reg_id: str,
        out: WorkOutput,
        work: asyncpg.Record,
        digest: bytes,
    ) -> None:
        kind = str(out.kind)
        await conn.execute(
            "INSERT INTO edge_work_outputs (tenant, work_id, sequence, kind, body, body_hash, "
            "attempt, registration_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
            tenant,
            out.work_id,
            out.sequence,
            kind,
            out.body,
            digest,
            work["attempts"],
            reg_id,
        )
        await conn.execute(
            _UPDATE_WORK,
            tenant,
            out.work_id,
            out.sequence,
            kind,
            out.body,
            _error_text(out.body) if kind == "fail" else None,
            FINAL_STATE.get(kind),
        )
        if kind in FINAL_STATE:
            await conn.execute(
                "UPDATE edge_work_leases SET ended_at = now(), outcome = $4 WHERE tenant = $1 "
                "AND work_id = $2 AND attempt = $3 AND ended_at IS NULL",
                tenant,
                out.work_id,
                work["attempts"],
                FINAL_STATE[kind],
            )
        if kind in AUDITED_KINDS:
            ref = work["session_ref"]
            await self._audit.record(
                AuditRecord(
                    action="gateway.edge.write_fenced_output",
                    actor_kind=PrincipalKind.GATEWAY,
                    actor_id=reg_id,
                    target_kind="edge_work",
                    target_id=out.work_id,
                    workspace_id=ref["workspaceId"],
                    session_id=ref.get("sessionId"),
                    metadata={"kind": kind, "sequence": out.sequence, "attempt": work["attempts"]},
                ),
                tenant=tenant,
                conn=conn,
            )

    @staticmethod
    async def _project(
        conn: asyncpg.Connection, tenant: str, reg_id: str, out: WorkOutput, work: asyncpg.Record
    ) -> tuple[str, WorkspaceEvent]:
        ref = work["session_ref"]
        workspace = ref["workspaceId"]
        last = await lock_cursor(conn, tenant, workspace)
        event = WorkspaceEvent(
            workspace_id=workspace,
            sequence=last + 1,
            event_id=f"{out.work_id}-{out.sequence}",
            type=f"work.{out.kind}",
            session_id=ref.get("sessionId") or _session_of(out.body),
            occurred_at=datetime.now(UTC),
            payload={
                "workId": out.work_id,
                "sequence": out.sequence,
                "attempt": work["attempts"],
                "body": out.body,
            },
        )
        await append_events(conn, tenant, workspace, "gateway", [reg_id], [event])
        return workspace, event


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
    work: asyncpg.Record, stored: asyncpg.Record | None, kind: str, digest: bytes
) -> bool:
    """The token holder re-sending what is stored, while its lease runs or after
    it finished the work (its final reply may have been lost)."""
    same = stored is not None and stored["kind"] == kind and stored["body_hash"] == digest
    return same and (work["live"] or work["state"] in FINAL_STATES)


def _check_writable(work: asyncpg.Record, out: WorkOutput, stored: asyncpg.Record | None) -> None:
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


_LOCK_WORK = """
    SELECT state, owner, lease_token, attempts, session_ref, last_sequence, output_count,
           coalesce(lease_expires_at > now(), false) AS live
    FROM edge_work WHERE tenant = $1 AND work_id = $2 FOR UPDATE"""
_UPDATE_WORK = """
    UPDATE edge_work SET last_sequence = greatest(last_sequence, $3),
        output_count = output_count + 1,
        -- A final output ends the lease: the view shows the end, not "running".
        status = CASE WHEN $7::text IS NOT NULL THEN jsonb_build_object('state', $7::text)
                      WHEN $4 = 'status' THEN $5::jsonb ELSE status END,
        lease_expires_at = CASE WHEN $7::text IS NULL THEN lease_expires_at END,
        result = CASE WHEN $4 = 'result' THEN $5::jsonb ELSE result END,
        error = coalesce($6, error),
        state = coalesce($7, state),
        completed_at = CASE WHEN $7::text IS NULL THEN completed_at ELSE now() END,
        updated_at = now()
    WHERE tenant = $1 AND work_id = $2"""
