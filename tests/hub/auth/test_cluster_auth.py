"""The 3-node cluster from deploy/ in operator mode enforces the same rules as one
server: every connection authenticated, tenant isolation, and a revocation pushed
through one node drops the revoked edge on another node within 2 s."""

import asyncio
import time

import nats
import pytest
from chaoskit import nats_cluster
from hubkit import running_hub

from hub.auth._keys import BusKeys
from hub.auth._permissions import Principal
from hub.core import flushed
from schemas import PrincipalKind, subjects


@pytest.fixture(scope="module")
async def operator_cluster(tmp_path_factory):
    """The committed node configs, unchanged, each included by a file that adds the
    operator block `cowork keys server-config` prints (as an operator would)."""
    workdir = tmp_path_factory.mktemp("nats-operator-cluster")
    keys = BusKeys.load_or_create(workdir / "keys")
    async with nats_cluster(workdir, keys) as cluster:
        yield keys, cluster.nodes


async def test_cluster_enforces_auth_isolation_and_revocation(operator_cluster, database_url):
    keys, (n1, n2, n3) = operator_cluster
    for node in (n1, n2, n3):
        with pytest.raises(Exception, match="(?i)authorization"):
            await nats.connect(
                node.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2
            )
    async with running_hub(n1.url, database_url, keys=keys) as hub:
        desk = Principal(PrincipalKind.DESKTOP, "acme", "desk-c")
        edge = await _edge_on(hub, desk, n3.url)
        bystander = await _edge_on(hub, Principal(PrincipalKind.DESKTOP, "acme", "desk-d"), n2.url)
        try:
            # Delivered across nodes: edge on node 3 -> hub on node 1.
            own = subjects.PRESENCE.build(
                tenant="acme", principal_kind="desktop", principal_id="desk-c"
            )
            sub = await hub.nc.subscribe(own)
            await hub.nc.flush()
            # Interest reaches other nodes over routes asynchronously: publish until seen.
            for _ in range(50):
                await edge.nc.publish(own, b"hello")
                try:
                    assert (await sub.next_msg(timeout=0.1)).data == b"hello"
                    break
                except nats.errors.TimeoutError:
                    continue
            else:
                raise AssertionError("a message from node 3 never reached the hub on node 1")
            # Tenant isolation is enforced by node 3, not by the hub.
            foreign = subjects.PRESENCE.build(
                tenant="globex", principal_kind="desktop", principal_id="desk-c"
            )
            await edge.nc.publish(foreign, b"x")
            await flushed(edge.nc)  # its -ERR comes before the last PONG (hub.core._flush)
            assert edge.publish_denied(foreign)
            # Revoke through the hub's system connection on node 1.
            started = time.monotonic()
            await hub.credentials.revoke("acme", "desktop", "desk-c", reason="cluster test")
            while edge.nc.is_connected:
                assert time.monotonic() - started < 2.0, "node 3 kept the revoked connection"
                await asyncio.sleep(0.02)
            for node in (n1, n2, n3):
                with pytest.raises(Exception, match="(?i)authorization|revoked"):
                    await nats.connect(
                        node.url,
                        allow_reconnect=False,
                        max_reconnect_attempts=0,
                        connect_timeout=2,
                        **_auth(edge),
                    )
            assert bystander.nc.is_connected
        finally:
            await edge.close()
            await bystander.close()


def _auth(edge):
    from hub.auth import _jwt

    return _jwt.nats_auth_options(edge.user_jwt, edge.seed)


async def _edge_on(hub, principal, url):
    from hubkit import connect_with

    from hub.auth import _jwt

    seed = _jwt.new_seed("user")
    issued = await hub.credentials.issue(principal, _jwt.public_key(seed))
    inbox = subjects.inbox_prefix(principal.tenant, str(principal.kind), principal.id)
    return await connect_with(url, issued.user_jwt, seed, inbox)
