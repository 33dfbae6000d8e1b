"""Registering a Standalone Team Gateway with Cloud (`cowork gateway register`).

`register()` exchanges a registration credential (`cwgr_…`, shown once by the
hub's admin API) for NATS credentials for a fresh nkey, over the public
bootstrap identity, and stores them with the registration in a `GatewayStore`.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import ValidationError

from schemas import (
    GatewayRegisterReply,
    GatewayRegisterRequest,
    PrincipalKind,
    ReplyKey,
    Source,
    VersionSet,
    subjects,
    versions,
)

from ..common import (
    BootstrapFailed,
    EdgeCredentials,
    OpenCodeClient,
    OpenCodeError,
    bootstrap_exchange,
    new_user_seed,
)
from ._store import GatewayFile, GatewayStore


class RegistrationFailed(BootstrapFailed):
    """Registration refused or impossible; the message says why, in one line."""

    default_code = "registration.failed"


def version_set(opencode_version: str | None) -> VersionSet:
    """The versions this Gateway speaks; OpenCode's comes from its /global/health."""
    return VersionSet(
        product=versions.product_version(),
        opencode=(opencode_version or "unknown")[:64],
        bus_protocol=versions.BUS_PROTOCOL,
        event_contract=versions.EVENT_CONTRACT,
        projection_contract=versions.PROJECTION_CONTRACT,
        checkpoint_schema=versions.CHECKPOINT_SCHEMA,
    )


async def opencode_version(
    opencode_url: str, password: str | None = None, timeout: float = 5.0
) -> str | None:
    """OpenCode's version from `GET /global/health`, or None when it does not answer."""
    async with OpenCodeClient(opencode_url, password=password, timeout=timeout) as client:
        try:
            health = await client.health()
        except OpenCodeError:
            return None
    version = health.get("version") if isinstance(health, dict) else None
    return str(version) if version else None


async def register(
    credential: str,
    hub_urls: list[str],
    store: GatewayStore,
    version_info: VersionSet,
    *,
    timeout: float = 10.0,
) -> GatewayFile:
    """Exchange `credential` for NATS credentials and store them in `store`.

    Registering again (after a rotation) replaces the stored credential; the
    work journal is kept."""
    credential = credential.strip()
    if not credential.startswith("cwgr_") or len(credential) < 16:
        raise RegistrationFailed(
            "that is not a Gateway registration credential (they start "
            "with cwgr_ and come from the hub's gateway-registrations API)",
            "credential.malformed",
        )
    seed, reply_key = new_user_seed(), ReplyKey()
    creds = EdgeCredentials("", seed)
    try:
        request = GatewayRegisterRequest(
            credential=credential,
            public_key=creds.public_key,
            reply_key=reply_key.public,
            versions=version_info,
        )
    except ValidationError as exc:
        raise RegistrationFailed(
            f"cannot build the request: {exc.errors()[0]['msg']}", "credential.malformed"
        ) from None
    reply = await bootstrap_exchange(
        hub_urls,
        subjects.GATEWAY_REGISTER.build(),
        request,
        Source(principal_kind=PrincipalKind.GATEWAY, principal_id="unregistered"),
        reply_key,
        GatewayRegisterReply,
        timeout=timeout,
        what="registration",
        error=RegistrationFailed,
    )
    return _store_registration(store, reply, hub_urls, seed)


def _store_registration(
    store: GatewayStore, reply: GatewayRegisterReply, hub_urls: list[str], seed: bytes
) -> GatewayFile:
    previous = store.load() if store.is_registered() else None
    store.ensure_dir()
    EdgeCredentials(reply.user_jwt, seed).write_creds_file(store.creds_path)
    gateway = GatewayFile(
        tenant=reply.tenant,
        registration_id=reply.registration_id,
        display_name=reply.display_name,
        kind=reply.kind.value,
        scopes=[s.value for s in reply.scopes],
        sync_scopes=list(reply.sync_scopes),
        hub_urls=list(hub_urls),
        registered_at=datetime.now(UTC).isoformat(),
        credential_expires_at=reply.expires_at.isoformat(),
        heartbeat_interval_seconds=reply.heartbeat_interval_seconds,
        state=reply.state.value,
    )
    store.save(gateway)
    same = previous is not None and (previous.tenant, previous.registration_id) == (
        gateway.tenant,
        gateway.registration_id,
    )
    store.audit(
        "gateway.registration.reregistered" if same else "gateway.registration.registered",
        tenant=gateway.tenant,
        registrationId=gateway.registration_id,
        kind=gateway.kind,
        scopes=gateway.scopes,
        hub=hub_urls,
        **({"replaced": previous.registration_id} if previous and not same else {}),
    )
    return gateway
