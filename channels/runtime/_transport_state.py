"""What an outbound transport keeps on the bus, with the instance's own credentials,
so the hub's replicas and `cowork channel run` processes share it alike:

- its **lease** (KV bucket CW_CHANNEL_LEASES, key `<tenant>.<instance>.transport`):
  exactly one connection per instance. Taken with `create` (succeeds only where
  no live key is), kept with `update` at the revision last written (fails as
  soon as anybody else holds it), handed back with a delete at that revision.
  Keys nobody renews age out (the bucket's max_age is the lease TTL, the hub's
  partition lease TTL), so a dead holder's lease is free one TTL after its last
  renewal. The holder stops its connection when the lease is no longer sure
  (two thirds of a TTL after the last renewal), before the key can age out.
  This is the hub's partition-lease rule (hub/core/_leases.py) for a group of
  one; it lives here because channel code may not import the hub and the
  instance's credentials may touch only its own keys (no member keys, no stream
  info, no deletes by sequence).
- its **cursor** (KV bucket CW_CHANNEL_CURSORS, key
  `<tenant>.<instance>.<transport name>`): where a new connection resumes
  (Telegram's next update offset, Discord's session and sequence, Matrix's
  next_batch), written only after the messages before it are stored.

The handles are built without stream info (the instance may not ask for it);
reads use the direct-get API (hub/auth/_permissions.py OWN_KV_KEYS).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

LEASE_BUCKET = "CW_CHANNEL_LEASES"
CURSOR_BUCKET = "CW_CHANNEL_CURSORS"


def _handle(js: Any, bucket: str) -> KeyValue:
    return KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=js, direct=True)


class LeaseLost(Exception):
    pass


class TransportLease:
    """The single-connection lease of one instance's transport."""

    def __init__(
        self, js: Any, tenant: str, instance_id: str, holder: str, *, ttl: float, timeout: float
    ) -> None:
        self._kv = _handle(js, LEASE_BUCKET)
        self._key = f"{tenant}.{instance_id}.transport"
        self.holder, self.ttl, self._timeout = holder, ttl, timeout
        self._revision = 0
        self._renewed_at = 0.0

    @property
    def held(self) -> bool:
        return self._revision != 0

    def sure(self) -> bool:
        """Renewed less than two thirds of a TTL ago (monotonic clock): the key
        outlives that by a third, so two holders never run at once."""
        return self.held and time.monotonic() - self._renewed_at < self.ttl * 2 / 3

    async def try_take(self) -> str | None:
        """Take the lease: None when taken, else who holds it (their holder name)."""
        sent = time.monotonic()
        try:
            revision = await asyncio.wait_for(
                self._kv.create(self._key, self.holder.encode()), self._timeout
            )
        except KeyWrongLastSequenceError:
            try:
                entry = await asyncio.wait_for(self._kv.get(self._key), self._timeout)
            except KeyNotFoundError:
                return "another process (just released)"
            return (entry.value or b"?").decode(errors="replace")[:200]
        self._revision, self._renewed_at = revision, sent
        return None

    async def renew(self) -> None:
        """Keep it; LeaseLost when another holder has it (ours aged out)."""
        sent = time.monotonic()
        try:
            self._revision = await asyncio.wait_for(
                self._kv.update(self._key, self.holder.encode(), last=self._revision),
                self._timeout,
            )
        except KeyWrongLastSequenceError:
            self._revision = 0
            raise LeaseLost("taken over by another process") from None
        self._renewed_at = sent

    async def keep(self) -> None:
        """Renew every third of the TTL until cancelled; return when it is lost or no
        longer sure (NATS out of reach)."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                await self.renew()
            except LeaseLost:
                return
            except Exception:  # NATS away: keep it while it is sure
                pass
            if not self.sure():
                self._revision = 0
                return

    async def release(self) -> None:
        """Hand it back at once (a delete at our revision: someone else's newer
        key stays). Best effort: otherwise it ages out."""
        revision, self._revision = self._revision, 0
        if not revision:
            return
        try:
            await asyncio.wait_for(self._kv.delete(self._key, last=revision), self._timeout)
        except Exception:
            pass


class CursorStore:
    """One instance's transport cursor."""

    def __init__(
        self, js: Any, tenant: str, instance_id: str, name: str, *, timeout: float
    ) -> None:
        self._kv = _handle(js, CURSOR_BUCKET)
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
