"""Helpers for tests of Gateway registrations against a real hub.

`create_registration` goes through the admin API; `register` exchanges a
credential on the real bootstrap subject (`cw.bootstrap.gateway.register`) with
a fresh nkey and reply key, exactly as a Gateway does, and returns the hub's
answer (opened) or its refusal; `registered_gateway` does both and connects
with the issued credential, giving a `GatewayClient` that sends heartbeats,
capabilities and syncs on the registration's own subjects.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import httpx

from edges.common._bootstrap import bootstrap_options, dial_once
from hub.auth import _jwt
from schemas import (
    AckReply,
    Envelope,
    GatewayCapabilities,
    GatewayHeartbeat,
    GatewayHeartbeatReply,
    GatewayRegisterReply,
    GatewayRegisterRequest,
    GatewaySync,
    SealedReply,
    Source,
    VersionSet,
    decode,
    subjects,
    versions,
)
from schemas._bootstrap import ReplyKey

TENANT = "acme"
OPENCODE = "1.18.33"


def base(tenant: str = TENANT) -> str:
    return f"/api/v1/tenants/{tenant}/gateway-registrations"


def healthy_beat(sequence: int, interval: float = 5.0) -> GatewayHeartbeat:
    """A heartbeat of a healthy, compatible, idle Gateway."""
    return GatewayHeartbeat(
        liveness="alive",
        mode="active",
        health="healthy",
        current_load=0,
        active_work_ids=[],
        heartbeat_sequence=sequence,
        interval_seconds=interval,
        versions=good_versions(),
    )


def good_versions(**overrides: str) -> VersionSet:
    """The versions of a compatible Gateway (this code's own), with `overrides`."""
    values = dict(
        product=versions.product_version(),
        opencode=OPENCODE,
        bus_protocol=versions.BUS_PROTOCOL,
        event_contract=versions.EVENT_CONTRACT,
        projection_contract=versions.PROJECTION_CONTRACT,
        checkpoint_schema=versions.CHECKPOINT_SCHEMA,
    )
    values.update(overrides)
    return VersionSet(**values)


# --- admin API ----------------------------------------------------------------------------------
async def create_registration(
    http: httpx.AsyncClient,
    kind: str = "edge_worker",
    *,
    trust: str = "self_hosted_same_operator",
    name: str = "test gateway",
    tenant: str = TENANT,
    **body: Any,
) -> dict:
    response = await http.post(
        base(tenant), json={"displayName": name, "kind": kind, "trustModel": trust, **body}
    )
    assert response.status_code == 201, response.text
    return response.json()


async def get_registration(
    http: httpx.AsyncClient, registration_id: str, tenant: str = TENANT
) -> dict:
    response = await http.get(f"{base(tenant)}/{registration_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def admin_action(
    http: httpx.AsyncClient,
    registration_id: str,
    action: str,
    tenant: str = TENANT,
    expect: int = 200,
    **body: Any,
) -> dict:
    response = await http.post(f"{base(tenant)}/{registration_id}/{action}", json=body)
    assert response.status_code == expect, response.text
    return response.json()


# --- the bootstrap exchange ---------------------------------------------------------------------
class Registration:
    """One register request's outcome: `reply` when accepted, else `refusal`."""

    def __init__(
        self, seed: bytes, reply: GatewayRegisterReply | None, refusal: AckReply | None
    ) -> None:
        self.seed, self.reply, self.refusal = seed, reply, refusal

    @property
    def code(self) -> str | None:
        return self.refusal.code if self.refusal else None


async def register(
    nats_url: str,
    credential: str,
    *,
    version_set: VersionSet | None = None,
    seed: bytes | None = None,
    timeout: float = 5.0,
) -> Registration:
    """Send `cw.bootstrap.gateway.register` as the public bootstrap identity."""
    seed = seed or _jwt.new_seed("user")
    reply_key = ReplyKey()
    request = GatewayRegisterRequest(
        credential=credential,
        public_key=_jwt.public_key(seed),
        reply_key=reply_key.public,
        versions=version_set or good_versions(),
    )
    env = Envelope.wrap(
        request, source=Source(principal_kind="gateway", principal_id="unregistered")
    )
    nc = await dial_once([nats_url], timeout, **bootstrap_options())
    try:
        raw = (
            await nc.request(subjects.GATEWAY_REGISTER.build(), env.encode(), timeout=timeout)
        ).data
    finally:
        await nc.close()
    if json.loads(raw)["type"] == AckReply.message_type:
        return Registration(seed, None, decode(raw, AckReply).data)
    sealed = decode(raw, SealedReply).data.sealed
    return Registration(seed, decode(reply_key.open(sealed), GatewayRegisterReply).data, None)


# --- a registered Gateway's own connection ---------------------------------------------------------
class GatewayClient:
    """A Gateway's bus connection (its own credential and reply inbox)."""

    def __init__(self, edge: Any, tenant: str, registration_id: str) -> None:
        self.edge, self.nc = edge, edge.nc
        self.tenant, self.registration_id = tenant, registration_id
        self.source = Source(principal_kind="gateway", principal_id=registration_id)
        self._sequence = itertools.count(1)

    @classmethod
    async def connect(cls, nats_url: str, registration: Registration) -> GatewayClient:
        from hubkit import connect_with

        reply = registration.reply
        assert reply is not None, registration.refusal
        inbox = subjects.inbox_prefix(reply.tenant, "gateway", reply.registration_id)
        edge = await connect_with(nats_url, reply.user_jwt, registration.seed, inbox)
        return cls(edge, reply.tenant, reply.registration_id)

    async def close(self) -> None:
        await self.edge.close()

    async def request(
        self, subject: str, message: Any, reply_model: type, timeout: float = 5.0
    ) -> Any:
        env = Envelope.wrap(message, source=self.source, tenant=self.tenant)
        raw = (await self.nc.request(subject, env.encode(), timeout=timeout)).data
        if json.loads(raw)["type"] == AckReply.message_type:
            return decode(raw, AckReply).data
        return decode(raw, reply_model).data

    def beat(self, sequence: int | None = None, **fields: Any) -> GatewayHeartbeat:
        values: dict[str, Any] = dict(
            liveness="alive",
            mode="active",
            health="healthy",
            current_load=0,
            active_work_ids=[],
            heartbeat_sequence=next(self._sequence) if sequence is None else sequence,
            interval_seconds=5.0,
            versions=good_versions(),
        )
        values.update(fields)
        return GatewayHeartbeat(**values)

    async def heartbeat(
        self, sequence: int | None = None, **fields: Any
    ) -> GatewayHeartbeatReply | AckReply:
        subject = subjects.GATEWAY_HEARTBEAT.build(
            tenant=self.tenant, registration_id=self.registration_id
        )
        return await self.request(subject, self.beat(sequence, **fields), GatewayHeartbeatReply)

    async def capabilities(
        self,
        max_concurrent_work: int = 2,
        work_kinds: tuple[str, ...] = ("prompt",),
        capabilities: dict[str, str] | None = None,
    ) -> AckReply:
        caps = GatewayCapabilities(
            capabilities=capabilities or {"opencode": "supported", "prompt": "supported"},
            max_concurrent_work=max_concurrent_work,
            work_kinds=list(work_kinds),
        )
        subject = subjects.GATEWAY_CAPABILITIES.build(
            tenant=self.tenant, registration_id=self.registration_id
        )
        return await self.request(subject, caps, AckReply)

    async def sync(
        self,
        scope: str,
        items: list[Any],
        *,
        body_scope: str | None = None,
        cursor: str | None = None,
    ) -> AckReply:
        subject = subjects.GATEWAY_SYNC.build(
            tenant=self.tenant, registration_id=self.registration_id, scope=scope
        )
        message = GatewaySync(scope=body_scope or scope, items=items, cursor=cursor)
        return await self.request(subject, message, AckReply)


async def registered_gateway(
    http: httpx.AsyncClient,
    nats_url: str,
    kind: str = "edge_worker",
    *,
    version_set: VersionSet | None = None,
    **body: Any,
) -> tuple[dict, GatewayClient]:
    """Create a registration, register it with a fresh nkey and connect with the result."""
    created = await create_registration(http, kind, **body)
    registration = await register(nats_url, created["credential"], version_set=version_set)
    return created, await GatewayClient.connect(nats_url, registration)


async def issue_gateway_credential(
    hub: Any, tenant: str, registration_id: str, scopes: list[str]
) -> tuple[str, bytes]:
    """A Gateway's NATS credential issued by the hub itself: (user JWT, its seed)."""
    from hub.auth._permissions import Principal
    from schemas._vocabulary import CredentialScope, PrincipalKind

    seed = _jwt.new_seed("user")
    principal = Principal(
        PrincipalKind.GATEWAY,
        tenant,
        registration_id,
        scopes=frozenset(CredentialScope(s) for s in scopes),
    )
    issued = await hub.credentials.issue(principal, _jwt.public_key(seed))
    return issued.user_jwt, seed
