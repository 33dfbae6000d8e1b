"""The one place that talks to a local OpenCode server (`opencode serve`).

Why one module: OpenCode's HTTP API and event stream change between versions
(pinned and measured: 1.18.33), so every route, body and quirk lives here and
the rest of the edge sees plain dicts and one error type.

Two things the relay would otherwise get wrong are handled here:

- OpenCode's `GET /event` SSE stream has no event ids, so a reconnect cannot
  resume, and OpenCode sends an event only to the streams open when it happens.
  After every (re)connect `OpenCodeEvents` first yields a synthetic
  `cowork.resync` event holding the busy sessions, pending permissions and
  pending questions, so the consumer can rebuild its state; then, for each
  session the consumer follows (`follow()`: a Desktop's commanded sessions) and
  has not seen go idle, the messages changed while no stream was open, re-read
  and yielded as `message.updated` / `message.part.updated` events marked
  `"replayed": true` (a turn that ran in the gap would otherwise never reach
  the consumer at all).
- An abort (and a non-retryable model error) makes OpenCode emit `session.idle`
  twice; the second one is dropped. Heartbeats are dropped too. Every other
  event, known or not, passes through untouched.

Payloads carry local paths and command lines: redacting them is the caller's
job. The password is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, Literal
from urllib.parse import quote

import httpx

from ._retry import jittered_backoff

log = logging.getLogger("cowork.edge.opencode")

RESYNC = "cowork.resync"
HEARTBEAT = "server.heartbeat"
# OpenCode sends a heartbeat every 10 s; three missed ones mean a dead stream.
STREAM_READ_TIMEOUT = 35.0
# Headers of a healthy server come at once; see OpenCodeClient._event_lines.
STREAM_OPEN_TIMEOUT = 5.0
# How long an agent waits for the event stream to be open before it prompts OpenCode
# (the Desktop before a command, a Gateway before edge work): bounded, since the
# session's messages are replayed once a stream opens anyway.
STREAM_OPEN_WAIT = 5.0
# How many of a followed session's latest messages a reconnect re-reads (a turn is
# one user and one assistant message; a few turns may fit in a gap).
REPLAY_MESSAGES = 20
# Messages that changed this long before the stream was last seen live are re-read
# too: OpenCode stamps them when they start, which may be just before an event.
REPLAY_SLACK_MS = 2000


class OpenCodeError(Exception):
    """A non-2xx answer from OpenCode, or no answer at all (status None, name "Unreachable")."""

    def __init__(self, status: int | None, name: str | None, message: str) -> None:
        super().__init__(f"{status} {name}: {message}" if status else f"{name}: {message}")
        self.status = status
        self.name = name
        self.message = message

    @property
    def is_not_found(self) -> bool:
        return self.status == 404


def _error_from(response: httpx.Response) -> OpenCodeError:
    """OpenCode errors look like {"name": "NotFoundError", "data": {"message": ...}}."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return OpenCodeError(
            response.status_code, None, response.text[:500] or response.reason_phrase
        )
    raw_data = body.get("data")
    data = raw_data if isinstance(raw_data, dict) else {}
    message = data.get("message") or body.get("message") or response.reason_phrase
    return OpenCodeError(response.status_code, body.get("name"), str(message))


def _model_ref(model: str | dict[str, str]) -> dict[str, str]:
    """ "provider/model" or {"providerID", "modelID"} -> the prompt body's model object."""
    if isinstance(model, dict):
        return model
    provider, _, model_id = model.partition("/")
    return {"providerID": provider, "modelID": model_id}


class OpenCodeClient:
    """Async client for one OpenCode server (and optionally one project directory)."""

    def __init__(
        self,
        base_url: str,
        *,
        password: str | None = None,
        username: str = "opencode",
        directory: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        headers = {"x-opencode-directory": quote(directory, safe="")} if directory else {}
        auth = httpx.BasicAuth(username, password) if password else None
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url, auth=auth, headers=headers, timeout=timeout
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> OpenCodeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(
        self, method: str, path: str, *, params: dict | None = None, body: Any = None
    ) -> Any:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = await self._http.request(method, path, params=params or None, json=body)
        except httpx.TransportError as exc:
            raise OpenCodeError(None, "Unreachable", f"{method} {path}: {exc!r}") from exc
        if not response.is_success:
            raise _error_from(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise OpenCodeError(
                response.status_code, "InvalidResponse", f"{method} {path}: not JSON"
            ) from exc

    # --- server and sessions -------------------------------------------------
    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/global/health")

    async def create_session(
        self, *, title: str | None = None, agent: str | None = None, parent_id: str | None = None
    ) -> dict[str, Any]:
        body = {
            k: v
            for k, v in {"title": title, "agent": agent, "parentID": parent_id}.items()
            if v is not None
        }
        return await self._request("POST", "/session", body=body)

    async def get_session(self, session_id: str) -> dict[str, Any]:
        return await self._request("GET", f"/session/{quote(session_id, safe='')}")

    async def list_sessions(self, *, limit: int | None = None) -> list[dict[str, Any]]:
        return await self._request("GET", "/session", params={"limit": limit})

    async def session_status(self) -> dict[str, Any]:
        """Busy and retrying sessions only: {"ses_…": {"type": "busy"}}; idle ones are omitted."""
        return await self._request("GET", "/session/status")

    # --- prompting -----------------------------------------------------------
    async def prompt_async(
        self,
        session_id: str,
        parts: list[dict[str, Any]],
        *,
        agent: str | None = None,
        variant: str | None = None,
        model: str | dict[str, str] | None = None,
    ) -> None:
        """Queue a prompt; OpenCode answers 204 at once and the turn runs in the background."""
        body: dict[str, Any] = {"parts": parts}
        body.update({k: v for k, v in {"agent": agent, "variant": variant}.items() if v})
        if model:
            body["model"] = _model_ref(model)
        return await self._request(
            "POST", f"/session/{quote(session_id, safe='')}/prompt_async", body=body
        )

    async def abort(self, session_id: str) -> bool:
        """True, also for unknown ids (OpenCode does not check)."""
        return await self._request("POST", f"/session/{quote(session_id, safe='')}/abort")

    async def messages(self, session_id: str, *, limit: int | None = None) -> list[dict[str, Any]]:
        return await self._request(
            "GET", f"/session/{quote(session_id, safe='')}/message", params={"limit": limit}
        )

    # --- permissions and questions -------------------------------------------
    async def list_permissions(self) -> list[dict[str, Any]]:
        return await self._request("GET", "/permission")

    async def reply_permission(
        self,
        request_id: str,
        reply: Literal["once", "always", "reject"],
        message: str | None = None,
    ) -> bool:
        body = {"reply": reply, **({"message": message} if message is not None else {})}
        return await self._request(
            "POST", f"/permission/{quote(request_id, safe='')}/reply", body=body
        )

    async def list_questions(self) -> list[dict[str, Any]]:
        return await self._request("GET", "/question")

    async def reply_question(self, request_id: str, answers: list[list[str]]) -> bool:
        """One list of chosen option labels per question, in the questions' order."""
        return await self._request(
            "POST", f"/question/{quote(request_id, safe='')}/reply", body={"answers": answers}
        )

    async def reject_question(self, request_id: str) -> bool:
        return await self._request("POST", f"/question/{quote(request_id, safe='')}/reject")

    # --- events --------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _event_lines(
        self, open_timeout: float = STREAM_OPEN_TIMEOUT
    ) -> AsyncIterator[AsyncIterator[str]]:
        """The raw lines of `GET /event`, once the server has answered with its headers.

        The headers get their own short deadline: a request that reaches OpenCode
        while it is still starting up is accepted and then never answered.
        """
        timeout = httpx.Timeout(self._http.timeout.connect or 30.0, read=STREAM_READ_TIMEOUT)
        request = self._http.build_request(
            "GET", "/event", timeout=timeout, headers={"Accept": "text/event-stream"}
        )
        try:
            # Not wait_for: 3.11's drops a cancellation that lands as the headers do, and
            # the caller (a stop) would then wait on an event stream that never ends.
            async with asyncio.timeout(open_timeout):
                response = await self._http.send(request, stream=True)
        except (TimeoutError, httpx.TransportError) as exc:
            raise OpenCodeError(None, "Unreachable", f"GET /event: {exc!r}") from exc
        try:
            if not response.is_success:
                await response.aread()
                raise _error_from(response)
            yield response.aiter_lines()
        except httpx.TransportError as exc:
            raise OpenCodeError(None, "Unreachable", f"GET /event: {exc!r}") from exc
        finally:
            await response.aclose()


# --------------------------------------------------------------------------
# Event stream: SSE decoding and filtering (pure, testable without a server)
# --------------------------------------------------------------------------


class SseDecoder:
    """Turns SSE lines into event dicts: `feed(line)` returns one when a blank line ends it.

    OpenCode sends one `data: {json}` line per event and nothing else; other
    fields and comments are ignored. Undecodable payloads are skipped.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> dict[str, Any] | None:
        line = line.rstrip("\r\n")
        if line:
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)
            return None
        data, self._data = "\n".join(self._data), []
        return _decode(data) if data else None


def _decode(data: str) -> dict[str, Any] | None:
    try:
        event = json.loads(data)
    except ValueError:
        log.debug("opencode event skipped: not JSON (%d chars)", len(data))
        return None
    if not isinstance(event, dict):
        log.debug("opencode event skipped: not an object")
        return None
    return event


class EventFilter:
    """Drops heartbeats and the duplicate `session.idle` OpenCode sends after an abort.

    An idle is a duplicate when the session is already idle: no busy or retry
    `session.status` arrived since its last idle.
    """

    MAX_TRACKED = 4096

    def __init__(self) -> None:
        self._idle: OrderedDict[str, None] = OrderedDict()

    def accept(self, event: dict[str, Any]) -> bool:
        kind = event.get("type")
        raw_props = event.get("properties")
        props = raw_props if isinstance(raw_props, dict) else {}
        session = props.get("sessionID")
        if kind == HEARTBEAT:
            return False
        if kind == "session.status" and _is_active(props.get("status")):
            self._forget(session)
        elif kind == "session.deleted":
            self._forget(session)
        elif kind == "session.idle" and isinstance(session, str):
            return self._first_idle(session)
        return True

    def resync(self, status: dict[str, Any]) -> None:
        """Sessions the snapshot shows busy are not idle any more."""
        for session, state in status.items():
            if _is_active(state):
                self._idle.pop(session, None)

    def _forget(self, session: object) -> None:
        """The session is not idle (any more); only string ids are ever tracked."""
        if isinstance(session, str):
            self._idle.pop(session, None)

    def _first_idle(self, session: str) -> bool:
        if session in self._idle:
            return False
        self._idle[session] = None
        if len(self._idle) > self.MAX_TRACKED:
            self._idle.popitem(last=False)
        return True


def _is_active(status: Any) -> bool:
    return isinstance(status, dict) and status.get("type") in ("busy", "retry")


def parse_events(
    lines: Iterable[str], event_filter: EventFilter | None = None
) -> Iterator[dict[str, Any]]:
    """Decode and filter SSE lines: what `OpenCodeEvents` yields for one connection."""
    decoder, event_filter = SseDecoder(), event_filter or EventFilter()
    for line in lines:
        event = decoder.feed(line)
        if event is not None and event_filter.accept(event):
            yield event


# --------------------------------------------------------------------------
# Event stream: the reconnecting iterator
# --------------------------------------------------------------------------


_CLOSED = object()


class OpenCodeEvents:
    """Async iterator over OpenCode's `GET /event`, reconnecting forever.

    After every successful (re)connect the first event is `cowork.resync` with
    `properties = {"status", "permissions", "questions"}`, then the replayed
    messages of the followed sessions (`follow()`). Reading runs in a
    background task feeding a queue, so cancelling a pending `__anext__` (for
    example with `asyncio.wait_for`) loses nothing. `reconnects` counts the
    successful connections after the first.
    """

    def __init__(
        self,
        client: OpenCodeClient,
        *,
        min_backoff: float = 0.2,
        max_backoff: float = 10.0,
        open_timeout: float = STREAM_OPEN_TIMEOUT,
        queue_size: int = 1000,
    ) -> None:
        self._client = client
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._open_timeout = open_timeout
        self._queue: asyncio.Queue[Any] = asyncio.Queue(queue_size)
        self._filter = EventFilter()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._live = asyncio.Event()  # set while a stream is open and read
        # Sessions followed and not seen idle since, and since when (epoch ms) no
        # stream may have seen their events: from here, until the first connect.
        self._followed: OrderedDict[str, None] = OrderedDict()
        self._unseen_since_ms = _now_ms()
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._live.is_set()

    async def wait_connected(self, timeout: float) -> bool:
        """True once a stream is open (at once if one is), False after `timeout`."""
        try:
            # Not wait_for: 3.11's swallows a cancel that lands as the event is set.
            async with asyncio.timeout(timeout):
                await self._live.wait()
        except TimeoutError:
            return False
        return True

    async def open_for(self, session_id: str | None, timeout: float) -> bool:
        """Before a prompt (a Desktop's command, a Gateway's edge work): follow its
        session, if any, and wait at most `timeout` for a stream to be open, so the
        turn's events stream live. False: none opened in time; the session's messages
        are then relayed once one does."""
        if session_id:
            self.follow(session_id)
        return await self.wait_connected(timeout)

    def follow(self, session_id: str) -> None:
        """Re-read this session's messages after a (re)connect until it is seen idle:
        its turn's events are then relayed even if they happened while no stream
        was open (the first one not open yet, or one dropped mid-turn)."""
        self._followed[session_id] = None
        self._followed.move_to_end(session_id)
        if len(self._followed) > EventFilter.MAX_TRACKED:
            self._followed.popitem(last=False)

    def __aiter__(self) -> OpenCodeEvents:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        self.start()
        item = await self._queue.get()
        if item is _CLOSED:
            self._queue.put_nowait(_CLOSED)  # keep later calls ending too
            raise StopAsyncIteration
        return item

    def start(self) -> None:
        """Start reading now (otherwise the first `__anext__` does)."""
        if self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="opencode-events")

    async def aclose(self) -> None:
        self._closed = True
        self._live.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_CLOSED)

    async def __aenter__(self) -> OpenCodeEvents:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self) -> None:
        failures, connections = 0, 0
        # Checked as well as cancelled: on Python 3.11 `asyncio.wait_for` can swallow
        # a cancellation that lands as the inner request finishes, and the loop
        # would then retry forever while `aclose()` waits for it.
        while not self._closed:
            try:
                async with self._client._event_lines(self._open_timeout) as lines:
                    await self._resync()
                    connections += 1
                    self.reconnects = connections - 1
                    failures = 0
                    await self._pump(lines)
                log.info("opencode event stream ended; reconnecting")
            except OpenCodeError as exc:
                log.info("opencode event stream failed: %s", exc)
            except Exception:  # a bug must not end the stream for good: log, back off, retry
                log.exception("opencode event stream broke")
            finally:
                if self._live.is_set():  # from now on events may pass unseen
                    self._unseen_since_ms = _now_ms()
                self._live.clear()
            failures += 1
            await asyncio.sleep(self._backoff(failures))

    async def _resync(self) -> None:
        status = await self._client.session_status()
        permissions = await self._client.list_permissions()
        questions = await self._client.list_questions()
        self._filter.resync(status or {})
        await self._queue.put(
            {
                "type": RESYNC,
                "properties": {
                    "status": status,
                    "permissions": permissions,
                    "questions": questions,
                },
            }
        )
        await self._replay(status or {})
        self._live.set()

    async def _replay(self, status: dict[str, Any]) -> None:
        """The followed sessions' messages changed since events may have passed
        unseen, as the events that would have carried them. A session the snapshot
        does not show busy has finished its turn: it is followed no longer."""
        since = self._unseen_since_ms - REPLAY_SLACK_MS
        for session in list(self._followed):
            try:
                messages = await self._client.messages(session, limit=REPLAY_MESSAGES)
            except OpenCodeError as exc:
                if not exc.is_not_found:
                    raise  # OpenCode away again: this connection fails, the next replays
                messages = None  # deleted meanwhile: nothing to replay, ever
            for event in replayed_events(session, messages or [], since):
                await self._queue.put(event)
            if messages is None or not _is_active(status.get(session)):
                self._followed.pop(session, None)

    async def _pump(self, lines: AsyncIterator[str]) -> None:
        decoder = SseDecoder()
        async for line in lines:
            event = decoder.feed(line)
            if event is not None and self._filter.accept(event):
                if _is_idle(event):
                    self._followed.pop(session_of(event) or "", None)
                await self._queue.put(event)

    def _backoff(self, failures: int) -> float:
        """Full-jitter exponential backoff; `failures` restarts at 1 after a good connection."""
        return jittered_backoff(failures, self._min_backoff, self._max_backoff)


def _now_ms() -> int:
    """Epoch milliseconds, as OpenCode stamps messages (same machine, same clock)."""
    return int(time.time() * 1000)


def _is_idle(event: dict[str, Any]) -> bool:
    kind = event.get("type")
    if kind == "session.idle":
        return True
    props = event.get("properties")
    status = props.get("status") if isinstance(props, dict) else None
    return kind == "session.status" and isinstance(status, dict) and status.get("type") == "idle"


def replayed_events(
    session: str, messages: list[dict[str, Any]], since_ms: int
) -> Iterator[dict[str, Any]]:
    """`message.updated` and `message.part.updated` events for the messages (as
    `GET /session/{id}/message` returns them: {"info", "parts"}) that started or
    completed at or after `since_ms`, or have not completed yet."""
    for message in messages:
        info = message.get("info")
        if not isinstance(info, dict) or not _changed_since(info, since_ms):
            continue
        yield {
            "type": "message.updated",
            "replayed": True,
            "properties": {"sessionID": session, "info": info},
        }
        for part in message.get("parts") or []:
            yield {
                "type": "message.part.updated",
                "replayed": True,
                "properties": {"sessionID": session, "part": part},
            }


def _changed_since(info: dict[str, Any], since_ms: int) -> bool:
    raw = info.get("time")
    times = raw if isinstance(raw, dict) else {}
    created, completed = times.get("created"), times.get("completed")
    if info.get("role") == "assistant" and completed is None:
        return True  # still being written
    return any(isinstance(t, int | float) and t >= since_ms for t in (created, completed))


_SESSION_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def session_of(event: dict[str, Any]) -> str | None:
    """The OpenCode session an event is about, wherever that event type keeps it."""
    props = event.get("properties") or {}
    if not isinstance(props, dict):
        return None
    for candidate in (
        props.get("sessionID"),
        _get(props, "info", "sessionID"),
        _get(props, "part", "sessionID"),
    ):
        if isinstance(candidate, str) and _SESSION_TOKEN.match(candidate):
            return candidate
    info_id = _get(props, "info", "id")
    if isinstance(info_id, str) and info_id.startswith("ses") and _SESSION_TOKEN.match(info_id):
        return info_id
    return None


def _get(mapping: dict, *keys: str) -> Any:
    value: Any = mapping  # a JSON value: any type, checked at each step
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
