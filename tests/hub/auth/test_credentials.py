"""Runtime credentials: issue, refresh before expiry, revoke within 2 s, and
revocations that survive hub and NATS restarts. Real operator-mode nats-server."""

import asyncio
import logging
import shutil
import time
from datetime import timedelta

import nats
import pytest
from hubkit import client, connect_principal, connect_with, operator_nats, running_hub

from edges import CredentialRefreshError, EdgeCredentials, refresh_forever, refresh_once
from edges.local import free_port
from hub.auth import _jwt
from hub.auth._permissions import Principal
from hub.core import flushed
from schemas import PrincipalKind, subjects

TENANT = "acme"


@pytest.fixture
async def own_nats(tmp_path, bus_keys):
    """A private operator-mode server this test may stop, restart or wipe."""
    async with operator_nats(tmp_path / "nats", bus_keys, port=free_port()) as server:
        yield server


def desktop(pid="desk-1"):
    return Principal(PrincipalKind.DESKTOP, TENANT, pid)


async def _dropped_within(edge, seconds: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if not edge.nc.is_connected:
            return time.monotonic() - started
        await asyncio.sleep(0.02)
    raise AssertionError(f"connection still up after {seconds}s")


async def _refused(url, edge) -> None:
    with pytest.raises(Exception, match="(?i)authorization|revoked|expired"):
        await connect_with(
            url, edge.user_jwt, edge.seed, "_INBOX.x", connect_timeout=2, max_reconnect_attempts=0
        )


async def test_revocation_drops_live_connection_and_refuses_reconnect(
    own_nats, database_url, bus_keys
):
    async with running_hub(own_nats.url, database_url, keys=bus_keys) as hub:
        edge = await connect_principal(hub, desktop())
        bystander = await connect_principal(hub, desktop("desk-2"))
        async with client(hub, admin=True) as http:
            started = time.monotonic()
            response = await http.post(
                f"/api/v1/tenants/{TENANT}/principals/desktop/desk-1/revoke",
                json={"reason": "laptop stolen"},
            )
            assert response.status_code == 200, response.text
            assert response.json() == {"revokedKeys": 1, "status": "revoked"}
            await _dropped_within(edge, 2.0)
            took = time.monotonic() - started  # from the admin's request to the drop
            await _refused(own_nats.url, edge)
            assert bystander.nc.is_connected  # only the revoked principal is affected
            # idempotent, final, and audited
            again = await http.post(
                f"/api/v1/tenants/{TENANT}/principals/desktop/desk-1/revoke",
                json={"reason": "again"},
            )
            assert again.json()["revokedKeys"] == 0
            audit = (await http.get(f"/api/v1/tenants/{TENANT}/audit")).json()["items"]
            revoked = [a for a in audit if a["action"] == "credential.revoked"]
            assert len(revoked) == 1 and revoked[0]["reason"] == "laptop stolen"
            listed = (await http.get(f"/api/v1/tenants/{TENANT}/principals")).json()["items"]
            assert {p["principalId"]: p["status"] for p in listed}["desk-1"] == "revoked"
        with pytest.raises(Exception, match="revoked"):
            await hub.credentials.issue(desktop(), _jwt.public_key(_jwt.new_seed("user")))
        await bystander.close()
    print(f"revocation dropped the live connection in {took * 1000:.0f} ms")


async def test_revocation_survives_nats_and_hub_restarts(own_nats, database_url, bus_keys):
    async with running_hub(own_nats.url, database_url, keys=bus_keys) as hub:
        edge = await connect_principal(hub, desktop())
        await hub.credentials.revoke(TENANT, "desktop", "desk-1", reason="test")
        await _dropped_within(edge, 2.0)
    # NATS restarts with its resolver directory: still refused.
    await own_nats.stop()
    await own_nats.start()
    await _refused(own_nats.url, edge)
    # NATS loses its resolver state entirely: the preloaded account has no
    # revocations, until a hub starts and pushes them again from PostgreSQL.
    await own_nats.stop()
    shutil.rmtree(own_nats.store_dir / "resolver")
    await own_nats.start()
    async with running_hub(own_nats.url, database_url, keys=bus_keys):
        await _refused(own_nats.url, edge)


async def test_refresh_before_expiry_keeps_traffic_flowing(
    operator_nats_url, database_url, bus_keys
):
    """A 3 s credential is refreshed over the bus; the server disconnects the old JWT at its
    expiry and the client reconnects with the new one: not one message is lost."""
    async with running_hub(operator_nats_url, database_url, keys=bus_keys) as hub:
        seed = _jwt.new_seed("user")
        issued = await hub.credentials.issue(
            desktop("desk-r"), _jwt.public_key(seed), ttl=timedelta(seconds=3)
        )
        creds = EdgeCredentials(issued.user_jwt, seed)
        old_exp = creds.expires_at
        reconnects = []

        async def on_reconnect():
            reconnects.append(time.monotonic())

        nc = await nats.connect(
            operator_nats_url,
            reconnect_time_wait=0.05,
            inbox_prefix=subjects.inbox_prefix(TENANT, "desktop", "desk-r"),
            reconnected_cb=on_reconnect,
            **creds.connect_options(),
        )
        received = []
        subject = subjects.PRESENCE.build(
            tenant=TENANT, principal_kind="desktop", principal_id="desk-r"
        )

        async def collect(msg):
            received.append(int(msg.data))

        await hub.nc.subscribe(subject, cb=collect)
        await flushed(hub.nc)
        loop = asyncio.create_task(
            refresh_forever(
                nc, creds, tenant=TENANT, kind="desktop", principal_id="desk-r", fraction=0.5
            )
        )
        for i in range(100):  # 5 s of traffic across the 3 s expiry
            await nc.publish(subject, str(i).encode())
            await asyncio.sleep(0.05)
        await nc.flush()
        await asyncio.sleep(0.3)
        loop.cancel()
        assert creds.expires_at > old_exp + 3600  # refreshed to the 24 h default
        assert reconnects, "the server should have ended the expired JWT's connection"
        assert sorted(set(received)) == list(range(100)), f"lost {set(range(100)) - set(received)}"
        await nc.close()


async def test_refresh_is_refused_for_revoked_or_foreign_keys(
    operator_nats_url, database_url, bus_keys
):
    async with running_hub(operator_nats_url, database_url, keys=bus_keys) as hub:
        edge = await connect_principal(hub, desktop("desk-f"))
        creds = EdgeCredentials(edge.user_jwt, edge.seed)
        reply = await refresh_once(
            edge.nc, creds, tenant=TENANT, kind="desktop", principal_id="desk-f"
        )
        assert reply.user_jwt == creds.user_jwt
        # Another principal's key, asked for on my subject: refused.
        other = EdgeCredentials(edge.user_jwt, _jwt.new_seed("user"))
        with pytest.raises(CredentialRefreshError) as info:
            await refresh_once(edge.nc, other, tenant=TENANT, kind="desktop", principal_id="desk-f")
        assert info.value.code == "credential.unknown"
        # Asking on another principal's subject is stopped by the server itself.
        with pytest.raises(Exception):
            await refresh_once(
                edge.nc, creds, tenant=TENANT, kind="desktop", principal_id="desk-other", timeout=1
            )
        assert edge.publish_denied("cw.acme.auth.desktop.desk-other.refresh")
        await hub.credentials.revoke(TENANT, "desktop", "desk-f", reason="test")
        await edge.close()


async def test_expired_credential_is_disconnected(operator_nats_url, database_url, bus_keys):
    async with running_hub(operator_nats_url, database_url, keys=bus_keys) as hub:
        edge = await connect_principal(hub, desktop("desk-x"), ttl=timedelta(seconds=2))
        await _dropped_within(edge, 4.0)
        # The server checks `exp` in whole seconds: in the second after it a connect
        # is accepted and closed at once; from then on it is refused.
        exp = _jwt.decode(edge.user_jwt, verify=False)["exp"]
        await asyncio.sleep(max(0.0, exp + 1.2 - time.time()))
        await _refused(operator_nats_url, edge)


async def test_admin_api_issues_only_what_it_may(operator_nats_url, database_url, bus_keys):
    async with (
        running_hub(operator_nats_url, database_url, keys=bus_keys) as hub,
        client(hub, admin=True) as http,
    ):
        url = f"/api/v1/tenants/{TENANT}/credentials"
        key = _jwt.public_key(_jwt.new_seed("user"))
        ok = await http.post(
            url,
            json={
                "kind": "viewer",
                "principalId": "web-1",
                "publicKey": key,
                "workspaces": ["ws1"],
            },
        )
        assert ok.status_code == 201, ok.text
        claims = _jwt.decode(ok.json()["userJwt"], verify=False)
        assert claims["sub"] == key
        assert claims["nats"]["sub"]["allow"] == ["cw.acme.ws.ws1.evt"]
        assert claims["nats"]["pub"] == {"deny": [">"]}  # a viewer publishes nothing at all
        cases = [
            ({"kind": "desktop", "principalId": "d", "publicKey": key}, 422, "kind_not_issuable"),
            ({"kind": "viewer", "principalId": "w", "publicKey": key}, 422, "workspaces_required"),
            (
                {"kind": "viewer", "principalId": "w", "publicKey": "SUAAA", "workspaces": ["x"]},
                422,
                "invalid_request",
            ),
            (
                {"kind": "viewer", "principalId": "a.b", "publicKey": key, "workspaces": ["x"]},
                422,
                "invalid_request",
            ),
            # A channel's credential comes from its instance's route, for kind cli only.
            (
                {"kind": "channel", "principalId": "c", "publicKey": key, "workspaces": ["x"]},
                422,
                "kind_not_issuable",
            ),
        ]
        for body, status, code in cases:
            response = await http.post(url, json=body)
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"]["code"] == code


async def test_no_seed_signing_key_or_jwt_reaches_logs_or_audit(
    operator_nats_url, database_url, bus_keys, caplog
):
    caplog.set_level(logging.DEBUG)
    async with running_hub(operator_nats_url, database_url, keys=bus_keys) as hub:
        edge = await connect_principal(hub, desktop("desk-s"))
        await hub.credentials.revoke(TENANT, "desktop", "desk-s", reason="scan")
        await hub.credentials.push_account()
        rows = await hub.audit.recent(TENANT, 1000)
    secrets_ = [edge.seed.decode(), edge.user_jwt, bus_keys.app_account_jwt({})]
    secrets_ += [k.seed.decode() for k in bus_keys._app_signing]  # the signing seeds
    haystack = caplog.text + repr(rows)
    for secret in secrets_:
        assert secret not in haystack
    assert "credential.revoked" in repr(rows) and "credential.issued" in repr(rows)


async def test_edge_creds_file_is_private_and_usable_by_any_nats_client(
    operator_nats_url, database_url, bus_keys, tmp_path
):
    async with running_hub(operator_nats_url, database_url, keys=bus_keys) as hub:
        seed = _jwt.new_seed("user")
        issued = await hub.credentials.issue(desktop("desk-file"), _jwt.public_key(seed))
        path = tmp_path / "desktop.creds"
        EdgeCredentials(issued.user_jwt, seed).write_creds_file(path)
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        loaded = EdgeCredentials.from_creds_file(path)
        assert (loaded.user_jwt, loaded.public_key) == (issued.user_jwt, _jwt.public_key(seed))
        nc = await nats.connect(
            operator_nats_url,
            user_credentials=str(path),
            inbox_prefix=subjects.inbox_prefix(TENANT, "desktop", "desk-file"),
        )
        assert nc.is_connected
        await nc.close()
