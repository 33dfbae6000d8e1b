"""Idempotent requests: the same key with the same body is the same request.

`body_hash` is the digest a stored request keeps beside its idempotency key, so a
retry is recognised (same key, same digest: answer with the stored result) and a
reuse of the key for another body is refused. Desktop commands and edge work both
use it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def body_hash(fields: dict[str, Any]) -> bytes:
    """SHA-256 of the fields as canonical JSON (sorted keys; dates as text)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).digest()
