"""SKELETON: hashed single-use approval/question tokens. Replaced by H7."""

from __future__ import annotations

from typing import Any


class ActionTokens:
    def __init__(self, pool: Any) -> None:
        self._pool = pool
