"""Commands for paired Desktops: accepted durably, pushed in order, lease-fenced.

PostgreSQL is the queue. A command gets the pairing's next sequence when it is
accepted. The hub pushes the lowest open command of an online Desktop with a
fresh lease (token + expiry); the next one goes out only when that one is
final, so a Desktop sees its commands strictly in sequence order. An ack must
carry the current lease token before the lease expires, the command's own
sequence (above the last one acknowledged) and the Desktop's own pairing id;
anything else is refused and audited. A lease that expires is handed out
again (a new token) when the Desktop is online: the old token is then stale.
A push is core NATS, so one made while the Desktop could not hear it (NATS, a
node or the hub's connection away) is lost; a lease its Desktop has not
accepted is pushed again, the same lease, once the Desktop shows it is back on
the bus or the hub's own connection comes back (`repush_lost`), not only when
the lease runs out. Which replica pushes is decided by a conditional UPDATE,
so replicas agree. The Desktop sends an unanswered ack again, to any replica
(`edges.common.ask`): a copy of an ack already applied is answered ok and
changes nothing (no second audit row, no second finish), even when two copies
reach two replicas at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS

from schemas import (
    AckReply,
    AuditRecord,
    CommandAck,
    CommandKind,
    DeviceCommand,
    Envelope,
    Lease,
    PrincipalKind,
    Source,
    new_id,
    scrub_secrets,
    subjects,
)

from ..bus import Answer, Caller, Route
from ..core import AuditLog, BackgroundTask, HubMetrics, Refusal, body_hash, every, kv
from ._pairing import PairingError

log = logging.getLogger("cowork.hub.commands")
DEFAULT_LEASE = timedelta(seconds=30)
# A live Desktop accepts a push within milliseconds; one unaccepted for longer
# was most likely lost. Waiting this long keeps a push whose accept is still on
# its way from going out twice (a duplicate would be harmless: the Desktop
# ignores a push it already holds, but it costs a message and a row update).
REPUSH_AFTER = timedelta(seconds=1)
# How many lost pushes one reaper tick sends again. More wait for the next tick
# (after a reconnect: for their Desktop's next heartbeat).
REPUSH_BATCH = 500
# Waiting for a command's result (`wait_final`): a final ack wakes the waiters of its
# replica at once and those of the others through a notice on FINAL_NOTICE (the hub's
# own inbox space: only hub connections may subscribe there). A waiter also reads the
# row again this often, for a notice lost in a reconnect or a final nobody announces
# (a revocation failing the open commands).
FINAL_NOTICE = "_INBOX.hub.command-final"
WAIT_RECHECK = 0.5
# The leases to push again: unaccepted, still live, pushed over $1 ago, to an
# online Desktop that can hear it now. The evidence: it heartbeated after the
# push (a Desktop subscribes before its first heartbeat on a connection, so a
# push older than that heartbeat and still unaccepted was lost), or ($3) this
# hub's own connection came back. The oldest pushes first; SKIP LOCKED and the
# conditional UPDATE let replicas share the work without pushing one lease twice.
REPUSH = """
    WITH lost AS (
        SELECT c.tenant, c.command_id FROM pairing_commands c
        JOIN pairings p USING (tenant, pairing_id)
        WHERE c.state = 'leased' AND c.pushed_at <= now() - $1::interval
          AND c.lease_expires_at > now() AND p.status = 'paired_online'
          AND ($3::boolean OR p.last_heartbeat_at > c.pushed_at)
        ORDER BY c.pushed_at LIMIT $2 FOR UPDATE OF c SKIP LOCKED)
    UPDATE pairing_commands c SET pushed_at = now() FROM lost
    WHERE c.tenant = lost.tenant AND c.command_id = lost.command_id
    RETURNING c.*"""
# Accept a command in one statement (one round trip, atomic): take the pairing's
# next sequence, only if it is commandable, the command's workspace and session are
# allowlisted ($12: the admin API's check; a channel checks its own) and no command
# has this id yet, and insert the command with it. NULL when nothing was inserted (a
# repeated id, or a pairing that takes no commands or not this one: the caller looks
# at which). Two submits of one new id at once: the second waits on the pairing row,
# then its INSERT fails on the primary key and the whole statement (its sequence
# too) is undone.
# The command is leased at once (state 'leased', a lease $13 for $14) when the
# Desktop is online and every command before it was finally acknowledged: the
# pairing's last acknowledged sequence is the last one assigned before this. That
# is read from the pairing row this statement updates (and locks): a submit, an ack
# or a revocation that got there first is seen as committed (READ COMMITTED re-reads
# a row it waited for), so two submits at once never both lease, and an open
# command (queued, leased, accepted) always keeps the one after it queued for
# `dispatch`. Final acks go strictly in sequence (ACK), and a revocation, the one
# other way a command ends, leaves a pairing that takes no commands.
# $15: whether a channel submits it (`from_channel`: its final is the channel
# router's business only then).
SUBMIT = """
    WITH seq AS (
        UPDATE pairings SET next_command_sequence = next_command_sequence + 1
        WHERE tenant = $1 AND pairing_id = $2 AND status NOT IN ('revoked', 'pending')
          AND enabled AND NOT EXISTS (
              SELECT 1 FROM pairing_commands WHERE tenant = $1 AND command_id = $3)
          AND (NOT $12::boolean OR ($5::text = ANY(allowed_workspace_ids)
               AND (allowed_session_ids IS NULL OR coalesce($6::text, '') = ''
                    OR $6::text = ANY(allowed_session_ids))))
        RETURNING next_command_sequence, status = 'paired_online'
            AND last_command_sequence = next_command_sequence - 1 AS lease_now)
    INSERT INTO pairing_commands (tenant, command_id, pairing_id, sequence, kind,
        workspace_id, session_id, actor_id, actor_label, payload, body_hash, signed,
        state, lease_token, lease_expires_at, attempts, pushed_at, from_channel)
    SELECT $1, $3, $2, next_command_sequence, $4, $5, $6, $7, $8, $9, $10, $11,
        CASE WHEN lease_now THEN 'leased' ELSE 'queued' END,
        CASE WHEN lease_now THEN $13::text END,
        CASE WHEN lease_now THEN now() + $14::interval END,
        CASE WHEN lease_now THEN 1 ELSE 0 END,
        CASE WHEN lease_now THEN now() END,
        $15
    FROM seq
    RETURNING *"""
# An ack in one statement (one round trip, atomic), for the common case: the ack
# applies. It locks the command and its pairing (as the step-by-step path does),
# checks the lease (token compared as SHA-256 digests, so the time taken says
# nothing about the token; live; the command's own sequence; for a final ack a
# sequence above the last acknowledged), moves the command, for a final ack the
# pairing's last acknowledged sequence, and writes the audit row. A row the lock
# waited for is read as it is after that wait (READ COMMITTED re-checks a locked
# row), and the UPDATEs follow that same version. No row: the ack does not apply
# as sent (refused, a replay, unknown): the step-by-step path decides and names it.
# An accept applies only to a lease not accepted yet: a copy of it (the Desktop
# sends a request again when unanswered, to any replica) is a replay.
# `later_command`: whether the pairing had assigned a sequence above this command's
# when the statement locked its row, i.e. whether a later command may be waiting
# for `dispatch`. A submit that assigns one after this statement waited for the
# same row lock and then sees this final committed (last acknowledged = its
# sequence - 1): it leases and pushes its command itself (SUBMIT). So when this is
# false, the `dispatch` after a final ack would find nothing, and is skipped.
# A final ack to a lease never accepted (a Desktop accepts only a command still
# running after ACCEPT_AFTER, edges/desktop/_agent.py) implies the accept: the
# statement audits `command.accepted` ($10: its metadata) before the final, as two
# acks would have.
# $1 tenant, $2 command, $3 pairing, $4 lease token, $5 sequence, $6 final status
# (NULL for accepted), $7 result, $8 audit action, $9 audit metadata, $10 the
# implied accept's audit metadata.
ACK = """
    WITH cur AS (
        SELECT c.command_id, c.state AS was, p.next_command_sequence > c.sequence AS later
        FROM pairing_commands c JOIN pairings p USING (tenant, pairing_id)
        WHERE c.tenant = $1 AND c.command_id = $2 AND c.pairing_id = $3 AND c.state <> 'done'
          AND sha256(convert_to(coalesce(c.lease_token, ''), 'UTF8'))
              = sha256(convert_to($4::text, 'UTF8'))
          AND c.lease_expires_at > now() AND c.sequence = $5
          AND ($6::text IS NULL OR $5 > p.last_command_sequence)
          AND ($6::text IS NOT NULL OR c.state = 'leased')
        FOR UPDATE OF c, p),
    cmd AS (
        UPDATE pairing_commands c SET
            state = CASE WHEN $6::text IS NULL THEN 'accepted' ELSE 'done' END,
            result_status = $6, result = $7::jsonb,
            lease_token = CASE WHEN $6::text IS NULL THEN c.lease_token END,
            completed_at = CASE WHEN $6::text IS NULL THEN NULL ELSE now() END,
            updated_at = now()
        FROM cur WHERE c.tenant = $1 AND c.command_id = cur.command_id
        RETURNING c.*),
    seq AS (
        UPDATE pairings p SET last_command_sequence = $5, updated_at = now()
        FROM cmd WHERE $6::text IS NOT NULL AND p.tenant = $1 AND p.pairing_id = $3),
    audited AS (
        INSERT INTO audit_log (tenant, action, actor_kind, actor_id, target_kind, target_id,
            command_id, metadata)
        SELECT $1, a.action, 'desktop', $3, 'command', $2, $2, a.metadata
        FROM cmd, cur, (VALUES (1, 'command.accepted', $10::jsonb), (2, $8, $9::jsonb))
            AS a (n, action, metadata)
        WHERE a.n = 2 OR ($6::text IS NOT NULL AND cur.was = 'leased')
        ORDER BY a.n)
    SELECT cmd.*, cur.later AS later_command FROM cmd, cur"""
FINAL_AUDIT = {
    "completed": "command.completed",
    "failed": "command.failed",
    "blocked_by_policy": "command.blocked",
    "requires_local_confirmation": "command.blocked",
}


# The audit metadata of an accept a final ack implies (ACK): the lease was never
# accepted on its own.
_IMPLIED_ACCEPT = {"outcome": "accepted", "impliedBy": "final"}


class AckRefused(Refusal):
    """A Desktop's command ack the hub refuses (stale lease, wrong sequence, ...)."""


class CommandService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: AuditLog,
        nc: NATS,
        metrics: HubMetrics,
        *,
        hub_id: str,
        lease: timedelta = DEFAULT_LEASE,
        reap_interval: float = 0.5,
    ) -> None:
        self._pool, self._audit, self._nc, self._metrics = pool, audit, nc, metrics
        self._source = Source(principal_kind=PrincipalKind.HUB, principal_id=hub_id)
        self.lease = lease
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._reaper = BackgroundTask(
            "command-lease-reaper",
            lambda: every(reap_interval, self.reap, log, "commands.reap_failed"),
        )
        self._reconnected = False  # set by connection_restored, cleared by the reaper
        self.on_final: list[Any] = []  # async callbacks (tenant, command row)
        # (tenant, command id) -> futures of the requests waiting for it to be final
        self._waiters: dict[tuple[str, str], set[asyncio.Future[dict | None]]] = {}
        self._notices: Any = None  # the FINAL_NOTICE subscription

    # --- submit ---------------------------------------------------------------------------
    async def submit(
        self,
        tenant: str,
        pairing_id: str,
        fields: dict[str, Any],
        *,
        allowlists: bool = False,
        channel: bool = False,
    ) -> dict:
        """Accept a validated command (fields: id?, kind, workspace_id, session_id,
        payload, actor_id, actor_label, signed); idempotent by id. `signed` (a
        controller's signed command, camelCase JSON) is stored and pushed as it came.
        `allowlists`: refuse a workspace or session the pairing does not allowlist
        (checked before the id: a repeat of a command no longer allowed is refused).
        `channel`: a channel submits it (the row's `from_channel`).
        Pushed at once when it is the Desktop's only open command (SUBMIT)."""
        command_id = fields.pop("id", None) or new_id()
        digest = body_hash(fields)
        args = (
            tenant,
            pairing_id,
            command_id,
            fields["kind"],
            fields["workspace_id"],
            fields.get("session_id"),
            fields.get("actor_id"),
            fields.get("actor_label"),
            fields.get("payload"),
            digest,
            fields.get("signed"),
            allowlists,
            secrets.token_urlsafe(24),
            self.lease,
            channel,
        )
        async with self._pool.acquire() as conn:
            try:
                row = await conn.fetchrow(SUBMIT, *args)
            except asyncpg.UniqueViolationError:  # the same id, submitted meanwhile
                row = None
            if row is None:  # a repeat, or not commandable: say which
                return await self._submitted_before(
                    conn, tenant, pairing_id, command_id, digest, fields if allowlists else None
                )
        self._metrics.bus_messages.labels("device.command", "queued").inc()
        inserted = dict(row)
        if inserted["state"] == "leased":  # its own lease: nothing else is open
            await self._push(inserted)
        else:
            await self.dispatch(tenant, pairing_id)
        return {
            "command_id": command_id,
            "sequence": row["sequence"],
            "created": True,
            "row": inserted,  # as inserted (queued or leased)
        }

    async def _submitted_before(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        pairing_id: str,
        command_id: str,
        digest: bytes,
        allowlisted: dict[str, Any] | None,
    ) -> dict:
        """The answer to a submit that inserted nothing: the command as it was accepted
        before (the same id and body: idempotent), or why this one is refused.
        `allowlisted`: the fields whose workspace and session must be allowlisted."""
        pairing = await conn.fetchrow(
            "SELECT status, enabled, allowed_workspace_ids, allowed_session_ids FROM pairings "
            "WHERE tenant = $1 AND pairing_id = $2",
            tenant,
            pairing_id,
        )
        if pairing is None:
            raise PairingError.not_found(pairing_id)
        if allowlisted is not None:
            _check_allowlists(
                dict(pairing), allowlisted["workspace_id"], allowlisted.get("session_id")
            )
        existing = await conn.fetchrow(
            "SELECT pairing_id, sequence, body_hash FROM pairing_commands "
            "WHERE tenant = $1 AND command_id = $2",
            tenant,
            command_id,
        )
        if existing is None:
            raise _not_commandable(dict(pairing))
        if existing["pairing_id"] != pairing_id or existing["body_hash"] != digest:
            raise PairingError(
                "command.conflict",
                f"command {command_id!r} exists with a different body",
                status=409,
            )
        return {"command_id": command_id, "sequence": existing["sequence"], "created": False}

    async def get(self, tenant: str, pairing_id: str, command_id: str) -> dict:
        row = await self._pool.fetchrow(
            "SELECT * FROM pairing_commands WHERE tenant = $1 AND pairing_id = $2 "
            "AND command_id = $3",
            tenant,
            pairing_id,
            command_id,
        )
        if row is None:
            raise PairingError("command.not_found", f"no command {command_id!r}", status=404)
        return dict(row)

    # --- waiting for the result -------------------------------------------------------------
    async def wait_final(
        self,
        tenant: str,
        pairing_id: str,
        command_id: str,
        timeout: float,
        *,
        known: dict | None = None,
    ) -> dict:
        """The command's row once it is done, or as it is after `timeout` seconds.
        `known`: the row as the caller has just seen it (saves the first read)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        key = (tenant, command_id)
        row = known
        while True:
            future: asyncio.Future[dict | None] = loop.create_future()
            waiters = self._waiters.setdefault(key, set())
            waiters.add(future)
            try:
                if row is None:  # read after registering: a final in between wakes us
                    row = await self.get(tenant, pairing_id, command_id)
                left = deadline - loop.time()
                if row["state"] == "done" or left <= 0:
                    return row
                try:
                    # Not wait_for: 3.11's returns the result of a final that lands with
                    # a cancellation (the client gone, the hub stopping) and drops the
                    # cancellation, and this loop then read on until the deadline.
                    async with asyncio.timeout(min(left, WAIT_RECHECK)):
                        final = await future
                except TimeoutError:
                    final = None
                if final is not None and final["pairing_id"] == pairing_id:
                    return final
                row = None
            finally:
                waiters.discard(future)
                if not waiters and self._waiters.get(key) is waiters:
                    del self._waiters[key]

    def _wake(self, tenant: str, command_id: str, row: dict | None) -> None:
        for future in self._waiters.get((tenant, command_id), ()):
            if not future.done():
                future.set_result(row)

    async def _announce_final(self, tenant: str, row: dict) -> None:
        """Wake this replica's waiters with the row, the other replicas' by a notice."""
        self._wake(tenant, row["command_id"], row)
        try:
            await self._nc.publish(FINAL_NOTICE, f"{tenant} {row['command_id']}".encode())
        except Exception as exc:  # the waiters elsewhere read it again shortly
            log.info("commands.final_notice_failed", **kv(error=str(exc)))

    async def _on_final_notice(self, msg: Any) -> None:
        tenant, _, command_id = msg.data.decode(errors="replace").partition(" ")
        self._wake(tenant, command_id, None)  # None: read it (here it may be stale)

    async def listen(self) -> None:
        """Hear the other replicas' finals (every replica, not a queue group)."""
        self._notices = await self._nc.subscribe(FINAL_NOTICE, cb=self._on_final_notice)

    # --- delivery --------------------------------------------------------------------------
    async def dispatch(self, tenant: str, pairing_id: str) -> None:
        """Push the lowest open command if the Desktop is online and no lease is live."""
        lock = self._locks.setdefault((tenant, pairing_id), asyncio.Lock())
        async with lock:
            row = await self._pool.fetchrow(
                """UPDATE pairing_commands c SET state = 'leased', lease_token = $3,
                       lease_expires_at = now() + $4, attempts = attempts + 1, updated_at = now(),
                       pushed_at = now()
                   FROM pairings p
                   WHERE c.tenant = $1 AND c.pairing_id = $2 AND p.tenant = c.tenant
                     AND p.pairing_id = c.pairing_id AND p.status = 'paired_online'
                     AND c.sequence = (SELECT min(sequence) FROM pairing_commands
                                        WHERE tenant = $1 AND pairing_id = $2 AND state <> 'done')
                     AND (c.state = 'queued' OR c.lease_expires_at <= now())
                   RETURNING c.*""",
                tenant,
                pairing_id,
                secrets.token_urlsafe(24),
                self.lease,
            )
            if row is not None:
                await self._push(dict(row))

    async def _push(self, row: dict, outcome: str = "pushed") -> None:
        command = DeviceCommand(
            id=row["command_id"],
            kind=row["kind"],
            pairing_id=row["pairing_id"],
            workspace_id=row["workspace_id"],
            session_id=row["session_id"],
            actor_id=row["actor_id"],
            actor_label=row["actor_label"],
            payload=row["payload"],
            signed=row["signed"],
            sequence=row["sequence"],
            created_at=row["created_at"],
            lease=Lease(
                leased_by=self._source.principal_id,
                lease_token=row["lease_token"],
                lease_expires_at=row["lease_expires_at"],
            ),
        )
        env = Envelope.wrap(command, source=self._source, tenant=row["tenant"])
        subject = subjects.DEVICE_COMMAND.build(tenant=row["tenant"], device_id=row["pairing_id"])
        await self._nc.publish(subject, env.encode())
        self._metrics.bus_messages.labels("device.command", outcome).inc()

    async def dispatch_expired(self) -> int:
        """Re-lease commands whose lease ran out, for Desktops that are online."""
        rows = await self._pool.fetch(
            """SELECT DISTINCT c.tenant, c.pairing_id FROM pairing_commands c
               JOIN pairings p USING (tenant, pairing_id)
               WHERE c.state IN ('leased', 'accepted') AND c.lease_expires_at <= now()
                 AND p.status = 'paired_online'"""
        )
        for r in rows:
            await self.dispatch(r["tenant"], r["pairing_id"])
        return len(rows)

    async def repush_lost(self, *, reconnected: bool = False) -> int:
        """Push again, on the same lease, unaccepted pushes that were lost (REPUSH);
        after this hub's own reconnect, every unaccepted one, however recent."""
        age = timedelta(0) if reconnected else REPUSH_AFTER
        rows = await self._pool.fetch(REPUSH, age, REPUSH_BATCH, reconnected)
        for row in rows:
            await self._push(dict(row), "repushed")
        return len(rows)

    def connection_restored(self) -> None:
        """The hub's NATS connection is back: what it pushed just before or while it
        was away may be lost. The next reaper tick pushes those again (not here: the
        client awaits its reconnect callback, which should not wait on the database)."""
        self._reconnected = True

    async def reap(self) -> None:
        await self.dispatch_expired()
        reconnected = self._reconnected
        await self.repush_lost(reconnected=reconnected)
        if reconnected:  # only once it ran: a failed tick tries again at the next
            self._reconnected = False

    def start(self) -> None:
        self._reaper.start()

    async def stop(self) -> None:
        await self._reaper.stop()
        if self._notices is not None:
            try:
                await self._notices.unsubscribe()
            except Exception:
                pass
            self._notices = None

    # --- acks --------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        """Command acks (`cw.<t>.device.<id>.ack`), for the hub's bus responder. The
        server lets a Desktop publish only on its own subject: the subject names it."""
        return [
            Route(
                subjects.DEVICE_COMMAND_ACK,
                CommandAck,
                self._ack,
                kind="desktop",
                id_field="device_id",
            )
        ]

    async def _ack(self, caller: Caller, ack: CommandAck) -> Answer:
        final = await self.record_ack(caller.tenant, caller.id, ack)
        # Whether a later command may wait for `dispatch` (ACK's `later_command`; the
        # step-by-step path does not say: then it may).
        later = final.pop("later_command", True) if final is not None else True
        if final is not None:  # committed: whoever waits for the result may have it now
            await self._announce_final(caller.tenant, final)

        async def finish() -> None:  # after the answer: a final step may disconnect it
            if final is not None:
                await self.finish(caller.tenant, caller.id, final, dispatch=bool(later))

        async def next_one() -> None:
            # A copy of a final ack already applied: the replica that applied it may
            # have died or frozen before pushing the next command; push it if so.
            await self.dispatch(caller.tenant, caller.id)

        if final is None and ack.outcome != "accepted":
            return Answer(AckReply(ok=True), after=next_one)
        if final is None:
            return Answer(AckReply(ok=True))
        # The answer and a next push leave on this one connection, in that order, and
        # reach the Desktop in it: only a revocation (which cuts the Desktop's route)
        # must wait until the answer has reached the server.
        return Answer(AckReply(ok=True), after=finish, flush=final["kind"] == "revoke_pairing")

    async def record_ack(self, tenant: str, device_id: str, ack: CommandAck) -> dict | None:
        """Apply an ack durably; returns the command row if this ack finished it."""
        try:
            row = await self._apply_ack(tenant, device_id, ack)
        except AckRefused as exc:
            await self._audit_refusal(tenant, device_id, ack, exc)
            raise
        return row if row is not None and row["state"] == "done" else None

    async def finish(
        self, tenant: str, device_id: str, row: dict, *, dispatch: bool = True
    ) -> None:
        """After a final ack: the `on_final` callbacks, then the next command's push
        (`dispatch=False`: the final's own statement found no later command, ACK)."""
        for callback in self.on_final:
            await callback(tenant, row)
        if dispatch:
            await self.dispatch(tenant, device_id)

    async def _apply_ack(self, tenant: str, device_id: str, ack: CommandAck) -> dict | None:
        if ack.pairing_id != device_id:
            raise AckRefused(
                "command.wrong_pairing", f"pairing id {ack.pairing_id!r} is not this Desktop's"
            )
        applied = await self._apply_ack_at_once(tenant, device_id, ack)
        if applied is not None:
            return applied if applied["state"] == "done" else None
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT c.*, p.last_command_sequence FROM pairing_commands c JOIN pairings p "
                "USING (tenant, pairing_id) WHERE c.tenant = $1 AND c.command_id = $2 "
                "AND c.pairing_id = $3 FOR UPDATE OF c, p",
                tenant,
                ack.command_id,
                device_id,
            )
            if row is None:
                raise AckRefused("command.unknown", f"no command {ack.command_id!r} here")
            if row["state"] == "done":
                self._replayed(dict(row), ack)
                return None
            _check_lease(dict(row), ack)
            if ack.outcome == "accepted" and row["state"] == "accepted":
                return None  # a copy of an accept already applied: a no-op
            if ack.outcome == "accepted":
                await conn.execute(
                    "UPDATE pairing_commands SET state = 'accepted', "
                    "updated_at = now() WHERE tenant = $1 AND command_id = $2",
                    tenant,
                    ack.command_id,
                )
                await self._audit_ack(conn, tenant, device_id, ack, "command.accepted")
                return None
            return await self._finish(conn, tenant, device_id, dict(row), ack)

    async def _apply_ack_at_once(self, tenant: str, device_id: str, ack: CommandAck) -> dict | None:
        """The ack applied by one statement (ACK), or None when it does not apply as
        sent (the caller's step-by-step path then says why)."""
        if ack.outcome == "accepted":
            status, result, action = None, None, "command.accepted"
        elif ack.result is None:
            return None
        else:
            result = ack.result.model_dump(mode="json", by_alias=True)
            status = result["status"] if ack.outcome == "completed" else "failed"
            action = FINAL_AUDIT.get(status, "command.completed")
        row = await self._pool.fetchrow(
            ACK,
            tenant,
            ack.command_id,
            device_id,
            ack.lease_token,
            ack.sequence,
            status,
            result,
            action,
            scrub_secrets({"sequence": ack.sequence, "outcome": ack.outcome}),
            scrub_secrets(_IMPLIED_ACCEPT | {"sequence": ack.sequence}),
        )
        if row is None:
            return None
        if status is not None:
            self._metrics.bus_messages.labels("device.command", status).inc()
        return dict(row)

    def _replayed(self, row: dict, ack: CommandAck) -> None:
        """A repeated final ack with the same outcome is a no-op; anything else is stale."""
        same = (
            ack.outcome != "accepted"
            and ack.result is not None
            and row["result"] == ack.result.model_dump(mode="json", by_alias=True)
        )
        if not same:
            raise AckRefused("command.already_final", "the command is already final")

    async def _finish(
        self, conn: asyncpg.Connection, tenant: str, device_id: str, row: dict, ack: CommandAck
    ) -> dict:
        if ack.sequence <= row["last_command_sequence"]:
            raise AckRefused(
                "command.stale_sequence",
                f"sequence {ack.sequence} is not above the last acknowledged "
                f"({row['last_command_sequence']})",
            )
        if ack.result is None:
            raise AckRefused("command.result_missing", "a final ack must carry a result")
        result = ack.result.model_dump(mode="json", by_alias=True)
        status = result["status"] if ack.outcome == "completed" else "failed"
        done = await conn.fetchrow(
            """UPDATE pairing_commands SET state = 'done', result_status = $3, result = $4,
                   lease_token = NULL, completed_at = now(), updated_at = now()
               WHERE tenant = $1 AND command_id = $2 RETURNING *""",
            tenant,
            ack.command_id,
            status,
            result,
        )
        await conn.execute(
            "UPDATE pairings SET last_command_sequence = $3, updated_at = now() "
            "WHERE tenant = $1 AND pairing_id = $2",
            tenant,
            device_id,
            ack.sequence,
        )
        if row["state"] == "leased":  # never accepted: the final implies it (as ACK)
            await self._audit_ack(conn, tenant, device_id, ack, "command.accepted", _IMPLIED_ACCEPT)
        await self._audit_ack(
            conn, tenant, device_id, ack, FINAL_AUDIT.get(status, "command.completed")
        )
        self._metrics.bus_messages.labels("device.command", status).inc()
        return dict(done)

    async def _audit_ack(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        device_id: str,
        ack: CommandAck,
        action: str,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        await self._audit.record(
            AuditRecord(
                action=action,
                actor_kind=PrincipalKind.DESKTOP,
                actor_id=device_id,
                target_kind="command",
                target_id=ack.command_id,
                command_id=ack.command_id,
                metadata={"sequence": ack.sequence, "outcome": ack.outcome}
                if metadata is None
                else metadata | {"sequence": ack.sequence},
            ),
            tenant=tenant,
            conn=conn,
        )

    async def _audit_refusal(
        self, tenant: str, device_id: str, ack: CommandAck, exc: AckRefused
    ) -> None:
        log.warning(
            "commands.ack_refused",
            **kv(tenant=tenant, pairing=device_id, command=ack.command_id, code=exc.code),
        )
        await self._audit.record(
            AuditRecord(
                action="command.ack_rejected",
                actor_kind=PrincipalKind.DESKTOP,
                actor_id=device_id,
                target_kind="command",
                target_id=ack.command_id,
                command_id=ack.command_id,
                reason=f"{exc.code}: {exc}",
                metadata={
                    "sequence": ack.sequence,
                    "outcome": ack.outcome,
                    "claimedPairingId": ack.pairing_id,
                },
            ),
            tenant=tenant,
        )


def _check_allowlists(pairing: dict, workspace_id: str, session_id: str | None) -> None:
    """Refuse a command for a workspace or session the pairing does not allowlist."""
    if workspace_id not in pairing["allowed_workspace_ids"]:
        raise PairingError(
            "pairing.workspace_not_allowed",
            f"workspace {workspace_id!r} is not allowlisted",
            status=403,
        )
    sessions = pairing["allowed_session_ids"]
    if sessions is not None and session_id and session_id not in sessions:
        raise PairingError(
            "pairing.session_not_allowed",
            f"session {session_id!r} is not allowlisted",
            status=403,
        )


def _not_commandable(pairing: dict) -> PairingError:
    """Why a pairing that exists takes no commands."""
    if pairing["status"] == "revoked":
        return PairingError("pairing.revoked", "the pairing is revoked", status=409)
    if pairing["status"] == "pending":
        return PairingError("pairing.not_redeemed", "the pairing code is not redeemed", status=409)
    return PairingError("pairing.disabled", "the pairing is disabled", status=409)


def _check_lease(row: dict, ack: CommandAck) -> None:
    token = row["lease_token"] or ""
    if not hmac.compare_digest(token.encode(), ack.lease_token.encode()):
        raise AckRefused("command.stale_lease", "the lease token is not the current one")
    if row["lease_expires_at"] is None or row["lease_expires_at"] <= _now():
        raise AckRefused("command.lease_expired", "the lease has expired")
    if ack.sequence != row["sequence"]:
        raise AckRefused(
            "command.wrong_sequence", f"command {row['command_id']} has sequence {row['sequence']}"
        )


def _now() -> datetime:
    return datetime.now(UTC)


COMMAND_KINDS = tuple(k.value for k in CommandKind)
