"""Telegram inbound by long polling: `getUpdates` instead of a webhook.

https://core.telegram.org/bots/api#getupdates: an update is confirmed by the
next call with `offset` above its `update_id`; unconfirmed updates are kept
(24 h) and returned again. So the offset is stored as the cursor only after
the updates before it are stored durably, and only then asked with: a crash in
between fetches them again, and their keyed dedupe ids make them one message.
Each update is parsed by the provider's webhook parser, unchanged.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import httpx

from .._provider import ChannelError, WebhookResult
from .._transport import TransportSink, transport_request
from ._telegram import TelegramProvider


class TelegramPolling:
    name: ClassVar[str] = "telegram-polling"

    def __init__(self, provider: Any, http: httpx.AsyncClient) -> None:
        self.provider: TelegramProvider = provider
        self._webhook_cleared = False

    async def run(self, sink: TransportSink) -> None:
        provider = self.provider
        if not self._webhook_cleared:
            await provider.stop_webhook()
            self._webhook_cleared = True
        offset = int(sink.cursor) if sink.cursor and sink.cursor.isdigit() else None
        sink.report("long polling getUpdates", connected=True)
        while True:
            updates = await provider.poll(offset, provider.settings.poll_timeout_seconds)
            result, offset = self._batch(sink, updates, offset)
            await sink.accept(result, None if offset is None else str(offset))

    def _batch(
        self, sink: TransportSink, updates: list[Any], offset: int | None
    ) -> tuple[WebhookResult, int | None]:
        """The batch's messages, in order, and the offset past it."""
        result = WebhookResult()
        for update in updates:
            update_id = update.get("update_id") if isinstance(update, dict) else None
            if not isinstance(update_id, int) or isinstance(update_id, bool):
                sink.refused("telegram: an update without an update_id")
                continue
            offset = max(offset or 0, update_id + 1)
            body = json.dumps(update).encode()
            if len(body) > sink.body_limit:
                sink.refused(f"telegram update {update_id}: larger than the body limit")
                continue
            try:
                parsed = self.provider.parse(transport_request(body))
            except ChannelError as exc:
                sink.refused(f"telegram update {update_id}: {exc.message}")
                continue
            result.messages.extend(parsed.messages)
        return result, offset
