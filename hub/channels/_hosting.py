"""Channel instances on the hub: the in-memory view other services read, the admin
operations (create, change, delete; audited), and hosting the channel runtime.

The database is the truth. Every replica polls instance revisions every 2 s and
applies what changed to its own runtime, so replicas converge whichever of them
served the admin call; the replica that served it applies at once. Every replica
answers every instance's webhooks; an instance's deliveries go out from the one
replica holding its lease (_delivery_leases.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from datetime import timedelta
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from pydantic import BaseModel

from channels import (
    ChannelRuntime,
    InstanceConfig,
    RuntimeOptions,
    destination_changed,
    webhook_secrets_missing,
)
from schemas import (
    AuditRecord,
    ControllerKeys,
    PrincipalKind,
    SealError,
    SetChannelController,
)

from ..auth import CredentialError, CredentialService, IssuedCredential, Principal
from ..core import AuditLog, HubMetrics, HubSettings, kv
from ..http import client_address
from ._bus_access import InstanceConnections, delete_consumer, ensure_consumer
from ._controllers import ChannelControllers
from ._delivery_leases import DeliveryLeases
from ._store import (
    AUTHORITIES,
    ChannelInstanceError,
    InstanceStore,
    NewInstance,
    SecretBox,
    merge_secrets,
    not_found,
    provider_for,
    secret_names,
    validate_secrets,
    validate_settings,
)

log = logging.getLogger("cowork.hub.channels")

RELOAD_SECONDS = 2.0
PUBLIC_FIELDS = (
    "tenant",
    "instance_id",
    "kind",
    "workspace_id",
    "authority",
    "default_agent",
    "enabled",
    "display_name",
    "revision",
)


class ChannelService:
    def __init__(
        self,
        pool: asyncpg.Pool,
        audit: AuditLog,
        js: JetStreamContext,
        nc: NATS,
        metrics: HubMetrics,
        *,
        hub_id: str,
        secret_key: bytes,
        credentials: CredentialService | None,
        settings: HubSettings,
        replica: str | None = None,
    ) -> None:
        self._pool, self._audit, self._js, self._nc = pool, audit, js, nc
        self._metrics, self._hub_id, self._settings = metrics, hub_id, settings
        self._credentials = credentials
        self._box = SecretBox(secret_key)
        self._store = InstanceStore(pool)
        self.list = self._store.list  # a page of the tenant's instances, filtered
        self.controllers = ChannelControllers(pool, self._box)
        self.connections = InstanceConnections(settings, credentials)
        trusted = settings.trusted_proxy_networks
        self.runtime = ChannelRuntime(
            connect=self.connections.connect,
            options=RuntimeOptions(
                body_limit_bytes=settings.channel_body_limit_bytes,
                source_rate=settings.channel_source_rate,
                msg_id_key=hmac.new(secret_key, b"inbound-msg-id", hashlib.sha256).digest(),
                # Outbound transports of `transportHost: any` instances: one process
                # holds each (hub replica or `cowork channel run`), by a lease in
                # CW_CHANNEL_LEASES whose max_age is the partition lease TTL.
                transport_holder=f"hub replica {replica or hub_id}",
                transport_lease_seconds=settings.partition_lease_seconds,
            ),
            source_of=lambda request: client_address(request, trusted),
            deliver_all=False,  # where the lease is: self._delivery
        )
        self._delivery = DeliveryLeases(js, self.runtime, metrics, replica=replica or hub_id)
        self._cache: dict[str, dict[str, Any]] = {}
        self._configs: dict[str, InstanceConfig] = {}  # what the runtime was last given
        self._errors: dict[str, str] = {}  # instance id -> why its config could not apply
        self._retry: set[str] = set()  # applied revisions that failed for a passing reason
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.runtime.start()
        await self.reload()
        self._delivery.start()  # its first step takes the leases at once
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._delivery.stop()  # hands the leases over before the runtime goes
        await self.runtime.stop()
        await self.connections.stop()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_SECONDS)
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: keep serving the cache
                log.warning("channels.reload_failed", **kv(error=str(exc)[:200]))

    # --- the cache other services read ----------------------------------------------------------
    def instance(self, instance_id: str) -> dict | None:
        entry = self._cache.get(instance_id)
        return dict(entry) if entry is not None else None

    def instances(self, tenant: str | None = None) -> list[dict]:
        return [dict(e) for e in self._cache.values() if tenant is None or e["tenant"] == tenant]

    def runtime_config(self, instance_id: str) -> InstanceConfig | None:
        """The configuration (with plaintext secrets) the runtime was last given."""
        return self._configs.get(instance_id)

    async def reload(self) -> None:
        """Bring the cache and the runtime in step with the table."""
        async with self._lock:
            revisions = await self._store.revisions()
            changed = [
                i
                for i, rev in revisions.items()
                if i in self._retry or self._cache.get(i, {}).get("revision") != rev
            ]
            for row in await self._store.get_any(changed) if changed else []:
                await self._apply(row)
            for instance_id in [i for i in self._cache if i not in revisions]:
                self._cache.pop(instance_id, None)
                self._configs.pop(instance_id, None)
                self._errors.pop(instance_id, None)
                self._retry.discard(instance_id)
                await self.runtime.remove(instance_id)
            self._delivery.host(self._hosted())
            self._refresh_gauge()

    def _hosted(self) -> dict[str, str]:
        """Instances whose deliveries this hub sends (id -> tenant): a `cli` one's go
        out from its own process, and so do those of an instance whose transport
        runs on an edge only (`transportHost: edge`: `cowork channel run`)."""
        return {
            instance_id: config.tenant
            for instance_id, config in self._configs.items()
            if provider_for(config.kind).capabilities.inbound != "stdin"
            and getattr(config.settings, "transport_host", "any") != "edge"
        }

    async def _apply(self, row: dict[str, Any]) -> None:
        instance_id = row["instance_id"]
        entry = {k: row[k] for k in PUBLIC_FIELDS}
        try:
            entry["capabilities"] = provider_for(row["kind"]).capabilities
        except ChannelInstanceError:  # a kind this hub version does not know
            entry["capabilities"] = None
        self._cache[instance_id] = entry
        self._retry.discard(instance_id)
        if not row["enabled"]:
            self._errors.pop(instance_id, None)
            self._configs.pop(instance_id, None)
            await self.runtime.remove(instance_id)
            return
        try:
            settings_value, _ = validate_settings(row["kind"], row["settings"])
            secrets_value, _ = validate_secrets(row["kind"], self._box.open(row["secrets_enc"]))
        except ChannelInstanceError as exc:  # stays off until an admin fixes it
            self._errors[instance_id] = str(exc)
            log.error(
                "channels.instance_config_invalid",
                **kv(instance=instance_id, code=exc.code, error=str(exc)),
            )
            self._configs.pop(instance_id, None)
            await self.runtime.remove(instance_id)
            return
        config = InstanceConfig(
            tenant=row["tenant"],
            instance_id=instance_id,
            kind=row["kind"],
            workspace_id=row["workspace_id"],
            settings=settings_value,
            secrets=secrets_value,
            default_agent=row["default_agent"],
            revision=row["revision"],
        )
        try:
            await ensure_consumer(self._js, row["tenant"], instance_id)
            await self.runtime.apply(config)
        except Exception as exc:  # bus trouble: the next reload tries again
            self._retry.add(instance_id)
            self._errors[instance_id] = f"not started yet: {str(exc)[:200]}"
            log.warning(
                "channels.instance_apply_failed", **kv(instance=instance_id, error=str(exc)[:200])
            )
            return
        self._configs[instance_id] = config
        self._errors.pop(instance_id, None)

    def _refresh_gauge(self) -> None:
        counts: dict[str, int] = {}
        per_instance = self._metrics.channel_instance_state
        per_instance.clear()  # deleted instances and left states disappear
        for instance_id, entry in self._cache.items():
            state = (
                self.health(instance_id).get("state", "unknown") if entry["enabled"] else "disabled"
            )
            counts[state] = counts.get(state, 0) + 1
            per_instance.labels(instance_id, state).set(1)
        gauge = self._metrics.channel_instances
        gauge.clear()
        for state, count in counts.items():
            gauge.labels(state).set(count)

    def health(self, instance_id: str) -> dict[str, Any]:
        entry = self._cache.get(instance_id)
        if entry is not None and not entry["enabled"]:
            return {"state": "stopped", "detail": "disabled"}
        health = dict(self.runtime.health(instance_id))
        if instance_id in self._errors:
            health.setdefault("detail", self._errors[instance_id])
            health["configError"] = self._errors[instance_id]
        return health

    # --- admin operations ------------------------------------------------------------------------
    async def get(self, tenant: str, instance_id: str) -> dict[str, Any]:
        row = await self._store.get(tenant, instance_id)
        if row is None:
            raise not_found(instance_id)
        return row

    async def create(self, tenant: str, body: dict[str, Any], *, actor: str) -> dict[str, Any]:
        kind = body["kind"]
        provider_for(kind)
        settings_value, settings = validate_settings(kind, body.get("settings") or {})
        secrets_value, secrets = validate_secrets(kind, body.get("secrets") or {})
        _check_webhook_secrets(settings_value, secrets_value)
        _check_authority(body.get("authority", "desktop_paired"))
        new = NewInstance(
            instance_id=body["instance_id"],
            tenant=tenant,
            kind=kind,
            workspace_id=body["workspace_id"],
            authority=body.get("authority", "desktop_paired"),
            display_name=body.get("display_name") or "",
            default_agent=body.get("default_agent"),
            settings=settings,
            secrets_enc=self._box.seal(secrets),
            secret_names=secret_names(secrets),
            enabled=body.get("enabled", True),
            created_by=actor,
        )
        async with self._pool.acquire() as conn, conn.transaction():
            await _check_workspace(conn, tenant, new.authority, new.workspace_id)
            row = await self._store.insert(new, conn)
            if row is None:
                raise ChannelInstanceError(
                    "channel_instance.exists",
                    f"channel instance id {new.instance_id!r} is taken (ids are global)",
                    status=409,
                )
            await self._store.reactivate_principal(conn, tenant, new.instance_id)
            await self._record("channel.instance_created", row, actor, conn)
        await self.reload()
        return row

    async def update(
        self, tenant: str, instance_id: str, patch: dict[str, Any], *, actor: str
    ) -> dict[str, Any]:
        """Apply an admin change; `patch` holds only the fields that were sent."""
        async with self._pool.acquire() as conn, conn.transaction():
            current = await self._store.get(
                tenant, instance_id, conn=conn, for_update=True, with_secrets=True
            )
            if current is None:
                raise not_found(instance_id)
            changes: dict[str, Any] = {}
            secrets_value: BaseModel | None = None  # the merged secrets, when patched
            for field in ("display_name", "workspace_id", "default_agent", "enabled"):
                if field in patch:
                    changes[field] = patch[field]
            if "display_name" in changes and changes["display_name"] is None:
                changes["display_name"] = ""
            if "authority" in patch:
                changes["authority"] = _check_authority(patch["authority"])
            if "authority" in changes or "workspace_id" in changes:
                await _check_workspace(
                    conn,
                    tenant,
                    changes.get("authority", current["authority"]),
                    changes.get("workspace_id", current["workspace_id"]),
                )
            if "settings" in patch:
                after, changes["settings"] = validate_settings(
                    current["kind"], patch["settings"] or {}
                )
                before, _ = validate_settings(current["kind"], current["settings"])
                _check_secrets_reentered(current, before, after, patch.get("secrets") or {})
            if "secrets" in patch:
                try:
                    stored = self._box.open(current["secrets_enc"])
                except ChannelInstanceError:  # unreadable (key changed): set them all again
                    stored = {}
                merged = merge_secrets(current["kind"], stored, patch["secrets"] or {})
                secrets_value, plain = validate_secrets(current["kind"], merged)
                changes["secrets_enc"] = self._box.seal(plain)
                changes["secret_names"] = secret_names(plain)
            if "settings" in patch or "secrets" in patch:
                self._check_patched_secrets(current, changes.get("settings"), secrets_value)
            row = await self._store.update(conn, tenant, instance_id, changes)
            assert row is not None  # locked above
            # Field names only: which secrets changed is not recorded, let alone values.
            changed = sorted({_WIRE.get(k, k) for k in changes})
            await self._record("channel.instance_updated", row, actor, conn, changed=changed)
            if "enabled" in changes and changes["enabled"] != current["enabled"]:
                action = (
                    "channel.instance_enabled" if row["enabled"] else "channel.instance_disabled"
                )
                await self._record(action, row, actor, conn)
        await self.reload()
        return row

    def _check_patched_secrets(
        self, current: dict[str, Any], settings: dict[str, Any] | None, secrets: BaseModel | None
    ) -> None:
        """A webhook instance after the change still has its webhook secrets."""
        kind = current["kind"]
        if secrets is None:
            try:
                secrets = validate_secrets(kind, self._box.open(current["secrets_enc"]))[0]
            except ChannelInstanceError:  # unreadable: the secrets are being set again
                return
        after = validate_settings(kind, settings if settings is not None else current["settings"])
        _check_webhook_secrets(after[0], secrets)

    async def delete(self, tenant: str, instance_id: str, *, actor: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._store.delete(conn, tenant, instance_id)
            if row is None:
                raise not_found(instance_id)
            await self._record("channel.instance_deleted", row, actor, conn)
        # Stop sending first, then take away the consumer and the bus identity.
        self._configs.pop(instance_id, None)
        await self.runtime.remove(instance_id)
        await delete_consumer(self._js, instance_id)
        if self._credentials is not None:
            await self._credentials.revoke(
                tenant, "channel", instance_id, reason="channel instance deleted", actor=actor
            )
        await self.reload()

    async def issue_credential(
        self, tenant: str, instance_id: str, public_key: str, *, ttl: timedelta | None, actor: str
    ) -> IssuedCredential:
        """A bus credential for a key the caller holds (a `cowork channel cli` process),
        bound to the instance's own subjects and workspace."""
        if self._credentials is None:
            raise ChannelInstanceError(
                "credentials_unavailable",
                "bus credentials are not managed by this hub (no COWORK_KEYS_DIR)",
                status=503,
            )
        row = await self.get(tenant, instance_id)
        outbound = validate_settings(row["kind"], row["settings"])[0]
        if (
            provider_for(row["kind"]).capabilities.inbound != "stdin"
            and getattr(outbound, "transport", "webhook") != "outbound"
        ):
            # A hosted kind's bus identity belongs to the hub's runtime alone: a key
            # held elsewhere could speak as its chat users and take its deliveries.
            # An outbound transport may run elsewhere (`cowork channel run`), whose
            # operator holds the platform's token already.
            raise ChannelInstanceError(
                "channel_instance.hosted_kind",
                f"credentials are issued only for kind 'cli' instances and instances with "
                f"transport 'outbound'; {instance_id!r} is a {row['kind']} instance "
                f"receiving webhooks, served by the hub itself",
                status=409,
            )
        principal = Principal(
            PrincipalKind.CHANNEL, tenant, instance_id, workspaces=(row["workspace_id"],)
        )
        try:
            return await self._credentials.issue(principal, public_key, ttl=ttl, actor=actor)
        except CredentialError as exc:
            raise ChannelInstanceError(exc.code, str(exc), status=409) from None

    # --- the instance as a controller of its sealed Desktop (docs/sealed.md) ---------------
    async def set_controller(
        self, tenant: str, instance_id: str, body: SetChannelController, *, actor: str
    ) -> dict[str, Any]:
        """Keep the controller keys `cowork channel enrol` enrolled on the instance's
        Desktop. The instance must drive that pairing (`desktop_paired`, its workspace)."""
        try:
            keys = ControllerKeys.from_json(body.keys.model_dump(by_alias=True))
        except SealError as exc:
            raise ChannelInstanceError(
                "channel_controller.bad_keys", str(exc), status=422
            ) from None
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._store.get(tenant, instance_id, conn=conn)
            if row is None:
                raise not_found(instance_id)
            if row["authority"] != "desktop_paired" or row["workspace_id"] != body.pairing_id:
                raise ChannelInstanceError(
                    "channel_controller.wrong_pairing",
                    f"instance {instance_id!r} drives no pairing {body.pairing_id!r} "
                    "(a controller belongs to the paired Desktop the instance drives)",
                    status=422,
                )
            await self.controllers.save(
                conn,
                tenant,
                instance_id,
                body.pairing_id,
                keys,
                body.desktop_key,
                body.next_sequence,
            )
            await self._record(
                "channel.controller_set",
                row,
                actor,
                conn,
                controllerId=keys.controller_id,
                pairingId=body.pairing_id,
            )
        return self._controller_view(instance_id, body.pairing_id, keys)

    async def get_controller(self, tenant: str, instance_id: str) -> dict[str, Any]:
        controller = await self.controllers.get(tenant, instance_id)
        if controller is None:
            raise _no_controller(instance_id)
        return self._controller_view(instance_id, controller.pairing_id, controller.keys)

    async def remove_controller(self, tenant: str, instance_id: str, *, actor: str) -> None:
        """Forget the keys here (the Desktop owner removes the controller there)."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await self._store.get(tenant, instance_id, conn=conn)
            if row is None:
                raise not_found(instance_id)
            if not await self.controllers.remove(conn, tenant, instance_id):
                raise _no_controller(instance_id)
            await self._record("channel.controller_removed", row, actor, conn)

    @staticmethod
    def _controller_view(instance_id: str, pairing_id: str, keys: ControllerKeys) -> dict:
        return {
            "instanceId": instance_id,
            "pairingId": pairing_id,
            "controllerId": keys.controller_id,
            "fingerprint": keys.public.fingerprint,
        }

    async def _record(
        self,
        action: str,
        row: dict[str, Any],
        actor: str,
        conn: asyncpg.Connection,
        **metadata: Any,
    ) -> None:
        # Secret names only, never values.
        meta = {
            "kind": row["kind"],
            "revision": row["revision"],
            "enabled": row["enabled"],
            "authority": row["authority"],
        }
        meta.update({k: v for k, v in metadata.items() if v is not None})
        await self._audit.record(
            AuditRecord(
                action=action,
                actor_kind=PrincipalKind.ADMIN,
                actor_id=actor,
                target_kind="channel_instance",
                target_id=row["instance_id"],
                workspace_id=row["workspace_id"],
                metadata=meta,
            ),
            tenant=row["tenant"],
            conn=conn,
        )


def _no_controller(instance_id: str) -> ChannelInstanceError:
    return ChannelInstanceError(
        "channel_controller.none",
        f"instance {instance_id!r} is enrolled as no controller",
        status=404,
    )


_WIRE = {
    "display_name": "displayName",
    "workspace_id": "workspaceId",
    "default_agent": "defaultAgent",
    "secrets_enc": "secrets",
    "secret_names": "secrets",
}


async def _check_workspace(
    conn: asyncpg.Connection, tenant: str, authority: str, workspace_id: str
) -> None:
    """A `desktop_paired` instance's workspace is a pairing of its tenant: refused now
    rather than at the chat's first prompt."""
    if authority != "desktop_paired":
        return
    if (
        await conn.fetchval(
            "SELECT 1 FROM pairings WHERE tenant = $1 AND pairing_id = $2", tenant, workspace_id
        )
        is None
    ):
        raise ChannelInstanceError(
            "channel_instance.workspace_not_paired",
            f"authority desktop_paired needs the workspace to be a pairing of tenant "
            f"{tenant!r}; {workspace_id!r} is none (create one with POST …/pairings, or use "
            "authority cloud_worker)",
            status=422,
        )


def _check_authority(value: Any) -> str:
    if value not in AUTHORITIES:
        raise ChannelInstanceError(
            "channel_instance.invalid_authority",
            f"authority must be one of {', '.join(AUTHORITIES)}",
            status=422,
        )
    return value


def _check_secrets_reentered(
    current: dict[str, Any], before: Any, after: Any, patched: dict[str, Any]
) -> None:
    """Secrets are write-only: changing where they are sent (apiBase and the address
    rules) needs every secret of the instance in the same request, so a PATCH cannot
    send the stored bot token to an address of the caller's choosing."""
    if not destination_changed(before, after):
        return
    given = {key for key, value in patched.items() if value is not None}
    fields = provider_for(current["kind"]).secrets_model.model_fields
    given |= {field.alias or name for name, field in fields.items() if name in given}
    missing = sorted(set(current["secret_names"] or ()) - given)
    if missing:
        raise ChannelInstanceError(
            "channel_instance.secrets_required",
            "changing apiBase, allowLoopbackHttp or allowPrivateNetworks sends the "
            f"instance's secrets elsewhere: send them again ({', '.join(missing)})",
            status=422,
        )


def _check_webhook_secrets(settings: BaseModel, secrets: BaseModel) -> None:
    missing = webhook_secrets_missing(settings, secrets)
    if missing:
        raise ChannelInstanceError(
            "channel_instance.invalid_secrets",
            "; ".join(f"missing secret {name!r}" for name in missing)
            + " (needed unless transport is 'outbound')",
            status=422,
        )
