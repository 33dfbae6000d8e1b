"""One key of a NATS KV bucket held by one holder at a time: the project's one lease.

- **take**: `create`, which succeeds only where no live key is (an absent key,
  or one handed back: a delete marker);
- **renew**: `update` at the revision this holder last wrote, which fails as soon
  as anybody else wrote the key (ours aged out and was taken): `LeaseLost`;
- **release**: a delete at that revision (someone else's newer key stays), so the
  key is free at once rather than one TTL later;
- **expiry**: keys nobody renews age out of the bucket (its max_age is the TTL),
  so a dead holder's lease is free one TTL after its last renewal;
- **fencing token**: the KV revision the lease was taken at; every later holder's
  is larger, so a store that remembers the largest token seen can refuse an
  earlier holder's write;
- **sure**: renewed (or taken) less than two thirds of a TTL ago, by this
  process's monotonic clock (which runs on while the process is frozen). The key
  outlives that by a third of a TTL, so a holder that stops working when its lease
  is no longer sure never overlaps the next one, even when it cannot reach NATS to
  learn that it lost.

No consensus of our own: JetStream's per-subject compare-and-set decides every
race. The caller chooses the bucket handle, so a principal allowed only its own
keys (no stream info, no deletes by sequence) can hold a lease too (`direct_kv`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from nats.js.errors import (
    BadRequestError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

T = TypeVar("T")
SURE_FRACTION = 2 / 3  # of the TTL: how long a renewal (or a take) keeps a lease sure
WRONG_LAST = 10071  # JetStream's "wrong last sequence" (a delete raises it as a bad request)


def direct_kv(js: Any, bucket: str) -> KeyValue:
    """A bucket's handle built without asking for its stream info (a principal may
    not be allowed to), reading by the direct-get API."""
    return KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=js, direct=True)


class LeaseLost(Exception):
    """The lease was taken by another holder (ours had aged out)."""


class KvLease:
    """The lease on `key` for `holder` (the value written: who holds it)."""

    def __init__(
        self,
        kv: KeyValue,
        key: str,
        holder: str,
        *,
        ttl: float,
        timeout: float | None = None,
    ) -> None:
        self.key, self.holder = key, holder
        # How long the key outlives its last renewal: the bucket's max_age. A holder
        # that reads it from the bucket updates it (an operator may change it).
        self.ttl = ttl
        self._kv, self._timeout = kv, timeout
        self._revision = 0  # the last revision we wrote (0: not held)
        self._token = 0
        self._renewed_at = 0.0  # monotonic time the last successful write was sent

    @property
    def held(self) -> bool:
        return self._revision != 0

    @property
    def token(self) -> int:
        """The fencing token: the revision the lease was taken at (0: not held)."""
        return self._token if self.held else 0

    def sure(self) -> bool:
        """Held, and renewed less than two thirds of a TTL ago (monotonic clock)."""
        return self.held and time.monotonic() - self._renewed_at < self.ttl * SURE_FRACTION

    async def try_take(self) -> bool:
        """Take it if nobody holds it; False when a live key is somebody's."""
        for _ in range(2):
            sent = time.monotonic()
            try:
                revision = await self._call(self._kv.create(self.key, self.holder.encode()))
            except KeyWrongLastSequenceError:
                return False
            except KeyNotFoundError:
                # nats-py's create, refused because a key was there, reads it to see
                # whether it is a delete marker; when the key aged out between the
                # two, that read finds nothing. The key is free now: try once more.
                continue
            self._revision = self._token = revision
            self._renewed_at = sent
            return True
        return False

    async def holder_now(self) -> str | None:
        """Who holds the key now (its value), None when nobody does."""
        try:
            entry = await self._call(self._kv.get(self.key))
        except (KeyNotFoundError, KeyDeletedError):  # absent, or handed back
            return None
        return (entry.value or b"?").decode(errors="replace")[:200]

    async def renew(self) -> None:
        """Keep it; `LeaseLost` (and no longer held) when another holder has it.
        Other errors (NATS out of reach) leave it held while it is sure."""
        if not self.held:
            raise LeaseLost("not held")
        sent = time.monotonic()
        try:
            revision = await self._call(
                self._kv.update(self.key, self.holder.encode(), last=self._revision)
            )
        except KeyWrongLastSequenceError:
            self._revision = 0
            raise LeaseLost("taken over by another holder") from None
        self._revision, self._renewed_at = revision, sent

    async def keep(self) -> None:
        """Renew every third of the TTL until cancelled; return once the lease is
        lost or no longer sure (NATS out of reach): the holder must stop then."""
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
        """Hand it back at once: a delete at our revision (a newer key, someone
        else's, stays). No longer held even when the delete fails (the key then
        ages out); that failure is raised for the caller to report."""
        revision, self._revision = self._revision, 0
        if not revision:
            return
        try:
            await self._call(self._kv.delete(self.key, last=revision))
        except BadRequestError as exc:
            if exc.err_code != WRONG_LAST:  # else written since: not ours to delete
                raise

    async def _call(self, call: Awaitable[T]) -> T:
        if self._timeout is None:
            return await call
        return await asyncio.wait_for(call, self._timeout)
