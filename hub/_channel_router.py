"""SKELETON: the inbound router. Replaced by H6."""

from __future__ import annotations

from typing import Any


class ChannelRouter:
    def __init__(self, js: Any, pool: Any, audit: Any, metrics: Any, dead_letters: Any, *,
                 hub_id: str, instances: Any, outbox: Any, commands: Any, edge_work: Any,
                 pairings: Any, actions: Any) -> None: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def on_command_final(self, tenant: str, command: dict) -> None: ...
