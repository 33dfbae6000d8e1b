"""SKELETON of the channel runtime (ingress + delivery workers + lifecycle);
the real implementation replaces this file. The API below is the contract the
hub (hub/_channels.py) codes against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from ._provider import InstanceConfig


@dataclass(frozen=True)
class RuntimeOptions:
    body_limit_bytes: int = 1024 * 1024
    source_rate: float = 50.0           # webhook requests per second per (instance, source)
    source_burst: float = 100.0
    lockout_failures: int = 10          # auth failures per source ...
    lockout_window_seconds: float = 600.0   # ... within this window lock the source out
    lane_parallelism: int = 8
    max_attempts: int = 5
    backoff_base_seconds: float = 1.0
    backoff_cap_seconds: float = 30.0
    breaker_threshold: int = 5          # consecutive failed deliveries -> degraded
    breaker_cooldown_seconds: float = 30.0
    api_bases: dict[str, str] | None = None  # kind -> API base override (tests, proxies)


class ChannelRuntime:
    def __init__(self, *, connect: Callable[[InstanceConfig], Awaitable[Any]],
                 options: RuntimeOptions = RuntimeOptions()) -> None:
        self._connect = connect
        self.options = options

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def apply(self, config: InstanceConfig) -> None: ...

    async def remove(self, instance_id: str) -> None: ...

    def health(self, instance_id: str) -> dict[str, Any]:
        return {"state": "stopped"}

    def routes(self) -> list[Any]:
        return []
