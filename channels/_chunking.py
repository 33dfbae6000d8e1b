"""Splitting a long text into chunks that each fit a platform's message limit.

Breaks are taken at a paragraph, else a line, else a word boundary, but only
past ~65% of the window (a break near the start would waste most of a message);
otherwise the text is cut hard. A chunk that ends inside a ``` code fence is
closed at its end and the fence is re-opened, with the same info string, at the
start of the next chunk, so every chunk renders as valid markdown; the added
fence lines count toward the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

FENCE = "```"
_BREAK_RATIO = 0.65
_CLOSER_RESERVE = len("\n" + FENCE)


@dataclass(frozen=True)
class ChunkParts:
    """One chunk as (added prefix, original text slice, added suffix)."""

    prefix: str
    body: str
    suffix: str

    @property
    def text(self) -> str:
        return self.prefix + self.body + self.suffix


@dataclass(frozen=True)
class _Toggle:
    start: int  # index of the fence line's first character
    end: int  # index just past the fence line (before its newline)
    opener: str | None  # the opening line ("```python"), None for a closing fence


def _fence_toggles(text: str) -> list[_Toggle]:
    """Fence lines in order. Closed: a line starting with ``` opens (its rest is the
    info string). Open: a line that is only ``` closes; anything else is code."""
    toggles: list[_Toggle] = []
    is_open = False
    start = 0
    for line in text.split("\n"):
        end = start + len(line)
        stripped = line.strip()
        if not is_open and stripped.startswith(FENCE):
            toggles.append(_Toggle(start, end, stripped))
            is_open = True
        elif is_open and stripped == FENCE:
            toggles.append(_Toggle(start, end, None))
            is_open = False
        start = end + 1
    return toggles


def _opener_at(toggles: list[_Toggle], position: int) -> str | None:
    """The opening line of the fence open at `position` (lines wholly before it)."""
    opener = None
    for toggle in toggles:
        if toggle.end > position:
            break
        opener = toggle.opener
    return opener


def _break_at(window: str, minimum: int) -> int | None:
    """Where to cut `window`: after a paragraph, line or word break at or past `minimum`."""
    for separator in ("\n\n", "\n", " "):
        index = window.rfind(separator)
        if index >= 0 and index + len(separator) >= minimum:
            return index + len(separator)
    return None


def chunk_parts(text: str, limit: int) -> list[ChunkParts]:
    """The chunks with what was added to each (tests rebuild the text from them)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if not text:
        return []
    toggles = _fence_toggles(text)
    # A fence is re-opened only when its opening and closing lines leave at least
    # half the window for content; a longer info string is carried as plain text.
    reopenable = {
        t.opener
        for t in toggles
        if t.opener is not None and len(t.opener) + 1 + _CLOSER_RESERVE <= limit // 2
    }
    parts: list[ChunkParts] = []
    position = 0
    while position < len(text):
        opener = _opener_at(toggles, position)
        prefix = opener + "\n" if opener in reopenable else ""
        room = limit - len(prefix)
        if len(text) - position <= room:
            parts.append(ChunkParts(prefix, text[position:], ""))
            break
        opens_inside = any(
            t.opener in reopenable and position <= t.start < position + room for t in toggles
        )
        budget = room - (_CLOSER_RESERVE if prefix or opens_inside else 0)
        window = text[position : position + budget]
        cut = _break_at(window, int(budget * _BREAK_RATIO)) or budget
        cut += position
        # Never split a fence line: the chunk would show a half marker.
        for toggle in toggles:
            if toggle.start < cut < toggle.end and toggle.start > position:
                cut = toggle.start
                break
        body = text[position:cut]
        suffix = ""
        if _opener_at(toggles, cut) in reopenable:
            suffix = FENCE if body.endswith("\n") else "\n" + FENCE
        parts.append(ChunkParts(prefix, body, suffix))
        position = cut
    return parts


def chunk_text(text: str, limit: int) -> list[str]:
    """`text` as chunks of at most `limit` characters (an empty text has none)."""
    return [part.text for part in chunk_parts(text, limit)]
