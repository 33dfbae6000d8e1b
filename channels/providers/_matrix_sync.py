"""Matrix inbound over `/sync` long polling.

https://spec.matrix.org/v1.11/client-server-api/#syncing: each answer carries
`next_batch`, the token the next call passes as `since`. The token is the
cursor, stored after the batch's messages are; a crash in between syncs the
batch again and its event ids make the same message ids. A first connection
without a cursor syncs once with no wait and starts from there (the room
history before the bot was set up is not replayed as prompts). Invitations are
joined when `autoJoin` is on. A timeline the server marks `limited` has a gap
(more events than it returned): that gap is not backfilled.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import httpx

from .._provider import ChannelError, DeliveryFailed, WebhookResult
from .._transport import TransportSink, transport_request
from ._matrix import MatrixProvider


class MatrixSync:
    name: ClassVar[str] = "matrix-sync"

    def __init__(self, provider: Any, http: httpx.AsyncClient) -> None:
        self.provider: MatrixProvider = provider

    async def run(self, sink: TransportSink) -> None:
        provider = self.provider
        since = sink.cursor
        if since is None:
            since = _next_batch(await provider.sync(None, 0))
            await sink.save_cursor(since)
        sink.report("syncing", connected=True)
        while True:
            answer = await provider.sync(since, provider.settings.poll_timeout_seconds)
            rooms = answer.get("rooms")
            if not isinstance(rooms, dict):
                rooms = {}
            await self._join_invited(sink, rooms.get("invite"))
            result = self._messages(sink, rooms.get("join"))
            since = _next_batch(answer)
            await sink.accept(result, since)

    def _messages(self, sink: TransportSink, joined: Any) -> WebhookResult:
        result = WebhookResult()
        if not isinstance(joined, dict):
            return result
        for room, state in joined.items():
            timeline = state.get("timeline") if isinstance(state, dict) else None
            events = timeline.get("events") if isinstance(timeline, dict) else None
            for event in events if isinstance(events, list) else []:
                body = json.dumps({"room_id": room, "event": event}).encode()
                if len(body) > sink.body_limit:
                    sink.refused(f"matrix event in {room[:80]}: larger than the body limit")
                    continue
                try:
                    result.messages.extend(self.provider.parse(transport_request(body)).messages)
                except ChannelError as exc:
                    sink.refused(f"matrix event in {room[:80]}: {exc.message}")
        return result

    async def _join_invited(self, sink: TransportSink, invited: Any) -> None:
        if not self.provider.settings.auto_join or not isinstance(invited, dict):
            return
        for room in invited:
            try:
                await self.provider.join(str(room))
            except Exception as exc:  # a room that cannot be joined: the others still are
                sink.refused(f"matrix join {str(room)[:80]}: {type(exc).__name__}")


def _next_batch(answer: dict[str, Any]) -> str:
    token = answer.get("next_batch")
    if not isinstance(token, str) or not token:
        raise DeliveryFailed("matrix sync: no next_batch", code="platform.bad_response")
    return token
