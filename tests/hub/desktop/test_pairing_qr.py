"""The pairing QR code: the SVG drawn here is exactly the matrix segno encodes
for the link (error level M, mask 0), inside a white quiet zone, as a data URI a
browser takes whole (no raw '#', which would end the URI, no raw space or quote).
tests/hub/console/test_console_browser.py reads the rendered image back pixel by
pixel in Chromium."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
import segno

from hub.desktop._qr import BORDER, SCALE, pairing_qr

LINKS = [
    "http://127.0.0.1:8080/console/pair#code=ABCD-EFGH-JKLM&hub=nats%3A%2F%2F127.0.0.1%3A4222",
    "https://hub.example.com/console/pair#code=ZZZZ-2345-6789&hub="
    + "%2C".join(f"tls%3A%2F%2Fedge-{i}.example.com%3A7422" for i in range(6)),
    "x",
]
_STROKE = re.compile(r"M(\d+) (\d+)\.5h(\d+)")


def _drawn(uri: str) -> tuple[int, set[tuple[int, int]], str]:
    """The SVG's size in modules and the dark modules its path draws."""
    assert uri.startswith("data:image/svg+xml,")
    body = uri.removeprefix("data:image/svg+xml,")
    assert not set(body) & set('# "<>'), "characters a URI or an attribute cannot hold"
    doc = unquote(body)
    size = int(re.search(r"viewBox='0 0 (\d+) \1'", doc).group(1))
    path = re.search(r"<path stroke='#000' d='([^']*)'/>", doc).group(1)
    dark = set()
    for x, y, run in _STROKE.findall(path):
        dark |= {(int(x) + i, int(y)) for i in range(int(run))}
    assert _STROKE.sub("", path) == "", "only horizontal strokes"
    return size, dark, doc


@pytest.mark.parametrize("link", LINKS, ids=["local", "six hubs", "one letter"])
def test_the_svg_draws_exactly_the_encoded_matrix(link):
    matrix = segno.make(link, error="m", mask=0, micro=False, boost_error=False).matrix
    size, dark, doc = _drawn(pairing_qr(link))
    assert size == len(matrix) + 2 * BORDER
    assert f"width='{size * SCALE}' height='{size * SCALE}'" in doc
    assert f"<rect width='{size}' height='{size}' fill='#fff'/>" in doc
    expected = {
        (x + BORDER, y + BORDER) for y, row in enumerate(matrix) for x, v in enumerate(row) if v
    }
    assert dark == expected


def test_the_code_holds_the_link_at_error_level_m():
    code = segno.make(LINKS[1], error="m", mask=0, micro=False, boost_error=False)
    assert code.error == "M" and code.mask == 0 and not code.is_micro
    assert pairing_qr(LINKS[0]) != pairing_qr(LINKS[0].replace("ABCD", "ABCE"))
