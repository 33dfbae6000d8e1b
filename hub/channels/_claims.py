"""The router's durable dedupe: one claim row per (tenant, instance, event type,
provider event id), the first insert wins.

Claims are taken for a whole fetched batch in one statement (one round trip
instead of one per message: the router's cost per message under load), then
each message is handled in order with the claim row it got.
"""

from __future__ import annotations

import asyncpg

from schemas import ChannelInbound

ClaimKey = tuple[str, str, str, str]  # tenant, instance, event type, provider event id

_INSERT = (
    "INSERT INTO channel_inbound_claims (tenant, instance_id, event_type, provider_event_id, "
    "message_id) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], "
    "$5::text[]) ON CONFLICT DO NOTHING RETURNING *"
)
_EXISTING = (
    "SELECT c.* FROM channel_inbound_claims c JOIN unnest($1::text[], $2::text[], $3::text[], "
    "$4::text[]) AS k(tenant, instance_id, event_type, provider_event_id) USING (tenant, "
    "instance_id, event_type, provider_event_id)"
)


def claim_key(tenant: str, inbound: ChannelInbound) -> ClaimKey:
    return (tenant, inbound.provider, str(inbound.event_type), inbound.provider_event_id)


def _key_of(row: asyncpg.Record) -> ClaimKey:
    return (row["tenant"], row["instance_id"], row["event_type"], row["provider_event_id"])


async def claim_all(
    pool: asyncpg.Pool, items: list[tuple[str, ChannelInbound]]
) -> dict[ClaimKey, dict]:
    """The claim row of each (tenant, inbound): new rows ('claimed', this message's
    id) where the key was free, the existing row otherwise."""
    wanted: dict[ClaimKey, str] = {}
    for tenant, inbound in items:
        wanted.setdefault(claim_key(tenant, inbound), inbound.id)
    if not wanted:
        return {}
    keys = list(wanted)
    columns = [list(col) for col in zip(*keys)]
    async with pool.acquire() as conn:
        rows = {
            _key_of(r): dict(r) for r in await conn.fetch(_INSERT, *columns, list(wanted.values()))
        }
        missing = [k for k in keys if k not in rows]
        if missing:
            rows.update(
                (_key_of(r), dict(r))
                for r in await conn.fetch(_EXISTING, *[list(col) for col in zip(*missing)])
            )
    return rows
