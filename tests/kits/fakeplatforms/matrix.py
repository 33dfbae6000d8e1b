"""A fake Matrix homeserver: the client-server API a bot uses (`/sync` long polls
with `since` tokens, room event sends with transaction ids, typing, joins,
whoami), bearer-token auth and Matrix's error format (`errcode`, 429
`M_LIMIT_EXCEEDED` with `retry_after_ms`)."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
from typing import Any

from aiohttp import web

from channels import WebhookRequest

from ._base import FakePlatform, webhook_request

SERVER = "fake.test"
PREFIX = "/_matrix/client/v3"


class FakeMatrix(FakePlatform):
    kind = "matrix"
    authenticates_api = True
    signs_body = False

    def __init__(self) -> None:
        super().__init__()
        self.access_token = "syt_" + secrets.token_urlsafe(24)
        self.user_id = f"@cowork:{SERVER}"
        self.log: list[dict[str, Any]] = []  # {"room_id", "event"} in order: the sync stream
        self.invites: list[str] = []
        self.joined: list[str] = []
        self._arrived = asyncio.Event()
        self._txns: dict[str, str] = {}  # transaction id -> event id (idempotent sends)
        self._syncing: list[web.Request] = []
        self._drop_next = 0
        self.syncs: list[str | None] = []  # the `since` of every sync, in order

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(PREFIX + "/account/whoami", self._whoami),
            web.get(PREFIX + "/sync", self._sync),
            web.put(PREFIX + "/rooms/{room}/send/{type}/{txn}", self._send),
            web.put(PREFIX + "/rooms/{room}/typing/{user}", self._typing),
            web.post(PREFIX + "/join/{room}", self._join),
        ]

    def instance_settings(self) -> dict[str, Any]:
        return {"apiBase": self.base_url, "allowLoopbackHttp": True, "userId": self.user_id}

    def transport_settings(self) -> dict[str, Any]:
        return {**self.instance_settings(), "pollTimeoutSeconds": 1}

    def instance_secrets(self) -> dict[str, str]:
        return {"accessToken": self.access_token}

    # --- ids in Matrix's shapes -------------------------------------------------------------
    def chat_ref(self, chat_id: str) -> str:
        return f"!room{chat_id}:{SERVER}"

    def user_ref(self, user_id: str) -> str:
        return f"@user{user_id}:{SERVER}"

    def event_ref(self, event_id: str) -> str:
        return f"$ev{event_id}"

    # --- the API ----------------------------------------------------------------------------
    @staticmethod
    def _error(status: int, errcode: str, error: str, **extra: Any) -> web.Response:
        return web.json_response({"errcode": errcode, "error": error, **extra}, status=status)

    async def _guard(self, request: web.Request, operation: str) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        if not hmac.compare_digest(auth, f"Bearer {self.access_token}"):
            return self._error(401, "M_UNKNOWN_TOKEN", "Invalid access token")
        body = await request.json() if request.can_read_body else None
        self.calls.append((operation, body))
        failure = self.injected()
        if failure is None:
            return None
        if failure.status == 429:
            millis = int((failure.retry_after or 1) * 1000)
            return self._error(429, "M_LIMIT_EXCEEDED", "Too many requests", retry_after_ms=millis)
        if failure.status >= 500:
            return self._error(failure.status, "M_UNKNOWN", "Internal server error")
        return self._error(failure.status, "M_FORBIDDEN", "injected failure")

    async def _whoami(self, request: web.Request) -> web.Response:
        refused = await self._guard(request, "whoami")
        return refused or web.json_response({"user_id": self.user_id})

    async def _join(self, request: web.Request) -> web.Response:
        refused = await self._guard(request, "join")
        if refused:
            return refused
        room = request.match_info["room"]
        self.joined.append(room)
        return web.json_response({"room_id": room})

    async def _typing(self, request: web.Request) -> web.Response:
        refused = await self._guard(request, "typing")
        if refused:
            return refused
        self.typing.append(request.match_info["room"])
        return web.json_response({})

    async def _send(self, request: web.Request) -> web.Response:
        refused = await self._guard(request, f"send {request.match_info['type']}")
        if refused:
            return refused
        room, kind, txn = (request.match_info[k] for k in ("room", "type", "txn"))
        if txn in self._txns:  # the same transaction again: the same event
            return web.json_response({"event_id": self._txns[txn]})
        content = self.calls[-1][1] or {}
        relation = content.get("m.relates_to") or {}
        if kind == "m.reaction":
            self.reactions.append((room, relation.get("event_id"), relation.get("key")))
            event_id = "$" + self.new_message_id()
        elif relation.get("rel_type") == "m.replace":
            if (
                self.edit(room, relation.get("event_id", ""), content["m.new_content"]["body"])
                is None
            ):
                return self._error(400, "M_INVALID_PARAM", "unknown event to replace")
            event_id = "$" + self.new_message_id()
        else:
            if not content.get("body"):
                return self._error(400, "M_BAD_JSON", "body is required")
            posted = self.post(room, content["body"])
            posted.message_id = "$" + posted.message_id
            event_id = posted.message_id
        self._txns[txn] = event_id
        return web.json_response({"event_id": event_id})

    async def _sync(self, request: web.Request) -> web.StreamResponse:
        refused = await self._guard(request, "sync")
        if refused:
            return refused
        since = request.query.get("since")
        self.syncs.append(since)
        live = [
            r for r in self._syncing if r.transport is not None and not r.transport.is_closing()
        ]
        if live:
            self.conflicts += 1  # two pollers of one bot at once
        start = int(since[1:]) if since and since[1:].isdigit() else 0
        timeout = int(request.query.get("timeout", "0")) / 1000
        self._syncing.append(request)
        try:
            if since is not None and start >= len(self.log) and timeout:
                self._arrived.clear()
                try:
                    async with asyncio.timeout(timeout):
                        await self._arrived.wait()
                except TimeoutError:
                    pass
        finally:
            self._syncing.remove(request)
        batch = self.log[start:]
        if batch and self._drop_next and since is not None:
            self._drop_next -= 1
            self.dropped()
            assert request.transport is not None
            request.transport.close()  # mid-stream: the client never sees this batch
            return web.Response(status=500)
        join: dict[str, Any] = {}
        for item in batch:
            room = join.setdefault(item["room_id"], {"timeline": {"events": [], "limited": False}})
            room["timeline"]["events"].append(item["event"])
        rooms: dict[str, Any] = {"join": join}
        if self.invites:
            rooms["invite"] = {room: {"invite_state": {"events": []}} for room in self.invites}
            self.invites = []
        return web.json_response({"next_batch": f"s{len(self.log)}", "rooms": rooms})

    # --- what the homeserver would hand the bot -----------------------------------------------
    def _event(self, text: str, chat_id: str, user_id: str, event_id: str) -> dict[str, Any]:
        return {
            "room_id": self.chat_ref(chat_id),
            "event": {
                "type": "m.room.message",
                "event_id": self.event_ref(event_id),
                "sender": self.user_ref(user_id),
                "origin_server_ts": 1_700_000_000_000,
                "content": {"msgtype": "m.text", "body": text},
            },
        }

    def signed_message(
        self,
        text: str,
        *,
        chat_id: str = "100",
        user_id: str = "7",
        event_id: str = "1",
        thread_id: str | None = None,
    ) -> WebhookRequest:
        """One room event as the sync transport hands it to the parser (Matrix has no
        webhook: nothing to sign)."""
        body = json.dumps(self._event(text, chat_id, user_id, event_id)).encode()
        return webhook_request(body, {"Content-Type": "application/json"})

    async def emit(self, request: WebhookRequest) -> None:
        self.log.append(json.loads(request.body))
        self._arrived.set()

    def drop_next(self) -> None:
        self._drop_next += 1

    def invite(self, room: str) -> None:
        self.invites.append(room)
        self._arrived.set()
