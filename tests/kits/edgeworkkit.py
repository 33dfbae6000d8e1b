"""Helpers for edge-work tests: registration rows (written directly, so these tests
do not depend on the registration API), a Gateway's bus connection and its
claim/renew/output requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from hub.core import flushed
from schemas import (
    AckReply,
    Envelope,
    Source,
    WorkClaimReply,
    WorkClaimRequest,
    WorkOutput,
    WorkRenew,
    WorkRenewReply,
    decode,
    subjects,
)
from schemas._vocabulary import CredentialScope, PrincipalKind

EDGE_SCOPES = sorted(
    s.value
    for s in (
        CredentialScope.HEARTBEAT,
        CredentialScope.CAPABILITIES,
        CredentialScope.EDGE_CLAIM,
        CredentialScope.EDGE_LEASE_RENEW,
        CredentialScope.EDGE_WRITE_FENCED_OUTPUT,
    )
)


@contextlib.asynccontextmanager
async def edge_work_service(
    hub, dsn: str, *, hub_id: str, min_size: int = 1, max_size: int = 4
) -> AsyncIterator[Any]:
    """An EdgeWorkService of its own (another replica's, to the hub's) on a pool of its
    own; offers and live events go out on the hub's NATS connection."""
    from hub.core._audit import AuditLog
    from hub.core._db import create_pool
    from hub.core._metrics import HubMetrics
    from hub.work._service import EdgeWorkService

    pool = await create_pool(dsn, min_size=min_size, max_size=max_size)
    svc = EdgeWorkService(
        pool,
        AuditLog(pool),
        hub.nc,
        HubMetrics(),
        hub.dead_letters,
        hub_id=hub_id,
        lease_seconds=30.0,
        write_rate=100_000,
    )
    try:
        yield svc
    finally:
        await svc.stop()
        await pool.close()


async def add_registration(
    db,
    tenant: str,
    reg_id: str | None = None,
    *,
    kind: str = "edge_worker",
    status: str = "active",
    trust: str = "self_hosted_same_operator",
    scopes: list[str] | None = None,
    max_concurrent_work: int = 4,
    work_kinds: tuple[str, ...] = ("prompt",),
    capabilities: dict[str, str] | None = None,
    approved_credentials: tuple[str, ...] = (),
    drain_deadline: datetime | None = None,
) -> str:
    """Insert an edge registration row as the registration service would leave it
    (with a long heartbeat interval, so the unhealthy sweep leaves it alone)."""
    reg_id = reg_id or f"gw{secrets.token_hex(6)}"
    await db.execute(
        """INSERT INTO gateway_registrations (tenant, registration_id, display_name, kind,
               trust_model, scopes, sync_scopes, approved_credentials, credential_expires_at,
               status, drain_deadline, capabilities, work_kinds, max_concurrent_work,
               created_by, registered_at, last_heartbeat_at, heartbeat_interval)
           VALUES ($1,$2,$3,$4,$5,$6,'{}',$7,$8,$9,$10,$11::text::jsonb,$12,$13,'test',now(),
                   now(), 3600)""",
        tenant,
        reg_id,
        f"gateway {reg_id}",
        kind,
        trust,
        scopes or EDGE_SCOPES,
        list(approved_credentials),
        datetime.now(UTC) + timedelta(days=30),
        status,
        drain_deadline,
        json.dumps(capabilities if capabilities is not None else {"opencode": "supported"}),
        list(work_kinds),
        max_concurrent_work,
    )
    return reg_id


def enqueue_body(text: str = "say hello", *, workspace: str = "ws1", **extra: Any) -> dict:
    return {
        "kind": "prompt",
        "sessionRef": {"workspaceId": workspace},
        "payload": {"text": text},
        **extra,
    }


class GatewayBus:
    """A registered Gateway's own NATS connection (its credential, its inbox)."""

    def __init__(self, edge, tenant: str, reg_id: str) -> None:
        self.edge, self.tenant, self.reg_id = edge, tenant, reg_id
        self.nc = edge.nc
        self.source = Source(principal_kind="gateway", principal_id=reg_id)

    @classmethod
    async def connect(
        cls, hub, tenant: str, reg_id: str, scopes: list[str] | None = None
    ) -> GatewayBus:
        from hubkit import connect_principal

        from hub.auth._permissions import Principal

        principal = Principal(
            PrincipalKind.GATEWAY,
            tenant,
            reg_id,
            scopes=frozenset(CredentialScope(s) for s in (scopes or EDGE_SCOPES)),
        )
        return cls(await connect_principal(hub, principal), tenant, reg_id)

    async def close(self) -> None:
        await self.edge.close()

    async def _request(self, family, message, reply_model, timeout: float = 5.0):
        subject = family.build(tenant=self.tenant, registration_id=self.reg_id)
        env = Envelope.wrap(message, source=self.source, tenant=self.tenant)
        raw = (await self.nc.request(subject, env.encode(), timeout=timeout)).data
        if json.loads(raw)["type"] == AckReply.message_type:
            return decode(raw, AckReply).data
        return decode(raw, reply_model).data

    async def claim(
        self,
        work_id: str | None = None,
        kinds: tuple[str, ...] = ("prompt",),
        *,
        claim_id: UUID | None = None,
    ) -> WorkClaimReply | AckReply:
        return await self._request(
            subjects.WORK_CLAIM,
            WorkClaimRequest(work_kinds=list(kinds), work_id=work_id, claim_id=claim_id),
            WorkClaimReply,
        )

    async def renew(self, work_id: str, token: str) -> WorkRenewReply | AckReply:
        return await self._request(
            subjects.WORK_RENEW, WorkRenew(work_id=work_id, lease_token=token), WorkRenewReply
        )

    async def output(
        self, work_id: str, token: str, sequence: int, kind: str = "event", body: dict | None = None
    ) -> AckReply:
        out = WorkOutput(
            work_id=work_id,
            lease_token=token,
            kind=kind,
            sequence=sequence,
            body=body if body is not None else {"n": sequence},
        )
        return await self._request(subjects.WORK_OUTPUT, out, AckReply)


async def collect(nc, subject: str, model) -> asyncio.Queue:
    """Subscribe and queue each message's decoded data (flushed, so nothing is missed)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def on_message(msg) -> None:
        queue.put_nowait(decode(msg.data, model).data)

    await nc.subscribe(subject, cb=on_message)
    await flushed(nc)  # not flush(): its PING can overtake the SUB (hub.core._flush)
    return queue
