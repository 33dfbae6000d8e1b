"""Chunking long texts under a platform limit (channels/_chunking.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channels._chunking import FENCE, chunk_parts, chunk_text


def fence_state_closed(chunk: str) -> bool:
    """True when every ``` fence opened in the chunk is closed in it."""
    is_open = False
    for line in chunk.split("\n"):
        stripped = line.strip()
        if not is_open and stripped.startswith(FENCE):
            is_open = True
        elif is_open and stripped == FENCE:
            is_open = False
    return not is_open


words = st.text(alphabet="abcdefghij xyz.,", min_size=1, max_size=30)
prose = st.lists(st.one_of(words, st.just("\n"), st.just("\n\n")), max_size=40).map("".join)
code_block = st.tuples(st.sampled_from(["", "python", "js", "bash"]), prose).map(
    lambda t: f"\n```{t[0]}\n{t[1]}\n```\n"
)
documents = st.lists(st.one_of(prose, code_block), max_size=8).map("".join)


@settings(max_examples=300, deadline=None)
@given(text=documents, limit=st.integers(min_value=40, max_value=400))
def test_chunks_fit_rejoin_and_keep_fences_balanced(text: str, limit: int) -> None:
    parts = chunk_parts(text, limit)
    assert "".join(part.body for part in parts) == text
    for part in parts:
        assert len(part.text) <= limit
        assert part.body, "every chunk carries some of the text"
        assert fence_state_closed(part.text), part.text
    assert chunk_text(text, limit) == [part.text for part in parts]


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=600), limit=st.integers(min_value=1, max_value=120))
def test_any_text_fits_and_rejoins(text: str, limit: int) -> None:
    parts = chunk_parts(text, limit)
    assert "".join(part.body for part in parts) == text
    assert all(len(part.text) <= limit for part in parts)


def test_short_text_is_one_chunk_and_empty_text_none() -> None:
    assert chunk_text("hello", 10) == ["hello"]
    assert chunk_text("", 10) == []
    with pytest.raises(ValueError):
        chunk_text("x", 0)


def test_prefers_paragraph_then_line_then_word_breaks() -> None:
    first, second = "a" * 70 + "\n\n", "b" * 50
    assert chunk_text(first + second, 100) == [first, second]
    assert chunk_text("a" * 70 + "\n" + "b" * 50, 100) == ["a" * 70 + "\n", "b" * 50]
    assert chunk_text("a" * 70 + " " + "b" * 50, 100) == ["a" * 70 + " ", "b" * 50]


def test_breaks_too_early_in_the_window_are_not_taken() -> None:
    text = "a" * 10 + "\n\n" + "b" * 150  # the only break is at 12% of the window
    chunks = chunk_text(text, 100)
    assert chunks[0] == text[:100]
    assert "".join(chunks) == text


def test_code_fences_are_closed_and_reopened_with_their_info_string() -> None:
    code = "\n".join(f"line {i}" for i in range(40))
    text = f"Intro\n\n```python\n{code}\n```\nAfter."
    chunks = chunk_text(text, 120)
    assert len(chunks) > 2
    for chunk in chunks[1:-1]:
        assert chunk.startswith("```python\n") and chunk.endswith("```")
    assert chunks[0].startswith("Intro") and chunks[0].endswith("```")
    assert all(len(chunk) <= 120 and fence_state_closed(chunk) for chunk in chunks)
