"""Pure rendering of single items: tool progress lines, approval and question
prompts with their choices, button layout under a platform's limits, and the
text-command fallbacks. No I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from channels import ButtonLimits

ButtonStyle = Literal["default", "danger", "success"]  # ChannelButton's styles


@dataclass
class Choice:
    label: str
    action: str  # allow | deny | answer | reject
    answer: list | None = None
    style: ButtonStyle = "default"


@dataclass
class Approval:
    kind: str  # permission | question
    request_id: str
    session_id: str
    prompt: str
    choices: list[Choice]  # as buttons
    fallback: list[Choice]  # as text commands when buttons do not fit


def tool_line(part: dict) -> tuple[str, bool] | None:
    """("⏳ bash: <title>", False) while running; ✅/❌ when done."""
    state = part.get("state")
    tool = str(part.get("tool") or "tool")[:64]
    if not isinstance(state, dict):
        return None
    status = state.get("status")
    if status == "error":
        return f"❌ {tool}: {_short(state.get('error')) or 'failed'}", True
    title = _short(state.get("title")) or _short(_input_title(state.get("input")))
    head = f"{tool}: {title}" if title else tool
    if status == "completed":
        return f"✅ {head}", True
    if status in ("pending", "running"):
        return f"⏳ {head}", False
    return None


def permission_approval(props: dict) -> Approval | None:
    request, session = props.get("id"), props.get("sessionID")
    if not isinstance(request, str) or not isinstance(session, str):
        return None
    patterns = [str(p) for p in props.get("patterns") or [] if isinstance(p, (str, int))]
    prompt = _short(
        f"Permission requested: {props.get('permission') or '?'} {' '.join(patterns)}".strip(), 3000
    )
    allow = Choice("Allow", "allow", style="success")
    deny = Choice("Deny", "deny", style="danger")
    return Approval("permission", request, session, prompt, [allow, deny], [allow, deny])


def question_approval(props: dict) -> Approval | None:
    request, session = props.get("id"), props.get("sessionID")
    questions = [q for q in props.get("questions") or [] if isinstance(q, dict)]
    if not isinstance(request, str) or not isinstance(session, str) or not questions:
        return None
    lines, options = [], []
    for q in questions:
        head = f"{q['header']}: " if isinstance(q.get("header"), str) and q["header"] else ""
        lines.append(f"❓ {head}{_short(q.get('question'), 1000)}")
        for o in q.get("options") or []:
            if isinstance(o, dict) and isinstance(o.get("label"), str) and o["label"]:
                desc = f" — {_short(o.get('description'), 200)}" if o.get("description") else ""
                lines.append(f"• {o['label'][:200]}{desc}")
                options.append(o["label"][:200])
    reject = Choice("Reject", "reject", style="danger")
    # An option button answers the whole request, so only a single question gets them.
    buttons = (
        [Choice(label, "answer", answer=[[label]]) for label in options]
        if len(questions) == 1
        else []
    )
    return Approval(
        "question",
        request,
        session,
        "\n".join(lines),
        buttons + [reject],
        [Choice("Answer", "answer"), reject],
    )


def button_rows(count: int, limits: ButtonLimits | None, token_bytes: int) -> list[int] | None:
    """How many buttons go in each row, or None when they do not fit the platform."""
    if (
        limits is None
        or count == 0
        or count > limits.max_count
        or token_bytes > limits.max_token_bytes
    ):
        return None
    if count <= limits.max_rows:
        return [1] * count if count > 2 else [count]
    per_row = -(-count // limits.max_rows)
    return [min(per_row, count - i) for i in range(0, count, per_row)]


_FALLBACK = {
    "allow": "/approve {t}",
    "deny": "/deny {t}",
    "answer": "/answer {t} <text>",
    "reject": "/reject {t}",
}


def fallback_text(prompt: str, choices: list[Choice], tokens: list[str]) -> str:
    commands = [_FALLBACK[c.action].format(t=t) for c, t in zip(choices, tokens)]
    return prompt + "\n\nReply with:\n" + "\n".join(commands)


def _input_title(value: Any) -> str | None:
    if isinstance(value, dict):
        for key in ("description", "command", "filePath", "path", "pattern", "url"):
            if isinstance(value.get(key), str) and value[key]:
                return value[key]
    return None


def error_text(error: Any) -> str:
    if isinstance(error, dict):
        data = error.get("data")
        if isinstance(data, dict) and isinstance(data.get("message"), str) and data["message"]:
            return _short(data["message"], 300)
        if isinstance(error.get("name"), str):
            return _short(error["name"], 300)
    return _short(error, 300) or "unknown error"


def _short(value: Any, limit: int = 200) -> str:
    if not isinstance(value, str):
        return ""
    value = " ".join(value.split())
    return value if len(value) <= limit else value[: limit - 1] + "…"
