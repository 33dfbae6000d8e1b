"""Chat commands (/help, /status, /new, ...), approvals, and what counts as a prompt.

Each handler appends its answer to `turn.replies`; a user without the right
gets a clear refusal (audited as channel.command_refused), never silence.
Approval tokens are single use and checked against the chat and user
(ActionTokens.consume); an unknown token is answered as such and never
approves. A token consumed once is remembered in the message's claim row
(`turn.memo`), so re-processing the message after a crash submits the same
answer instead of reporting the token as used.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from schemas import AuditRecord, ChannelEventType, PrincipalKind

from ..core import AuditLog
from ._approval_outcome import outcome_text
from ._identity import ChannelIdentity, may_approve, may_prompt, may_read
from ._sessions import ChannelSessions, Turn, derived_id

ACCESS_HELP = (
    "You don't have access here yet. Ask an admin of this workspace for a claim "
    "code, then send /claim CODE."
)
UNKNOWN_TOKEN = "That approval is unknown or expired; nothing was approved."
# command -> (who may use it, usage without the slash: a string starting "/session"
# would read as an OpenCode route to tests/test_boundaries.py)
COMMANDS: dict[str, tuple[Callable[[str], bool], str]] = {
    "help": (lambda role: True, "help - this list"),
    "claim": (lambda role: True, "claim CODE - redeem a claim code from an admin"),
    "status": (may_read, "status - instance, workspace, session and Desktop state"),
    "whereami": (may_read, "whereami - tenant, instance, chat, thread, session, your role"),
    "sessions": (may_read, "sessions - this chat's sessions"),
    "new": (may_prompt, "new [title] - start a fresh session for this chat"),
    "switch": (may_prompt, "switch N|sessionId - make another session active"),
    "abort": (may_prompt, "abort - stop the active session's current run"),
    "ask": (may_prompt, "ask TEXT - send a prompt"),
    "approve": (may_approve, "approve TOKEN - allow a pending permission"),
    "deny": (may_approve, "deny TOKEN - deny a pending permission"),
    "answer": (may_approve, "answer TOKEN TEXT - answer a pending question"),
    "reject": (may_approve, "reject TOKEN - decline a pending question"),
}
TOKEN_ACTIONS = {"approve": "allow", "deny": "deny", "answer": "answer", "reject": "reject"}
_COMMAND_OF = {action: name for name, action in TOKEN_ACTIONS.items()}


class ChatCommands:
    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: AuditLog,
        identity: ChannelIdentity,
        sessions: ChannelSessions,
        actions: Any,
        save_memo: Callable[[asyncpg.Connection, Turn], Awaitable[None]],
        *,
        outcomes: Any = None,
    ) -> None:
        self._pool, self._audit, self._identity = pool, audit, identity
        self._sessions, self._actions, self._save_memo = sessions, actions, save_memo
        self._outcomes = outcomes  # ApprovalOutcomes: approval messages show the outcome

    async def handle(self, turn: Turn) -> None:
        msg = turn.msg
        if msg.event_type == ChannelEventType.INTERACTION:
            if msg.interaction is None:
                turn.replies.append("That button press carried nothing to act on.")
                turn.outcome = "refused"
                return
            await self._token(turn, None, msg.interaction.token, "")
            return
        name = (
            (msg.command or "").lstrip("/").lower()
            if (msg.is_command or msg.event_type == ChannelEventType.COMMAND)
            else ""
        )
        args = list(msg.command_args)
        if name and name not in COMMANDS and msg.event_type == ChannelEventType.COMMAND:
            # A platform slash command that is not ours: its free text is the prompt.
            name, args = "ask", args
        if not name:
            await self._prompt(turn, msg.text, plain=True)
            return
        if name not in COMMANDS:
            turn.replies.append(f"Unknown command /{name}. Send /help.")
            turn.outcome = "unknown_command"
            return
        allowed, _ = COMMANDS[name]
        if not allowed(turn.role):
            await self._refuse(turn, name)
            return
        await getattr(self, f"_cmd_{name}")(turn, args)

    async def _refuse(self, turn: Turn, name: str, *, plain: bool = False) -> None:
        """Refuse and say why. A pending user's plain message gets the access help at
        most once per ACCESS_HELP_INTERVAL (anyone can write to a bot: it must not
        answer every message of a stranger); the refusal is audited every time."""
        if not may_read(turn.role):
            if not plain or await self._access_help_due(turn):
                turn.replies.append(ACCESS_HELP)
        elif name == "ask":
            turn.replies.append(f"Your role ({turn.role}) may not send prompts here.")
        else:
            turn.replies.append(f"Your role ({turn.role}) may not use /{name}.")
        turn.outcome = "refused"
        await self._audit.record(
            AuditRecord(
                action="channel.command_refused",
                actor_kind=PrincipalKind.CHANNEL,
                actor_id=turn.instance_id,
                target_kind="channel_user",
                target_id=f"{turn.instance_id}/{turn.msg.sender.provider_user_id}",
                workspace_id=turn.workspace_id,
                reason=f"role {turn.role} may not use /{name}",
                metadata={"instance": turn.instance_id, "command": name, "role": turn.role},
            ),
            tenant=turn.tenant,
        )

    async def _access_help_due(self, turn: Turn) -> bool:
        if turn.memo.get("access_help"):  # this message took the slot before a crash
            return True
        async with self._pool.acquire() as conn, conn.transaction():
            due = await self._identity.take_access_help_slot(
                conn, turn.tenant, turn.instance_id, turn.msg.sender.provider_user_id
            )
            if due:
                turn.memo["access_help"] = True
                await self._save_memo(conn, turn)
        return due

    async def _prompt(self, turn: Turn, text: str, *, plain: bool = False) -> None:
        if not may_prompt(turn.role):
            await self._refuse(turn, "ask", plain=plain)
            return
        if not text.strip():
            turn.replies.append("There is nothing to send: the message has no text.")
            turn.outcome = "empty"
            return
        await self._sessions.prompt(turn, text)

    # --- commands ------------------------------------------------------------------------
    async def _cmd_ask(self, turn: Turn, args: list[str]) -> None:
        await self._prompt(turn, " ".join(args))

    async def _cmd_help(self, turn: Turn, args: list[str]) -> None:
        lines = ["/" + usage for allowed, usage in COMMANDS.values() if allowed(turn.role)]
        intro = ACCESS_HELP if not may_read(turn.role) else f"Your role: {turn.role}."
        if may_prompt(turn.role):
            lines.append("Any other message is sent to the active session as a prompt.")
        turn.replies.append("\n".join([intro, "Commands:", *lines]))

    async def _cmd_claim(self, turn: Turn, args: list[str]) -> None:
        if len(args) != 1 and not (args and len("".join(args)) == 10):
            turn.replies.append("Usage: /claim CODE (the code an admin gave you).")
            turn.outcome = "refused"
            return
        outcome = turn.memo.get("claim")
        if outcome is None:
            async with self._pool.acquire() as conn, conn.transaction():
                result = await self._identity.redeem(
                    conn,
                    turn.tenant,
                    turn.instance_id,
                    turn.msg.sender.provider_user_id,
                    "".join(args),
                )
                outcome = {
                    "ok": result.ok,
                    "role": result.role,
                    "code": result.code,
                    "retryAfter": result.retry_after,
                }
                turn.memo["claim"] = outcome
                await self._save_memo(conn, turn)
        if outcome["ok"]:
            turn.user["role"] = outcome["role"]
            turn.replies.append(
                f"Welcome! Your role is now {outcome['role']}. Send /help to see what you can do."
            )
            turn.outcome = "claimed"
        elif outcome["code"] == "claim.rate_limited":
            turn.replies.append(
                "Too many claim attempts. Try again in "
                f"{max(1, round(outcome['retryAfter']))} seconds."
            )
            turn.outcome = "refused"
        else:
            turn.replies.append(
                "That claim code is not valid: it may be mistyped, expired or "
                "already used. Ask an admin for a new one."
            )
            turn.outcome = "refused"

    async def _cmd_status(self, turn: Turn, args: list[str]) -> None:
        inst = turn.instance
        async with self._pool.acquire() as conn:
            binding = await self._sessions.active(conn, turn, create=False)
        lines = [
            f"Instance: {inst.get('display_name') or turn.instance_id} "
            f"({turn.instance_id}, {inst['kind']})",
            f"Workspace: {turn.workspace_id} ({inst['authority']})",
            f"Session: {_describe(binding)}",
        ]
        if inst["authority"] == "desktop_paired":
            state = await self._sessions.desktop_online(turn.tenant, turn.workspace_id)
            lines.append(f"Desktop: {state}")
        turn.replies.append("\n".join(lines))

    async def _cmd_whereami(self, turn: Turn, args: list[str]) -> None:
        target = turn.msg.target
        async with self._pool.acquire() as conn:
            binding = await self._sessions.active(conn, turn, create=False)
        turn.replies.append(
            "\n".join(
                [
                    f"Tenant: {turn.tenant}",
                    f"Instance: {turn.instance_id}",
                    f"Workspace: {turn.workspace_id}",
                    f"Chat: {target.chat_id}",
                    f"Thread: {target.thread_id or '-'}",
                    f"Session: {_describe(binding)}",
                    f"Role: {turn.role}",
                ]
            )
        )

    async def _cmd_sessions(self, turn: Turn, args: list[str]) -> None:
        bindings = await self._sessions.list(turn)
        if not bindings:
            turn.replies.append("No sessions in this chat yet. Send a message to start one.")
            return
        lines = [
            f"{'*' if b['active'] else ' '} {n}. {_describe(b)}"
            for n, b in enumerate(bindings, start=1)
        ]
        turn.replies.append("Sessions (* = active):\n" + "\n".join(lines))

    async def _cmd_new(self, turn: Turn, args: list[str]) -> None:
        title = " ".join(args).strip()[:200] or None
        await self._sessions.new(turn, title)
        turn.replies.append(
            f"Started a new session{f' {title!r}' if title else ''}. Your next message goes to it."
        )

    async def _cmd_switch(self, turn: Turn, args: list[str]) -> None:
        if len(args) != 1:
            turn.replies.append(
                "Usage: /switch N (as /sessions numbers them) or /switch SESSION_ID."
            )
            turn.outcome = "refused"
            return
        binding = await self._sessions.switch(turn, args[0])
        if binding is None:
            turn.replies.append(f"No session {args[0]!r} in this chat. Send /sessions.")
            turn.outcome = "refused"
            return
        turn.replies.append(f"Switched to {_describe(binding)}.")

    async def _cmd_abort(self, turn: Turn, args: list[str]) -> None:
        async with self._pool.acquire() as conn:
            binding = await self._sessions.active(conn, turn, create=False)
        if turn.instance["authority"] != "desktop_paired":
            cancelled = (
                0
                if binding is None
                else await self._sessions.cancel_work(turn, binding["binding_id"])
            )
            if not cancelled:
                turn.replies.append("Nothing is running here to abort.")
                turn.outcome = "refused"
                return
            turn.replies.append("Stopped." if cancelled == 1 else f"Stopped {cancelled} runs.")
            return
        if binding is None or binding["session_id"] is None:
            turn.replies.append("There is no active session to abort.")
            turn.outcome = "refused"
            return
        await self._sessions.desktop_command(
            turn,
            "abort",
            binding["session_id"],
            None,
            derived_id(turn.msg.id, "abort"),
            binding_id=binding["binding_id"],
        )
        turn.replies.append("Abort sent to the Desktop.")

    async def _cmd_approve(self, turn: Turn, args: list[str]) -> None:
        await self._token_command(turn, "approve", args)

    async def _cmd_deny(self, turn: Turn, args: list[str]) -> None:
        await self._token_command(turn, "deny", args)

    async def _cmd_answer(self, turn: Turn, args: list[str]) -> None:
        await self._token_command(turn, "answer", args)

    async def _cmd_reject(self, turn: Turn, args: list[str]) -> None:
        await self._token_command(turn, "reject", args)

    # --- approvals ----------------------------------------------------------------------
    async def _token_command(self, turn: Turn, name: str, args: list[str]) -> None:
        needs_text = name == "answer"
        if not args or (needs_text and len(args) < 2):
            turn.replies.append(f"Usage: /{COMMANDS[name][1].split(' - ')[0]}")
            turn.outcome = "refused"
            return
        await self._token(turn, TOKEN_ACTIONS[name], args[0], " ".join(args[1:]))

    async def _token(self, turn: Turn, wanted: str | None, token: str, text: str) -> None:
        """Act on an approval token: `wanted` is the action a text command names
        (None for a button, whose token carries its action)."""
        if not may_approve(turn.role):
            await self._refuse(turn, "approve")
            return
        if turn.instance["authority"] != "desktop_paired":
            turn.replies.append("Approvals from chat work only for a paired Desktop.")
            turn.outcome = "refused"
            return
        row = turn.memo.get("action")
        if row is None:
            async with self._pool.acquire() as conn, conn.transaction():
                found = await self._actions.consume(
                    conn,
                    turn.tenant,
                    token,
                    instance_id=turn.instance_id,
                    chat_id=turn.msg.target.chat_id,
                    user_id=turn.msg.sender.provider_user_id,
                )
                row = _json_row(found) if found else {}
                turn.memo["action"] = row
                await self._save_memo(conn, turn)
        if not row:
            turn.replies.append(UNKNOWN_TOKEN)
            turn.outcome = "unknown_token"
            return
        await self._respond(turn, row, wanted, text)

    async def _respond(self, turn: Turn, row: dict, wanted: str | None, text: str) -> None:
        action = row["action"]
        # A text command may turn any permission token into a denial, never a denial
        # token into an approval; other mismatches send nothing.
        if (
            wanted is not None
            and wanted != action
            and not (wanted == "deny" and row["kind"] == "permission")
        ):
            turn.replies.append(
                f"That token is for {action} on a {row['kind']}, not "
                f"/{_COMMAND_OF[wanted]}. Nothing was sent."
            )
            turn.outcome = "refused"
            return
        action = wanted or action
        answer = ""
        if row["kind"] == "permission":
            kind, payload = (
                "permission.respond",
                {"permissionId": row["request_id"], "allowed": action == "allow"},
            )
            done = "Allowed." if action == "allow" else "Denied."
        elif action == "reject":
            kind, payload = "question.reject", {"requestId": row["request_id"]}
            done = "Question declined."
        else:
            answer = text or _answer_text(row.get("answer"))
            if not answer:
                turn.replies.append("Send /answer TOKEN TEXT with your answer.")
                turn.outcome = "refused"
                return
            kind, payload = (
                "question.reply",
                {"requestId": row["request_id"], "answers": [[answer]]},
            )
            done = "Answer sent."
        await self._sessions.desktop_command(
            turn,
            kind,
            row["session_id"],
            payload,
            derived_id(turn.msg.id, "respond"),
            binding_id=row.get("binding_id"),
        )
        turn.replies.append(done)
        turn.outcome = "responded"
        if self._outcomes is not None and row.get("workspace_id") and row.get("session_id"):
            who = turn.actor_label or turn.msg.sender.provider_user_id
            await self._outcomes.settle(
                turn.tenant, row, outcome_text(row["kind"], action, who, answer)
            )


def _describe(binding: dict | None) -> str:
    if binding is None:
        return "none yet (your next message starts one)"
    name = binding["title"] or "untitled"
    session = binding["session_id"] or "starting with the next message"
    return f"{name} [{session}]"


def _answer_text(answer: Any) -> str:
    if isinstance(answer, str):
        return answer
    if isinstance(answer, list) and answer:
        first = answer[0]
        return first if isinstance(first, str) else (first[0] if first else "")
    return ""


def _json_row(row: dict) -> dict:
    keep = ("kind", "request_id", "action", "answer", "workspace_id", "session_id", "binding_id")
    return {k: row.get(k) for k in keep}
