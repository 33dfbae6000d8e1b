"""One claimed item of Cloud-owned work, run on the Gateway's private OpenCode.

Order of things for a `prompt` lease:

1. the lease is journalled (a lease seen before is never run again);
2. a `status {"state": "running"}` output, then the OpenCode session: the one
   `sessionRef.sessionId` names when this OpenCode has it and no other run here
   is using it (a chat continuing its conversation), else a new one titled
   after `sessionRef.title`; then the prompt (`prompt_async`);
3. every OpenCode event of that session, redacted, as an `event` output, until
   the session goes idle; then a `result` (final assistant text, tokens, cost,
   and the `sessionId` the turn ran in, so the next prompt can continue it)
   or a `fail` with the reason. A `session.error` ends the run too (OpenCode
   does not always go idle after one, e.g. for an unknown agent): the session
   is aborted and the run fails with that error's first line. So does a
   session that goes quiet while OpenCode no longer reports it busy;
4. the lease is renewed every third of its TTL until the final output is
   acknowledged by the hub.

Outputs carry consecutive sequences from the claim's `next_sequence` and go
through the agent's outbox, so their order on the wire is the order here. The
moment the hub refuses a renewal or a write (stale, expired, revoked), the
OpenCode session is aborted and nothing more is written for this lease: a
newer lease, on this or another Gateway, owns the work now.

Permissions and questions inside Cloud-owned work are rejected at once: nobody
is at this Gateway to answer them and the Cloud has no approval path for edge
work (yet), so waiting would only hold the lease until it times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from schemas import WorkClaimReply, WorkOutput, WorkOutputKind

from ..common import (
    RESYNC,
    STREAM_OPEN_WAIT,
    OpenCodeClient,
    OpenCodeError,
    OpenCodeEvents,
    honour_dropped_cancel,
    redact_event,
    redact_text,
    session_of,
)
from ._store import GatewayStore

log = logging.getLogger("cowork.edge.gateway.work")

DEFAULT_MAX_RUN_SECONDS = 3600.0
# No event of the session for this long: ask OpenCode whether it is still running.
DEFAULT_QUIET_SECONDS = 60.0
# After a session.error, the events still worth relaying (a following idle, the
# aborted message) arrive within this long.
ERROR_SETTLE_SECONDS = 2.0
MAX_PROMPT_CHARS = 100_000
REFUSE_APPROVALS = "approvals are not available for Cloud-owned work on this Gateway"


class LeaseLost(Exception):
    """The hub refused this lease: stale, expired, revoked, or the work is over."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code, self.reason = code, reason


class TransientBusError(Exception):
    """No answer from the hub this time (timeout, no responders, disconnected)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LeaseBus(Protocol):
    """What a runner needs from the bus: renewing its lease (the agent implements it)."""

    async def renew(self, work_id: str, lease_token: str) -> float:
        """Renew; returns the seconds left on the lease. Raises LeaseLost or
        TransientBusError."""


class OutputSink(Protocol):
    async def append(self, output: WorkOutput) -> None: ...


class SessionEvents:
    """One OpenCode event stream for the whole Gateway, fanned out by session.

    A runner registers its session before sending the prompt, so it sees every
    event of the turn. `cowork.resync` (after a stream reconnect) goes to all.
    """

    def __init__(self, opencode: OpenCodeClient) -> None:
        self.stream = OpenCodeEvents(opencode)
        self._queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}

    @property
    def connected(self) -> bool:
        return self.stream.connected

    def register(self, session_id: str) -> asyncio.Queue[dict[str, Any]]:
        return self._queues.setdefault(session_id, asyncio.Queue())

    def reserve(self, session_id: str) -> bool:
        """Register `session_id` unless a run here already has it (two runs sharing one
        session's queue would steal each other's events)."""
        if session_id in self._queues:
            return False
        self._queues[session_id] = asyncio.Queue()
        return True

    def unregister(self, session_id: str) -> None:
        self._queues.pop(session_id, None)

    async def run(self) -> None:
        try:
            async for event in self.stream:
                if event.get("type") == RESYNC:
                    for waiting in self._queues.values():
                        waiting.put_nowait(event)
                    continue
                queue = self._queues.get(session_of(event) or "")
                if queue is not None:
                    queue.put_nowait(event)
        finally:
            await self.stream.aclose()


class WorkRunner:
    def __init__(
        self,
        claim: WorkClaimReply,
        *,
        opencode: OpenCodeClient,
        events: SessionEvents,
        sink: OutputSink,
        bus: LeaseBus,
        store: GatewayStore,
        max_run_seconds: float = DEFAULT_MAX_RUN_SECONDS,
        quiet_seconds: float = DEFAULT_QUIET_SECONDS,
        stream_wait_seconds: float = STREAM_OPEN_WAIT,
    ) -> None:
        assert claim.work_id and claim.lease_token
        self.claim = claim
        self.work_id: str = claim.work_id
        self.lease_token: str = claim.lease_token
        self.attempt = claim.attempt or 1
        self._opencode, self._events, self._sink = opencode, events, sink
        self._bus, self._store = bus, store
        self._max_run = max_run_seconds
        self._quiet = quiet_seconds
        self._stream_wait = stream_wait_seconds
        self._next = claim.next_sequence or 1
        self._final: int | None = None
        self._acked = 0
        self._acked_changed = asyncio.Event()
        self._lost = asyncio.Event()
        self.lost_reason: LeaseLost | None = None
        self.session_id: str | None = None
        self.outcome: str | None = None
        seconds = claim.lease_seconds or 30.0
        self.renew_every = max(0.2, seconds / 3)

    # --- callbacks from the agent's forwarder ---------------------------------------------
    def delivered(self, sequence: int) -> None:
        self._acked = max(self._acked, sequence)
        self._acked_changed.set()

    def lost(self, code: str, reason: str) -> None:
        if not self._lost.is_set():
            self.lost_reason = LeaseLost(code, reason)
            self._lost.set()

    # --- the run ----------------------------------------------------------------------------
    async def run(self) -> str:
        """Run the lease to its end; returns the journal's final state."""
        if not self._store.journal_claim(
            self.work_id, self.attempt, self.lease_token, self.claim.kind or "prompt"
        ):
            self._store.audit("work.lease_replayed", workId=self.work_id, attempt=self.attempt)
            self.outcome = "refused"
            return self.outcome
        self._store.audit(
            "work.claimed", workId=self.work_id, attempt=self.attempt, kind=self.claim.kind
        )
        renewer = asyncio.create_task(self._renew_forever(), name=f"renew-{self.work_id}")
        try:
            self.outcome = await self._run_until_lost()
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            if self.session_id:
                self._events.unregister(self.session_id)
        # A lost lease's detail (which request was refused, and why) is already journalled
        # by whoever saw the refusal.
        detail = str(self.lost_reason) if self.outcome == "lost" and self.lost_reason else None
        self._store.journal_update(
            self.lease_token, state=self.outcome, last_sequence=self._next - 1
        )
        self._store.audit(
            "work." + self.outcome,
            workId=self.work_id,
            attempt=self.attempt,
            **({"reason": detail} if detail else {}),
        )
        return self.outcome

    async def _run_until_lost(self) -> str:
        body = asyncio.create_task(self._execute_and_deliver(), name=f"work-{self.work_id}")
        lost = asyncio.create_task(self._lost.wait())
        try:
            await asyncio.wait({body, lost}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the agent stops: abort, let the lease expire
            await self._abandon(body, "stopped")
            return "stopped"
        finally:
            lost.cancel()
        if body.done() and not self._lost.is_set():
            return body.result()
        await self._abandon(body, "lost")
        return "lost"

    async def _abandon(self, body: asyncio.Task, why: str) -> None:
        body.cancel()
        await asyncio.gather(body, return_exceptions=True)
        if self.session_id:
            with contextlib.suppress(OpenCodeError):
                await self._opencode.abort(self.session_id)
        log.info("gateway.work_%s work=%s attempt=%s", why, self.work_id, self.attempt)

    async def _execute_and_deliver(self) -> str:
        outcome = await self._execute()
        if outcome in ("completed", "failed"):
            await self._wait_delivered()
        return outcome

    async def _wait_delivered(self) -> None:
        """Keep the lease (renewing) until the hub acknowledged the final output."""
        while self._final is not None and self._acked < self._final:
            self._acked_changed.clear()
            await self._acked_changed.wait()

    async def _execute(self) -> str:
        await self._emit(WorkOutputKind.STATUS, {"state": "running", "attempt": self.attempt})
        text, problem = _prompt_text(self.claim)
        if problem:
            return await self._fail(problem)
        try:
            self.session_id = await self._open_session()
            self._store.journal_update(
                self.lease_token, state="running", session_id=self.session_id
            )
            queue = self._events.register(self.session_id)
            # A Gateway just started may claim before its event stream is open: a
            # prompt run then would lose the turn's live events.
            if not await self._events.stream.open_for(self.session_id, self._stream_wait):
                log.info(
                    "gateway.stream_not_open: running work %s without OpenCode's event "
                    "stream; its session's messages are relayed once the stream opens",
                    self.work_id,
                )
            await self._opencode.prompt_async(
                self.session_id,
                [{"type": "text", "text": text}],
                **_prompt_options(self.claim.payload or {}),
            )
            error = await asyncio.wait_for(self._relay(queue), self._max_run)
            if error:
                return await self._fail(error)
            return await self._finish()
        except TimeoutError:
            if self.session_id:
                with contextlib.suppress(OpenCodeError):
                    await self._opencode.abort(self.session_id)
            return await self._fail(f"OpenCode did not finish within {self._max_run:g} s")
        except (OpenCodeError, KeyError, TypeError) as exc:
            return await self._fail(f"OpenCode failed: {exc}")

    async def _open_session(self) -> str:
        """The session named by the work's sessionRef if it can be continued here,
        else a new one. A named session is reserved before the first await, so two
        runs never share one."""
        ref = self.claim.session_ref
        wanted = ref.session_id if ref is not None else None
        if wanted and self._events.reserve(wanted):
            try:
                return str((await self._opencode.get_session(wanted))["id"])
            except OpenCodeError as exc:
                self._events.unregister(wanted)
                if not exc.is_not_found:
                    raise
        session = await self._opencode.create_session(title=self._title())
        return str(session["id"])

    def _title(self) -> str | None:
        ref = self.claim.session_ref
        return ref.title if ref and ref.title else None

    async def _relay(self, queue: asyncio.Queue[dict[str, Any]]) -> str | None:
        """Forward the session's events until it is idle, errs, or goes quiet while
        OpenCode no longer runs it; the error it ended with, if any."""
        error: str | None = None
        while True:
            try:
                async with asyncio.timeout(ERROR_SETTLE_SECONDS if error else self._quiet):
                    event = await queue.get()  # not wait_for: 3.11's may eat a cancel
            except TimeoutError:
                if error:  # erred and did not go idle: it is over all the same
                    with contextlib.suppress(OpenCodeError):
                        await self._opencode.abort(str(self.session_id))
                    return error
                if await self._still_running():
                    continue
                return (
                    "OpenCode stopped sending events for this session and no longer "
                    f"runs it (quiet for {self._quiet:g} s)"
                )
            kind = event.get("type")
            if kind == RESYNC:
                if await self._finished_meanwhile(event):
                    return error
                continue
            props = event.get("properties") or {}
            if kind == "session.error":
                if error is None:
                    error = _error_text(props.get("error")) or "OpenCode reported an error"
                    await self._emit(WorkOutputKind.EVENT, redact_event(event))
                continue  # a second report (often a stack trace) adds nothing
            await self._emit(WorkOutputKind.EVENT, redact_event(event))
            if kind == "permission.asked":
                await self._refuse_permission(props)
            elif kind == "question.asked":
                await self._refuse_question(props)
            elif kind == "session.idle" or (
                kind == "session.status"
                and isinstance(props.get("status"), dict)
                and props["status"].get("type") == "idle"
            ):
                return error

    async def _still_running(self) -> bool:
        """Whether OpenCode still reports the session busy (or retrying)."""
        try:
            status = await self._opencode.session_status()
        except OpenCodeError:
            return True  # cannot tell: keep waiting, the run limit still applies
        return self.session_id in (status or {})

    async def _finished_meanwhile(self, resync: dict[str, Any]) -> bool:
        """After an event-stream reconnect: did the turn end while we were not listening?"""
        status = (resync.get("properties") or {}).get("status") or {}
        if self.session_id in status:
            return False
        last = await self._last_assistant()
        return last is not None and bool(
            (last.get("info") or {}).get("time", {}).get("completed") or last["info"].get("error")
        )

    async def _refuse_permission(self, props: dict[str, Any]) -> None:
        if isinstance(props.get("id"), str):
            with contextlib.suppress(OpenCodeError):
                await self._opencode.reply_permission(props["id"], "reject", REFUSE_APPROVALS)

    async def _refuse_question(self, props: dict[str, Any]) -> None:
        if isinstance(props.get("id"), str):
            with contextlib.suppress(OpenCodeError):
                await self._opencode.reject_question(props["id"])

    async def _last_assistant(self) -> dict[str, Any] | None:
        assert self.session_id
        messages = await self._opencode.messages(self.session_id)
        for message in reversed(messages or []):
            if isinstance(message, dict) and (message.get("info") or {}).get("role") == "assistant":
                return message
        return None

    async def _finish(self) -> str:
        last = await self._last_assistant()
        if last is None:
            return await self._fail("OpenCode produced no answer")
        info = last.get("info") or {}
        if info.get("error"):
            return await self._fail(_error_text(info["error"]) or "OpenCode failed")
        text = "".join(
            p.get("text", "")
            for p in last.get("parts") or []
            if isinstance(p, dict) and p.get("type") == "text"
        )
        body: dict[str, Any] = {"text": redact_text(text), "sessionId": self.session_id}
        # Usage is numbers only; it bypasses redaction, whose secret-key rule would
        # otherwise blank "tokens".
        tokens, cost = _numbers(info.get("tokens")), info.get("cost")
        if tokens:
            body["tokens"] = tokens
        if isinstance(cost, (int, float)) and not isinstance(cost, bool):
            body["cost"] = cost
        await self._emit(WorkOutputKind.RESULT, body, final=True)
        return "completed"

    async def _fail(self, reason: str) -> str:
        await self._emit(WorkOutputKind.FAIL, {"reason": redact_text(reason)[:4000]}, final=True)
        return "failed"

    async def _emit(
        self, kind: WorkOutputKind, body: dict[str, Any], *, final: bool = False
    ) -> None:
        if self.lost_reason is not None:
            raise self.lost_reason  # nothing more is written under a lost lease
        output = WorkOutput(
            work_id=self.work_id,
            lease_token=self.lease_token,
            kind=kind,
            sequence=self._next,
            body=body,
        )
        self._next += 1
        if final:
            self._final = output.sequence
        await self._sink.append(output)

    # --- the lease -------------------------------------------------------------------------
    async def _renew_forever(self) -> None:
        delay = self.renew_every
        while True:
            honour_dropped_cancel()
            await asyncio.sleep(delay)
            started = time.monotonic()
            try:
                left = await self._bus.renew(self.work_id, self.lease_token)
                delay = max(0.1, min(self.renew_every, left / 3) - (time.monotonic() - started))
            except LeaseLost as exc:
                self.lost(exc.code, exc.reason)
                return
            except TransientBusError as exc:  # hub away: try again soon, keep the lease
                log.info("gateway.renew_retry work=%s: %s", self.work_id, exc)
                delay = exc.retry_after or min(1.0, self.renew_every)


def _prompt_text(claim: WorkClaimReply) -> tuple[str, str | None]:
    text = (claim.payload or {}).get("text")
    if not isinstance(text, str) or not text.strip():
        return "", "payload.text must be a non-empty string"
    if len(text) > MAX_PROMPT_CHARS:
        return "", f"payload.text is longer than {MAX_PROMPT_CHARS} characters"
    return text, None


def _prompt_options(payload: dict[str, Any]) -> dict[str, Any]:
    """Only the documented optional prompt fields, and only when they are plain strings."""
    return {
        key: payload[key]
        for key in ("agent", "variant", "model")
        if isinstance(payload.get(key), str) and payload[key]
    }


def _error_text(error: Any) -> str | None:
    """`{name, data: {message}}` -> "APIError: message", first line only (a stack
    trace is no reason); an unnamed error is its message (redacted by the caller)."""
    if not isinstance(error, dict):
        return None
    raw_data = error.get("data")
    data = raw_data if isinstance(raw_data, dict) else {}
    name = str(error.get("name") or "")
    message = next(
        (line.strip() for line in str(data.get("message") or "").splitlines() if line.strip()), ""
    )
    if name in ("", "Error", "UnknownError") or message.startswith(name):
        return message or name or None
    return f"{name}: {message}".strip(": ")


def _numbers(value: Any, depth: int = 0) -> dict[str, Any] | None:
    """OpenCode's token counts ({input, output, reasoning, cache: {read, write}}), keeping
    only numeric leaves."""
    if not isinstance(value, dict) or depth > 2:
        return None
    out: dict[str, Any] = {}
    for key, item in list(value.items())[:16]:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            out[str(key)[:32]] = item
        elif isinstance(item, dict) and (nested := _numbers(item, depth + 1)):
            out[str(key)[:32]] = nested
    return out or None
