"""What PostgreSQL cannot store, refused at the contract (pure functions).

PostgreSQL's `text` and `jsonb` cannot hold the NUL character (U+0000), and
UTF-8 cannot encode a lone surrogate (U+D800..U+DFFF). A message holding one
anywhere (a field, a key or a string at any depth of a JSON payload) would pass
validation and then fail every insert, so it is refused here, with where it sits.

JSON parsing (pydantic's) already refuses lone surrogate escapes, and a raw NUL
byte is not valid JSON, so on raw JSON only the `\\u0000` escape needs a look.
"""

from __future__ import annotations

import json
import re
from typing import Any

# `\u0000` preceded by an even number of backslashes (an odd one escapes the backslash)
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
UNSTORABLE_CODE = "contract.unstorable_text"


def unstorable_json(raw: bytes | str) -> str | None:
    """Why raw JSON cannot be stored (a NUL character, and where), or None."""
    data = raw.encode() if isinstance(raw, str) else raw
    if b"u0000" not in data or not _NUL_ESCAPE.search(data):
        return None
    try:
        where = _find(json.loads(data), "")
    except ValueError:  # not JSON: the parser reports that itself
        return None
    return _reason(where if where is not None else "")


def unstorable(value: Any) -> str | None:
    """Why a JSON-like value cannot be stored (a NUL or a lone surrogate, and where), or None."""
    where = _find(value, "")
    return None if where is None else _reason(where)


def storable_text(text: str) -> str:
    """`text` with NUL characters and lone surrogates replaced by U+FFFD."""
    if text.isascii() and "\x00" not in text:
        return text
    return _UNSTORABLE.sub("\ufffd", text)


def _reason(where: str) -> str:
    return (
        f"{where or 'message'}: holds a NUL character or a lone surrogate, which cannot be stored"
    )


def _find(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return path if _UNSTORABLE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _UNSTORABLE.search(key):
                return here
            found = _find(item, here)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find(item, f"{path}.{index}" if path else str(index))
            if found is not None:
                return found
    return None
