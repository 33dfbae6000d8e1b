"""A fake Discord REST API plus an Interactions endpoint client: it holds the
application's Ed25519 key pair and signs interactions as Discord does."""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from channels import WebhookRequest

from ._base import FakePlatform, webhook_request


@dataclass
class GatewaySession:
    """One Gateway session: its dispatches by sequence, and the socket serving it."""

    session_id: str
    events: list[dict[str, Any]] = field(default_factory=list)
    request: web.Request | None = None
    ws: web.WebSocketResponse | None = None


class FakeDiscord(FakePlatform):
    kind = "discord"
    authenticates_api = True

    def __init__(self) -> None:
        super().__init__()
        self.bot_token = secrets.token_urlsafe(40)
        self.application_id = str(10**17 + secrets.randbelow(10**17))
        self._key = Ed25519PrivateKey.generate()
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()
        self.nonces: dict[str, str] = {}  # nonce -> message id (enforce_nonce dedupe)
        self.deferred: set[str] = set()  # interaction ids already answered by the webhook
        self.original_edits: list[tuple[str, str]] = []  # (interaction token, content)
        # The Gateway (https://discord.com/developers/docs/events/gateway)
        self.heartbeat_ms = 300
        self.ack_heartbeats = True
        self.sessions: dict[str, GatewaySession] = {}
        self.current: GatewaySession | None = None  # where the bot's events go
        self.identifies = self.resumes = self.heartbeats = 0
        self.identified_intents: list[int] = []
        self._drop_next = 0
        self._invalidate_next = False
        self.gateway_token: str | None = None  # set: the Gateway accepts only this token
        self.refused_logins = 0

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/channels/{channel}/messages", self._create),
            web.patch("/channels/{channel}/messages/{message}", self._edit),
            web.post("/channels/{channel}/typing", self._typing),
            web.put("/channels/{channel}/messages/{message}/reactions/{emoji}/@me", self._react),
            web.post("/interactions/{id}/{token}/callback", self._callback),
            web.patch("/webhooks/{app}/{token}/messages/@original", self._original),
            web.get("/users/@me", self._me),
            web.get("/gateway/bot", self._gateway_bot),
            web.get("/gateway", self._gateway),
        ]

    def instance_settings(self) -> dict[str, Any]:
        return {
            "apiBase": self.base_url,
            "allowLoopbackHttp": True,
            "applicationId": self.application_id,
            "publicKey": self.public_key,
        }

    def instance_secrets(self) -> dict[str, str]:
        return {"botToken": self.bot_token}

    # --- the REST API ----------------------------------------------------------------------
    async def _guard(self, request: web.Request, operation: str) -> tuple[Any, web.Response | None]:
        """Auth, body decoding and failure injection shared by every handler."""
        auth = request.headers.get("Authorization", "")
        if not hmac.compare_digest(auth, f"Bot {self.bot_token}"):
            return None, web.json_response({"message": "401: Unauthorized", "code": 0}, status=401)
        if request.content_type == "application/json":
            body = await request.json()
        elif request.content_type.startswith("multipart/"):
            form = await request.post()
            body = json.loads(form["payload_json"])
            body["files"] = [
                {"filename": v.filename, "size": len(v.file.read())}
                for k, v in form.items()
                if k.startswith("files[")
            ]
        else:
            body = None
        self.calls.append((operation, body))
        failure = self.injected()
        if failure is None:
            return body, None
        if failure.status == 429:
            retry = failure.retry_after or 1
            return body, web.json_response(
                {"message": "You are being rate limited.", "retry_after": retry, "global": False},
                status=429,
                headers={"Retry-After": str(int(retry))},
            )
        if failure.status >= 500:
            return body, web.json_response(
                {"message": "Internal Server Error", "code": 0}, status=failure.status
            )
        return body, web.json_response(
            {"message": "Invalid Form Body", "code": 50035}, status=failure.status
        )

    @staticmethod
    def _invalid(message: str) -> web.Response:
        return web.json_response({"message": message, "code": 50035}, status=400)

    def _buttons(self, components: list[dict[str, Any]] | None) -> list[list[str]] | None:
        if components is None:
            return None
        rows = [[b["label"] for b in row["components"]] for row in components]
        for row in components:
            for b in row["components"]:
                if not 1 <= len(b["custom_id"]) <= 100:
                    raise ValueError("custom_id")
        return rows

    async def _create(self, request: web.Request) -> web.Response:
        body, refused = await self._guard(request, "create message")
        if refused:
            return refused
        content = body.get("content") or ""
        if len(content) > 2000:
            return self._invalid("content: Must be 2000 or fewer in length.")
        if not content and not body.get("files"):
            return self._invalid("Cannot send an empty message")
        nonce = body.get("nonce")
        if body.get("enforce_nonce") and nonce in self.nonces:
            return web.json_response({"id": self.nonces[nonce], "content": content})
        try:
            buttons = self._buttons(body.get("components")) or []
        except (KeyError, ValueError):
            return self._invalid("components: invalid")
        channel = request.match_info["channel"]
        posted = self.post(channel, content, buttons=buttons)
        if nonce:
            self.nonces[nonce] = posted.message_id
        return web.json_response(
            {
                "id": posted.message_id,
                "channel_id": channel,
                "content": content,
                "attachments": body.get("files", []),
            }
        )

    async def _edit(self, request: web.Request) -> web.Response:
        body, refused = await self._guard(request, "edit message")
        if refused:
            return refused
        channel, message = request.match_info["channel"], request.match_info["message"]
        posted = self.edit(channel, message, body.get("content") or "")
        if posted is None:
            return web.json_response({"message": "Unknown Message", "code": 10008}, status=404)
        buttons = self._buttons(body.get("components"))
        if buttons is not None:
            posted.buttons = buttons
        return web.json_response({"id": message, "channel_id": channel, "content": posted.text})

    async def _typing(self, request: web.Request) -> web.Response:
        _, refused = await self._guard(request, "typing")
        if refused:
            return refused
        self.typing.append(request.match_info["channel"])
        return web.Response(status=204)

    async def _react(self, request: web.Request) -> web.Response:
        _, refused = await self._guard(request, "add reaction")
        if refused:
            return refused
        info = request.match_info  # aiohttp has percent-decoded the emoji
        entry = (info["channel"], info["message"], info["emoji"])
        if entry not in self.reactions:  # Discord: adding it again changes nothing
            self.reactions.append(entry)
        return web.Response(status=204)

    async def _callback(self, request: web.Request) -> web.Response:
        # Interaction callbacks are authenticated by the interaction token, not the bot.
        body = await request.json()
        self.calls.append(("interaction callback", body))
        interaction = request.match_info["id"]
        if interaction in self.deferred or interaction in self.answered:
            return web.json_response(
                {"message": "Interaction has already been acknowledged.", "code": 40060}, status=400
            )
        self.answered.append(interaction)
        return web.Response(status=204)

    async def _original(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("edit original", body))
        if request.match_info["app"] != self.application_id:
            return web.json_response({"message": "Unknown Webhook", "code": 10015}, status=404)
        self.original_edits.append((request.match_info["token"], body.get("content", "")))
        return web.json_response({"id": self.new_message_id(), "content": body.get("content")})

    async def _me(self, request: web.Request) -> web.Response:
        _, refused = await self._guard(request, "get current user")
        if refused:
            return refused
        return web.json_response({"id": self.application_id, "username": "cowork", "bot": True})

    # --- the Gateway ----------------------------------------------------------------------
    async def _gateway_bot(self, request: web.Request) -> web.Response:
        _, refused = await self._guard(request, "get gateway")
        if refused:
            return refused
        return web.json_response(
            {
                "url": self.base_url.replace("http", "ws", 1) + "/gateway",
                "shards": 1,
                "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0},
            }
        )

    def _live(self) -> list[GatewaySession]:
        return [s for s in self.sessions.values() if s.ws is not None and not s.ws.closed]

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        failure = self.injected()  # the handshake fails as Discord's edge would answer
        if failure is not None:
            headers = (
                {"Retry-After": str(failure.retry_after or 1)} if failure.status == 429 else {}
            )
            return web.json_response(
                {"message": "injected", "retry_after": failure.retry_after},
                status=failure.status,
                headers=headers,
            )
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": self.heartbeat_ms}})
        session: GatewaySession | None = None
        try:
            async for msg in ws:
                event = json.loads(msg.data)
                op, data = event.get("op"), event.get("d") or {}
                if op == 1:
                    self.heartbeats += 1
                    if self.ack_heartbeats:
                        await ws.send_json({"op": 11})
                elif op in (2, 6) and not hmac.compare_digest(
                    str(data.get("token", "")), self.gateway_token or self.bot_token
                ):
                    self.refused_logins += 1
                    await ws.close(code=4004, message=b"Authentication failed.")
                elif op == 2:
                    session = await self._identify(request, ws, data)
                elif op == 6:
                    session = await self._resume(request, ws, data)
        finally:
            if session is not None and session.ws is ws:
                session.ws = session.request = None
        return ws

    async def _identify(self, request, ws, data) -> GatewaySession:
        self.identifies += 1
        self.identified_intents.append(int(data.get("intents", 0)))
        if self._live():
            self.conflicts += 1
        session = GatewaySession(secrets.token_hex(8), request=request, ws=ws)
        self.sessions[session.session_id] = session
        self.current = session
        resume_url = self.base_url.replace("http", "ws", 1) + "/gateway"
        ready = {
            "v": 10,
            "session_id": session.session_id,
            "resume_gateway_url": resume_url,
            "user": {"id": self.application_id, "username": "cowork", "bot": True},
            "application": {"id": self.application_id},
        }
        await self._dispatch_to(session, "READY", ready)
        return session

    async def _resume(self, request, ws, data) -> GatewaySession | None:
        session = self.sessions.get(str(data.get("session_id")))
        if session is None or self._invalidate_next:
            self._invalidate_next = False
            await ws.send_json({"op": 9, "d": False})
            return None
        self.resumes += 1
        if self._live():
            self.conflicts += 1
        session.request, session.ws = request, ws
        after = int(data.get("seq") or 0)
        for event in session.events:
            if event["s"] > after:
                await ws.send_json(event)
        await self._dispatch_to(session, "RESUMED", {})
        return session

    async def _dispatch_to(self, session: GatewaySession, kind: str, data: dict[str, Any]) -> None:
        event = {"op": 0, "t": kind, "s": len(session.events) + 1, "d": data}
        session.events.append(event)
        ws = session.ws
        if ws is None or ws.closed:
            return  # kept: a resume replays it
        if self._drop_next and kind not in ("READY", "RESUMED"):
            self._drop_next -= 1
            self.dropped()
            assert session.request is not None and session.request.transport is not None
            session.request.transport.close()  # cut before it is sent
            session.ws = session.request = None
            return
        try:
            await ws.send_json(event)
        except ConnectionError:  # the client went away: a resume replays it
            session.ws = session.request = None

    async def dispatch(self, kind: str, data: dict[str, Any]) -> None:
        """An event for the bot; kept in the current session (replayed on resume)."""
        for _ in range(100):  # the first connection may still be identifying
            if self.current is not None:
                break
            await asyncio.sleep(0.02)
        assert self.current is not None, "no gateway session was ever identified"
        await self._dispatch_to(self.current, kind, data)

    async def emit(self, request: WebhookRequest) -> None:
        """A slash command becomes the plain message a user would type in the channel
        (MESSAGE_CREATE); a button press stays an interaction (INTERACTION_CREATE)."""
        interaction = json.loads(request.body)
        if interaction["type"] == 3:
            await self.dispatch("INTERACTION_CREATE", interaction)
            return
        data = interaction["data"]
        values = [o["value"] for o in data.get("options", [])]
        text = (
            " ".join(values) if data["name"] == "ask" else " ".join([f"/{data['name']}", *values])
        )
        user = interaction["member"]["user"]
        await self.dispatch(
            "MESSAGE_CREATE",
            {
                "id": interaction["id"],
                "channel_id": interaction["channel_id"],
                "guild_id": interaction["guild_id"],
                "author": {k: user[k] for k in ("id", "username", "global_name")},
                "content": text,
                "attachments": [],
                "type": 0,
            },
        )

    def drop_next(self) -> None:
        self._drop_next += 1

    def invalidate_session(self) -> None:
        """The next RESUME is answered INVALID_SESSION (not resumable)."""
        self._invalidate_next = True

    async def send_op(self, op: int, data: Any = None) -> None:
        """Send an opcode (7 RECONNECT, 9 INVALID_SESSION) on the live connection."""
        assert self.current is not None and self.current.ws is not None
        await self.current.ws.send_json({"op": op, "d": data})

    # --- interactions Discord would send us -------------------------------------------------
    def sign(self, body: bytes, *, timestamp: float | None = None) -> WebhookRequest:
        ts = str(int(timestamp if timestamp is not None else time.time()))
        signature = self._key.sign(ts.encode() + body).hex()
        return webhook_request(
            body,
            {
                "Content-Type": "application/json",
                "X-Signature-Timestamp": ts,
                "X-Signature-Ed25519": signature,
            },
        )

    def _interaction(
        self,
        kind: int,
        event_id: str,
        chat_id: str,
        user_id: str,
        data: dict[str, Any],
        thread_id: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        channel_id = thread_id or chat_id
        user = {"id": user_id, "username": "ada", "global_name": "Ada", "bot": False}
        return {
            "id": event_id,
            "application_id": self.application_id,
            "type": kind,
            "token": f"itok-{event_id}-{secrets.token_hex(8)}",
            "version": 1,
            "guild_id": "999",
            "channel_id": channel_id,
            "channel": {
                "id": channel_id,
                "type": 11 if thread_id else 0,
                **({"parent_id": chat_id} if thread_id else {}),
            },
            "member": {"user": user, "roles": []},
            "data": data,
            **extra,
        }

    def signed_ping(self) -> WebhookRequest:
        return self.sign(
            json.dumps(
                {
                    "id": "1",
                    "application_id": self.application_id,
                    "type": 1,
                    "token": "t",
                    "version": 1,
                }
            ).encode()
        )

    def signed_message(
        self,
        text: str,
        *,
        chat_id: str = "100",
        user_id: str = "7",
        event_id: str = "1",
        thread_id: str | None = None,
        timestamp: float | None = None,
    ) -> WebhookRequest:
        """A slash command: `/name rest` as /name with one string option, any other
        text as `/ask text:<text>`."""
        if text.startswith("/"):
            name, _, rest = text[1:].partition(" ")
            options = [{"name": "args", "type": 3, "value": rest}] if rest else []
        else:
            name, options = "ask", [{"name": "text", "type": 3, "value": text}]
        data = {"id": "555", "name": name, "type": 1, "options": options}
        return self.sign(
            json.dumps(self._interaction(2, event_id, chat_id, user_id, data, thread_id)).encode(),
            timestamp=timestamp,
        )

    def signed_button_press(
        self, token: str, *, chat_id: str = "100", user_id: str = "7", event_id: str = "2"
    ) -> WebhookRequest:
        data = {"custom_id": token, "component_type": 2}
        message = {"id": "900", "channel_id": chat_id, "content": "Approve?"}
        return self.sign(
            json.dumps(
                self._interaction(3, event_id, chat_id, user_id, data, message=message)
            ).encode()
        )
