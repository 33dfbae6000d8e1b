"""A fake Slack Web API (`POST /api/<method>`, HTTP 200 with `{"ok": ...}`) that
also signs Events API, interactivity and slash-command requests as Slack does."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode

from aiohttp import web

from channels import WebhookRequest

from ._base import FakePlatform, webhook_request

_ERRORS = {400: "invalid_arguments", 403: "not_allowed_token_type", 404: "channel_not_found"}


class FakeSlack(FakePlatform):
    kind = "slack"
    authenticates_api = True

    def __init__(self) -> None:
        super().__init__()
        self.bot_token = "xoxb-" + secrets.token_hex(12)
        self.signing_secret = secrets.token_hex(16)
        self.uploads: dict[str, dict[str, Any]] = {}
        self.button_values: list[list[str]] = []  # tokens of the last message with buttons
        # Socket Mode (https://api.slack.com/apis/socket-mode)
        self.app_token = "xapp-1-" + secrets.token_hex(12)
        self._tickets: set[str] = set()  # one-use connection URLs handed out
        self.sockets: list[tuple[web.Request, web.WebSocketResponse]] = []  # live
        self.unacked: dict[str, dict[str, Any]] = {}  # envelope id -> envelope, in order
        self._sent_on: dict[str, web.WebSocketResponse] = {}
        self.acked: list[str] = []
        self.connections = 0
        self._drop_next = 0
        self._sending = asyncio.Lock()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/api/{method}", self._api),
            web.post("/upload/{file_id}", self._upload),
            web.get("/socket-mode", self._socket),
        ]

    def instance_settings(self) -> dict[str, Any]:
        return (
            {"apiBase": self.base_url + "/api", "allowLoopbackHttp": True} if self.base_url else {}
        )  # not started: no API to point at

    def instance_secrets(self) -> dict[str, str]:
        return {
            "botToken": self.bot_token,
            "signingSecret": self.signing_secret,
            "appToken": self.app_token,
        }

    # --- the Web API -----------------------------------------------------------------------
    @staticmethod
    def _ok(**fields: Any) -> web.Response:
        return web.json_response({"ok": True, **fields})

    @staticmethod
    def _err(error: str) -> web.Response:
        return web.json_response({"ok": False, "error": error})  # Slack: HTTP 200

    async def _api(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        method = request.match_info["method"]
        token = self.app_token if method == "apps.connections.open" else self.bot_token
        if not hmac.compare_digest(auth, f"Bearer {token}"):
            return self._err("invalid_auth")
        params = (
            await request.json()
            if request.content_type == "application/json"
            else dict(await request.post())
        )
        self.calls.append((method, params))
        failure = self.injected()
        if failure is not None:
            if failure.status == 429:
                return web.json_response(
                    {"ok": False, "error": "ratelimited"},
                    status=429,
                    headers={"Retry-After": str(int(failure.retry_after or 1))},
                )
            if failure.status >= 500:
                return web.Response(status=failure.status, text="upstream error")
            return self._err(_ERRORS.get(failure.status, "invalid_arguments"))
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return self._err("unknown_method")
        return handler(params)

    def _buttons(self, blocks: list[dict[str, Any]] | None) -> list[list[str]]:
        rows = [b["elements"] for b in blocks or [] if b.get("type") == "actions"]
        self.button_values = [[e["value"] for e in row] for row in rows]
        return [[e["text"]["text"] for e in row] for row in rows]

    # --- Socket Mode ----------------------------------------------------------------------
    def _m_apps_connections_open(self, params) -> web.Response:
        ticket = secrets.token_hex(8)
        self._tickets.add(ticket)
        url = self.base_url.replace("http", "ws", 1) + f"/socket-mode?ticket={ticket}"
        return self._ok(url=url)

    async def _socket(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        if ticket not in self._tickets:
            return web.Response(status=401, text="invalid ticket")
        self._tickets.discard(ticket)  # one use
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if self.sockets:
            self.conflicts += 1
        self.connections += 1
        self.sockets.append((request, ws))
        await ws.send_json({"type": "hello", "num_connections": len(self.sockets)})
        await self._send_pending()
        try:
            async for msg in ws:
                envelope_id = json.loads(msg.data).get("envelope_id")
                if self.unacked.pop(envelope_id, None) is not None:
                    self.acked.append(envelope_id)
        finally:
            self.sockets = [(r, w) for r, w in self.sockets if w is not ws]
        return ws

    async def _send_pending(self) -> None:
        """Every unacknowledged envelope not yet sent on the live socket, in order
        (again, with retry_attempt + 1, when an earlier socket had it)."""
        async with self._sending:
            if not self.sockets:
                return
            request, ws = self.sockets[0]
            for envelope_id, envelope in list(self.unacked.items()):
                if self._sent_on.get(envelope_id) is ws:
                    continue
                if envelope_id in self._sent_on:
                    envelope["retry_attempt"] += 1
                    envelope["retry_reason"] = "timeout"
                self._sent_on[envelope_id] = ws
                if self._drop_next:
                    self._drop_next -= 1
                    self.dropped()
                    assert request.transport is not None
                    request.transport.close()  # cut before it is sent
                    self.sockets = [(r, w) for r, w in self.sockets if w is not ws]
                    return
                try:
                    await ws.send_json(envelope)
                except ConnectionError:
                    return

    async def emit(self, request: WebhookRequest) -> None:
        """The webhook's body as the Socket Mode envelope Slack would send instead."""
        if request.headers.get("Content-Type", "").startswith("application/json"):
            kind, payload = "events_api", json.loads(request.body)
        else:
            form = dict(parse_qsl(request.body.decode()))
            if "payload" in form:
                kind, payload = "interactive", json.loads(form["payload"])
            else:
                kind, payload = "slash_commands", form
        envelope_id = secrets.token_hex(8)
        self.unacked[envelope_id] = {
            "envelope_id": envelope_id,
            "type": kind,
            "payload": payload,
            "accepts_response_payload": kind != "events_api",
            "retry_attempt": 0,
            "retry_reason": "",
        }
        await self._send_pending()

    def drop_next(self) -> None:
        self._drop_next += 1

    async def request_refresh(self) -> None:
        """Slack's `disconnect` (refresh_requested) on the live socket."""
        for _, ws in self.sockets:
            await ws.send_json({"type": "disconnect", "reason": "refresh_requested"})

    def _m_auth_test(self, params) -> web.Response:
        return self._ok(
            url="https://acme.slack.com/",
            team="Acme",
            user="cowork",
            team_id="T0001",
            user_id="U0BOT",
            bot_id="B0001",
        )

    def _m_chat_postMessage(self, params) -> web.Response:
        text = params.get("text") or ""
        if not text and not params.get("blocks"):
            return self._err("no_text")
        if len(text) > 40_000:
            return self._err("msg_too_long")
        posted = self.post(
            params["channel"],
            text,
            thread_id=params.get("thread_ts"),
            buttons=self._buttons(params.get("blocks")),
        )
        posted.message_id = f"1700000000.{int(posted.message_id):06d}"
        return self._ok(
            channel=params["channel"],
            ts=posted.message_id,
            message={"text": text, "ts": posted.message_id},
        )

    def _m_chat_update(self, params) -> web.Response:
        posted = self.edit(params["channel"], params["ts"], params.get("text") or "")
        if posted is None:
            return self._err("message_not_found")
        if "blocks" in params:
            posted.buttons = self._buttons(params["blocks"])
        return self._ok(channel=params["channel"], ts=params["ts"], text=posted.text)

    _NAMES = {"👀": "eyes", "👍": "+1", "🎉": "tada"}  # the names the suite uses

    def reaction_ref(self, emoji: str) -> str:
        return self._NAMES[emoji]

    def _m_reactions_add(self, params) -> web.Response:
        name, channel, ts = params.get("name"), params.get("channel"), params.get("timestamp")
        if not name or not channel or not ts:
            return self._err("invalid_arguments")
        if name not in self._NAMES.values():
            return self._err("invalid_name")
        if (channel, ts, name) in self.reactions:
            return self._err("already_reacted")
        self.reactions.append((channel, ts, name))
        return self._ok()

    def _m_files_getUploadURLExternal(self, params) -> web.Response:
        file_id = "F" + self.new_message_id()
        self.uploads[file_id] = {
            "filename": params["filename"],
            "length": int(params["length"]),
            "content": None,
        }
        return self._ok(upload_url=f"{self.base_url}/upload/{file_id}", file_id=file_id)

    def _m_files_completeUploadExternal(self, params) -> web.Response:
        for item in params["files"]:
            upload = self.uploads.get(item["id"])
            if upload is None or upload["content"] is None:
                return self._err("file_not_found")
            self.post(
                params["channel_id"],
                params.get("initial_comment", ""),
                thread_id=params.get("thread_ts"),
            )
        return self._ok(files=params["files"])

    async def _upload(self, request: web.Request) -> web.Response:
        upload = self.uploads.get(request.match_info["file_id"])
        if upload is None:
            return web.Response(status=404, text="not found")
        form = await request.post()
        upload["content"] = form["file"].file.read()
        self.calls.append(
            ("upload", {"filename": form["file"].filename, "size": len(upload["content"])})
        )
        return web.Response(text=f"OK - {len(upload['content'])}")

    # --- requests Slack would send us ---------------------------------------------------------
    def sign(
        self,
        body: bytes,
        content_type: str,
        *,
        timestamp: float | None = None,
        now: float | None = None,
    ) -> WebhookRequest:
        ts = str(int(timestamp if timestamp is not None else time.time()))
        digest = hmac.new(
            self.signing_secret.encode(), f"v0:{ts}:".encode() + body, hashlib.sha256
        ).hexdigest()
        return webhook_request(
            body,
            {
                "Content-Type": content_type,
                "X-Slack-Request-Timestamp": ts,
                "X-Slack-Signature": f"v0={digest}",
            },
            now=now,
        )

    def signed_event(self, event: dict[str, Any], event_id: str, **kw: Any) -> WebhookRequest:
        body = {
            "token": "legacy",
            "team_id": "T0001",
            "api_app_id": "A0001",
            "type": "event_callback",
            "event_id": event_id,
            "event_time": 1_700_000_000,
            "event": event,
        }
        return self.sign(json.dumps(body).encode(), "application/json", **kw)

    def signed_url_verification(self, challenge: str) -> WebhookRequest:
        return self.sign(
            json.dumps(
                {"token": "legacy", "challenge": challenge, "type": "url_verification"}
            ).encode(),
            "application/json",
        )

    def signed_message(
        self,
        text: str,
        *,
        chat_id: str = "100",
        user_id: str = "7",
        event_id: str = "1",
        thread_id: str | None = None,
        **kw: Any,
    ) -> WebhookRequest:
        if text.startswith("/"):  # Slack turns a typed /command into a slash command POST
            command, _, args = text.partition(" ")
            form = {
                "command": command,
                "text": args,
                "trigger_id": event_id,
                "user_id": user_id,
                "user_name": "ada",
                "channel_id": chat_id,
                "channel_name": "general",
                "team_id": "T0001",
                "response_url": "https://hooks.slack.com/commands/T0001/1/x",
            }
            return self.sign(urlencode(form).encode(), "application/x-www-form-urlencoded", **kw)
        event = {
            "type": "message",
            "channel": chat_id,
            "user": user_id,
            "text": text,
            "ts": f"1700000000.{int(event_id) if event_id.isdigit() else 1:06d}",
            "channel_type": "channel",
            "event_ts": "1700000000.000100",
        }
        if thread_id is not None:
            event["thread_ts"] = thread_id
        return self.signed_event(event, event_id, **kw)

    def signed_button_press(
        self, token: str, *, chat_id: str = "100", user_id: str = "7", event_id: str = "2"
    ) -> WebhookRequest:
        payload = {
            "type": "block_actions",
            "trigger_id": f"trig-{event_id}",
            "user": {"id": user_id, "username": "ada", "name": "Ada"},
            "channel": {"id": chat_id, "name": "general"},
            "container": {
                "type": "message",
                "message_ts": "1700000000.001001",
                "channel_id": chat_id,
            },
            "response_url": "https://hooks.slack.com/actions/T0001/1/x",
            "actions": [
                {
                    "type": "button",
                    "action_id": "cw-0-0",
                    "value": token,
                    "action_ts": "1700000001.000001",
                }
            ],
        }
        return self.sign(
            urlencode({"payload": json.dumps(payload)}).encode(),
            "application/x-www-form-urlencoded",
        )
