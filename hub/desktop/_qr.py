"""A pairing link as a QR code: an SVG data URI the console shows at creation.

A fleet is paired through the API by the thousand and every answer carries one,
so its cost is the pairing's: segno's encoder with one fixed mask pattern and no
error-level boost, then an SVG written here in one pass over the matrix (one path,
one horizontal stroke per run of dark modules), about a third of what segno's
general SVG writer takes (docs/performance.md, "Fleet").
"""

from __future__ import annotations

import re
from urllib.parse import quote

import segno

SCALE, BORDER = 4, 2  # pixels a module; modules of quiet zone (white) around the code
_DARK_RUN = re.compile(rb"\x01+")


def pairing_qr(link: str) -> str:
    """The link's QR code (error level M) as an SVG data URI. With one fixed mask
    pattern: segno would otherwise draw the code with each of the 8 patterns and
    score them (about 12 ms of the hub's CPU a pairing; minutes of a blocked event
    loop when a fleet is paired by the thousand). Every reader decodes every pattern;
    the score only avoids look-alikes of the finder marks, which a phone's scanner
    copes with at these sizes."""
    code = segno.make(link, error="m", mask=0, micro=False, boost_error=False)
    return "data:image/svg+xml," + quote(svg(code.matrix), safe="=:/,.'")


def svg(matrix: tuple[bytearray, ...]) -> str:
    """The matrix (rows of 0 and 1) drawn dark on white, within a quiet zone."""
    size = len(matrix) + 2 * BORDER
    path = "".join(
        f"M{run.start() + BORDER} {y + BORDER}.5h{run.end() - run.start()}"
        for y, row in enumerate(matrix)
        for run in _DARK_RUN.finditer(row)
    )
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{size * SCALE}' "
        f"height='{size * SCALE}' viewBox='0 0 {size} {size}'>"
        f"<rect width='{size}' height='{size}' fill='#fff'/>"
        f"<path stroke='#000' d='{path}'/></svg>"
    )
