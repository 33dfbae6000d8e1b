"""The inbound router: chat messages from CW_CHANNEL_INBOUND become work.

For each message (consumer "hub-channel-router", in batches):
1. check: the subject parses, the contract holds, the envelope's source is the
   channel instance the subject names, the instance is known, enabled, the
   tenant's, and bound to the subject's workspace; otherwise dead letter with
   the reason, and ack.
2. claim: INSERT the (tenant, instance, event type, provider event id) row
   (hub/channels/_claims.py, one statement per fetched batch); the first insert
   wins, and the same event twice in one batch is handled once. A duplicate is acked and counted, nothing else. A
   claim still 'claimed' is a message whose processing was cut short (a crash
   before the ack): it runs again, and since everything it becomes takes an id
   derived from the message id (commands, edge work, bindings, replies), nothing
   happens twice. A 'waiting' message re-asks for its session (idempotent).
3. identity, then a chat command, an approval, or a prompt (hub/channels/_chat.py,
   hub/channels/_sessions.py); replies go through the outbox with delivery ids
   derived from the message id.
4. the claim is marked done (with channel.message_accepted audited), then acked.
Database or NATS trouble naks the message for a later retry; anything else
is a bug in handling: dead letter with the reason, never a hot loop.
"""

from __future__ import annotations

import logging

import asyncpg
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import (
    AuditRecord,
    ChannelInbound,
    ChannelOutbound,
    ChannelTarget,
    DeliveryType,
    PrincipalKind,
    SealError,
    subjects,
)

from ..core import (
    TRANSIENT,
    AuditLog,
    BackgroundTask,
    DeadLetters,
    HubMetrics,
    Rejected,
    every,
    hub_consumer,
    kv,
    parse_and_decode,
    pull_forever,
)
from ._approval_outcome import ApprovalOutcomes
from ._chat import ChatCommands
from ._claims import ClaimKey, claim_all, claim_key
from ._identity import ChannelIdentity
from ._outbox import delivery_id
from ._sessions import ChannelSessions, SubmitRefused, Turn, received_reaction

log = logging.getLogger("cowork.hub.channels.router")
FAMILY = subjects.CHANNEL_INBOUND
SPEC = hub_consumer("hub-channel-router")
FINAL_FAILURES = {"failed", "blocked_by_policy", "requires_local_confirmation"}


class ChannelRouter:
    def __init__(
        self,
        js: JetStreamContext,
        pool: asyncpg.Pool,
        audit: AuditLog,
        metrics: HubMetrics,
        dead_letters: DeadLetters,
        *,
        hub_id: str,
        instances,
        outbox,
        commands,
        edge_work,
        pairings,
        actions,
        batch: int = 64,
        sweep_interval: float = 5.0,
    ) -> None:
        self._pool, self._audit, self._metrics = pool, audit, metrics
        self._dead, self.instances, self._outbox = dead_letters, instances, outbox
        self.identity = ChannelIdentity(pool, audit)
        self.sessions = ChannelSessions(pool, commands, edge_work, pairings, instances.controllers)
        self.approvals = ApprovalOutcomes(pool, outbox, lambda iid: self.instances.instance(iid))
        self.chat = ChatCommands(
            pool,
            audit,
            self.identity,
            self.sessions,
            actions,
            self._save_memo,
            outcomes=self.approvals,
        )
        self._worker = BackgroundTask(
            "channel-router",
            lambda: pull_forever(js, SPEC, batch, self._handle, log, "channel_router.fetch_failed"),
        )
        self._sweeper = BackgroundTask(
            "channel-router-sweep",
            lambda: every(sweep_interval, self._sweep, log, "channel_router.sweep_failed"),
        )

    def start(self) -> None:
        self._worker.start()
        self._sweeper.start()

    async def stop(self) -> None:
        await self._sweeper.stop()
        await self._worker.stop()

    # --- consuming ------------------------------------------------------------------------
    async def _handle(self, msgs: list[Msg]) -> None:
        checked = [self._checked(msg) for msg in msgs]
        try:  # one claim statement for the whole batch
            claims = await claim_all(
                self._pool, [(c[0], c[2]) for c in checked if not isinstance(c, Rejected)]
            )
        except TRANSIENT as exc:
            log.warning("channel_router.retry_later", **kv(error=str(exc)))
            for msg in msgs:
                await msg.nak(delay=1.0)
            return
        seen: set[ClaimKey] = set()
        for msg, check in zip(msgs, checked):  # in order: a chat's messages keep their order
            try:
                if isinstance(check, Rejected):
                    await self._reject(msg, check)
                    continue
                key = claim_key(check[0], check[2])
                first = key not in seen  # the same event twice in one batch: once only
                seen.add(key)
                await self._process(msg, *check, claims[key], first=first)
            except TRANSIENT as exc:
                log.warning("channel_router.retry_later", **kv(error=str(exc)))
                await msg.nak(delay=1.0)
            except Exception as exc:
                log.exception("channel_router.failed", **kv(subject=msg.subject))
                await self._reject(
                    msg, Rejected("channel.processing_failed", f"could not process: {exc}"[:2000])
                )

    def _checked(self, msg: Msg) -> tuple[str, dict, ChannelInbound] | Rejected:
        try:
            return self._check(msg)
        except Rejected as exc:
            return exc
        except Exception as exc:  # a bug in checking: dead letter, never a hot loop
            log.exception("channel_router.failed", **kv(subject=msg.subject))
            return Rejected("channel.processing_failed", f"could not process: {exc}"[:2000])

    async def _process(
        self,
        msg: Msg,
        tenant: str,
        instance: dict,
        inbound: ChannelInbound,
        claim: dict,
        *,
        first: bool,
    ) -> None:
        if (
            not first
            or claim["status"] in ("done", "rejected")
            or claim["message_id"] != inbound.id
        ):
            self._metrics.bus_messages.labels(FAMILY.name, "duplicate").inc()
            self._metrics.channel_inbound.labels(inbound.provider, "duplicate").inc()
            await msg.ack()
            return
        async with self._pool.acquire() as conn:
            user = await self.identity.upsert_user(
                conn, tenant, instance["instance_id"], inbound.sender
            )
        pending = claim["pending"] or {}
        turn = Turn(tenant, instance, inbound, user, memo=dict(pending.get("memo") or {}))
        if claim["status"] == "waiting":  # redelivered while it waits: re-ask, idempotent
            await self._rerequest_session(turn, claim["binding_id"])
            self._metrics.bus_messages.labels(FAMILY.name, "duplicate").inc()
            self._metrics.channel_inbound.labels(inbound.provider, "duplicate").inc()
            await msg.ack()
            return
        try:
            await self.chat.handle(turn)
        except SubmitRefused as exc:
            await self._submit_refused(turn, str(exc))
        await self._acknowledge(turn)
        await self._reply(tenant, instance["instance_id"], inbound, turn.replies)
        await self._finish(turn)
        self._metrics.bus_messages.labels(FAMILY.name, "accepted").inc()
        self._metrics.channel_inbound.labels(
            inbound.provider, "refused" if turn.outcome == "refused" else "accepted"
        ).inc()
        await msg.ack()

    def _check(self, msg: Msg) -> tuple[str, dict, ChannelInbound]:
        where, env = parse_and_decode(FAMILY, msg, ChannelInbound)
        tenant, instance_id = where["tenant"], where["instance_id"]
        data = env.data
        if (
            env.tenant != tenant
            or (str(env.source.principal_kind), env.source.principal_id) != ("channel", instance_id)
            or data.provider != instance_id
        ):
            raise Rejected(
                "contract.principal_mismatch",
                "the envelope's tenant, source or "
                "provider differs from the subject's channel instance",
            )
        instance = self.instances.instance(instance_id)
        if instance is None or instance["tenant"] != tenant:
            raise Rejected(
                "channel.unknown_instance",
                f"no channel instance {instance_id!r} in tenant {tenant!r}",
            )
        if not instance["enabled"]:
            raise Rejected("channel.instance_disabled", f"instance {instance_id!r} is disabled")
        if (
            where["workspace_id"] != instance["workspace_id"]
            or data.workspace_id != instance["workspace_id"]
        ):
            raise Rejected(
                "channel.wrong_workspace",
                f"instance {instance_id!r} is bound to workspace "
                f"{instance['workspace_id']!r}, not {where['workspace_id']!r}",
            )
        return tenant, instance, data

    def _instance_label(self, subject: str) -> str:
        """The subject's instance if the hub knows it (a metric label), else "unknown"."""
        try:
            instance_id = FAMILY.parse(subject)["instance_id"]
        except subjects.SubjectError:
            return "unknown"
        return instance_id if self.instances.instance(instance_id) is not None else "unknown"

    async def _sweep(self) -> None:
        await self.sweep_waiting()
        await self.approvals.sweep_expired()

    async def _reject(self, msg: Msg, exc: Rejected) -> None:
        self._metrics.channel_inbound.labels(
            self._instance_label(msg.subject), "dead_lettered"
        ).inc()
        await self._dead.reject(msg, FAMILY, exc)

    # --- the claim row ------------------------------------------------------------------
    @staticmethod
    async def _save_memo(conn: asyncpg.Connection, turn: Turn) -> None:
        """Remember an effect that must not run twice (a used claim code, a consumed
        approval token) in the message's claim row, in the effect's transaction."""
        await conn.execute(
            "UPDATE channel_inbound_claims SET pending = $5 WHERE tenant = $1 AND "
            "instance_id = $2 AND event_type = $3 AND provider_event_id = $4",
            turn.tenant,
            turn.instance_id,
            str(turn.msg.event_type),
            turn.msg.provider_event_id,
            {"memo": turn.memo},
        )

    async def _finish(self, turn: Turn) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            if not turn.waiting:
                await conn.execute(
                    "UPDATE channel_inbound_claims SET status = 'done', outcome = $5 "
                    "WHERE tenant = $1 AND instance_id = $2 AND event_type = $3 "
                    "AND provider_event_id = $4 AND status = 'claimed'",
                    turn.tenant,
                    turn.instance_id,
                    str(turn.msg.event_type),
                    turn.msg.provider_event_id,
                    turn.outcome,
                )
            await self._audit.record(
                AuditRecord(
                    action="channel.message_accepted",
                    actor_kind=PrincipalKind.CHANNEL,
                    actor_id=turn.instance_id,
                    target_kind="channel_message",
                    target_id=turn.msg.id,
                    workspace_id=turn.workspace_id,
                    metadata={
                        "instance": turn.instance_id,
                        "eventType": str(turn.msg.event_type),
                        "outcome": turn.outcome,
                        "role": turn.role,
                    },
                ),
                tenant=turn.tenant,
                conn=conn,
            )

    # --- replies ------------------------------------------------------------------------
    async def _reply(
        self,
        tenant: str,
        instance_id: str,
        inbound: ChannelInbound,
        texts: list[str],
        purpose: str = "reply",
    ) -> None:
        """Answer in the message's chat/thread; the first answer to a button press or
        slash command answers the interaction itself."""
        for n, text in enumerate(texts):
            answer = n == 0 and inbound.interaction is not None
            did = delivery_id(inbound.id, purpose, n)
            await self._outbox.send(
                tenant,
                instance_id,
                ChannelOutbound(
                    delivery_id=did,
                    idempotency_key=did,
                    type=DeliveryType.ANSWER_INTERACTION if answer else DeliveryType.TEXT,
                    target=inbound.target,
                    text=text,
                    interaction=inbound.interaction if answer else None,
                    reply_to_message_id=None if answer else inbound.provider_message_id,
                ),
            )

    async def _acknowledge(self, turn: Turn) -> None:
        """React to a submitted prompt's message where the platform can (best effort)."""
        reaction = received_reaction(turn)
        if reaction is not None:
            await self._outbox.send(turn.tenant, turn.instance_id, reaction)

    async def _notify(self, tenant: str, binding: dict, text: str, key: str) -> None:
        """A message to a binding's chat that answers no particular message."""
        instance = self.instances.instance(binding["instance_id"])
        if instance is None:
            return
        did = delivery_id(key, "notice")
        await self._outbox.send(
            tenant,
            binding["instance_id"],
            ChannelOutbound(
                delivery_id=did,
                idempotency_key=did,
                type=DeliveryType.TEXT,
                text=text,
                target=ChannelTarget(
                    chat_id=binding["chat_id"],
                    is_direct=binding["is_direct"],
                    thread_id=binding["thread_key"] or None,
                ),
            ),
        )

    async def _submit_refused(self, turn: Turn, reason: str) -> None:
        turn.outcome = "submit_refused"
        if turn.waiting:  # its session could not even be asked for: fail all who wait
            await self._session_failed(
                turn.tenant,
                turn.memo.pop("binding_id", None) or await self._binding_of(turn),
                reason,
            )
            turn.waiting = False
            return
        turn.replies.append(f"Could not send that: {reason}.")

    async def _binding_of(self, turn: Turn) -> str:
        return await self._pool.fetchval(
            "SELECT binding_id FROM channel_inbound_claims WHERE tenant = $1 AND instance_id = $2 "
            "AND event_type = $3 AND provider_event_id = $4",
            turn.tenant,
            turn.instance_id,
            str(turn.msg.event_type),
            turn.msg.provider_event_id,
        )

    # --- sessions that are being created --------------------------------------------------
    async def _rerequest_session(self, turn: Turn, binding_id: str | None) -> None:
        row = await self._pool.fetchrow(
            "SELECT b.*, s.command_id FROM channel_bindings b JOIN channel_submissions s "
            "ON s.tenant = b.tenant AND s.binding_id = b.binding_id AND s.kind = 'create_session' "
            "WHERE b.tenant = $1 AND b.binding_id = $2",
            turn.tenant,
            binding_id,
        )
        if row is not None and row["session_id"] is None:
            try:
                await self.sessions.request_session(turn, dict(row), row["command_id"])
            except SubmitRefused as exc:
                await self._session_failed(turn.tenant, binding_id, str(exc))

    async def on_command_final(self, tenant: str, command: dict) -> None:
        """A Desktop command finished: a binding's session now exists (or could not be
        made), or a chat's command failed and the chat should hear why. A command no
        channel submitted (`from_channel` false; NULL: accepted before the column
        existed) is none of the router's business: no read, off every command's path."""
        if command.get("from_channel") is False:
            return
        sub = await self._pool.fetchrow(
            "SELECT s.*, b.instance_id, b.chat_id, b.thread_key, b.is_direct "
            "FROM channel_submissions s JOIN channel_bindings b USING (tenant, binding_id) "
            "WHERE s.tenant = $1 AND s.command_id = $2",
            tenant,
            command["command_id"],
        )
        if sub is None:
            return  # not a chat's command
        status = command.get("result_status") or "failed"
        result = await self._opened_result(tenant, sub["instance_id"], command)
        if sub["kind"] == "create_session":
            session = (result.get("session") or {}).get("id") if status == "completed" else None
            if session:
                await self._session_ready(tenant, sub["binding_id"], str(session))
            else:
                await self._session_failed(tenant, sub["binding_id"], _why(result, status))
        elif status in FINAL_FAILURES:
            await self._notify(
                tenant,
                dict(sub),
                f"The Desktop did not run that ({sub['kind']}): {_why(result, status)}.",
                command["command_id"],
            )

    async def _opened_result(self, tenant: str, instance_id: str, command: dict) -> dict:
        """The command's result, opened with the instance's controller keys when the
        Desktop sealed it (docs/sealed.md, "Channels")."""
        result = command.get("result") or {}
        if not isinstance(result, dict) or not result.get("sealed"):
            return result  # in clear: a refusal, or a hub-trust pairing
        controllers = self.instances.controllers
        controller = await controllers.get(tenant, instance_id)
        try:
            if controller is None:
                raise SealError("this channel holds no controller keys")
            opened = controllers.open(controller, result["sealed"], "result", command["command_id"])
        except SealError as exc:
            return {"message": f"the Desktop's sealed result does not open here: {exc}"}
        return opened if isinstance(opened, dict) else {}

    async def _session_ready(self, tenant: str, binding_id: str, session_id: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            binding = await conn.fetchrow(
                "UPDATE channel_bindings SET session_id = COALESCE(session_id, $3), "
                "updated_at = now() WHERE tenant = $1 AND binding_id = $2 RETURNING *",
                tenant,
                binding_id,
                session_id,
            )
            waiting = await self._waiting(conn, tenant, binding_id)
        for claim in waiting:
            turn = self._waiting_turn(tenant, claim)
            if turn is None:
                continue
            try:
                await self.sessions.submit_prompt(
                    turn, dict(binding), turn.msg.text or " ".join(turn.msg.command_args)
                )
            except SubmitRefused as exc:
                turn.replies.append(f"Could not send that: {exc}.")
            await self._acknowledge(turn)
            await self._reply(tenant, turn.instance_id, turn.msg, turn.replies, "waited")
            await self._mark_done(tenant, claim, turn.outcome)

    async def _session_failed(self, tenant: str, binding_id: str | None, reason: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            # The next message asks for a session again.
            await conn.execute(
                "DELETE FROM channel_submissions WHERE tenant = $1 AND "
                "binding_id = $2 AND kind = 'create_session'",
                tenant,
                binding_id,
            )
            waiting = await self._waiting(conn, tenant, binding_id)
        for claim in waiting:
            turn = self._waiting_turn(tenant, claim)
            if turn is not None:
                await self._reply(
                    tenant,
                    turn.instance_id,
                    turn.msg,
                    [f"Could not start a session: {reason}."],
                    "session_failed",
                )
            await self._mark_done(tenant, claim, "session_failed")

    @staticmethod
    async def _waiting(conn: asyncpg.Connection, tenant: str, binding_id: str | None) -> list:
        return [
            dict(r)
            for r in await conn.fetch(
                "SELECT * FROM channel_inbound_claims WHERE tenant = $1 AND binding_id = $2 AND "
                "status = 'waiting' ORDER BY claimed_at, message_id",
                tenant,
                binding_id,
            )
        ]

    def _waiting_turn(self, tenant: str, claim: dict) -> Turn | None:
        instance = self.instances.instance(claim["instance_id"])
        try:
            inbound = ChannelInbound.model_validate((claim["pending"] or {})["inbound"])
        except (KeyError, ValueError):
            return None
        if instance is None:
            return None
        user = {"role": "member", "provider_user_id": inbound.sender.provider_user_id}
        return Turn(tenant, instance, inbound, user)

    async def _mark_done(self, tenant: str, claim: dict, outcome: str) -> None:
        await self._pool.execute(
            "UPDATE channel_inbound_claims SET status = 'done', outcome = $5, pending = NULL "
            "WHERE tenant = $1 AND instance_id = $2 AND event_type = $3 "
            "AND provider_event_id = $4",
            tenant,
            claim["instance_id"],
            claim["event_type"],
            claim["provider_event_id"],
            outcome,
        )

    async def sweep_waiting(self) -> None:
        """Finish what a crash cut short: messages still waiting on a create_session
        that is already final are handled as on_command_final would have."""
        rows = await self._pool.fetch(
            "SELECT DISTINCT c.* FROM channel_inbound_claims w JOIN channel_submissions s "
            "ON s.tenant = w.tenant AND s.binding_id = w.binding_id AND s.kind = 'create_session' "
            "JOIN pairing_commands c ON c.tenant = s.tenant AND c.command_id = s.command_id "
            "WHERE w.status = 'waiting' AND c.state = 'done' LIMIT 100"
        )
        for row in rows:
            await self.on_command_final(row["tenant"], dict(row))


def _why(result: dict, status: str) -> str:
    return str(result.get("message") or status.replace("_", " "))[:500]
