"""Discord inbound over the Gateway websocket: ordinary channel messages
(MESSAGE_CREATE), which the Interactions endpoint never sees, and interactions.

https://discord.com/developers/docs/events/gateway: after HELLO the client
heartbeats every `heartbeat_interval` (the first after a random fraction of it)
and expects an ACK before the next one (none: a zombie connection, closed and
resumed); it IDENTIFYs with its intents (GUILD_MESSAGES, DIRECT_MESSAGES,
MESSAGE_CONTENT: a privileged intent the application must have enabled) or
RESUMEs a session with its last sequence number, after which Discord replays
what was dispatched meanwhile. RECONNECT (op 7) and a resumable INVALID_SESSION
(op 9, d=true) resume; op 9 d=false and close codes 4007/4009 start a new
session (what was dispatched in between is lost: Discord's rule); 4004 (bad
token) and 4010-4014 (shards, version, intents) are permanent.

The cursor is the session: `{"sessionId", "resumeUrl", "seq"}`, stored after
each dispatch's messages are, so a resume (by this process or the next holder
of the lease) replays from the last stored event and a replayed one is a
duplicate the stream drops.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any, ClassVar

import httpx

from .._provider import ChannelError, DeliveryFailed
from .._transport import TransportSink, transport_request
from ._discord import DiscordProvider
from ._websocket import receive_json, websocket

DISPATCH, HEARTBEAT, IDENTIFY, RESUME, RECONNECT, INVALID_SESSION, HELLO, HEARTBEAT_ACK = (
    0,
    1,
    2,
    6,
    7,
    9,
    10,
    11,
)
GUILDS, GUILD_MESSAGES, DIRECT_MESSAGES, MESSAGE_CONTENT = 1, 1 << 9, 1 << 12, 1 << 15
INTENTS = GUILDS | GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT
# Close codes after which a session cannot go on (a new one is identified).
NEW_SESSION_CODES = frozenset({4007, 4009})
# Close codes that retrying cannot fix: the token, shards, API version, intents.
PERMANENT_CODES = {
    4004: "authentication failed (bad bot token)",
    4010: "invalid shard",
    4011: "sharding required",
    4012: "invalid API version",
    4013: "invalid intents",
    4014: "disallowed intents (enable MESSAGE CONTENT in the developer portal)",
}
HELLO_TIMEOUT = 10.0
QUERY = "?v=10&encoding=json"


class _Resume(Exception):
    """The connection ends; resume (or identify when the session was dropped)."""


class DiscordGateway:
    name: ClassVar[str] = "discord-gateway"

    def __init__(self, provider: Any, http: httpx.AsyncClient) -> None:
        self.provider: DiscordProvider = provider
        self._session: dict[str, Any] = {}
        self._acked = True
        self._dropped = False  # the session ended on Discord's side: identify next

    async def run(self, sink: TransportSink) -> None:
        self._session = _session_of(sink.cursor)
        resuming = bool(self._session.get("sessionId"))
        if resuming:
            url = self.provider.checked_gateway_url(self._session["resumeUrl"])
        else:
            url = await self.provider.gateway_url()
        sink.report(f"connecting to the gateway ({'resume' if resuming else 'identify'})")
        async with websocket(url + QUERY, "discord gateway") as ws:
            await self._serve(ws, sink, resuming)

    async def _serve(self, ws: Any, sink: TransportSink, resuming: bool) -> None:
        hello = await self._receive(ws, timeout=HELLO_TIMEOUT)
        if hello is None or hello.get("op") != HELLO:
            raise DeliveryFailed("discord gateway: no HELLO", code="platform.bad_response")
        interval = float((hello.get("d") or {}).get("heartbeat_interval", 41250)) / 1000
        self._acked = True
        beating = asyncio.create_task(self._heartbeat(ws, interval))
        try:
            await ws.send_json(self._resume() if resuming else self._identify())
            while True:
                event = await self._receive(ws, timeout=None)
                if self._dropped:
                    await self._forget(sink)
                if event is None or beating.done():
                    return  # closed (resume next) or a zombie connection
                await self._handle(ws, sink, event)
        except _Resume:
            return
        finally:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)

    async def _handle(self, ws: Any, sink: TransportSink, event: dict[str, Any]) -> None:
        op = event.get("op")
        if op == HEARTBEAT_ACK:
            self._acked = True
        elif op == HEARTBEAT:
            await ws.send_json({"op": HEARTBEAT, "d": self._session.get("seq")})
        elif op == RECONNECT:
            raise _Resume
        elif op == INVALID_SESSION:
            if not event.get("d"):
                await self._forget(sink)
                await asyncio.sleep(random.uniform(1, 5))  # as Discord asks
            raise _Resume
        elif op == DISPATCH:
            await self._dispatch(sink, event)

    async def _dispatch(self, sink: TransportSink, event: dict[str, Any]) -> None:
        kind, data, seq = event.get("t"), event.get("d"), event.get("s")
        if isinstance(seq, int):
            self._session["seq"] = seq
        if not isinstance(data, dict):
            return
        if kind == "READY":
            url = data.get("resume_gateway_url")
            self._session.update(sessionId=data.get("session_id"), resumeUrl=url)
            sink.report("gateway session ready", connected=True)
        elif kind == "RESUMED":
            sink.report("gateway session resumed", connected=True)
        elif kind == "MESSAGE_CREATE":
            try:
                result = self.provider.gateway_message(data)
            except ChannelError as exc:
                sink.refused(f"discord message: {exc.message}")
            else:
                await sink.accept(result, self._cursor())
                return
        elif kind == "INTERACTION_CREATE":
            body = json.dumps(data).encode()
            try:
                result = self.provider.parse(transport_request(body))
            except ChannelError as exc:
                sink.refused(f"discord interaction: {exc.message}")
            else:
                await sink.accept(result, self._cursor())
                await self.provider.acknowledge(data, result.body)
                return
        await sink.save_cursor(self._cursor())

    async def _heartbeat(self, ws: Any, interval: float) -> None:
        """Returns (ending the connection) when an ACK did not come in time."""
        await asyncio.sleep(interval * random.random())
        while True:
            if not self._acked:
                await ws.close(code=4000)  # a zombie: Discord asks for a resume
                return
            self._acked = False
            await ws.send_json({"op": HEARTBEAT, "d": self._session.get("seq")})
            await asyncio.sleep(interval)

    async def _receive(self, ws: Any, *, timeout: float | None) -> dict[str, Any] | None:
        """The next event, or None when the connection closed (resumable). Raises
        DeliveryFailed for the close codes that no retry can fix."""
        event = await receive_json(ws, timeout)
        if event is not None:
            return event
        code = ws.close_code
        if code in PERMANENT_CODES:
            raise DeliveryFailed(
                f"discord gateway closed {code}: {PERMANENT_CODES[code]}",
                code="platform.rejected",
                permanent=True,
            )
        if code in NEW_SESSION_CODES:
            self._dropped = True
        return None

    def _identify(self) -> dict[str, Any]:
        return {
            "op": IDENTIFY,
            "d": {
                "token": self.provider.secrets.bot_token,
                "intents": INTENTS,
                "properties": {"os": "linux", "browser": "cowork", "device": "cowork"},
            },
        }

    def _resume(self) -> dict[str, Any]:
        return {
            "op": RESUME,
            "d": {
                "token": self.provider.secrets.bot_token,
                "session_id": self._session["sessionId"],
                "seq": self._session.get("seq"),
            },
        }

    def _cursor(self) -> str:
        return json.dumps(self._session, sort_keys=True)

    async def _forget(self, sink: TransportSink) -> None:
        self._session, self._dropped = {}, False
        await sink.save_cursor("{}")


def _session_of(cursor: str | None) -> dict[str, Any]:
    try:
        session = json.loads(cursor or "{}")
    except ValueError:
        return {}
    if not isinstance(session, dict) or not isinstance(session.get("resumeUrl"), str):
        return {}
    return session
