"""What every bootstrap request shares: the per-source brute-force limit and the
responder skeleton.

Pairing-code redemption and Gateway registration both take a secret from a
client that holds no credential yet. The server shares the client's info with
the request (`Nats-Request-Info`), which gives its source address. After
`MAX_FAILURES` failed secrets within `WINDOW`, that source is refused for
`LOCKOUT`. The count lives in PostgreSQL so every hub replica shares it, and it
is one count per source for all bootstrap secrets: guessing pairing codes and
guessing registration credentials from one address spend the same budget.

Both answer the same way (`BootstrapResponder`): a refusal is a plain `ack.reply`
(it holds nothing secret); a success is a `bootstrap.sealed_reply` that only the
requester can open.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any

import asyncpg
from nats.aio.msg import Msg

from schemas import AckReply, ContractError, Envelope, SealedReply, SealError, Source, decode, seal

from ..core import HubMetrics, kv

log = logging.getLogger("cowork.hub.bootstrap")

MAX_FAILURES = 10
WINDOW = timedelta(minutes=10)
LOCKOUT = timedelta(minutes=15)


def request_source(msg: Msg) -> str:
    """The client's address from the shared client info, else 'unknown'."""
    info = (msg.headers or {}).get("Nats-Request-Info")
    if not info:
        return "unknown"
    try:
        return str(json.loads(info).get("host") or "unknown")[:128]
    except (ValueError, AttributeError):
        return "unknown"


class BootstrapLockout:
    """Failed bootstrap secrets counted per source; `locked_for` says how long a
    source must still wait (None when it may try)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_failures: int = MAX_FAILURES,
        window: timedelta = WINDOW,
        lockout: timedelta = LOCKOUT,
    ) -> None:
        self._pool = pool
        self.max_failures, self.window, self.lockout = max_failures, window, lockout

    async def locked_for(self, source: str) -> float | None:
        left = await self._pool.fetchval(
            "SELECT extract(epoch FROM locked_until - now()) FROM bootstrap_failures "
            "WHERE source = $1 AND locked_until > now()",
            source,
        )
        return None if left is None else round(float(left), 1)

    async def count_failure(self, source: str, what: str) -> int:
        """Count one failed secret from `source` (`what` names it in the log); returns
        the failures in the current window."""
        failures = await self._pool.fetchval(
            """INSERT INTO bootstrap_failures (source, window_started_at, failures)
               VALUES ($1, now(), 1)
               ON CONFLICT (source) DO UPDATE SET
                 failures = CASE WHEN bootstrap_failures.window_started_at < now() - $2::interval
                                 THEN 1 ELSE bootstrap_failures.failures + 1 END,
                 window_started_at = CASE WHEN bootstrap_failures.window_started_at < now() - $2
                                 THEN now() ELSE bootstrap_failures.window_started_at END,
                 locked_until = CASE WHEN bootstrap_failures.window_started_at >= now() - $2
                                      AND bootstrap_failures.failures + 1 >= $3
                                 THEN now() + $4 ELSE bootstrap_failures.locked_until END
               RETURNING failures""",
            source,
            self.window,
            self.max_failures,
            self.lockout,
        )
        log.warning("bootstrap.secret_refused", **kv(what=what, source=source, failures=failures))
        return int(failures)


class BootstrapResponder:
    """Decode the request, run `exchange`, seal its reply to the requester's
    `reply_key`. The exchange's own refusals (`refusal` turns them into an ack) are
    answered as they are; an unexpected failure (e.g. the database is away) is
    answered as `hub.unavailable` rather than left hanging."""

    family: str  # the bus-message metric label, e.g. "pairing.redeem"
    request_model: type
    unavailable: str  # the `hub.unavailable` reason people read

    def __init__(self, metrics: HubMetrics, *, hub_id: str) -> None:
        self._metrics = metrics
        self._source = Source(principal_kind="hub", principal_id=hub_id)

    async def exchange(self, request: Any, source: str) -> Any:
        """The reply (it names its `tenant`), or an exception `refusal` recognises."""
        raise NotImplementedError

    def refusal(self, exc: Exception) -> AckReply | None:
        """The answer to one of the exchange's refusals; None for anything else."""
        raise NotImplementedError

    async def settle(self) -> None:
        """Work that must wait until the answer has left (see `handle`)."""

    async def handle(self, msg: Msg) -> None:
        try:
            await self._answer(msg)
        finally:
            # The bootstrap services are imported into the BOOTSTRAP account: a reply
            # travels back through the import's response mapping, which an account
            # push (a key revocation) replaces. So the answer is flushed to the server
            # first, and only then may the exchange's revocations be pushed.
            nc = getattr(msg, "_client", None)  # the connection the answer went out on
            if nc is not None and nc.is_connected:
                try:
                    await nc.flush(timeout=5)
                except Exception as exc:  # nats-py raises several unrelated types here
                    log.warning(f"{self.family}_flush_failed", **kv(error=str(exc)))
            await self.settle()

    async def _answer(self, msg: Msg) -> None:
        source = request_source(msg)
        try:
            request = decode(msg.data, self.request_model).data
        except ContractError as exc:
            await self._refuse(msg, _refused(exc.code, exc.reason))
            return
        try:
            reply = await self.exchange(request, source)
            sealed = seal(
                Envelope.wrap(reply, source=self._source, tenant=reply.tenant).encode(),
                request.reply_key,
            )
        except SealError as exc:
            await self._refuse(msg, _refused("contract.invalid", str(exc)))
            return
        except Exception as exc:
            answer = self.refusal(exc)
            await self._refuse(msg, self._unavailable(exc) if answer is None else answer)
            return
        self._metrics.bus_messages.labels(self.family, "accepted").inc()
        await msg.respond(Envelope.wrap(SealedReply(sealed=sealed), source=self._source).encode())

    def _unavailable(self, exc: Exception) -> AckReply:
        log.warning(f"{self.family}_failed", **kv(error=str(exc)))
        return _refused("hub.unavailable", self.unavailable)

    async def _refuse(self, msg: Msg, answer: AckReply) -> None:
        self._metrics.bus_messages.labels(self.family, "rejected").inc()
        if msg.reply:
            await msg.respond(Envelope.wrap(answer, source=self._source).encode())


def _refused(code: str, reason: str) -> AckReply:
    return AckReply(ok=False, code=code, reason=reason[:16_000])
