"""What an outbound transport keeps on the bus, with the instance's own credentials,
so the hub's replicas and `cowork channel run` processes share it alike:

- its **lease** (KV bucket CW_CHANNEL_LEASES, key `<tenant>.<instance>.transport`):
  exactly one connection per instance. It is the project's one lease
  (`channels.KvLease`, which the hub's partition leases use too): taken with
  `create`, kept with `update` at the revision last written, handed back with a
  delete at that revision, aged out by the bucket's max_age (the hub's partition
  lease TTL) one TTL after the last renewal. The holder stops its connection
  when the lease is no longer sure (two thirds of a TTL after the last renewal),
  before the key can age out. Unlike the hub's partitions it is a group of one:
  the instance's credentials may touch only its own keys (no member keys, no
  stream info, no deletes by sequence).
- its **cursor** (KV bucket CW_CHANNEL_CURSORS, key
  `<tenant>.<instance>.<transport name>`): where a new connection resumes
  (Telegram's next update offset, Discord's session and sequence, Matrix's
  next_batch), written only after the messages before it are stored.

The handles are built without stream info (the instance may not ask for it);
reads use the direct-get API (hub/auth/_permissions.py OWN_KV_KEYS).
"""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js.errors import KeyNotFoundError

from .._kv_lease import KvLease, direct_kv

LEASE_BUCKET = "CW_CHANNEL_LEASES"
CURSOR_BUCKET = "CW_CHANNEL_CURSORS"


def transport_lease(
    js: Any, tenant: str, instance_id: str, holder: str, *, ttl: float, timeout: float
) -> KvLease:
    """The single-connection lease of one instance's transport."""
    key = f"{tenant}.{instance_id}.transport"
    return KvLease(direct_kv(js, LEASE_BUCKET), key, holder, ttl=ttl, timeout=timeout)


class CursorStore:
    """One instance's transport cursor."""

    def __init__(
        self, js: Any, tenant: str, instance_id: str, name: str, *, timeout: float
    ) -> None:
        self._kv = direct_kv(js, CURSOR_BUCKET)
        self._key = f"{tenant}.{instance_id}.{name}"
        self._timeout = timeout

    async def load(self) -> str | None:
        try:
            entry = await asyncio.wait_for(self._kv.get(self._key), self._timeout)
        except KeyNotFoundError:
            return None
        return (entry.value or b"").decode() or None

    async def save(self, cursor: str) -> None:
        await asyncio.wait_for(self._kv.put(self._key, cursor.encode()), self._timeout)
