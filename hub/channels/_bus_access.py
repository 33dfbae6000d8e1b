"""Each channel instance's place on the bus: its durable consumer on the outbound
work queue and its own NATS connection.

In operator mode an instance connects as a `channel` principal with a fresh nkey
and a user JWT minted for it, so the server itself limits it to its own subjects.
nats-py closes a connection for good when the server says its JWT expired, so a
refresher re-mints the JWT for the same key before expiry and forces a reconnect
that presents it (the JWT callback always returns the current one).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from channels import InstanceConfig
from schemas import PrincipalKind, subjects

from ..auth import CredentialError, CredentialService, Principal, nats_jwt
from ..core import HubSettings, kv, streams

log = logging.getLogger("cowork.hub.channels.bus")

STREAM = subjects.EDGE_CONSUMERS["channel"]


def consumer_name(instance_id: str) -> str:
    return subjects.edge_consumer("channel", instance_id)


def consumer_spec(tenant: str, instance_id: str) -> streams.ConsumerSpec:
    # Never gives up on a delivery (-1): the runtime decides when one is dead.
    return streams.ConsumerSpec(
        STREAM,
        consumer_name(instance_id),
        subjects.CHANNEL_OUTBOUND.build(tenant=tenant, instance_id=instance_id),
        ack_wait_seconds=30.0,
        max_deliver=-1,
    )


async def ensure_consumer(js: JetStreamContext, tenant: str, instance_id: str) -> None:
    """Create (or update to this configuration) the instance's durable consumer."""
    await js.add_consumer(STREAM, streams.consumer_config(consumer_spec(tenant, instance_id)))


async def delete_consumer(js: JetStreamContext, instance_id: str) -> bool:
    from nats.js.errors import NotFoundError

    try:
        return bool(await js.delete_consumer(STREAM, consumer_name(instance_id)))
    except NotFoundError:
        return False


class InstanceConnections:
    """Opens instance connections for the runtime and keeps their JWTs fresh."""

    def __init__(self, settings: HubSettings, credentials: CredentialService | None) -> None:
        self._settings, self._credentials = settings, credentials
        self._refreshers: set[asyncio.Task] = set()
        # The last error the server reported per instance (permission violations,
        # auth failures): for health and for tests of the permission table.
        self.last_errors: dict[str, str] = {}

    async def connect(self, config: InstanceConfig) -> NATS:
        s = self._settings
        options: dict[str, Any] = dict(
            servers=s.nats_servers,
            name=f"cowork-channel-{config.instance_id}",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=2,
            error_cb=self._error_cb(config.instance_id),
        )
        if self._credentials is None:
            if s.nats_creds:
                options["user_credentials"] = str(s.nats_creds)
            return await nats.connect(**options)
        seed = nats_jwt.new_seed("user")
        public = nats_jwt.public_key(seed)
        principal = Principal(
            PrincipalKind.CHANNEL,
            config.tenant,
            config.instance_id,
            workspaces=(config.workspace_id,),
        )
        issued = await self._credentials.issue(principal, public)
        current = {"jwt": issued.user_jwt}
        auth = nats_jwt.nats_auth_options(issued.user_jwt, seed)
        auth["user_jwt_cb"] = lambda: current["jwt"].encode()
        nc = await nats.connect(
            **options,
            **auth,
            inbox_prefix=subjects.inbox_prefix(config.tenant, "channel", config.instance_id),
        )
        if issued.expires_at is not None:
            task = asyncio.create_task(
                self._refresh(nc, config, public, current, issued.expires_at)
            )
            self._refreshers.add(task)
            task.add_done_callback(self._refreshers.discard)
        return nc

    async def _refresh(
        self,
        nc: NATS,
        config: InstanceConfig,
        public: str,
        current: dict[str, str],
        expires_at: datetime,
    ) -> None:
        assert self._credentials is not None
        while not nc.is_closed:
            remaining = (expires_at - datetime.now(UTC)).total_seconds()
            # Renew at two thirds of the lifetime left (at least 1 s before expiry).
            await asyncio.sleep(max(0.5, min(remaining * 2 / 3, remaining - 1.0)))
            if nc.is_closed:
                return
            try:
                issued = await self._credentials.refresh(
                    config.tenant, "channel", config.instance_id, public
                )
            except CredentialError as exc:  # revoked or removed: let the connection end
                log.info(
                    "channel.credential_not_refreshed",
                    **kv(instance=config.instance_id, code=exc.code),
                )
                return
            except Exception as exc:  # database or bus hiccup: try again shortly
                log.warning(
                    "channel.credential_refresh_failed",
                    **kv(instance=config.instance_id, error=str(exc)[:200]),
                )
                await asyncio.sleep(1.0)
                continue
            current["jwt"] = issued.user_jwt
            if issued.expires_at is not None:
                expires_at = issued.expires_at
            await nc.force_reconnect()
            log.info("channel.credential_refreshed", **kv(instance=config.instance_id))

    def _error_cb(self, instance_id: str):
        async def on_error(exc: Exception) -> None:
            self.last_errors[instance_id] = str(exc)[:500]
            log.warning("channel.nats_error", **kv(instance=instance_id, error=str(exc)[:200]))

        return on_error

    async def stop(self) -> None:
        for task in list(self._refreshers):
            task.cancel()
        for task in list(self._refreshers):
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
