"""What an instance has sent, by delivery id, and how one delivery is sent
given that record.

The ledger makes a re-served delivery a no-op, lets a retried chunked delivery
resume after the chunks already sent, and lets an edit find the message(s) a
delivery produced and the text they show. In memory it is bounded (least
recently used first out) and outlives an instance's restart with a new revision
(the runtime keeps one per instance id). A completed delivery is also written
to the durable store (`durable`, a JetStream KV bucket: _sent_store.py) before
its receipt, and a memory miss consults it, so a process restart does not
resend a delivery that went out. Only a chunked delivery interrupted midway is
memory-only: after a crash its remaining chunks (and the sent ones) go again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from schemas import ChannelOutbound, DeliveryType

from .._chunking import chunk_text
from .._provider import Capabilities, DeliveryFailed
from ._sent_store import SentStore


@dataclass
class Sent:
    """One delivery's messages on the platform, in order, as [provider id, text shown];
    `text` is the whole text they represent (what an edit's suffix is measured from)."""

    parts: list[list[Any]] = field(default_factory=list)
    text: str = ""
    complete: bool = False

    @property
    def message_ids(self) -> list[str]:
        return [mid for mid, _ in self.parts if mid]


class Ledger:
    def __init__(self, max_entries: int = 10_000) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, Sent] = OrderedDict()
        self._by_message: dict[str, str] = {}  # provider message id -> delivery id
        self.durable: SentStore | None = None  # set by the delivery worker that runs

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, delivery_id: str) -> Sent | None:
        entry = self._entries.get(delivery_id)
        if entry is not None:
            self._entries.move_to_end(delivery_id)
        return entry

    def open(self, delivery_id: str) -> Sent:
        """The entry for a delivery being sent, created when new."""
        entry = self.get(delivery_id)
        if entry is None:
            entry = self._entries[delivery_id] = Sent()
            while len(self._entries) > self._max:
                _, dropped = self._entries.popitem(last=False)
                for mid in dropped.message_ids:
                    if self._by_message.get(mid) is not None:
                        del self._by_message[mid]
        return entry

    def record(
        self, delivery_id: str, entry: Sent, message_id: str | None, text: str | None
    ) -> None:
        """One more message of `delivery_id` is on the platform."""
        entry.parts.append([message_id, text])
        if message_id:
            self._by_message[message_id] = delivery_id

    def delivery_of(self, message_id: str) -> str | None:
        return self._by_message.get(message_id)

    async def recall(self, delivery_id: str) -> Sent | None:
        """The entry from memory, else from the durable store (then kept in memory)."""
        entry = self.get(delivery_id)
        if entry is not None or self.durable is None:
            return entry
        record = await self.durable.get(delivery_id)
        if record is None or self.get(delivery_id) is not None:  # sent meanwhile: memory wins
            return self.get(delivery_id)
        entry = self.open(delivery_id)
        for mid, text in record.parts:
            self.record(delivery_id, entry, mid, text)
        entry.text, entry.complete = record.text, record.complete
        return entry

    async def load(self, delivery_id: str) -> Sent:
        """recall(), or a new entry."""
        return await self.recall(delivery_id) or self.open(delivery_id)

    async def persist(self, *delivery_ids: str) -> None:
        """Write these entries to the durable store (best effort: see SentStore)."""
        if self.durable is None:
            return
        for delivery_id in dict.fromkeys(delivery_ids):
            entry = self.get(delivery_id)
            if entry is not None:
                await self.durable.put(delivery_id, entry)


async def perform(
    provider: Any, caps: Capabilities, ledger: Ledger, d: ChannelOutbound
) -> list[str]:
    """Send one delivery (resuming a partly sent one); the provider message ids it
    produced. Raises what provider.send raises; progress is kept in the ledger, and
    the outcome is durable (as far as the store is reachable) when this returns."""
    entry = await ledger.load(d.delivery_id)
    edited: str | None = None
    if d.type is DeliveryType.EDIT:
        edited = await _edit(provider, caps, ledger, d, entry)
    elif d.text and len(d.text) > caps.max_text_length:
        await _send_chunks(
            provider,
            ledger,
            d,
            entry,
            d.delivery_id,
            entry,
            chunk_text(d.text, caps.max_text_length),
            len(entry.parts),
        )
    elif not entry.parts:
        result = await provider.send(d)
        ledger.record(d.delivery_id, entry, result.provider_message_id, d.text or "")
    entry.text = d.text or ""
    entry.complete = True
    await ledger.persist(d.delivery_id, *([edited] if edited else []))
    return entry.message_ids


async def _send_chunks(
    provider: Any,
    ledger: Ledger,
    d: ChannelOutbound,
    progress: Sent,
    owner_id: str,
    owner: Sent,
    chunks: list[str],
    start: int,
) -> None:
    """Send `chunks[start:]` as new messages in order (a retry resumes past those
    already sent); each is recorded as a message of `owner`, and in `progress`."""
    last = len(chunks) - 1
    for n in range(start, len(chunks)):
        part = d.model_copy(
            update={
                "type": d.type
                if n == last and d.type is not DeliveryType.EDIT
                else DeliveryType.TEXT,
                "text": chunks[n],
                "idempotency_key": f"{d.delivery_id}:chunk:{n}",
                "edit_message_id": None,
                "edit_of_delivery_id": None,
                "buttons": d.buttons if n == last else None,
                "reply_to_message_id": d.reply_to_message_id if n == 0 else None,
            }
        )
        result = await provider.send(part)
        ledger.record(owner_id, owner, result.provider_message_id, chunks[n])
        if progress is not owner:
            progress.parts.append([result.provider_message_id, chunks[n]])


async def _edit(
    provider: Any, caps: Capabilities, ledger: Ledger, d: ChannelOutbound, entry: Sent
) -> str:
    """Apply an edit; the delivery id whose record it changed (the original's)."""
    text = d.text or ""
    limit = caps.max_text_length
    original_id = d.edit_of_delivery_id
    if original_id is None and d.edit_message_id:
        # an edit by provider id of a message we did not send as a delivery we know:
        # keep its own record so later edits of it see what it shows
        original_id = ledger.delivery_of(d.edit_message_id) or f"msg:{d.edit_message_id}"
    if original_id is None:
        raise DeliveryFailed(
            "an edit names neither editMessageId nor editOfDeliveryId",
            code="delivery.invalid",
            permanent=True,
        )
    original = await ledger.load(original_id)
    if d.edit_message_id and not original.parts:
        ledger.record(original_id, original, d.edit_message_id, None)  # text unknown
    target = d.edit_message_id or (original.message_ids[0] if original.message_ids else None)
    if caps.edit and target:
        chunks = [text] if len(text) <= limit else chunk_text(text, limit)
        start = next((i for i, (mid, _) in enumerate(original.parts) if mid == target), 0)
        existing = original.parts[start:]
        for n, chunk in enumerate(chunks[: len(existing)]):
            part = existing[n]
            if part[1] != chunk:
                await provider.send(
                    d.model_copy(
                        update={
                            "text": chunk,
                            "edit_message_id": part[0],
                            "edit_of_delivery_id": None,
                            "idempotency_key": d.idempotency_key
                            if n == 0
                            else f"{d.delivery_id}:chunk:{n}",
                        }
                    )
                )
                part[1] = chunk
            if not any(p[0] == part[0] for p in entry.parts):
                entry.parts.append([part[0], chunk])
        if len(chunks) > len(existing):
            # overflow messages join the original, so a retry finds them in `existing`
            await _send_chunks(
                provider, ledger, d, entry, original_id, original, chunks[len(existing) :], 0
            )
        original.text = text
        return original_id
    # No editing here (or nothing to edit): only text beyond what was shown goes out.
    shown = original.text
    suffix = text[len(shown) :] if len(text) > len(shown) else ""
    if suffix.strip():
        # `original.text` moves only when all are out, so a retry skips what `entry` has
        await _send_chunks(
            provider,
            ledger,
            d,
            entry,
            original_id,
            original,
            chunk_text(suffix, limit),
            len(entry.parts),
        )
    original.text = text if suffix.strip() else shown
    return original_id
