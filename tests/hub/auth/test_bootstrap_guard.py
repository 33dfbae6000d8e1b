"""The public bootstrap account cannot be held full by one client: the hub closes
an address's connections beyond its share, and any that stays too long."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import nats
from desktopkit import eventually

from edges.common import bootstrap_options
from hub.auth import BootstrapConnectionGuard


async def _bootstrap_clients(url: str, n: int) -> list:
    # No reconnects: a closed connection stays closed, so the test sees the kicks.
    return [await nats.connect(url, allow_reconnect=False, **bootstrap_options()) for _ in range(n)]


async def test_an_address_over_its_share_loses_its_newest_connections(hub, operator_nats_url):
    share = hub.settings.bootstrap_connections_per_source
    clients = await _bootstrap_clients(operator_nats_url, share + 8)
    try:
        await eventually(
            lambda: sum(c.is_connected for c in clients) == share,
            timeout=10,
            what=f"the address to be cut to {share} bootstrap connections",
        )
        assert all(c.is_connected for c in clients[:share])  # the oldest stay
        assert not any(c.is_connected for c in clients[share:])
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_a_connection_held_too_long_is_closed(hub, operator_nats_url):
    guard = BootstrapConnectionGuard(hub.system_nc, max_age=timedelta(seconds=1))
    (client,) = await _bootstrap_clients(operator_nats_url, 1)
    try:
        assert await guard.sweep_once() == 0 and client.is_connected  # young: kept
        await asyncio.sleep(1.2)
        assert await guard.sweep_once() >= 1
        await eventually(lambda: not client.is_connected, timeout=5, what="the old connection")
    finally:
        await client.close()


def test_the_bounds_keep_each_address_oldest_share():
    from hub.auth._bootstrap_guard import BootstrapConnection

    now = datetime.now(UTC)
    conns = [
        BootstrapConnection("s1", cid, ip, now - timedelta(seconds=age))
        for cid, (ip, age) in enumerate(
            [("a", 5), ("a", 4), ("a", 3), ("b", 2), ("c", 100), ("a", 1)], start=1
        )
    ]
    guard = BootstrapConnectionGuard.__new__(BootstrapConnectionGuard)
    guard.per_source, guard.max_age = 2, timedelta(seconds=30)
    doomed = guard.over_bounds(conns, now)
    assert sorted(c.cid for c in doomed) == [3, 5, 6]  # c too old; a's two newest
