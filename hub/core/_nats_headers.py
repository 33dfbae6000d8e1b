"""nats-py's header parser, with one line made fast (installed by the hub).

Every JetStream message a hub consumer fetches carries headers (a Desktop's event
its `Nats-Msg-Id`), and nats-py parses them in Python before any callback runs.
Its check that a header name holds no whitespace, `any(c.isspace() for c in key)`,
runs a generator over every character of every name: about 9% of the hub's CPU
while it projects a Desktop's stream (docs/performance.md, relay round 7).
`_parse_header_lines` below is nats-py 2.16's, line for line, but for that check,
written `key.split() != [key]`: the same test (`str.split` splits on exactly the
characters `str.isspace` names, so a name keeps its one piece iff it has none of
them), made by one C call. tests/hub/core/test_nats_headers.py holds it to the
original on generated header blocks.
"""

from __future__ import annotations

from nats.aio.client import Client

_CRLF = b"\r\n"
ORIGINAL = Client.__dict__["_parse_header_lines"]  # (the staticmethod object)


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """A NATS message-header block (`Name: Value\\r\\n` per line) as a dict."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if key and key.split() != [key]:  # whitespace inside the name: not a name
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def install() -> None:
    """Use `parse_header_lines` for every nats-py client of this process (idempotent)."""
    Client._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign]
