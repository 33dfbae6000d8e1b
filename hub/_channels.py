"""SKELETON: channel instances (store, secrets, runtime hosting). Replaced by H5."""

from __future__ import annotations

from typing import Any


class ChannelService:
    def __init__(self, pool: Any, audit: Any, js: Any, nc: Any, metrics: Any, *, hub_id: str,
                 secret_key: bytes, credentials: Any, settings: Any) -> None:
        self.runtime = None

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def instance(self, instance_id: str) -> dict | None:
        return None
