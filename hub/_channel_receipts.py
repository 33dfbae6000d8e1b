"""SKELETON: delivery receipts from instances. Replaced by H7."""

from __future__ import annotations

from typing import Any


class ReceiptIngest:
    def __init__(self, js: Any, pool: Any, metrics: Any, dead_letters: Any, *, hub_id: str,
                 instances: Any, outbox: Any) -> None: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...
