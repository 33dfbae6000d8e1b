"""`scrub_text` scans a text with no literal hint for the three token shapes that
need none (schemas/_secrets.py, UNHINTED_SHAPE) instead of all of TOKEN_SHAPE: the
same result as scanning for all of them, held here against that reference on the
redaction suite's corpus of fake secrets, ids and prose mixed at random."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_redaction import CORPUS

from schemas._secrets import (
    _COOKIE,
    _HINT,
    _LONG_RUN,
    _REPLACE_COOKIE,
    _REPLACE_VALUE,
    ASSIGNMENT,
    SECRET_REDACTED,
    TOKEN_SHAPE,
    scrub_text,
)


def reference(text: str) -> str:
    """scrub_text as it was: every token shape whenever a hint or a long run is there."""
    lowered = text.lower()
    hint = _HINT.search(lowered)
    if not (hint or _LONG_RUN.search(text)):
        return text
    text = TOKEN_SHAPE.sub(SECRET_REDACTED, text)
    if hint or _HINT.search(text.lower()):
        text = ASSIGNMENT.sub(_REPLACE_VALUE, text)
    if "cookie" in lowered:
        text = _COOKIE.sub(_REPLACE_COOKIE, text)
    return text


_PIECES = st.sampled_from(
    [fake.raw for fake in CORPUS]
    + [
        "prt_bench0000000000000042",
        "msg_01JABCDEFGHJKMNPQRSTVWXYZ",
        "ses_3f2a9c1e7b4d8a6f0e5c2b1a",
        "SU" + "A" * 56,
        "SK" + "0123456789abcdef" * 2,
        "N" + "a" * 23 + ".abcdef." + "b" * 27,
        "-" * 30,
        "_" * 25,
        " ",
        ".",
        "\n",
        "the quick brown fox",
        "=",
        ":",
        "token",
    ]
)


@settings(max_examples=4000, deadline=None)
@given(st.lists(_PIECES, max_size=6).map("".join))
def test_scrub_text_is_what_scanning_every_shape_gives(text):
    assert scrub_text(text) == reference(text)


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from("SKMNOAZ27aq0f_-.:/ "), max_size=80))
def test_scrub_text_on_runs_of_token_characters(text):
    assert scrub_text(text) == reference(text)
