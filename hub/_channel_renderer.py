"""SKELETON: session events -> chat deliveries. Replaced by H7."""

from __future__ import annotations

from typing import Any


class ChannelRenderer:
    def __init__(self, nc: Any, pool: Any, metrics: Any, *, hub_id: str, instances: Any,
                 outbox: Any, actions: Any) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...
