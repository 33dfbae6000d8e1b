"""Runs a hub command on the local OpenCode, under the Desktop's own policy.

The Desktop is the execution authority: whatever the hub sends, this module
decides. Approvals and questions default to `local_confirmation` (answered
`requires_local_confirmation`, nothing done); they run only under
`remote_allowed` and with a lease that has not expired, and only for a
request that belongs to the command's own session tree. Results always carry
the null projection fence with its reason (schemas.CommandResult).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import ValidationError

from schemas import (
    CommandResult,
    CommandStatus,
    DeviceCommand,
    PairingPolicy,
    PairingState,
    PolicyDecision,
    command_payload,
)

from ..common import OpenCodeClient, OpenCodeError, redact, redaction_policy

MAX_TREE_DEPTH = 16


def _result(status: CommandStatus, *, ok: bool | None = None, **fields: Any) -> CommandResult:
    ok = status in (CommandStatus.COMPLETED, CommandStatus.QUEUED) if ok is None else ok
    return CommandResult(ok=ok, status=status, **fields)


def _session_id(command: DeviceCommand) -> str:
    """The session of a command kind that needs one (command_payload() checked it)."""
    if not command.session_id:
        raise ValueError(f"{command.kind.value} needs a sessionId")
    return command.session_id


class Refusal(Exception):
    """A command this Desktop will not run; becomes a non-ok result."""

    def __init__(self, status: CommandStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class CommandRunner:
    def __init__(self, opencode: OpenCodeClient, state: PairingState) -> None:
        self._opencode = opencode
        self.state = state

    @property
    def policy(self) -> PairingPolicy:
        return self.state.policy

    def _redact(self, value: Any) -> Any:
        return redact(value, redaction_policy(self.policy))

    async def run(self, command: DeviceCommand) -> CommandResult:
        try:
            self._check_scope(command)
            payload = command_payload(str(command.kind.value), command.session_id, command.payload)
            handler = getattr(self, "_" + command.kind.value.replace(".", "_"))
            return await handler(command, payload)
        except Refusal as exc:
            return _result(exc.status, ok=False, message=str(exc))
        except (ValueError, ValidationError) as exc:
            return _result(CommandStatus.FAILED, ok=False, message=f"invalid command: {exc}"[:2000])
        except OpenCodeError as exc:
            return _result(CommandStatus.FAILED, ok=False, message=f"OpenCode: {exc}"[:2000])

    def _check_scope(self, command: DeviceCommand) -> None:
        state = self.state
        if state.revoked:
            raise Refusal(CommandStatus.BLOCKED_BY_POLICY, "this pairing is revoked")
        if not state.enabled:
            raise Refusal(
                CommandStatus.BLOCKED_BY_POLICY, "this pairing is disabled on the Desktop"
            )
        if command.workspace_id not in state.allowed_workspace_ids:
            raise Refusal(
                CommandStatus.BLOCKED_BY_POLICY,
                f"workspace {command.workspace_id!r} is not allowlisted",
            )
        allowed = state.allowed_session_ids
        if allowed is not None and command.session_id and command.session_id not in allowed:
            raise Refusal(
                CommandStatus.BLOCKED_BY_POLICY,
                f"session {command.session_id!r} is not allowlisted",
            )

    def _decision(self, decision: PolicyDecision, command: DeviceCommand, what: str) -> None:
        if decision == PolicyDecision.DISABLED:
            raise Refusal(
                CommandStatus.BLOCKED_BY_POLICY, f"remote {what} are disabled on this Desktop"
            )
        if decision == PolicyDecision.LOCAL_CONFIRMATION:
            raise Refusal(
                CommandStatus.REQUIRES_LOCAL_CONFIRMATION,
                f"remote {what} need confirmation on the Desktop itself",
            )
        if command.lease.lease_expires_at <= datetime.now(UTC):
            raise Refusal(CommandStatus.BLOCKED_BY_POLICY, f"remote {what} need a live lease")

    # --- kinds ----------------------------------------------------------------------------
    async def _create_session(self, command: DeviceCommand, payload: Any) -> CommandResult:
        if not self.policy.allow_remote_prompts:
            raise Refusal(
                CommandStatus.BLOCKED_BY_POLICY, "remote prompts are disabled on this Desktop"
            )
        session = await self._opencode.create_session(title=payload.title, agent=payload.agent)
        return _result(CommandStatus.COMPLETED, session=self._redact(session))

    async def _prompt(self, command: DeviceCommand, payload: Any) -> CommandResult:
        if not self.policy.allow_remote_prompts:
            raise Refusal(
                CommandStatus.BLOCKED_BY_POLICY, "remote prompts are disabled on this Desktop"
            )
        parts: list[dict[str, Any]] = [{"type": "text", "text": payload.text}]
        if payload.attachments:
            if not self.policy.allow_remote_attachments:
                raise Refusal(CommandStatus.BLOCKED_BY_POLICY, "remote attachments are disabled")
            parts += [
                {
                    "type": "file",
                    "mime": a.mime,
                    "url": a.url,
                    **({"filename": a.filename} if a.filename else {}),
                }
                for a in payload.attachments
            ]
        await self._opencode.prompt_async(
            _session_id(command), parts, agent=payload.agent, variant=payload.variant
        )
        return _result(
            CommandStatus.QUEUED, message="the prompt is running; follow the session events"
        )

    async def _abort(self, command: DeviceCommand, payload: Any) -> CommandResult:
        if not self.policy.allow_remote_abort:
            raise Refusal(
                CommandStatus.BLOCKED_BY_POLICY, "remote abort is disabled on this Desktop"
            )
        await self._opencode.abort(_session_id(command))
        return _result(CommandStatus.COMPLETED)

    async def _permission_respond(self, command: DeviceCommand, payload: Any) -> CommandResult:
        self._decision(self.policy.remote_approvals, command, "approvals")
        pending = await self._opencode.list_permissions()
        request = await self._pending_in_tree(pending, payload.permission_id, command)
        reply: Literal["once", "reject"] = "once" if payload.allowed is True else "reject"
        await self._opencode.reply_permission(request["id"], reply)
        return _result(
            CommandStatus.COMPLETED, data={"permissionId": request["id"], "reply": reply}
        )

    async def _question_reply(self, command: DeviceCommand, payload: Any) -> CommandResult:
        self._decision(self.policy.remote_questions, command, "answers to questions")
        pending = await self._opencode.list_questions()
        request = await self._pending_in_tree(pending, payload.request_id, command)
        await self._opencode.reply_question(request["id"], payload.answers)
        return _result(CommandStatus.COMPLETED, data={"requestId": request["id"]})

    async def _question_reject(self, command: DeviceCommand, payload: Any) -> CommandResult:
        self._decision(self.policy.remote_questions, command, "answers to questions")
        pending = await self._opencode.list_questions()
        request = await self._pending_in_tree(pending, payload.request_id, command)
        await self._opencode.reject_question(request["id"])
        return _result(CommandStatus.COMPLETED, data={"requestId": request["id"]})

    async def _status(self, command: DeviceCommand, payload: Any) -> CommandResult:
        health = await self._opencode.health()
        busy = await self._opencode.session_status()
        sessions = await self._opencode.list_sessions(limit=50)
        allowed = self.state.allowed_session_ids
        if allowed is not None:
            sessions = [s for s in sessions if s.get("id") in allowed]
            busy = {k: v for k, v in busy.items() if k in allowed}
        return _result(
            CommandStatus.COMPLETED,
            sessions=self._redact(sessions),
            data={"opencode": self._redact(health), "busy": self._redact(busy)},
        )

    async def _revoke_pairing(self, command: DeviceCommand, payload: Any) -> CommandResult:
        # The agent revokes locally once this result is acknowledged (see _desktop).
        return _result(CommandStatus.COMPLETED, message="the Desktop revoked this pairing")

    async def _pending_in_tree(
        self, pending: list[dict], request_id: str, command: DeviceCommand
    ) -> dict:
        request = next((p for p in pending if p.get("id") == request_id), None)
        if request is None:
            raise Refusal(CommandStatus.FAILED, f"no pending request {request_id!r}")
        if not await self._in_tree(request.get("sessionID"), command.session_id):
            raise Refusal(
                CommandStatus.BLOCKED_BY_POLICY,
                "the request does not belong to this command's session tree",
            )
        return request

    async def _in_tree(self, session_id: str | None, root: str | None) -> bool:
        for _ in range(MAX_TREE_DEPTH):
            if not session_id:
                return False
            if session_id == root:
                return True
            session = await self._opencode.get_session(session_id)
            session_id = session.get("parentID")
        return False
