"""Helpers for tests that run a real hub against the fixture servers."""

from __future__ import annotations

import contextlib
import secrets
from typing import AsyncIterator

import httpx

from hub import Hub, HubSettings


@contextlib.asynccontextmanager
async def running_hub(nats_url: str, database_url: str, **overrides) -> AsyncIterator[Hub]:
    token = overrides.pop("admin_token", None) or secrets.token_urlsafe(24)
    settings = HubSettings(nats_url=nats_url, database_url=database_url, admin_token=token,
                           http_host="127.0.0.1", http_port=0, log_format="text", **overrides)
    hub = Hub(settings)
    await hub.start(startup_timeout=15)
    hub.test_admin_token = token  # type: ignore[attr-defined]
    try:
        yield hub
    finally:
        await hub.stop()


def client(hub: Hub, *, admin: bool = False) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {hub.test_admin_token}"} if admin else {}  # type: ignore[attr-defined]
    return httpx.AsyncClient(base_url=hub.http_url, headers=headers, timeout=10)
