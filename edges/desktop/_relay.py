"""OpenCode events -> redaction -> on-disk outbox -> JetStream, in order.

Every event is redacted under the pairing's policy before it is written
anywhere, then appended to the outbox (SQLite) and published from there with
its event id as the JetStream message id. The events `relay()` takes within one
turn of the event loop (a burst of streamed deltas) are appended together, in
one transaction, at the end of that turn and before anything is published;
command events are written at once (with whatever is pending before them). Rows leave the outbox only once
JetStream acknowledged them; a failed batch is published again, and the
stream's duplicate window plus the hub's event-id check drop the repeats. So
a NATS or hub outage loses nothing and duplicates nothing downstream.

OpenCode sends an event only to the streams open when it happens: a command's
session is followed (`OpenCodeEvents.follow`), so its messages changed while no
stream was open (before the first opens, or after one drops) are re-read and
relayed once one is.

Only enabled pairings relay, and only events of allowlisted sessions when the
pairing has a session allowlist. On a sealed pairing each payload is encrypted
(after redaction) to the enrolled controllers before it is written (_sealed.py):
type, session, command id and time stay in clear for routing.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import APIError, NoStreamResponseError
from pydantic_core import to_json

from schemas import (
    CommandResult,
    DeviceCommand,
    DeviceEvent,
    DeviceEventType,
    EnvelopeTemplate,
    ExecutionAuthority,
    PairingState,
    PrincipalKind,
    Source,
    check_token,
    new_id,
    subjects,
)

from ..common import (
    RESYNC,
    OpenCodeClient,
    OpenCodeEvents,
    RedactionPolicy,
    honour_dropped_cancel,
    redact,
    redact_event,
    redaction_policy,
    reply_inbox,
    session_of,
)
from ._sealed import SealedGuard
from ._store import DesktopStore, PairingFile

log = logging.getLogger("cowork.edge.relay")
BATCH = 1000
PUBLISH_TIMEOUT = 5.0


def device_event_json(
    event_id: str,
    pairing_id: str,
    kind: DeviceEventType,
    workspace_id: str | None,
    session_id: str | None,
    command_id: str | None,
    occurred_at: datetime,
    payload: dict[str, Any] | None,
) -> bytes:
    """`DeviceEvent(...).model_dump_json(by_alias=True, exclude_none=True)`, the same
    bytes (pydantic-core serialises both: datetimes alike, NaN and infinities as
    null), without building and validating the model (about 12% of the relay's
    time): for fields valid as made. The relay's are: a fresh id, the pairing and
    workspace ids checked once, a session id checked when it changes (OpenCode's,
    already matched to the token pattern by session_of), a command's id from its
    validated command, and a payload with string keys (redacted JSON, or the
    relay's own)."""
    # The kind as its plain value: an enum costs pydantic-core a Python call.
    body: dict[str, Any] = {"id": event_id, "pairingId": pairing_id, "type": kind.value}
    if workspace_id is not None:
        body["workspaceId"] = workspace_id
    if session_id is not None:
        body["sessionId"] = session_id
    if command_id is not None:
        body["commandId"] = command_id
    body["occurredAt"] = occurred_at
    if payload is not None:
        body["payload"] = payload
    return to_json(body, inf_nan_mode="null")


class StoredAcks:
    """JetStream publishes of one connection, each acknowledged by the stream, awaited
    a batch at a time. The answers come to the connection's one reply inbox (the
    `ask`s' too: `reply_inbox`), a batch under a route of its own, a numbered reply
    subject per message, and each answer is read only as far as it must be (an
    error, or not). nats-py's `publish_async` costs, per message, a future and its
    callback, a semaphore, a NUID and an `os.urandom` call for its token, and a
    parsed PubAck: about a quarter of the relay's time (docs/performance.md, relay
    round 5). An answer to an earlier batch (one that timed out) counts for nothing:
    its route is closed."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._reply = ""  # the route of the batch awaited now: <inbox>.<key>_<i>
        self._left: set[int] = set()
        self._error: Exception | None = None
        self._done = asyncio.Event()
        # One batch at a time (the publisher's drain and a stopping agent's flush
        # may overlap): the next waits for the one in flight, then goes on.
        self._one_at_a_time = asyncio.Lock()

    async def publish(self, rows: list[tuple[int, str, str, bytes]], timeout: float) -> None:
        """Publish (seq, subject, message id, data) rows in order, the message id as
        `Nats-Msg-Id`; back once the stream stored (or already had) every one. Raises
        on a refusal or no stream, TimeoutError after `timeout` seconds."""
        if not rows:
            return
        async with self._one_at_a_time:
            inbox = await reply_inbox(self.nc)
            self._reply = reply = inbox.route(self._on_answer)
            try:
                await self._publish(rows, reply, timeout)
            finally:
                inbox.close(reply)

    async def _publish(
        self, rows: list[tuple[int, str, str, bytes]], reply: str, timeout: float
    ) -> None:
        self._left, self._error = set(range(len(rows))), None
        self._done.clear()
        publish = self.nc.publish
        for i, (_, subject, msg_id, data) in enumerate(rows):
            await publish(subject, data, reply=f"{reply}{i}", headers={"Nats-Msg-Id": msg_id})
        # Not wait_for: 3.11's drops a cancellation that lands as the acks do, and
        # _publish_forever would then outlive its stop.
        async with asyncio.timeout(timeout):
            await self._done.wait()
        if self._error is not None:
            raise self._error

    def _on_answer(self, msg: Any) -> None:
        index = msg.subject[len(self._reply) :]  # (the route is this batch's)
        if not index.isdigit():
            return
        if msg.headers and msg.headers.get("Status") == "503":
            self._error = NoStreamResponseError()
        elif b'"error"' in msg.data:  # (a PubAck, {"stream":..,"seq":..}, seldom has it)
            self._error = _refusal(msg.data)
        self._left.discard(int(index))
        if self._error is not None or not self._left:
            self._done.set()


def _refusal(data: bytes) -> APIError | None:
    """The stream's refusal in an answer that names an error, None if it is a PubAck
    after all (a stream or domain called "error")."""
    try:
        answer = json.loads(data)
    except ValueError:
        return APIError(description=data[:200].decode(errors="replace"))
    err = answer.get("error") if isinstance(answer, dict) else None
    if err is None:
        return None
    if not isinstance(err, dict):
        return APIError(description=str(err)[:200])
    return APIError(
        code=err.get("code"), err_code=err.get("err_code"), description=err.get("description")
    )


class EventRelay:
    def __init__(
        self,
        store: DesktopStore,
        pairing: PairingFile,
        opencode: OpenCodeClient,
        state: Callable[[], PairingState],
        *,
        workspace_id: str = "local",
        guard: SealedGuard | None = None,
    ) -> None:
        self._guard = guard
        self.store, self.pairing, self._opencode = store, pairing, opencode
        self._state = state
        # Checked once here; the event's other fields are valid as made (below).
        check_token(pairing.pairing_id, "pairing id")
        self.workspace_id = check_token(workspace_id, "workspace id")
        self._session: str | None = None  # the last session id checked
        self._source = Source(
            principal_kind=PrincipalKind.DESKTOP,
            principal_id=pairing.pairing_id,
            authority=ExecutionAuthority.DESKTOP_LOCAL,
        )
        # Every envelope from this Desktop has the same source and tenant: encoded once.
        self._template = EnvelopeTemplate(DeviceEvent, source=self._source, tenant=pairing.tenant)
        self._subjects: dict[str, str] = {}  # event kind -> its subject
        self._pending: list[tuple[str, str, bytes]] = []  # taken this turn, not written yet
        self._wake_on_persist = False  # something taken this turn wakes the publisher
        self._nc: NATS | None = None
        self._acks: StoredAcks | None = None  # see _stored
        self._wakeup = asyncio.Event()
        self.published = 0
        # Made here, not in run(): a command may follow its session before the relay
        # reads (the stream opens late under load), and that must not be lost.
        self.events = OpenCodeEvents(opencode)
        self._policy_of: PairingState | None = None
        self._redaction = RedactionPolicy()

    # --- in ------------------------------------------------------------------------------
    async def run(self) -> None:
        publisher = asyncio.create_task(self._publish_forever(), name="desktop-publisher")
        try:
            async for event in self.events:
                self.relay(event)
        finally:
            self.persist()
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
            await self.events.aclose()

    def _policy(self) -> RedactionPolicy:
        """The redaction policy of the current pairing state, built once per state
        (a state change replaces the PairingState object)."""
        state = self._state()
        if self._policy_of is not state:
            self._policy_of = state
            self._redaction = redaction_policy(state.policy)
        return self._redaction

    def relay(self, event: dict[str, Any]) -> bool:
        """Queue one OpenCode event if the pairing lets it out; True if queued."""
        state = self._state()
        if state.revoked or not state.enabled:
            return False
        session = session_of(event)
        if state.allowed_session_ids is not None and session not in state.allowed_session_ids:
            return False
        if event.get("type") == RESYNC:
            self._append(DeviceEventType.STATUS, None, None, self._resync_payload(event, state))
            return True
        self._append(
            DeviceEventType.SESSION_EVENT, session, None, redact_event(event, self._policy())
        )
        return True

    def _resync_payload(self, event: dict, state: PairingState) -> dict:
        props = dict(event.get("properties") or {})
        allowed = state.allowed_session_ids
        if allowed is not None:
            props["status"] = {k: v for k, v in (props.get("status") or {}).items() if k in allowed}
            for key in ("permissions", "questions"):
                props[key] = [p for p in props.get(key) or [] if p.get("sessionID") in allowed]
        return {"opencode": "connected", **redact(props, self._policy())}

    def command_event(
        self, command: DeviceCommand, kind: DeviceEventType, result: CommandResult | None
    ) -> None:
        """Queue a command's own event, durably, without waking the publisher: the agent
        wakes it once the command's final ack is answered, so publishing (and the hub
        projecting) it does not compete with the command's round trip. (Anything else
        that wakes the publisher meanwhile, or its one-second tick, takes it along.)"""
        body: dict[str, Any] = {"kind": command.kind.value, "sequence": command.sequence}
        if result is not None:
            body["result"] = result.model_dump(mode="json", by_alias=True)
        self._append(kind, command.session_id, command.id, body, wake=False)
        self.persist()  # on disk before the command's ack goes out

    def _append(
        self,
        kind: DeviceEventType,
        session: str | None,
        command_id: str | None,
        payload: dict,
        *,
        wake: bool = True,
    ) -> None:
        """Queue the event for the outbox, written at the end of this loop turn."""
        event_id = new_id()
        if self._guard is not None:
            payload = self._guard.seal_event(event_id, payload)
        if session is not None and session != self._session:
            self._session = check_token(session, "session id")
        now = datetime.now(UTC)
        data = device_event_json(
            event_id,
            self.pairing.pairing_id,
            kind,
            self.workspace_id,
            session,
            command_id,
            now,
            payload,
        )
        subject = self._subjects.get(kind)
        if subject is None:
            subject = self._subjects[kind] = subjects.DEVICE_EVENT.build(
                tenant=self.pairing.tenant,
                device_id=self.pairing.pairing_id,
                event_kind=kind.split(".")[0],
            )
        # One message per event: the envelope takes the event's id and time.
        envelope = self._template.encode_json(data, id=event_id, time=now)
        self._pending.append((subject, event_id, envelope))
        self._wake_on_persist |= wake
        if len(self._pending) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.persist)
            except RuntimeError:  # no event loop: nothing would come back for them
                self.persist()

    def persist(self) -> None:
        """Write the events taken so far to the outbox (one transaction), in order."""
        items, self._pending = self._pending, []
        wake, self._wake_on_persist = self._wake_on_persist, False
        if not items:
            return
        dropped = self.store.outbox_append(items)
        if dropped:  # the hub has been away for a long time: say what is lost
            log.warning(
                "relay.outbox_full: dropped the %d oldest events (bound %d)",
                dropped,
                self.store.max_outbox,
            )
        if wake:
            self._wakeup.set()

    # --- out -----------------------------------------------------------------------------
    def attach(self, nc: NATS) -> None:
        self._nc = nc
        self._wakeup.set()

    def wake(self) -> None:
        self._wakeup.set()

    async def _publish_forever(self) -> None:
        backoff = 0.2
        while True:
            honour_dropped_cancel()
            try:
                async with asyncio.timeout(1.0):  # not wait_for: 3.11's swallows a cancel
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            try:
                await self._drain(nc)
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS or the stream away: keep the rows, retry
                log.info("relay.publish_retry: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wakeup.set()

    def _stored(self, nc: NATS) -> StoredAcks:
        """One ack inbox per connection: a subscription per drain would leave one
        more on the connection (and the server) at every drain, without bound."""
        if self._acks is None or self._acks.nc is not nc:
            self._acks = StoredAcks(nc)
        return self._acks

    async def _drain(self, nc: NATS) -> None:
        acks = self._stored(nc)
        self.persist()
        while rows := self.store.outbox_peek(BATCH):
            await acks.publish(rows, PUBLISH_TIMEOUT)
            self.store.outbox_remove_through(rows[-1][0])
            self.published += len(rows)

    async def flush(self, nc: NATS, timeout: float) -> None:
        await asyncio.wait_for(self._drain(nc), timeout)
