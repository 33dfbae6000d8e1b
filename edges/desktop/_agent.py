"""The paired Desktop agent: pairing redemption and the long-running relay.

Dial-out only. `pair()` redeems a one-time code over NATS with the public
bootstrap identity and stores the returned credential. `DesktopAgent.run()`
connects with that credential and, side by side:

- heartbeats its presence (and at once after every reconnect);
- takes commands pushed by the hub, checks them (own pairing id, live lease,
  sequence, the local journal), runs them with `CommandRunner`, and acks
  with the lease token; a push of a lease it already holds (queued or
  running) is ignored: the hub pushes again when it has not seen the accept;
- relays OpenCode's event stream, redacted, through the on-disk outbox to
  JetStream (message id = event id, so nothing is duplicated downstream);
- refreshes its credential before expiry.

Revocation is local first: a revoked Desktop sends and runs nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
from datetime import UTC, datetime
from typing import Any, Literal

import nats.errors
from nats.aio.client import Client as NATS

from schemas import (
    AckReply,
    CommandAck,
    CommandKind,
    CommandResult,
    CommandStatus,
    ContractError,
    DeviceCommand,
    DeviceEventType,
    Envelope,
    ExecutionAuthority,
    PairingRedeemReply,
    PairingRedeemRequest,
    PairingRevokeNotice,
    PairingState,
    PolicySetPayload,
    PresenceHeartbeat,
    PrincipalKind,
    ReplyKey,
    Source,
    decode,
    subjects,
)

from ..common import (
    STREAM_OPEN_WAIT,
    AnswerTimes,
    BootstrapFailed,
    EdgeCredentials,
    OpenCodeClient,
    ReconnectPolicy,
    ask,
    bootstrap_exchange,
    bootstrap_options,
    dial,
    dial_once,
    honour_dropped_cancel,
    new_user_seed,
    not_refused_as,
    refresh_forever,
)
from ._commands import CommandRunner
from ._relay import EventRelay
from ._sealed import SealedGuard, SealedRefusal, typed_payload
from ._store import DesktopStore, PairingFile, StoreError

log = logging.getLogger("cowork.edge.desktop")
# What a command ack reports (CommandAck.outcome).
AckOutcome = Literal["accepted", "completed", "failed"]
CLIENT_VERSION = "cowork-desktop/0.1"
ACK_TIMEOUT = 5.0
# Answers to an ack that say the hub cannot apply it now (its database away, say),
# not that it never will: the ack is sent again while its lease is live.
ACK_UNAVAILABLE = frozenset({"hub.unavailable", "hub.error", "rate_limited"})
ACK_AGAIN_SECONDS = 0.5
# A command still running this long after it started is reported `accepted` (the hub
# then stops pushing its lease again: it does so for one unaccepted after a second,
# hub/desktop/_commands.py REPUSH_AFTER). One done sooner sends its final ack alone,
# which the hub takes as the accept too (audited as both): one bus request and one
# commit per command fewer. What keeps a command from running twice is the journal's
# `started` row, written before it runs, not the accept.
ACCEPT_AFTER = 0.25
# What the hub pushes on the command subject.
Pushed = PairingState | DeviceCommand


class PairingFailed(BootstrapFailed):
    """Redemption refused or impossible; the message says why, in one line."""

    default_code = "pairing.failed"


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Accept:
    """A running command's `accepted` ack: sent once it has run ACCEPT_AFTER."""

    def __init__(self, agent: DesktopAgent, command: DeviceCommand) -> None:
        self.sending = False
        self.task = asyncio.create_task(
            self._later(agent, command), name=f"desktop-accept-{command.id}"
        )

    async def _later(self, agent: DesktopAgent, command: DeviceCommand) -> bool:
        await asyncio.sleep(ACCEPT_AFTER)
        self.sending = True  # from here on the accept may be on its way to the hub
        return await agent._send_ack(command, "accepted", None)

    async def settle(self) -> None:
        """Before the final ack: an accept on its way is answered first; one not sent
        yet is dropped (cancelled in its wait, it never sends), the final implies it."""
        if self.sending:
            await self.task
        else:
            self.task.cancel()


# Kept under their old names: tests and callers import them from here.
_bootstrap_options = bootstrap_options


async def pair(
    code: str,
    hub_urls: list[str],
    store: DesktopStore,
    *,
    device_name: str | None = None,
    timeout: float = 10.0,
) -> PairingFile:
    if store.is_paired() and not store.load_pairing().revoked:
        current = store.load_pairing()
        raise PairingFailed(
            f"{store.directory} already holds pairing {current.pairing_id}; "
            "revoke it first or use another --state-dir",
            "pairing.exists",
        )
    seed, reply_key = new_user_seed(), ReplyKey()
    creds = EdgeCredentials("", seed)
    name = device_name or platform.node() or "desktop"
    request = PairingRedeemRequest(
        code=code.strip(),
        public_key=creds.public_key,
        reply_key=reply_key.public,
        device_name=name[:512],
        client_version=CLIENT_VERSION,
    )
    reply = await bootstrap_exchange(
        hub_urls,
        subjects.PAIRING_REDEEM.build(),
        request,
        Source(principal_kind=PrincipalKind.DESKTOP, principal_id="unpaired"),
        reply_key,
        PairingRedeemReply,
        timeout=timeout,
        what="pairing",
        error=PairingFailed,
    )
    store.ensure_dir()
    EdgeCredentials(reply.user_jwt, seed).write_creds_file(store.creds_path)
    pairing = PairingFile(
        tenant=reply.tenant,
        pairing_id=reply.pairing_id,
        label=reply.label,
        hub_urls=list(hub_urls),
        device_name=name,
        paired_at=_utcnow().isoformat(),
        state=reply.state.model_dump(mode="json", by_alias=True),
    )
    store.save_pairing(pairing)
    store.audit(
        "pairing.paired",
        pairingId=reply.pairing_id,
        tenant=reply.tenant,
        label=reply.label,
        hub=hub_urls,
    )
    return pairing


def revoke_locally(store: DesktopStore, reason: str) -> PairingFile:
    """Final and idempotent: mark revoked and delete the credential's secret."""
    pairing = store.load_pairing()
    if not pairing.revoked:
        pairing.revoked, pairing.revoked_at = True, _utcnow().isoformat()
        pairing.revoke_reason = reason
        state = dict(pairing.state)
        state.update(revoked=True, enabled=False)
        pairing.state = state
        store.save_pairing(pairing)
        store.audit("pairing.revoked", pairingId=pairing.pairing_id, reason=reason)
    store.creds_path.unlink(missing_ok=True)
    return pairing


async def notify_hub_of_revocation(
    store: DesktopStore, pairing: PairingFile, reason: str, timeout: float = 3.0
) -> bool:
    """Best effort, before the local revocation deletes the credential."""
    try:
        creds = EdgeCredentials.from_creds_file(store.creds_path)
        nc = await dial_once(
            pairing.hub_urls,
            timeout,
            **creds.connect_options(),
            inbox_prefix=subjects.inbox_prefix(pairing.tenant, "desktop", pairing.pairing_id),
        )
    except Exception:
        return False
    try:
        notice = PairingRevokeNotice(
            pairing_id=pairing.pairing_id, reason=reason[:512], revoked_at=_utcnow()
        )
        env = Envelope.wrap(notice, source=_source(pairing), tenant=pairing.tenant)
        msg = await nc.request(
            subjects.PAIRING_REVOKE.build(tenant=pairing.tenant, pairing_id=pairing.pairing_id),
            env.encode(),
            timeout=timeout,
        )
        return decode(msg.data, AckReply).data.ok
    except Exception:
        return False
    finally:
        await nc.close()


def _lease_key(command: DeviceCommand) -> tuple[str, str]:
    """One delivery of a command: a new lease (after the old one expired) is another
    delivery, whose ack the hub needs even if the command is already in hand."""
    return command.id, command.lease.lease_token


def _source(pairing: PairingFile) -> Source:
    return Source(
        principal_kind=PrincipalKind.DESKTOP,
        principal_id=pairing.pairing_id,
        authority=ExecutionAuthority.DESKTOP_LOCAL,
    )


class DesktopAgent:
    def __init__(
        self,
        store: DesktopStore,
        opencode_url: str,
        *,
        opencode_password: str | None = None,
        heartbeat_interval: float = 5.0,
        reconnect: ReconnectPolicy | None = None,
    ) -> None:
        self.store = store
        # When to dial the hub's NATS again (COWORK_EDGE_RECONNECT_*, edges/common/_reconnect.py)
        self.reconnect = reconnect or ReconnectPolicy.from_env()
        self.pairing = store.load_pairing()
        if self.pairing.revoked:
            raise StoreError("this pairing is revoked; pair again with a new code")
        self.creds = EdgeCredentials.from_creds_file(store.creds_path)
        self.state = PairingState.model_validate(self.pairing.state)
        self.opencode = OpenCodeClient(opencode_url, password=opencode_password)
        self.runner = CommandRunner(self.opencode, self.state)
        self.heartbeat_interval = heartbeat_interval
        self.nc: NATS | None = None
        self.guard = SealedGuard(store, self.pairing.tenant, self.pairing.pairing_id)
        self.relay = EventRelay(
            store, self.pairing, self.opencode, lambda: self.state, guard=self.guard
        )
        self._commands: asyncio.Queue[Pushed] = asyncio.Queue()
        self._in_hand: set[tuple[str, str]] = set()  # (command id, lease token) queued or running
        self._stopped = asyncio.Event()
        self._beat = 0
        self._answer_times = AnswerTimes()  # how long the hub usually takes to answer an ack
        self.connected = asyncio.Event()

    @property
    def tenant(self) -> str:
        return self.pairing.tenant

    @property
    def pairing_id(self) -> str:
        return self.pairing.pairing_id

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(coro, name=name)
            for name, coro in (
                ("desktop-bus", self._bus()),
                ("desktop-commands", self._command_worker()),
                ("desktop-relay", self.relay.run()),
            )
        ]
        try:
            await self._stopped.wait()
        finally:
            await self._shutdown(tasks)

    async def _shutdown(self, tasks: list[asyncio.Task]) -> None:
        if self.nc is not None and self.nc.is_connected and not self.pairing.revoked:
            try:
                await self._heartbeat("offline")
                await self.relay.flush(self.nc, timeout=2.0)
            except Exception:
                pass
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()
        await self.opencode.aclose()
        self.store.close()

    # --- bus ----------------------------------------------------------------------------
    async def _bus(self) -> None:
        self.nc = await self._connect()
        await self.nc.subscribe(
            subjects.DEVICE_COMMAND.build(tenant=self.tenant, device_id=self.pairing_id),
            cb=self._on_command,
        )
        self.connected.set()
        self.relay.attach(self.nc)
        await asyncio.gather(
            self._heartbeats(),
            refresh_forever(
                self.nc,
                self.creds,
                tenant=self.tenant,
                kind="desktop",
                principal_id=self.pairing_id,
                on_refresh=lambda c: c.write_creds_file(self.store.creds_path),
            ),
        )

    async def _connect(self) -> NATS:
        failures = 0
        while True:
            try:
                return await dial(
                    self.pairing.hub_urls,
                    self.reconnect,
                    failures=failures,
                    name=f"cowork-desktop-{self.pairing_id}",
                    inbox_prefix=subjects.inbox_prefix(self.tenant, "desktop", self.pairing_id),
                    error_cb=self._on_error,
                    reconnected_cb=self._on_reconnect,
                    **self.creds.connect_options(),
                )
            except Exception as exc:  # hub away at start: the relay buffers meanwhile
                if "authorization" in str(exc).lower():
                    log.error("desktop.credential_refused: %s", exc)
                log.info("desktop.connect_retry: %s", exc)
                await asyncio.sleep(self.reconnect.wait_before(failures))
                failures += 1

    async def _on_error(self, exc: Exception) -> None:
        log.info("desktop.nats_error: %s", exc)

    async def _on_reconnect(self) -> None:
        try:
            await self._heartbeat("online")
        except Exception:
            pass
        self.relay.wake()

    async def _heartbeats(self) -> None:
        while True:
            honour_dropped_cancel()
            try:
                await self._heartbeat("online")
            except Exception as exc:
                log.info("desktop.heartbeat_failed: %s", exc)
            await asyncio.sleep(self.heartbeat_interval)

    async def _heartbeat(self, status: Literal["online", "offline"]) -> None:
        assert self.nc is not None
        self._beat += 1
        beat = PresenceHeartbeat(
            principal_kind=PrincipalKind.DESKTOP,
            principal_id=self.pairing_id,
            sequence=self._beat,
            interval_seconds=self.heartbeat_interval,
            status=status,
            version=CLIENT_VERSION,
            trust="sealed" if self.guard.sealed else "hub",
        )
        env = Envelope.wrap(beat, source=_source(self.pairing), tenant=self.tenant)
        await self.nc.publish(
            subjects.PRESENCE.build(
                tenant=self.tenant, principal_kind="desktop", principal_id=self.pairing_id
            ),
            env.encode(),
        )

    # --- commands ----------------------------------------------------------------------------
    async def _on_command(self, msg: Any) -> None:
        pushed = self._decode_push(msg.data)
        if isinstance(pushed, DeviceCommand):
            key = _lease_key(pushed)
            if key in self._in_hand:
                # The hub pushes a lease again when it has not seen it accepted (the
                # accept may be on its way). The copy in hand acks for both; handled
                # after it, this one would only send its final ack a second time.
                log.info("desktop.duplicate_push_ignored: %s", pushed.id)
                return
            self._in_hand.add(key)
        if pushed is not None:
            self._commands.put_nowait(pushed)

    def _decode_push(self, raw: bytes) -> Pushed | None:
        try:
            if json.loads(raw).get("type") == PairingState.message_type:
                return decode(raw, PairingState).data
            return decode(raw, DeviceCommand).data
        except (ValueError, AttributeError, ContractError) as exc:
            self.store.audit("command.rejected", reason=f"unreadable: {exc}"[:500])
            return None

    async def _command_worker(self) -> None:
        while True:
            honour_dropped_cancel()
            pushed = await self._commands.get()
            try:
                await self._dispatch(pushed)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("desktop.command_handling_failed")
            finally:
                # Handled: a push of it from now on is answered from the journal.
                if isinstance(pushed, DeviceCommand):
                    self._in_hand.discard(_lease_key(pushed))

    async def _dispatch(self, pushed: Pushed) -> None:
        if self.pairing.revoked:
            return
        if isinstance(pushed, PairingState):
            self._apply_state(pushed)
        else:
            await self._handle_command(pushed)

    def _apply_state(self, state: PairingState) -> None:
        if state.pairing_id != self.pairing_id or state.revision <= self.state.revision:
            return
        if self.guard.sealed:
            state = self._hub_may_only_stop(state)
        self.state = state
        self.runner.state = state
        self.pairing.state = state.model_dump(mode="json", by_alias=True)
        self.store.save_pairing(self.pairing)
        self.store.audit(
            "pairing.updated",
            revision=state.revision,
            enabled=state.enabled,
            policy=state.policy.model_dump(mode="json", by_alias=True),
            allowedSessionIds=state.allowed_session_ids,
        )
        if state.revoked:
            self._revoke("revoked by the hub")

    def _hub_may_only_stop(self, state: PairingState) -> PairingState:
        """On a sealed pairing the hub may disable or revoke it (it can always stop
        relaying anyway), never change what the Desktop allows: policy and allowlists
        stay as they are here."""
        kept = state.model_copy(
            update={
                "policy": self.state.policy,
                "allowed_workspace_ids": self.state.allowed_workspace_ids,
                "allowed_session_ids": self.state.allowed_session_ids,
            }
        )
        if kept != state:
            self.store.audit(
                "pairing.update_refused",
                code="sealed.policy_is_local",
                revision=state.revision,
                reason="a sealed pairing's policy and allowlists change only on the Desktop",
            )
        return kept

    def _set_policy(self, command: DeviceCommand) -> CommandResult:
        """A signed `policy.set` (the guard refused it unsigned): on a sealed pairing,
        the one way to change the Desktop's policy and allowlists remotely. On a
        hub-trust pairing the hub's PATCH owns them, and would overwrite the change."""
        signed = command.signed
        if signed is None or not self.guard.sealed:
            return CommandResult(
                ok=False,
                status=CommandStatus.BLOCKED_BY_POLICY,
                code="policy.not_sealed",
                message="this pairing trusts the hub: its policy changes by PATCH at the hub",
            )
        change = typed_payload(PolicySetPayload, command, "policy", "policy change")
        if isinstance(change, CommandResult):
            return change
        update: dict[str, Any] = {}
        if change.policy is not None:  # the fields given; the others stay as they are
            given = change.policy.model_fields_set
            update["policy"] = self.state.policy.model_copy(
                update={name: getattr(change.policy, name) for name in given}
            )
        if change.allowed_workspace_ids is not None:
            update["allowed_workspace_ids"] = change.allowed_workspace_ids
        if "allowed_session_ids" in change.model_fields_set:
            update["allowed_session_ids"] = change.allowed_session_ids
        state = self.state.model_copy(update=update)
        self.state = self.runner.state = state
        self.pairing.state = state.model_dump(mode="json", by_alias=True)
        self.store.save_pairing(self.pairing)
        self.store.audit(
            "pairing.policy_set",
            commandId=command.id,
            controllerId=signed.claims.controller_id,
            policy=state.policy.model_dump(mode="json", by_alias=True),
            allowedWorkspaceIds=state.allowed_workspace_ids,
            allowedSessionIds=state.allowed_session_ids,
        )
        return CommandResult(
            ok=True,
            status=CommandStatus.COMPLETED,
            data={
                "policy": state.policy.model_dump(mode="json", by_alias=True),
                "allowedWorkspaceIds": state.allowed_workspace_ids,
                "allowedSessionIds": state.allowed_session_ids,
            },
        )

    def _revoke(self, reason: str) -> None:
        self.pairing = revoke_locally(self.store, reason)
        self.stop()

    async def _handle_command(self, command: DeviceCommand) -> None:
        problem = self._refusal_reason(command)
        if problem:
            self.store.audit(
                "command.rejected", commandId=command.id, sequence=command.sequence, reason=problem
            )
            return
        record = self.store.command_record(command.id)
        if record is not None and record[0] == "done":
            await self._ack(command, CommandResult.model_validate(record[1]))
            return
        # Started and not done: a crash (or an error) broke its run off, since a push
        # of a command this process still holds never gets here (_on_command).
        # Never run twice.
        accepted: _Accept | None = None
        if record is not None:
            result = CommandResult(
                ok=False,
                status=CommandStatus.FAILED,
                message="interrupted by a Desktop restart; not run again",
            )
        else:
            if command.sequence <= self.store.last_command_sequence():
                self.store.audit(
                    "command.rejected",
                    commandId=command.id,
                    sequence=command.sequence,
                    reason="stale sequence",
                )
                return
            try:
                command = self.guard.check(command)
            except SealedRefusal as refusal:
                self.store.audit(
                    "command.refused",
                    commandId=command.id,
                    sequence=command.sequence,
                    code=refusal.code,
                    reason=str(refusal),
                )
                accepted = self._accept(command)
                result = refusal.result()
            else:
                accepted = self._accept(command)
                try:
                    result = await self._execute(command)
                except BaseException:
                    accepted.task.cancel()
                    raise
        self.store.command_done(command.id, result.model_dump(mode="json", by_alias=True))
        self.store.audit(
            "command." + ("completed" if result.ok else "failed"),
            commandId=command.id,
            kind=command.kind.value,
            status=result.status.value,
        )
        if accepted is not None:
            # An accept not sent yet never will be: the final ack implies it. One
            # sent already is answered before the final ack goes, so the hub applies
            # (and audits) them in that order.
            await accepted.settle()
        await self._ack(command, result)
        self.relay.wake()  # the command's own events (queued by _execute) go out now
        if command.kind.value == "revoke_pairing" and result.ok:
            self._revoke("revoked by a revoke_pairing command")

    def _refusal_reason(self, command: DeviceCommand) -> str | None:
        if command.pairing_id != self.pairing_id:
            return f"pairing id {command.pairing_id!r} is not this Desktop's"
        if command.lease.lease_expires_at <= _utcnow():
            return "lease already expired"
        return None

    def _accept(self, command: DeviceCommand) -> _Accept:
        """Journal the command as started (what keeps it from ever running twice),
        then tell the hub it is accepted if it still runs after ACCEPT_AFTER: the ack
        is sent, and its answer awaited, while the command runs (`_handle_command`
        settles it before the final ack)."""
        self.store.command_started(command.id, command.sequence, command.kind.value)
        self.store.audit(
            "command.accepted",
            commandId=command.id,
            kind=command.kind.value,
            sequence=command.sequence,
            actorId=command.actor_id,
        )
        return _Accept(self, command)

    async def _execute(self, command: DeviceCommand) -> CommandResult:
        self.relay.command_event(command, DeviceEventType.COMMAND_ACCEPTED, None)
        if command.kind == CommandKind.CONTROLLER_ENROL:
            # Public keys and fingerprints only, for a controller not enrolled yet: clear.
            result = self.guard.enrolment_request(command)
            if result.code == "controller.pending_approval" and result.data:
                # tell the person at this machine what to compare
                log.warning(
                    "desktop.controller_requested: %r asks to be enrolled, fingerprint %s; "
                    "compare it with the controller's, then run "
                    "`cowork desktop controllers add %s`",
                    command.payload and command.payload.get("label"),
                    result.data["controllerFingerprint"],
                    result.data["controllerFingerprint"],
                )
        else:
            if command.kind == CommandKind.POLICY_SET:
                result = self._set_policy(command)
            else:
                await self._stream_open_for(command)
                result = await self.runner.run(command)
            if self.guard.sealed:  # what leaves the machine: only the controllers open it
                result = self.guard.seal_result(command.id, result)
        self.relay.command_event(
            command,
            DeviceEventType.COMMAND_COMPLETED if result.ok else DeviceEventType.COMMAND_FAILED,
            result,
        )
        return result

    async def _stream_open_for(self, command: DeviceCommand) -> None:
        """Before a command acts on OpenCode: follow its session (its messages are
        relayed even if no stream sees its events), and wait, bounded, for the event
        stream to be open, so they stream live."""
        left = (command.lease.lease_expires_at - _utcnow()).total_seconds()
        wait = min(STREAM_OPEN_WAIT, max(left / 2, 0.0))
        if not await self.relay.events.open_for(command.session_id, wait):
            log.info(
                "desktop.stream_not_open: running %s %s without OpenCode's event stream; "
                "its session's messages are relayed once the stream opens",
                command.kind.value,
                command.id,
            )

    async def _ack(self, command: DeviceCommand, result: CommandResult) -> None:
        outcome: AckOutcome = "failed" if result.status.value == "failed" else "completed"
        await self._send_ack(command, outcome, result)

    async def _send_ack(
        self, command: DeviceCommand, outcome: AckOutcome, result: CommandResult | None
    ) -> bool:
        ack = CommandAck(
            command_id=command.id,
            pairing_id=self.pairing_id,
            sequence=command.sequence,
            lease_token=command.lease.lease_token,
            outcome=outcome,
            result=result,
        )
        data = Envelope.wrap(ack, source=_source(self.pairing), tenant=self.tenant).encode()
        subject = subjects.DEVICE_COMMAND_ACK.build(tenant=self.tenant, device_id=self.pairing_id)
        # `ask`, as the Gateway's requests: a copy left unanswered (a replica that died
        # or froze holding it) is sent again after twice the usual answer time, to any
        # replica, and the first answer to any copy counts; the hub takes a copy of an
        # ack it has applied as a no-op. An answer that the hub cannot apply it now
        # (PostgreSQL away) is asked again while the lease is live, never left to it.
        settled = not_refused_as(ACK_UNAVAILABLE)
        while self.nc is not None:
            left = (command.lease.lease_expires_at - _utcnow()).total_seconds()
            if left <= 0:
                break
            try:
                msg = await ask(
                    self.nc, subject, data, min(ACK_TIMEOUT, left), self._answer_times, settled
                )
            except nats.errors.Error:  # no answer in time, nobody subscribed, disconnected
                await asyncio.sleep(0.2)
                continue
            reply = decode(msg.data, AckReply).data
            if not reply.ok and reply.code in ACK_UNAVAILABLE:
                await asyncio.sleep(min(reply.retry_after_seconds or 0, 1.0) or ACK_AGAIN_SECONDS)
                continue
            if not reply.ok:
                self.store.audit(
                    "command.ack_refused",
                    commandId=command.id,
                    outcome=outcome,
                    code=reply.code,
                    reason=reply.reason,
                )
            return reply.ok
        return False  # the hub re-leases it; the journal answers from the stored result
