"""A fake Telegram Bot API: `POST /bot<token>/<method>`, `{"ok": ..., "result": ...}`."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import secrets
from typing import Any

from aiohttp import web

from channels import WebhookRequest

from ._base import FakePlatform, webhook_request

# Some of the emoji Telegram allows as reactions (its list is fixed; ✅ is not on it).
REACTION_EMOJI = {"👀", "👍", "👎", "❤", "🔥", "🎉", "🙏", "👌", "🤔", "💯"}


class FakeTelegram(FakePlatform):
    kind = "telegram"
    authenticates_api = True
    signs_body = False  # the secret-token header does not cover the body

    def __init__(self) -> None:
        super().__init__()
        self.bot_token = f"{secrets.randbelow(10**9)}:{secrets.token_urlsafe(24)}"
        self.webhook_secret = secrets.token_urlsafe(24)
        self.bot_username = "cowork_test_bot"
        # getUpdates (long polling): updates not yet confirmed by an offset past them
        self.pending: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self.polls: list[dict[str, Any]] = []  # getUpdates parameters, in order
        self._poller: tuple[web.Request, asyncio.Event] | None = None  # the poll in flight
        self.conflicts = 0  # a second concurrent getUpdates (Telegram answers 409)
        self.webhook_deleted = 0
        self._drop_next = 0  # batches cut off (connection closed) before their answer

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/bot{token}/{method}", self._api)]

    def instance_settings(self) -> dict[str, Any]:
        return {
            "apiBase": self.base_url,
            "allowLoopbackHttp": True,
            "botUsername": self.bot_username,
        }

    def instance_secrets(self) -> dict[str, str]:
        return {"botToken": self.bot_token, "webhookSecret": self.webhook_secret}

    # --- the API ------------------------------------------------------------------------
    @staticmethod
    def _error(status: int, description: str, retry_after: float | None = None) -> web.Response:
        body: dict[str, Any] = {"ok": False, "error_code": status, "description": description}
        if retry_after is not None:
            body["parameters"] = {"retry_after": int(retry_after)}
        return web.json_response(body, status=status)

    async def _api(self, request: web.Request) -> web.Response:
        if not hmac.compare_digest(request.match_info["token"], self.bot_token):
            return self._error(401, "Unauthorized")
        method = request.match_info["method"]
        if request.content_type == "application/json":
            params = await request.json()
        else:  # multipart (sendDocument) or form
            params = {}
            form = await request.post()
            for key, value in form.items():
                params[key] = (
                    {
                        "filename": value.filename,
                        "size": len(value.file.read()),
                        "content_type": value.content_type,
                    }
                    if hasattr(value, "file")
                    else value
                )
        self.calls.append((method, params))
        failure = self.injected()
        if failure is not None:
            if failure.status == 429:
                return self._error(
                    429,
                    f"Too Many Requests: retry after {failure.retry_after}",
                    failure.retry_after,
                )
            return self._error(
                failure.status,
                "Bad Request: injected failure"
                if failure.status < 500
                else "Internal Server Error",
            )
        if method == "getUpdates":
            return await self._get_updates(request, params)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return self._error(404, "Not Found: method not found")
        answer = handler(params)
        return await answer if inspect.isawaitable(answer) else answer

    # --- long polling (https://core.telegram.org/bots/api#getupdates) --------------------
    def queue_update(self, request: WebhookRequest) -> None:
        """What the webhook request would carry, delivered by getUpdates instead."""
        self.pending.append(json.loads(request.body))
        self._arrived.set()

    async def emit(self, request: WebhookRequest) -> None:
        self.queue_update(request)

    def drop_next(self) -> None:
        """The next getUpdates with updates closes the connection unanswered."""
        self._drop_next += 1

    async def _get_updates(self, request: web.Request, params: dict[str, Any]) -> web.Response:
        """Long poll. As Telegram does, a second getUpdates ends the one in flight with
        409; counted as a conflict when that one's client was still listening (two
        live pollers: what the transport lease must prevent)."""
        self.polls.append(params)
        previous = self._poller
        if previous is not None:
            old_request, terminated = previous
            transport = old_request.transport
            if transport is not None and not transport.is_closing():
                self.conflicts += 1
            terminated.set()
        terminated = asyncio.Event()
        self._poller = (request, terminated)
        offset = params.get("offset")
        if isinstance(offset, int):  # confirms every update below it
            self.pending = [u for u in self.pending if u["update_id"] >= offset]
        try:
            if not self.pending:
                self._arrived.clear()
                waits = [asyncio.ensure_future(e.wait()) for e in (self._arrived, terminated)]
                await asyncio.wait(
                    waits,
                    timeout=float(params.get("timeout") or 0),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for waiting in waits:
                    waiting.cancel()
            if terminated.is_set():
                return self._error(409, "Conflict: terminated by other getUpdates request")
            batch = list(self.pending[:100])
        finally:
            if self._poller is not None and self._poller[1] is terminated:
                self._poller = None
        if batch and self._drop_next:
            self._drop_next -= 1
            self.dropped()
            assert request.transport is not None
            request.transport.close()  # mid-stream: the client never sees this batch
            return web.Response(status=500)
        return self._ok(batch)

    def _m_deleteWebhook(self, params) -> web.Response:
        self.webhook_deleted += 1
        return self._ok(True)

    @staticmethod
    def _ok(result: Any) -> web.Response:
        return web.json_response({"ok": True, "result": result})

    def _message(self, posted, params) -> dict[str, Any]:
        return {
            "message_id": int(posted.message_id),
            "date": 0,
            "text": posted.text,
            "chat": {"id": params["chat_id"], "type": "private"},
        }

    def _m_getMe(self, params) -> web.Response:
        return self._ok(
            {
                "id": int(self.bot_token.split(":")[0]),
                "is_bot": True,
                "first_name": "Cowork",
                "username": self.bot_username,
            }
        )

    def _m_sendMessage(self, params) -> web.Response:
        if not params.get("text"):
            return self._error(400, "Bad Request: message text is empty")
        if len(params["text"]) > 4096:
            return self._error(400, "Bad Request: message is too long")
        keyboard = (params.get("reply_markup") or {}).get("inline_keyboard") or []
        for row in keyboard:
            for button in row:
                if not 1 <= len(button["callback_data"].encode()) <= 64:
                    return self._error(400, "Bad Request: BUTTON_DATA_INVALID")
        thread = params.get("message_thread_id")
        posted = self.post(
            str(params["chat_id"]),
            params["text"],
            thread_id=None if thread is None else str(thread),
            buttons=[[b["text"] for b in row] for row in keyboard],
        )
        return self._ok(self._message(posted, params))

    def _m_editMessageText(self, params) -> web.Response:
        chat = str(params["chat_id"])
        current = next(
            (m for m in self.chats.get(chat, []) if m.message_id == str(params["message_id"])), None
        )
        if current is None:
            return self._error(400, "Bad Request: message to edit not found")
        if current.text == params["text"]:
            return self._error(400, "Bad Request: message is not modified")
        posted = self.edit(chat, str(params["message_id"]), params["text"])
        keyboard = (params.get("reply_markup") or {}).get("inline_keyboard")
        if keyboard is not None:
            posted.buttons = [[b["text"] for b in row] for row in keyboard]
        return self._ok(self._message(posted, params))

    def _m_sendChatAction(self, params) -> web.Response:
        self.typing.append(str(params["chat_id"]))
        return self._ok(True)

    def _m_setMessageReaction(self, params) -> web.Response:
        reaction = params.get("reaction")
        if not isinstance(reaction, list) or any(
            r.get("type") != "emoji" or r.get("emoji") not in REACTION_EMOJI for r in reaction
        ):
            return self._error(400, "Bad Request: REACTION_INVALID")
        chat, message = str(params["chat_id"]), str(params["message_id"])
        # setMessageReaction sets the bot's reactions on the message (replacing them)
        self.reactions = [r for r in self.reactions if r[:2] != (chat, message)]
        self.reactions.extend((chat, message, r["emoji"]) for r in reaction)
        return self._ok(True)

    def _m_answerCallbackQuery(self, params) -> web.Response:
        self.answered.append(str(params["callback_query_id"]))
        return self._ok(True)

    def _m_sendDocument(self, params) -> web.Response:
        document = params.get("document")
        if not isinstance(document, dict):
            return self._error(400, "Bad Request: there is no document in the request")
        posted = self.post(str(params["chat_id"]), params.get("caption", ""))
        return self._ok(
            {
                **self._message(posted, params),
                "document": {
                    "file_id": "F" + posted.message_id,
                    "file_name": document["filename"],
                    "file_size": document["size"],
                },
            }
        )

    # --- requests Telegram would send us ------------------------------------------------------
    def _signed(self, update: dict[str, Any]) -> WebhookRequest:
        return webhook_request(
            json.dumps(update).encode(),
            {
                "Content-Type": "application/json",
                "X-Telegram-Bot-Api-Secret-Token": self.webhook_secret,
            },
        )

    @staticmethod
    def _update_id(event_id: str) -> int:
        return int(event_id) if event_id.isdigit() else int.from_bytes(event_id.encode()[:6])

    def signed_message(
        self,
        text: str,
        *,
        chat_id: str = "100",
        user_id: str = "7",
        event_id: str = "1",
        thread_id: str | None = None,
    ) -> WebhookRequest:
        message: dict[str, Any] = {
            "message_id": 500 + self._update_id(event_id),
            "date": 1_700_000_000,
            "chat": {"id": int(chat_id), "type": "private" if chat_id == user_id else "supergroup"},
            "from": {
                "id": int(user_id),
                "is_bot": False,
                "first_name": "Ada",
                "last_name": "Lovelace",
                "username": "ada",
            },
            "text": text,
        }
        if thread_id is not None:
            message.update(message_thread_id=int(thread_id), is_topic_message=True)
        return self._signed({"update_id": self._update_id(event_id), "message": message})

    def signed_button_press(
        self, token: str, *, chat_id: str = "100", user_id: str = "7", event_id: str = "2"
    ) -> WebhookRequest:
        return self._signed(
            {
                "update_id": self._update_id(event_id),
                "callback_query": {
                    "id": f"cbq{event_id}",
                    "chat_instance": "1",
                    "data": token,
                    "from": {
                        "id": int(user_id),
                        "is_bot": False,
                        "first_name": "Ada",
                        "username": "ada",
                    },
                    "message": {
                        "message_id": 900,
                        "date": 1_700_000_000,
                        "chat": {"id": int(chat_id), "type": "supergroup"},
                        "text": "Approve?",
                    },
                },
            }
        )
