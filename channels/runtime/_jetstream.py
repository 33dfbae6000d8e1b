"""A lean JetStream publish that waits for the stream's acknowledgement.

A JetStream publish is a core NATS request: the message goes to the stream's
subject with a reply subject, and the server that stored it answers there with
a PubAck `{"stream": ..., "seq": ..., "duplicate"?: true}` or with
`{"error": {"code": ..., "description": ...}}`; when no stream listens on the
subject the server answers "503 no responders" in a status header.

nats-py's `js.publish` does the same with, per message, a NUID plus random
reply token, an `asyncio.wait_for` timer and a `PubAck` object: about half
the client CPU of a webhook request. Here one wildcard reply subscription per
connection (under the connection's own inbox prefix, which the principal's
permissions allow), a counter for reply tokens, and one periodic sweep for
timeouts instead of a timer per message. Nothing is weakened: the caller gets
the ack only when the stream has stored the message, and every other outcome
(error reply, no responders, timeout, closed connection) is `PublishFailed`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import Callable
from typing import Any, NamedTuple

NO_RESPONDERS = "503"
# How nats-server writes a successful PubAck (no error member can hide in it).
_PLAIN_ACK = re.compile(
    rb'\{"stream":"([A-Za-z0-9_-]{1,256})",(?:"domain":"[A-Za-z0-9_-]*",)?"seq":([0-9]{1,20})'
    rb'(,"duplicate":true)?\}'
)


class PublishFailed(Exception):
    """The stream did not acknowledge the message; `reason` says why (no secrets)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PubAck(NamedTuple):
    stream: str
    seq: int
    duplicate: bool  # JetStream already held a message with this Nats-Msg-Id


def check_ack(headers: dict[str, str] | None, data: bytes) -> PubAck:
    """The PubAck in a publish's reply, or PublishFailed saying what the reply was."""
    status = headers.get("Status") if headers else None
    if status == NO_RESPONDERS:
        raise PublishFailed("no stream stores this subject (no responders)")
    if status:
        raise PublishFailed(f"the server answered status {status[:8]}")
    plain = _PLAIN_ACK.fullmatch(data)
    if plain is not None:  # the server's usual ack, exactly; anything else is parsed below
        stream, seq, duplicate = plain.groups()
        if int(seq) >= 1:
            return PubAck(stream.decode(), int(seq), duplicate is not None)
    try:
        reply = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise PublishFailed("the publish reply is not JSON") from None
    if not isinstance(reply, dict):
        raise PublishFailed("the publish reply is not a JSON object")
    error = reply.get("error")
    if error is not None:
        if isinstance(error, dict):
            code, what = error.get("code"), str(error.get("description", ""))[:200]
            raise PublishFailed(f"the stream refused the message ({code}: {what})")
        raise PublishFailed("the stream refused the message")
    stream, seq = reply.get("stream"), reply.get("seq")
    if (
        not isinstance(stream, str)
        or not stream
        or isinstance(seq, bool)
        or not isinstance(seq, int)
        or seq < 1
    ):
        raise PublishFailed("the publish reply is not a stream acknowledgement")
    return PubAck(stream, seq, reply.get("duplicate") is True)


class JetStreamPublisher:
    """Publishes over one connection (`nc`, a connected nats-py client) and awaits
    each message's PubAck for at most `timeout` seconds (plus one sweep interval).
    `on_closed` is called once when the connection is found closed."""

    def __init__(
        self,
        nc: Any,
        *,
        timeout: float,
        on_closed: Callable[[JetStreamPublisher], None] | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.nc = nc
        self._timeout = timeout
        self._sweep_every = min(0.5, max(0.02, timeout / 5))
        self._on_closed = on_closed
        self._tokens = itertools.count(1)
        # token -> (future, deadline); insertion order is deadline order (one timeout)
        self._pending: dict[str, tuple[asyncio.Future, float]] = {}
        self._prefix = ""
        self._sub: Any = None
        self._sweeper: asyncio.Task | None = None
        self._starting: asyncio.Future | None = None
        self.closed = False

    async def publish(self, subject: str, payload: bytes, msg_id: str) -> PubAck:
        """Store `payload` on `subject` with `Nats-Msg-Id: msg_id` (JetStream drops a
        repeat of the id within its duplicate window and says `duplicate`)."""
        if not self._prefix:
            await self._start()
        if self.closed:  # checked after any await: nothing may wait on a finished publisher
            raise PublishFailed("the publisher was closed")
        loop = asyncio.get_running_loop()
        token = str(next(self._tokens))
        future = loop.create_future()
        self._pending[token] = (future, loop.time() + self._timeout)
        try:
            await self.nc.publish(
                subject, payload, reply=self._prefix + token, headers={"Nats-Msg-Id": msg_id}
            )
            headers, data = await future
        finally:
            self._pending.pop(token, None)
        return check_ack(headers, data)

    async def close(self) -> None:
        """Stop waiting for anything: pending publishes fail, the reply
        subscription is dropped (when the connection is still open)."""
        self._finish("the publisher was closed")
        if self._sub is not None and not self.nc.is_closed:
            try:
                await self._sub.unsubscribe()
            except Exception:  # closed or draining meanwhile: nothing left to release
                pass

    # --- internals ----------------------------------------------------------------------
    async def _start(self) -> None:
        if self.closed:
            raise PublishFailed("the publisher was closed")
        if self._starting is None:  # one subscription, however many first callers
            self._starting = asyncio.ensure_future(self._subscribe())
        try:
            await asyncio.shield(self._starting)
        except Exception as exc:
            self._starting = None  # the next publish tries again
            raise PublishFailed(
                f"cannot subscribe to the reply inbox ({type(exc).__name__})"
            ) from None

    async def _subscribe(self) -> None:
        prefix = self.nc.new_inbox() + "."
        self._sub = await self.nc.subscribe(prefix + "*", cb=self._on_reply)
        self._sweeper = asyncio.ensure_future(self._sweep())
        self._prefix = prefix

    async def _on_reply(self, msg: Any) -> None:
        entry = self._pending.get(msg.subject[len(self._prefix) :])
        if entry is not None and not entry[0].done():
            entry[0].set_result((msg.headers, msg.data))

    async def _sweep(self) -> None:
        """Fails publishes whose ack is overdue; notices a closed connection."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            await asyncio.sleep(self._sweep_every)
            if self.nc.is_closed:
                self._finish("the connection is closed")
                return
            now = loop.time()
            overdue = []
            for token, (future, deadline) in self._pending.items():
                if deadline > now:
                    break
                overdue.append(token)
                if not future.done():
                    future.set_exception(
                        PublishFailed(f"no acknowledgement within {self._timeout:g} s")
                    )
            for token in overdue:
                self._pending.pop(token, None)

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(PublishFailed(reason))
        if self._sweeper is not None and self._sweeper is not asyncio.current_task():
            self._sweeper.cancel()
        if self._on_closed is not None:
            self._on_closed(self)
