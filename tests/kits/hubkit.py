"""Helpers for tests that run a real hub against the fixture servers."""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
import nats
from desktopkit import eventually

from hub import Hub, HubSettings


@contextlib.asynccontextmanager
async def operator_nats(store, keys, port: int = 0):
    """A JetStream nats-server in operator (JWT) mode trusting `keys`; stopped on exit."""
    from edges.local import NatsServer

    server = NatsServer(
        store_dir=store, port=port, extra_config=keys.server_config(store / "resolver")
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running_hub(
    nats_url: str, database_url: str, *, keys=None, **overrides
) -> AsyncIterator[Hub]:
    token = overrides.pop("admin_token", None) or secrets.token_urlsafe(24)
    settings = HubSettings(
        nats_url=nats_url,
        database_url=database_url,
        admin_token=token,
        http_host="127.0.0.1",
        http_port=0,
        log_format="text",
        **overrides,
    )
    hub = Hub(settings, keys=keys)
    await hub.start(startup_timeout=15)
    hub.test_admin_token = token  # type: ignore[attr-defined]
    try:
        yield hub
    finally:
        await hub.stop()


def client(hub: Hub, *, admin: bool = False) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {hub.test_admin_token}"} if admin else {}  # type: ignore[attr-defined]
    return httpx.AsyncClient(base_url=hub.http_url, headers=headers, timeout=10)


@dataclass
class EdgeConnection:
    """A principal's own connection, with the permission violations the server reported."""

    nc: nats.aio.client.Client
    public_key: str
    seed: bytes
    user_jwt: str
    denied_publish: set[str] = field(default_factory=set)
    denied_subscribe: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)

    # nats-py lower-cases the server's error text, so compare case-insensitively.
    def publish_denied(self, subject: str) -> bool:
        return subject.lower() in self.denied_publish

    def subscribe_denied(self, subject: str) -> bool:
        return subject.lower() in self.denied_subscribe

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.close()


_VIOLATION = re.compile(r'permissions violation for (publish|subscription) to "([^"]+)"', re.I)


async def connect_with(
    url: str, user_jwt: str, seed: bytes, inbox: str, **options
) -> EdgeConnection:
    from hub.auth import _jwt

    edge = EdgeConnection(
        nc=None,
        public_key=_jwt.public_key(seed),
        seed=seed,  # type: ignore[arg-type]
        user_jwt=user_jwt,
    )

    async def on_error(exc: Exception) -> None:
        text = str(exc)
        edge.errors.append(text)
        match = _VIOLATION.search(text)
        if match:
            target = edge.denied_publish if match[1].lower() == "publish" else edge.denied_subscribe
            target.add(match[2].lower())

    options.setdefault("allow_reconnect", False)
    edge.nc = await nats.connect(
        url,
        inbox_prefix=inbox,
        error_cb=on_error,
        **_jwt.nats_auth_options(user_jwt, seed),
        **options,
    )
    return edge


async def connect_principal(hub: Hub, principal, ttl=None, **options) -> EdgeConnection:
    """Issue a credential for a fresh nkey through the hub, and connect with it."""
    from hub.auth import _jwt
    from schemas import subjects

    seed = _jwt.new_seed("user")
    issued = await hub.credentials.issue(principal, _jwt.public_key(seed), ttl=ttl)
    inbox = subjects.inbox_prefix(principal.tenant, str(principal.kind), principal.id)
    return await connect_with(hub.settings.nats_servers[0], issued.user_jwt, seed, inbox, **options)


async def waiting_on_a_lock(pool, statement: str, n: int = 1, timeout: float = 10.0) -> None:
    """Wait until n sessions run `statement` (a marker in its text) blocked on a lock."""

    async def check() -> bool:
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND position($1 in query) > 0",
            statement,
        )
        return bool(waiting >= n)

    await eventually(check, timeout, 0.02, f"{statement!r} waiting on a lock")
