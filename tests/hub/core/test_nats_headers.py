"""The hub's header parser (hub/core/_nats_headers.py) gives what nats-py's own
gives, on header blocks made to hit every branch: names with whitespace of every
kind `str.isspace` knows (inside, around, alone), empty names and values, no
colon, non-ASCII names and values, invalid UTF-8; and a real message's headers
reach a subscriber through it once the hub installed it."""

from __future__ import annotations

import nats
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.core import install_fast_nats_headers
from hub.core._nats_headers import ORIGINAL, parse_header_lines

_SPACES = [" ", "\t", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\xa0"]
_PIECES = st.sampled_from(
    ["Nats-Msg-Id", "a", "X", ":", ": ", "\r", "\n", "é", "\xff", "", "1", "-", *_SPACES]
)
_LINE = st.lists(_PIECES, max_size=8).map("".join)


def _block(lines: list[str]) -> bytes:
    return b"\r\n".join(line.encode("utf-8", "surrogatepass") for line in lines) + b"\r\n\r\n"


@settings(max_examples=3000, deadline=None)
@given(st.lists(_LINE, max_size=6), st.binary(max_size=12))
def test_the_fast_parser_parses_as_nats_py_does(lines, raw):
    original = ORIGINAL.__func__
    for block in (_block(lines), raw, raw + b":" + raw):
        assert parse_header_lines(block) == original(block), block


def test_names_with_whitespace_anywhere_are_dropped_as_nats_py_drops_them():
    original = ORIGINAL.__func__
    for space in _SPACES:
        for name in (f"a{space}b", f"{space}ab", f"ab{space}", space):
            block = f"{name}: v\r\nok: 1\r\n".encode()
            assert parse_header_lines(block) == original(block), repr(name)
    assert (
        parse_header_lines(b": empty name\r\n")
        == original(b": empty name\r\n")
        == {"": "empty name"}
    )


async def test_a_message_s_headers_reach_a_subscriber_through_the_installed_parser(nats_url):
    install_fast_nats_headers()
    nc = await nats.connect(nats_url)
    try:
        sub = await nc.subscribe("headers.test")
        await nc.publish("headers.test", b"x", headers={"Nats-Msg-Id": "m1", "A-B": "c d"})
        msg = await sub.next_msg(timeout=5)
        assert msg.headers == {"Nats-Msg-Id": "m1", "A-B": "c d"}
    finally:
        await nc.close()
