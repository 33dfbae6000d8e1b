"""Chat <-> session bindings, and prompts turned into work for the workspace's
execution authority.

A binding is keyed (tenant, instance, workspace, chat, thread or '') with one
active binding per key (a unique partial index); `/new` and `/switch` change
which one is active. Everything a message becomes takes an id derived from the
message id, so a message processed twice (a crash before its ack) submits
nothing twice.

- `desktop_paired` (the workspace id is the pairing id): a binding without a
  session first gets a `create_session` command; the messages that arrive
  meanwhile wait in their claim rows (status 'waiting', in arrival order) and
  are submitted as `prompt` commands when the session exists
  (`session_ready`). One message at a time per session is left to the
  Desktop's command queue, which runs a pairing's commands strictly in order.
- `cloud_worker`: a prompt is edge work (kind "prompt") whose idempotency key
  is the message id.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from pydantic import ValidationError

from schemas import (
    ChannelInbound,
    ChannelOutbound,
    DeliveryType,
    PrincipalKind,
    SessionRef,
    command_payload,
)

from ..core import Refusal
from ..desktop import PairingError
from ..work import EdgeWorkError, EnqueueWork
from ._controllers import ChannelControllers
from ._outbox import delivery_id
from ._session_link import learn_session

DESKTOP_WORKSPACE = "local"  # the Desktop's own workspace; the hub's is the pairing id
MAX_LISTED = 20
RECEIVED_REACTION = "👀"  # allowed by every platform that has reactions (Telegram's set)


def derived_id(message_id: str, purpose: str) -> str:
    """A token id for what one inbound message becomes (stable across re-processing)."""
    return f"{message_id}-{purpose}"


def binding_id_for(message_id: str) -> str:
    return "b-" + hashlib.sha256(message_id.encode()).hexdigest()[:32]


@dataclass
class Turn:
    """One inbound message being handled: who sent it where, and what to answer."""

    tenant: str
    instance: dict
    msg: ChannelInbound
    user: dict
    memo: dict = field(default_factory=dict)  # effects already done (re-processing)
    replies: list[str] = field(default_factory=list)
    outcome: str = "done"
    waiting: bool = False  # the message waits for its session (claim status 'waiting')

    @property
    def role(self) -> str:
        return self.user["role"]

    @property
    def instance_id(self) -> str:
        return self.instance["instance_id"]

    @property
    def workspace_id(self) -> str:
        return self.instance["workspace_id"]

    @property
    def actor_id(self) -> str:
        return f"channel:{self.instance_id}:{self.msg.sender.provider_user_id}"[:512]

    @property
    def actor_label(self) -> str | None:
        sender = self.msg.sender
        return sender.display_name or sender.username or None


class SubmitRefused(Refusal):
    """The execution authority refused the work; the message is for the chat."""


class ChannelSessions:
    def __init__(
        self,
        pool: asyncpg.Pool,
        commands: Any,
        edge_work: Any,
        pairings: Any,
        controllers: ChannelControllers,
    ) -> None:
        self._pool, self._commands, self._edge_work = pool, commands, edge_work
        self._pairings, self._controllers = pairings, controllers

    # --- bindings ----------------------------------------------------------------------
    @staticmethod
    def _key(turn: Turn) -> tuple[str, str, str, str, str]:
        t = turn.msg.target
        return turn.tenant, turn.instance_id, turn.workspace_id, t.chat_id, t.thread_id or ""

    async def active(
        self, conn: asyncpg.Connection, turn: Turn, *, create: bool, lock: bool = False
    ) -> dict | None:
        """The chat's active binding (made on first use when `create`)."""
        key = self._key(turn)
        sql = (
            "SELECT * FROM channel_bindings WHERE tenant = $1 AND instance_id = $2 AND "
            "workspace_id = $3 AND chat_id = $4 AND thread_key = $5 AND active"
            + (" FOR UPDATE" if lock else "")
        )
        row = await conn.fetchrow(sql, *key)
        if row is None and create:
            await conn.execute(
                """INSERT INTO channel_bindings (tenant, binding_id, instance_id, workspace_id,
                       chat_id, thread_key, is_direct, created_by) VALUES ($1,$6,$2,$3,$4,$5,$7,$8)
                   ON CONFLICT (tenant, instance_id, workspace_id, chat_id, thread_key)
                   WHERE active DO NOTHING""",
                *key,
                binding_id_for(turn.msg.id),
                turn.msg.target.is_direct,
                turn.actor_id,
            )
            row = await conn.fetchrow(sql, *key)
        return dict(row) if row else None

    async def new(self, turn: Turn, title: str | None) -> dict:
        """A fresh binding for this chat/thread; its session starts with the next prompt."""
        binding_id = binding_id_for(turn.msg.id)
        async with self._pool.acquire() as conn, conn.transaction():
            existing = await conn.fetchrow(
                "SELECT * FROM channel_bindings WHERE tenant = $1 AND binding_id = $2",
                turn.tenant,
                binding_id,
            )
            if existing is not None:  # this very message made it already
                return dict(existing)
            key = self._key(turn)
            await conn.execute(
                "UPDATE channel_bindings SET active = false, updated_at = now() WHERE "
                "tenant = $1 AND instance_id = $2 AND workspace_id = $3 AND chat_id = $4 "
                "AND thread_key = $5 AND active",
                *key,
            )
            row = await conn.fetchrow(
                """INSERT INTO channel_bindings (tenant, binding_id, instance_id, workspace_id,
                       chat_id, thread_key, is_direct, title, created_by)
                   VALUES ($1,$6,$2,$3,$4,$5,$7,$8,$9) RETURNING *""",
                *key,
                binding_id,
                turn.msg.target.is_direct,
                title,
                turn.actor_id,
            )
        return dict(row)

    async def list(self, turn: Turn) -> list[dict]:
        rows = await self._pool.fetch(
            "SELECT * FROM channel_bindings WHERE tenant = $1 AND instance_id = $2 AND "
            "workspace_id = $3 AND chat_id = $4 AND thread_key = $5 "
            "ORDER BY created_at, binding_id LIMIT $6",
            *self._key(turn),
            MAX_LISTED,
        )
        bindings = [dict(r) for r in rows]
        for binding in bindings:
            if binding["session_id"] is None and turn.instance["authority"] != "desktop_paired":
                async with self._pool.acquire() as conn:  # a finished prompt may name it
                    binding["session_id"] = await learn_session(
                        conn, turn.tenant, binding["binding_id"]
                    )
            if not binding["title"] and binding["session_id"]:
                binding["title"] = await self._opencode_title(turn, binding["session_id"])
        return bindings

    async def _opencode_title(self, turn: Turn, session_id: str) -> str | None:
        """The title OpenCode last gave the session (its `session.updated` events, from
        a Desktop or from Cloud work), when the chat gave it none."""
        return await self._pool.fetchval(
            "SELECT t FROM (SELECT coalesce(payload->'body'->'properties'->'info'->>'title', "
            "payload->'payload'->'properties'->'info'->>'title', "
            "payload->'properties'->'info'->>'title') AS t, sequence FROM workspace_events "
            "WHERE tenant = $1 AND workspace_id = $2 AND session_id = $3) e "
            "WHERE t IS NOT NULL ORDER BY sequence DESC LIMIT 1",
            turn.tenant,
            turn.workspace_id,
            session_id,
        )

    async def switch(self, turn: Turn, ref: str) -> dict | None:
        """Make binding number `ref` (as /sessions lists them) or the one with session
        id `ref` active; None when there is no such binding."""
        bindings = await self.list(turn)
        target = None
        if ref.isdigit() and 1 <= int(ref) <= len(bindings):
            target = bindings[int(ref) - 1]
        else:
            target = next((b for b in bindings if ref in (b["session_id"], b["binding_id"])), None)
        if target is None:
            return None
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE channel_bindings SET active = false, updated_at = now() WHERE "
                "tenant = $1 AND instance_id = $2 AND workspace_id = $3 AND chat_id = $4 "
                "AND thread_key = $5 AND active AND binding_id <> $6",
                *self._key(turn),
                target["binding_id"],
            )
            row = await conn.fetchrow(
                "UPDATE channel_bindings SET active = true, updated_at = now() "
                "WHERE tenant = $1 AND binding_id = $2 RETURNING *",
                turn.tenant,
                target["binding_id"],
            )
        return dict(row)

    # --- Desktop commands ---------------------------------------------------------------
    async def desktop_command(
        self,
        turn: Turn,
        kind: str,
        session_id: str | None,
        payload: dict | None,
        command_id: str,
        *,
        binding_id: str | None = None,
    ) -> None:
        """Submit one command to the paired Desktop (idempotent by `command_id`) and
        remember which binding it serves; SubmitRefused when the hub refuses it."""
        async with self._recorded(turn, command_id, binding_id, kind):
            try:
                command_payload(kind, session_id, payload)
            except (ValueError, ValidationError) as exc:
                raise SubmitRefused(
                    "channel.invalid_command", f"that is not a valid {kind}: {exc}"
                ) from None
            pairing_id = turn.workspace_id
            signed_by_us = False

            async def submit(signed: dict | None) -> None:
                nonlocal signed_by_us
                signed_by_us = signed is not None
                fields = {
                    "id": command_id,
                    "kind": kind,
                    "workspace_id": DESKTOP_WORKSPACE,
                    "session_id": session_id,
                    "payload": None if signed else payload,  # signed: it travels sealed only
                    "signed": signed,
                    "actor_id": turn.actor_id,
                    "actor_label": turn.actor_label,
                }
                await self._commands.submit(
                    turn.tenant,
                    pairing_id,
                    {k: v for k, v in fields.items() if v is not None},
                    channel=True,
                )

            try:
                pairing = await self._pairings.get(turn.tenant, pairing_id)
                allowed = pairing["allowed_session_ids"]
                if session_id and allowed is not None and session_id not in allowed:
                    raise SubmitRefused(
                        "pairing.session_not_allowed",
                        f"the pairing does not allow session {session_id}",
                    )
                # An instance enrolled as a controller of its Desktop signs every command
                # (docs/sealed.md, "Channels").
                enrolled = await self._controllers.submit_signed(
                    turn.tenant,
                    turn.instance_id,
                    pairing_id,
                    submit,
                    command_id=command_id,
                    kind=kind,
                    workspace_id=DESKTOP_WORKSPACE,
                    session_id=session_id,
                    payload=payload,
                )
                if not enrolled:
                    if pairing.get("reported_trust") == "sealed":
                        raise SubmitRefused("pairing.sealed", REFUSALS["pairing.sealed"])
                    await submit(None)
            except PairingError as exc:
                # A message processed again signs anew, so its body differs from the
                # command already submitted under this id: that one stands.
                if not (exc.code == "command.conflict" and signed_by_us):
                    raise SubmitRefused(exc.code, refusal_text(exc.code, str(exc))) from None

    @contextlib.asynccontextmanager
    async def _recorded(
        self, turn: Turn, command_id: str, binding_id: str | None, kind: str
    ) -> AsyncIterator[None]:
        """The command's binding, recorded before the command exists: the command is
        pushed as it is submitted, and the Desktop may answer at once (a refusal takes
        it no time); the router finds the chat to tell of a failed final only through
        this record, so one written after the final left the chat without an answer.
        A submit the hub refuses forgets the record it wrote (no command came of it)."""
        recorded = binding_id is not None and await record_submission(
            self._pool, turn.tenant, command_id, binding_id, kind, turn.msg.id
        )
        try:
            yield
        except SubmitRefused:
            if recorded:
                await forget_submission(self._pool, turn.tenant, command_id)
            raise

    async def desktop_online(self, tenant: str, pairing_id: str) -> str:
        try:
            row = await self._pairings.get(tenant, pairing_id)
        except PairingError:
            return "unknown pairing"
        return {
            "paired_online": "online",
            "paired_offline": "offline",
            "pending": "not paired yet",
            "revoked": "revoked",
        }.get(row["status"], row["status"])

    # --- prompts ----------------------------------------------------------------------------
    async def prompt(self, turn: Turn, text: str) -> None:
        if turn.instance["authority"] == "cloud_worker":
            await self._edge_prompt(turn, text)
            return
        async with self._pool.acquire() as conn, conn.transaction():
            binding = await self.active(conn, turn, create=True, lock=True)
            assert binding is not None
            if binding["session_id"] is None:
                await self._wait_for_session(conn, turn, binding)
                new_session = turn.memo.get("create_session")
            else:
                new_session = None
        if new_session is not None:  # outside the transaction: the binding lock is released
            await self.request_session(turn, binding, new_session)
            return
        if binding["session_id"] is not None:
            await self.submit_prompt(turn, binding, text)

    async def _wait_for_session(self, conn: asyncpg.Connection, turn: Turn, binding: dict) -> None:
        """Park the message until the binding's session exists; ask for the session
        unless a create_session for this binding is already on its way."""
        pending = await conn.fetchval(
            "SELECT command_id FROM channel_submissions WHERE tenant = $1 AND binding_id = $2 "
            "AND kind = 'create_session'",
            turn.tenant,
            binding["binding_id"],
        )
        if pending is None:
            pending = derived_id(turn.msg.id, "session")
            await record_submission(
                conn, turn.tenant, pending, binding["binding_id"], "create_session", turn.msg.id
            )
            turn.memo["create_session"] = pending
        await conn.execute(
            "UPDATE channel_inbound_claims SET status = 'waiting', binding_id = $5, pending = $6 "
            "WHERE tenant = $1 AND instance_id = $2 AND event_type = $3 "
            "AND provider_event_id = $4",
            turn.tenant,
            turn.instance_id,
            str(turn.msg.event_type),
            turn.msg.provider_event_id,
            binding["binding_id"],
            {"inbound": turn.msg.model_dump(mode="json", by_alias=True)},
        )
        turn.memo["binding_id"] = binding["binding_id"]
        turn.waiting, turn.outcome = True, "waiting_for_session"

    async def request_session(self, turn: Turn, binding: dict, command_id: str) -> None:
        """Submit the binding's create_session (idempotent; also re-run for a message
        that is redelivered while it waits)."""
        title = binding["title"] or _title(turn)
        payload: dict = {"title": title[:512]}
        if turn.instance.get("default_agent"):
            payload["agent"] = turn.instance["default_agent"]
        await self.desktop_command(turn, "create_session", None, payload, command_id)

    async def submit_prompt(self, turn: Turn, binding: dict, text: str) -> None:
        payload = {"text": text}
        if turn.instance.get("default_agent"):
            payload["agent"] = turn.instance["default_agent"]
        await self.desktop_command(
            turn,
            "prompt",
            binding["session_id"],
            payload,
            derived_id(turn.msg.id, "prompt"),
            binding_id=binding["binding_id"],
        )
        if await self.desktop_online(turn.tenant, turn.workspace_id) == "offline":
            turn.replies.append(
                "Your Desktop is offline: the prompt is queued and runs when it reconnects."
            )
        turn.outcome = "prompted"

    async def _edge_prompt(self, turn: Turn, text: str) -> None:
        async with self._pool.acquire() as conn:
            binding = await self.active(conn, turn, create=True)
            assert binding is not None
            if binding["session_id"] is None:  # continue the session an earlier prompt opened
                binding["session_id"] = await learn_session(
                    conn, turn.tenant, binding["binding_id"]
                )
        payload = {"text": text}
        if turn.instance.get("default_agent"):
            payload["agent"] = turn.instance["default_agent"]
        request = EnqueueWork(
            kind="prompt",
            payload=payload,
            idempotency_key=turn.msg.id,
            session_ref=SessionRef(
                workspace_id=turn.workspace_id,
                session_id=binding["session_id"],
                title=binding["title"],
            ),
        )
        try:
            row, _ = await self._edge_work.enqueue(turn.tenant, request, actor=turn.actor_id)
        except EdgeWorkError as exc:
            raise SubmitRefused(exc.code, f"the workspace refused the prompt: {exc}") from None
        await record_submission(
            self._pool,
            turn.tenant,
            row["work_id"],
            binding["binding_id"],
            "edge_prompt",
            turn.msg.id,
        )
        turn.outcome = "prompted"

    async def cancel_work(self, turn: Turn, binding_id: str) -> int:
        """Cancel the chat's Cloud work still queued or running; how many items."""
        rows = await self._pool.fetch(
            "SELECT w.work_id FROM channel_submissions s JOIN edge_work w "
            "ON w.tenant = s.tenant AND w.work_id = s.command_id "
            "WHERE s.tenant = $1 AND s.binding_id = $2 AND w.state IN ('queued', 'leased')",
            turn.tenant,
            binding_id,
        )
        cancelled = 0
        for row in rows:
            try:
                await self._edge_work.cancel(
                    turn.tenant,
                    row["work_id"],
                    actor=turn.actor_id,
                    actor_kind=PrincipalKind.CHANNEL,
                    reason=f"stopped with /abort by {turn.actor_label or turn.actor_id}",
                )
                cancelled += 1
            except EdgeWorkError:  # it ended meanwhile
                pass
        return cancelled


def received_reaction(turn: Turn) -> ChannelOutbound | None:
    """👀 on the chat message a submitted prompt came from, so its sender sees it
    was taken; None unless the prompt was submitted, the instance's platform has
    reactions and the message has a platform id (a Discord slash command has none).
    The delivery id derives from the message id: a re-run reacts once."""
    caps, msg = turn.instance.get("capabilities"), turn.msg
    if (
        turn.outcome != "prompted"
        or not getattr(caps, "reactions", False)
        or not msg.provider_message_id
    ):
        return None
    did = delivery_id(msg.id, "received-reaction")
    return ChannelOutbound(
        delivery_id=did,
        idempotency_key=did,
        type=DeliveryType.REACTION,
        target=msg.target.model_copy(update={"message_id": msg.provider_message_id}),
        reaction=RECEIVED_REACTION,
    )


async def record_submission(
    conn: Any, tenant: str, command_id: str, binding_id: str, kind: str, message_id: str
) -> bool:
    """Remember which binding a command (or edge work) serves; True if this call wrote
    the record (False: it was there already, from an earlier try of the message)."""
    status = await conn.execute(
        "INSERT INTO channel_submissions (tenant, command_id, binding_id, kind, message_id) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant, command_id) DO NOTHING",
        tenant,
        command_id,
        binding_id,
        kind,
        message_id,
    )
    return bool(status == "INSERT 0 1")


async def forget_submission(conn: Any, tenant: str, command_id: str) -> None:
    await conn.execute(
        "DELETE FROM channel_submissions WHERE tenant = $1 AND command_id = $2",
        tenant,
        command_id,
    )


def _title(turn: Turn) -> str:
    who = turn.msg.sender.display_name or turn.msg.sender.username or turn.msg.target.chat_id
    name = turn.instance.get("display_name") or turn.instance_id
    return f"{name}: {who}"


REFUSALS = {
    "pairing.revoked": "the Desktop's pairing is revoked",
    "pairing.disabled": "the Desktop's pairing is disabled",
    "pairing.not_redeemed": "no Desktop has redeemed this workspace's pairing code yet",
    "pairing.not_found": "this workspace's Desktop pairing does not exist",
    # docs/sealed.md, "Channels"
    "pairing.sealed": "the Desktop is sealed: only controllers enrolled on it can drive it, "
    "and this chat channel is not one (its owner can enrol it: cowork channel enrol)",
}


def refusal_text(code: str, message: str) -> str:
    return REFUSALS.get(code, message)
