"""A fake signal-cli daemon: JSON-RPC 2.0 at `POST /api/v1/rpc` (`receive` in manual
receive mode, `send` to a number or a group with data-URI attachments and
`editTimestamp`, `sendReaction`, `sendTyping`, `version`), errors as JSON-RPC
error objects; failures injected as HTTP statuses (a proxy in front of it)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from channels import WebhookRequest

from ._base import FakePlatform, webhook_request

ACCOUNT = "+15550000000"


class FakeSignal(FakePlatform):
    kind = "signal"
    signs_body = False

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[dict[str, Any]] = []  # envelopes signal-cli holds for `receive`
        self._arrived = asyncio.Event()
        self._receiving: list[web.Request] = []
        self._drop_next = 0
        self._timestamp = 1_700_000_000_000

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/api/v1/rpc", self._rpc)]

    def instance_settings(self) -> dict[str, Any]:
        return {"apiBase": self.base_url, "allowLoopbackHttp": True, "account": ACCOUNT}

    def transport_settings(self) -> dict[str, Any]:
        return {**self.instance_settings(), "pollTimeoutSeconds": 1}

    def instance_secrets(self) -> dict[str, str]:
        return {}

    def chat_ref(self, chat_id: str) -> str:
        """The suite's chats are groups (a direct chat is the user's number)."""
        return f"group.g{chat_id}"

    def user_ref(self, user_id: str) -> str:
        return f"+1555{int(user_id):07d}"

    def event_ref(self, event_id: str) -> str:
        return f"{self.user_ref('7')}:{1_600_000_000_000 + int(event_id)}"

    # --- JSON-RPC -----------------------------------------------------------------------------
    async def _rpc(self, request: web.Request) -> web.StreamResponse:
        call = await request.json()
        method, params, call_id = call.get("method"), call.get("params") or {}, call.get("id")
        self.calls.append((method, params))
        failure = self.injected()
        if failure is not None:
            headers = (
                {"Retry-After": str(int(failure.retry_after or 1))} if failure.retry_after else {}
            )
            return web.json_response({"error": "injected"}, status=failure.status, headers=headers)
        if params.get("account") != ACCOUNT:
            return self._error(call_id, -1, "Specified account does not exist")
        if method == "receive":
            return await self._receive(request, call_id, params)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return self._error(call_id, -32601, "Method not implemented")
        result = handler(params)
        if isinstance(result, web.Response):
            return result
        return web.json_response({"jsonrpc": "2.0", "result": result, "id": call_id})

    @staticmethod
    def _error(call_id: Any, code: int, message: str) -> web.Response:
        body = {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": call_id}
        return web.json_response(body)

    def _chat(self, params: dict[str, Any]) -> str:
        if params.get("groupId"):
            return "group." + params["groupId"]
        return params["recipient"][0]

    def _m_version(self, params) -> dict[str, Any]:
        return {"version": "0.13.4"}

    def _m_send(self, params) -> Any:
        chat = self._chat(params)
        edit = params.get("editTimestamp")
        if edit is not None:
            if self.edit(chat, str(edit), params["message"]) is None:
                return self._error(None, -1, "Failed to send message: unknown target")
            self._timestamp += 1
            return {"timestamp": self._timestamp}
        attachments = params.get("attachments") or []
        if not params.get("message") and not attachments:
            return self._error(None, -1, "No message given")
        for uri in attachments:
            if not uri.startswith("data:") or ";base64," not in uri:
                return self._error(None, -1, "Invalid attachment")
        self._timestamp += 1
        posted = self.post(chat, params.get("message") or "")
        posted.message_id = str(self._timestamp)
        names = [uri.split("filename=")[1].split(";")[0] for uri in attachments]
        if names:
            self.calls.append(("attachment", {"filenames": names}))
        return {"timestamp": self._timestamp}

    def _m_sendReaction(self, params) -> dict[str, Any]:
        # Signal: one reaction per sender and message; a new one replaces it.
        chat, message = self._chat(params), str(params["targetTimestamp"])
        self.reactions = [r for r in self.reactions if r[:2] != (chat, message)]
        self.reactions.append((chat, message, params["emoji"]))
        return {"timestamp": self._timestamp}

    def _m_sendTyping(self, params) -> dict[str, Any]:
        self.typing.append(self._chat(params))
        return {}

    async def _receive(self, request: web.Request, call_id: Any, params) -> web.StreamResponse:
        live = [
            r for r in self._receiving if r.transport is not None and not r.transport.is_closing()
        ]
        if live:
            self.conflicts += 1
        self._receiving.append(request)
        try:
            if not self.queue:
                self._arrived.clear()
                try:
                    async with asyncio.timeout(float(params.get("timeout") or 0)):
                        await self._arrived.wait()
                except TimeoutError:
                    pass
        finally:
            self._receiving.remove(request)
        if self.queue and self._drop_next:
            self._drop_next -= 1
            self.dropped()
            assert request.transport is not None
            request.transport.close()  # the poll dies before signal-cli hands anything over
            return web.Response(status=500)
        if request.transport is None or request.transport.is_closing():
            return web.Response(status=499)  # its caller went away: keep the envelopes
        batch, self.queue = self.queue, []
        return web.json_response({"jsonrpc": "2.0", "result": batch, "id": call_id})

    # --- what signal-cli would hand over ------------------------------------------------------
    def signed_message(
        self,
        text: str,
        *,
        chat_id: str = "100",
        user_id: str = "7",
        event_id: str = "1",
        thread_id: str | None = None,
    ) -> WebhookRequest:
        """One envelope as `receive` returns it (a direct message when the chat is the
        user, else a group message); nothing to sign."""
        source = self.user_ref(user_id)
        message: dict[str, Any] = {
            "timestamp": 1_600_000_000_000 + int(event_id),
            "message": text,
        }
        if chat_id != user_id:
            message["groupInfo"] = {"groupId": f"g{chat_id}", "type": "DELIVER"}
        envelope = {
            "envelope": {
                "source": source,
                "sourceNumber": source,
                "sourceName": "Ada",
                "timestamp": message["timestamp"],
                "dataMessage": message,
            },
            "account": ACCOUNT,
        }
        return webhook_request(json.dumps(envelope).encode(), {"Content-Type": "application/json"})

    async def emit(self, request: WebhookRequest) -> None:
        self.queue.append(json.loads(request.body))
        self._arrived.set()

    def drop_next(self) -> None:
        self._drop_next += 1
