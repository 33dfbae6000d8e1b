"""Pure rendering of real OpenCode event captures into chat operations."""

from __future__ import annotations

import copy
import json

from opencode_env import CAPTURES_DIR

from channels import ButtonLimits, Capabilities
from hub.channels._outbox import delivery_id
from hub.channels._render_items import button_rows, fallback_text, permission_approval
from hub.channels._render_text import (
    ChatRender,
    RenderMemory,
    Slot,
    break_point,
    opencode_event,
)

CAPTURES = CAPTURES_DIR


def caps(*, edit=True, buttons=ButtonLimits(8, 4, 64), typing=True, limit=4096) -> Capabilities:
    return Capabilities(
        threads=True,
        edit=edit,
        buttons=buttons,
        file_upload=False,
        file_download=False,
        typing=typing,
        reactions=False,
        max_text_length=limit,
        parse_modes=frozenset({"plain"}),
        max_file_bytes=0,
        interaction_ack="none",
        rate_limit="none",
        ephemeral=False,
    )


TELEGRAM = caps()
EMAIL = caps(edit=False, buttons=None, typing=False, limit=20_000)


def capture(name: str) -> list[dict]:
    events = []
    for line in (CAPTURES / name).read_text().splitlines():
        if line.startswith("data: "):
            event = opencode_event("session.event", json.loads(line[6:]))
            if event is not None:
                events.append(event)
    return events


class Chat:
    """Drives ChatRender like the renderer does: batches, a clock, persisted slots."""

    def __init__(self, capabilities: Capabilities) -> None:
        self.caps, self.slots, self.memory, self.now = capabilities, {}, RenderMemory(), 1000.0
        self.ops: list = []
        self.sequence = 0

    def batch(self, events: list[dict], *, step: float = 0.0) -> list:
        chat = ChatRender(
            self.caps,
            self.slots,
            self.memory,
            lambda *p: delivery_id("acme", "b1", *p),
            binding_id="b1",
            now=self.now,
        )
        for event in events:
            self.sequence += 1
            chat.apply(event, self.sequence)
        chat.flush()
        for slot in self.slots.values():
            slot.changed = False
        self.ops += chat.ops
        self.now += step
        return chat.ops

    def each(self, events: list[dict], step: float) -> list:
        return [op for event in events for op in self.batch([event], step=step)]

    def sweep(self) -> list:
        return self.batch([])


def texts(ops, *types):
    return [(op.type, op.text) for op in ops if op.type in (types or ("text", "edit"))]


def test_plain_prompt_streams_into_one_message_with_a_final_edit():
    chat = Chat(TELEGRAM)
    ops = chat.each(capture("plain-prompt.sse"), step=0.01)
    assert texts(ops) == [("text", "Hello "), ("edit", "Hello from the fake model.")]
    first, final = [op for op in ops if op.type in ("text", "edit")]
    assert final.edit_of == first.delivery_id
    # several busy statuses within a second: one typing indicator
    assert [op.type for op in ops].count("typing") == 1
    assert "Say hello" not in json.dumps([op.text for op in ops])  # the prompt is not echoed


def test_one_batch_sends_the_whole_text_once():
    chat = Chat(TELEGRAM)
    ops = chat.batch(capture("plain-prompt.sse"))
    assert texts(ops) == [("text", "Hello from the fake model.")]


def test_slow_stream_edits_with_the_full_text_at_most_once_a_second():
    events = capture("plain-prompt.sse")
    chat = Chat(TELEGRAM)
    ops = []
    for event in events:
        ops += chat.batch([event], step=0.4)
    shown = texts(ops)
    assert shown[0] == ("text", "Hello ")
    assert shown[-1] == ("edit", "Hello from the fake model.")
    assert all(kind == "edit" for kind, _ in shown[1:])
    bodies = [t for _, t in shown]
    assert len(set(bodies)) == len(bodies)  # never the same text twice
    assert all(b.startswith(a) for a, b in zip(bodies, bodies[1:]))  # full text each time
    # 5 deltas 0.4 s apart: throttled to fewer edits than deltas
    assert len(shown) < 6


def test_sweep_sends_a_due_edit_without_new_events():
    events = capture("plain-prompt.sse")
    deltas = [i for i, e in enumerate(events) if e["type"] == "message.part.delta"]
    chat = Chat(TELEGRAM)
    chat.batch(events[: deltas[0] + 1])
    chat.batch(events[deltas[0] + 1 : deltas[2] + 1])
    assert texts(chat.ops) == [("text", "Hello ")]
    assert chat.sweep() == []  # not yet a second later
    chat.now += 1.5
    assert texts(chat.sweep()) == [("edit", "Hello from the ")]


def test_restart_resumes_from_persisted_slots_without_resending():
    events = capture("plain-prompt.sse")
    cut = next(i for i, e in enumerate(events) if e["type"] == "message.part.delta") + 1
    chat = Chat(TELEGRAM)
    chat.batch(events[:cut])
    chat.memory = RenderMemory()  # a new process: only the persisted slots survive
    chat.slots = copy.deepcopy(chat.slots)
    chat.now += 5
    chat.batch(events[cut:])
    assert texts(chat.ops) == [("text", "Hello "), ("edit", "Hello from the fake model.")]


def test_platform_without_edits_gets_each_text_once():
    chat = Chat(EMAIL)
    ops = chat.each(capture("plain-prompt.sse"), step=2.0)
    assert texts(ops) == [("text", "Hello from the fake model.")]
    assert not [op for op in ops if op.type == "typing"]


def _text_events(part: str, deltas: list[str], final: str) -> list[dict]:
    base = {"sessionID": "ses_1", "messageID": "msg_1"}
    out = [
        {
            "type": "message.updated",
            "properties": {"sessionID": "ses_1", "info": {"id": "msg_1", "role": "assistant"}},
        },
        {
            "type": "message.part.updated",
            "properties": {
                **base,
                "part": {
                    "id": part,
                    "messageID": "msg_1",
                    "type": "text",
                    "text": "",
                    "time": {"start": 1},
                },
            },
        },
    ]
    out += [
        {
            "type": "message.part.delta",
            "properties": {**base, "partID": part, "field": "text", "delta": d},
        }
        for d in deltas
    ]
    out.append(
        {
            "type": "message.part.updated",
            "properties": {
                **base,
                "part": {
                    "id": part,
                    "messageID": "msg_1",
                    "type": "text",
                    "text": final,
                    "time": {"start": 1, "end": 2},
                },
            },
        }
    )
    return out


def test_without_edits_only_completed_paragraphs_then_the_final_suffix():
    deltas = ["First para", "graph.\n\nSecond ", "one.\n\nThird", " and last."]
    full = "".join(deltas)
    chat = Chat(EMAIL)
    ops = chat.each(_text_events("prt_p", deltas, full), step=2.0)
    assert texts(ops) == [
        ("text", "First paragraph."),
        ("text", "Second one."),
        ("text", "Third and last."),
    ]


def test_long_text_rolls_over_into_new_messages_under_the_limit():
    words = [f"word{i:03d} " for i in range(60)]  # 480 characters
    full = "".join(words)
    chat = Chat(caps(limit=100))
    ops = chat.each(_text_events("prt_long", words, full), step=2.0)
    assert all(len(op.text) <= 100 for op in ops if op.text)
    finals: dict[str, str] = {}
    for op in ops:
        finals[op.edit_of or op.delivery_id] = op.text
    assert "".join(finals.values()) == full
    assert len(finals) == 5  # five chat messages, each edited in place
    slots = sorted(chat.slots.values(), key=lambda s: int(s.key.rsplit("#", 1)[1]))
    assert [s.key for s in slots] == [f"prt_long#{n}" for n in range(5)]
    assert all(s.finished for s in slots)


def test_whitespace_only_text_sends_nothing():
    chat = Chat(TELEGRAM)
    ops = chat.each(_text_events("prt_ws", ["  ", "\n"], "  \n"), step=2.0)
    assert texts(ops) == []


def test_tool_progress_is_one_message_edited_in_place():
    chat = Chat(TELEGRAM)
    ops = chat.each(capture("tool-permission-approved.sse"), step=0.01)
    tool = [op for op in ops if op.text and "bash" in op.text and op.type in ("text", "edit")]
    assert [(op.type, op.text) for op in tool] == [
        ("text", "⏳ bash"),
        ("edit", "⏳ bash: Echo a greeting"),
        ("edit", "✅ bash: echo hi-from-bash"),
    ]
    assert {op.edit_of for op in tool[1:]} == {tool[0].delivery_id}
    assert texts(ops)[-2:] == [("text", "Tool "), ("edit", "Tool finished.")]


def test_tool_progress_without_edits_is_only_the_final_state():
    chat = Chat(EMAIL)
    ops = chat.each(capture("tool-permission-approved.sse"), step=0.01)
    assert texts(ops) == [("text", "✅ bash: echo hi-from-bash"), ("text", "Tool finished.")]


def test_tool_error_is_shown():
    chat = Chat(TELEGRAM)
    ops = chat.each(capture("permission-rejected-then-question-rejected.sse"), step=0.01)
    assert (
        "edit",
        "❌ bash: The user rejected permission to use this specific tool call.",
    ) in texts(ops)


def test_permission_asked_becomes_allow_and_deny():
    chat = Chat(TELEGRAM)
    ops = chat.each(capture("tool-permission-approved.sse"), step=0.01)
    [op] = [op for op in ops if op.type == "buttons"]
    approval = op.approval
    assert approval.kind == "permission" and approval.request_id.startswith("per_")
    assert approval.prompt == "Permission requested: bash echo hi-from-bash"
    assert [(c.label, c.action, c.style) for c in approval.choices] == [
        ("Allow", "allow", "success"),
        ("Deny", "deny", "danger"),
    ]
    # the tool's progress message comes before the approval
    kinds = [o.type for o in ops]
    assert kinds.index("text") < kinds.index("buttons")


def test_question_asked_becomes_one_button_per_option_plus_reject():
    chat = Chat(TELEGRAM)
    ops = chat.each(capture("question-answered.sse"), step=0.01)
    [op] = [op for op in ops if op.type == "buttons"]
    approval = op.approval
    assert approval.kind == "question"
    assert [(c.label, c.action, c.answer) for c in approval.choices] == [
        ("Red", "answer", [["Red"]]),
        ("Blue", "answer", [["Blue"]]),
        ("Reject", "reject", None),
    ]
    assert "Colour: Pick a colour?" in approval.prompt and "Blue — cool" in approval.prompt
    assert [c.action for c in approval.fallback] == ["answer", "reject"]


def test_buttons_fit_or_fall_back():
    assert button_rows(2, ButtonLimits(8, 4, 64), 22) == [2]
    assert button_rows(3, ButtonLimits(8, 4, 64), 22) == [1, 1, 1]
    assert button_rows(6, ButtonLimits(8, 4, 64), 22) == [2, 2, 2]
    assert button_rows(4, ButtonLimits(3, 3, 256), 22) is None  # too many
    assert button_rows(2, ButtonLimits(8, 4, 16), 22) is None  # token too long
    assert button_rows(2, None, 22) is None  # no buttons at all
    approval = permission_approval(
        {"id": "per_1", "sessionID": "s", "permission": "bash", "patterns": ["ls"]}
    )
    text = fallback_text(approval.prompt, approval.fallback, ["caAAA", "caBBB"])
    assert text.endswith("/approve caAAA\n/deny caBBB")


def test_session_error_is_a_short_notice():
    chat = Chat(TELEGRAM)
    ops = chat.each(capture("abort-mid-stream.sse"), step=0.01)
    assert ("text", "⚠️ Session error: Aborted") in texts(ops)


def test_break_point_prefers_paragraphs_then_words():
    text = "a" * 70 + "\n\n" + "b" * 50
    assert break_point(text, 100) == 72
    text = "word " * 30
    assert break_point(text, 100) == 100
    assert break_point("x" * 150, 100) == 100
    assert break_point("short", 100) == 5


def test_slot_state_is_plain_data():
    slot = Slot("p#0", "d-1", "abc", "ab", False, 1.0)
    assert slot.text != slot.sent_text and not slot.changed
