"""Pure rendering: session events -> what one chat should be sent. No I/O.

`ChatRender` is one binding's view of its session, advanced event by event. The
text of an assistant text part lives in numbered *slots* (one chat message each,
key `<part>#<n>`): the first text sends a message, later text edits it with the
full current text (throttled), and text past the platform's limit finishes the
slot and continues in the next. Platforms without edits get only completed
paragraphs and the final suffix, never the same text twice. Tool parts are one
slot each (`<part>#tool`), edited as their state changes. Slots are persisted
by the renderer between batches (and restarts) together with the cursor.

Delivery ids come from `ids(*parts)` (deterministic), so rendering the same
events from the same persisted state again yields the same deliveries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from channels import Capabilities

from ._render_items import (
    Approval,
    error_text,
    permission_approval,
    question_approval,
    tool_line,
)

EDIT_INTERVAL = 1.0  # seconds between edits of one message (platform edit limits)
TYPING_INTERVAL = 4.0  # seconds between typing indicators of one chat
MAX_DELIVERY_TEXT = 16_000  # ChannelOutbound.text allows 16384
_BREAK_FROM = 0.65  # only break at a separator past 65% of the window


@dataclass
class Slot:
    key: str
    delivery_id: str | None = None
    text: str = ""  # the slot's full current text
    sent_text: str = ""  # what the chat shows (edit platforms) or has been sent (others)
    finished: bool = False
    sent_at: float | None = None
    changed: bool = False  # to be persisted


@dataclass
class Op:
    """One delivery to make. `approval` ops get their tokens from the renderer."""

    type: str  # text | edit | typing | buttons
    delivery_id: str
    text: str | None = None
    edit_of: str | None = None
    approval: Approval | None = None


@dataclass
class RenderMemory:
    """What the renderer remembers between batches without persisting it: message
    roles and part types (to tell assistant text from the user's own prompt and
    text deltas from reasoning deltas) and when each chat last saw typing."""

    roles: dict[str, str] = field(default_factory=dict)
    part_types: dict[str, str] = field(default_factory=dict)
    typing_at: dict[str, float] = field(default_factory=dict)

    def trim(self, limit: int = 20_000) -> None:
        for table in (self.roles, self.part_types, self.typing_at):
            while len(table) > limit:
                table.pop(next(iter(table)))


def text_limit(caps: Capabilities) -> int:
    return max(64, min(caps.max_text_length or MAX_DELIVERY_TEXT, MAX_DELIVERY_TEXT))


def break_point(text: str, limit: int) -> int:
    """Where to end a chunk of at most `limit` characters: after a paragraph, line
    or word break in the last 35% of the window, else exactly at the limit."""
    if len(text) <= limit:
        return len(text)
    floor = int(limit * _BREAK_FROM)
    for sep in ("\n\n", "\n", " "):
        at = text.rfind(sep, floor, limit)
        if at > 0:
            return at + len(sep)
    return limit


def opencode_event(row_type: str, payload: Any) -> dict | None:
    """The OpenCode event inside a workspace event (Desktop relay or edge work)."""
    if not isinstance(payload, dict):
        return None
    if row_type == "work.event":
        payload = payload.get("body")
    elif row_type != "session.event":
        return None
    if not isinstance(payload, dict):
        return None
    inner = payload.get("payload")  # the global event stream wraps the event
    if isinstance(inner, dict) and isinstance(inner.get("type"), str):
        payload = inner
    if not isinstance(payload.get("type"), str) or not isinstance(payload.get("properties"), dict):
        return None
    return payload


class ChatRender:
    """One binding's chat, advanced by events; `ops` collects what to deliver."""

    def __init__(
        self,
        caps: Capabilities,
        slots: dict[str, Slot],
        memory: RenderMemory,
        ids: Callable[..., str],
        *,
        binding_id: str,
        now: float,
    ) -> None:
        self.caps, self.slots, self.memory, self.ids = caps, slots, memory, ids
        self.binding_id, self.now = binding_id, now
        self.limit = text_limit(caps)
        self.ops: list[Op] = []

    # --- events -------------------------------------------------------------------------------
    def apply(self, event: dict, sequence: int, scope: str = "") -> None:
        """One OpenCode event. `scope` prefixes slot keys (edge work: `w.<work>.`)."""
        kind, props = event["type"], event["properties"]
        if kind == "message.updated":
            info = props.get("info")
            if isinstance(info, dict) and isinstance(info.get("id"), str):
                self.memory.roles[info["id"]] = str(info.get("role"))
        elif kind == "message.part.updated" and isinstance(props.get("part"), dict):
            self._part(props["part"], scope)
        elif kind == "message.part.delta":
            self._delta(props, scope)
        elif kind == "session.status":
            status = props.get("status")
            state = status.get("type") if isinstance(status, dict) else None
            if state == "busy":
                self.typing(sequence)
            elif state == "idle":
                self.finish_all()
        elif kind == "session.idle":
            self.finish_all()
        elif kind == "session.error":
            self.finish_all()
            if not scope:  # edge work: its `fail` output says it once, in words
                self.notice(sequence, "error", f"⚠️ Session error: {error_text(props.get('error'))}")
        elif kind in ("permission.asked", "question.asked") and scope:
            return  # Cloud edge work refuses approvals itself: nobody could answer them
        elif kind == "permission.asked":
            self._approval(permission_approval(props))
        elif kind == "question.asked":
            self._approval(question_approval(props))

    def _part(self, part: dict, scope: str) -> None:
        part_id, ptype = part.get("id"), part.get("type")
        if not isinstance(part_id, str) or not isinstance(ptype, str):
            return
        self.memory.part_types[part_id] = ptype
        if ptype == "text" and self._is_assistant_text(part):
            ended = isinstance(part.get("time"), dict) and part["time"].get("end") is not None
            self.set_text(scope + part_id, str(part.get("text") or ""), final=ended)
        elif ptype == "tool":
            self._tool(scope + part_id, part)

    def _is_assistant_text(self, part: dict) -> bool:
        if part.get("synthetic") or part.get("ignored"):
            return False
        role = self.memory.roles.get(str(part.get("messageID")))
        if role is not None:
            return role == "assistant"
        # Role unknown (restarted mid-message): the user's prompt parts carry no time.
        return isinstance(part.get("time"), dict)

    def _delta(self, props: dict, scope: str) -> None:
        part_id, delta = props.get("partID"), props.get("delta")
        if (
            props.get("field") != "text"
            or not isinstance(part_id, str)
            or not isinstance(delta, str)
        ):
            return
        base = scope + part_id
        known = self.memory.part_types.get(part_id)
        if known != "text" and not (known is None and self._text_slots(base)):
            return  # reasoning, or a part we know nothing of: its final update renders it
        if self.memory.roles.get(str(props.get("messageID"))) == "user":
            return
        self.set_text(base, self.part_text(base) + delta, final=False)

    # --- streamed text ------------------------------------------------------------------------
    def _text_slots(self, base: str) -> list[Slot]:
        found = [
            s
            for k, s in self.slots.items()
            if k.startswith(base + "#") and k[len(base) + 1 :].isdigit()
        ]
        return sorted(found, key=lambda s: int(s.key.rsplit("#", 1)[1]))

    def part_text(self, base: str) -> str:
        return "".join(s.text for s in self._text_slots(base))

    def set_text(self, base: str, full: str, *, final: bool) -> None:
        slots = self._text_slots(base)
        offset = sum(len(s.text) for s in slots if s.finished)
        rest = full[offset:]
        current = next((s for s in slots if not s.finished), None)
        number = len(slots) if current is None else int(current.key.rsplit("#", 1)[1])
        while True:
            if current is None:
                if not rest:
                    return
                current = self.slots.setdefault(f"{base}#{number}", Slot(f"{base}#{number}"))
            cut = break_point(rest, self.limit)
            overflow = cut < len(rest)
            if current.text != rest[:cut] or overflow or final:
                current.text, current.changed = rest[:cut], True
            if overflow or final:
                current.finished = True
                self._emit(current)  # open slots wait for flush(): one edit per batch
            if not overflow:
                return
            rest, number, current = rest[cut:], number + 1, None

    def finish_all(self) -> None:
        """The turn is over: every open slot gets its final edit/suffix."""
        for slot in list(self.slots.values()):
            if not slot.finished:
                slot.finished = slot.changed = True
                self._emit(slot)

    def flush(self) -> None:
        """Throttled edits that are now due (called after a batch and by the sweep)."""
        for slot in list(self.slots.values()):
            if not slot.finished and slot.text != slot.sent_text:
                self._emit(slot)

    def _emit(self, slot: Slot) -> None:
        if self.caps.edit:
            self._emit_edit(slot)
        else:
            self._emit_append(slot)

    def _emit_edit(self, slot: Slot) -> None:
        if slot.delivery_id is None:
            if not slot.text.strip():
                return
            # The content is part of the id: a batch rendered again after a crash may
            # hold more text than the first attempt sent, and must not be dropped as
            # a duplicate of it (it then arrives as a second, complete message).
            slot.delivery_id = self.ids("text", slot.key, slot.text)
            self._sent(slot, Op("text", slot.delivery_id, text=slot.text), slot.text)
            return
        if slot.text == slot.sent_text or not slot.text.strip():
            return
        due = slot.sent_at is None or self.now - slot.sent_at >= EDIT_INTERVAL
        if slot.finished or due:
            self._sent(
                slot,
                Op(
                    "edit",
                    self.ids("edit", slot.key, slot.text),
                    text=slot.text,
                    edit_of=slot.delivery_id,
                ),
                slot.text,
            )

    def _emit_append(self, slot: Slot) -> None:
        """No edits: send what is new since the last send, whole paragraphs only
        until the slot is finished."""
        if not slot.text.startswith(slot.sent_text):
            return  # the text was rewritten after we sent it: never send it twice
        if slot.finished:
            end = len(slot.text)
        elif slot.key.endswith("#tool"):
            end = 0  # tool progress without edits: only the final state
        else:
            paragraph = slot.text.rfind("\n\n")
            end = paragraph + 2 if paragraph >= 0 else 0
        fresh = slot.text[len(slot.sent_text) : end] if end > len(slot.sent_text) else ""
        if not fresh.strip():
            return
        op = Op(
            "text", self.ids("append", slot.key, len(slot.sent_text), fresh), text=fresh.strip()
        )
        slot.delivery_id = slot.delivery_id or op.delivery_id
        self._sent(slot, op, slot.text[:end])

    def _sent(self, slot: Slot, op: Op, shown: str) -> None:
        self.ops.append(op)
        slot.sent_text, slot.sent_at, slot.changed = shown, self.now, True

    # --- tools, typing, notices, approvals ----------------------------------------------------
    def _tool(self, base: str, part: dict) -> None:
        line = tool_line(part)
        if line is None:
            return
        text, done = line
        slot = self.slots.setdefault(base + "#tool", Slot(base + "#tool"))
        if slot.finished:
            return
        if slot.text == text and not done:
            return
        self.flush()  # text streamed before the tool call shows above it
        slot.text, slot.changed = text, True
        if done:
            slot.finished = True
        if self.caps.edit and slot.delivery_id is not None:
            slot.sent_at = None  # a tool's state change is not throttled
        self._emit(slot)

    def typing(self, sequence: int) -> None:
        if not self.caps.typing:
            return
        last = self.memory.typing_at.get(self.binding_id)
        if last is not None and self.now - last < TYPING_INTERVAL:
            return
        self.memory.typing_at[self.binding_id] = self.now
        self.ops.append(Op("typing", self.ids("typing", sequence)))

    def notice(self, sequence: int, what: str, text: str) -> None:
        self.flush()
        self.ops.append(Op("text", self.ids(what, sequence), text=text[: self.limit]))

    def _approval(self, approval: Approval | None) -> None:
        if approval is not None:
            self.flush()
            self.ops.append(
                Op("buttons", self.ids("approval", approval.request_id), approval=approval)
            )
