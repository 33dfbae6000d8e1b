"""Setting a message aside with its reason, durably, instead of dropping it."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

import asyncpg
import nats.errors
from asyncpg.exceptions import _base as asyncpg_base
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import (
    ContractError,
    DeadLetter,
    Envelope,
    Message,
    PrincipalKind,
    Source,
    decode,
    subjects,
)

from ._logging import LogBudget, kv
from ._metrics import HubMetrics

log = logging.getLogger("cowork.hub.deadletter")
M = TypeVar("M", bound=Message)
T = TypeVar("T")
R = TypeVar("R")

# What a row holds that PostgreSQL (or the driver) refuses: SQLSTATE classes 22 (data)
# and 23 (constraints), a value the driver cannot encode. Retrying never helps.
DATA_ERRORS = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg_base.DataError,
    UnicodeError,
)
# Trouble that passes (the database or NATS away, a lock conflict): retried for as long
# as the consumer allows.
TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.CannotConnectNowError,
    # 57xxx: the server shutting down or restarting under the query (admin or crash
    # shutdown), or a query cancelled by it.
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    nats.errors.Error,
)
# Any other failure is a bug or a surprise: retried this many deliveries, then set aside.
GIVE_UP_AFTER = 5


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) and not isinstance(exc, DATA_ERRORS)


def deliveries(msg: Msg) -> int:
    """How many times JetStream has delivered `msg` (1 for a first delivery)."""
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # not a JetStream message
        return 1


class StorageAway(Exception):
    """The database is away (a transient write failure) and the caller holds its
    messages to write them again, in order (`DeadLetters.write_batch(hold=True)`)."""


class Fenced(Exception):
    """This worker's partition lease has gone to another replica (its fencing
    token is not the partition's any more): stop, and neither ack nor nak what it
    holds; the new holder serves it again from the consumer's ack floor."""


class Rejected(Exception):
    """A bus message the hub will not accept: set aside with this code and reason."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def parse_and_decode(
    family: subjects.SubjectFamily, msg: Msg, model: type[M]
) -> tuple[dict[str, str], Envelope[M]]:
    """The subject's parameters and the decoded envelope, or Rejected with why."""
    try:
        return family.parse(msg.subject), decode(msg.data, model)
    except subjects.SubjectError as exc:
        raise Rejected("subject.invalid", str(exc)) from None
    except ContractError as exc:
        raise Rejected(exc.code, exc.reason) from None


_MAX = 16 * 1024


def _failed(msg: Msg, exc: BaseException, code: str = "storage.failed") -> Rejected:
    attempts = deliveries(msg)
    reason = f"not stored after {attempts} delivery(ies): {type(exc).__name__}: {exc}"
    return Rejected(code, reason[:2000])


class DeadLetters:
    def __init__(self, js: JetStreamContext, metrics: HubMetrics, hub_id: str) -> None:
        self._js = js
        self._metrics = metrics
        self._log_budget = LogBudget(rate=1.0, burst=20)
        self._source = Source(principal_kind=PrincipalKind.HUB, principal_id=hub_id)
        self._holds: dict[int, int] = {}  # held batches that failed by surprise: how often

    async def put(
        self,
        *,
        tenant: str | None,
        family: subjects.SubjectFamily,
        subject: str,
        payload: bytes,
        code: str,
        reason: str,
        attempts: int = 1,
    ) -> None:
        encoding: Literal["utf-8", "base64"]
        try:
            text, encoding = payload[:_MAX].decode(), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(payload[:_MAX]).decode(), "base64"
        letter = DeadLetter(
            reason=reason[:16_000],
            code=code,
            original_subject=subject[:512],
            original_payload=text,
            payload_encoding=encoding,
            attempts=attempts,
        )
        envelope = Envelope.wrap(letter, source=self._source, tenant=tenant)
        await self._js.publish(
            subjects.dead_letter_subject(tenant, family),
            envelope.encode(),
            headers={"Cowork-Reason": code},
        )
        self._metrics.dead_letters.labels(family.name, code).inc()
        # Every letter is durable and counted; the log shows the first few of a kind,
        # then one a second with how many it left out (a poison flood is not a log flood).
        suppressed = self._log_budget.allow(f"{family.name}:{code}")
        if suppressed is not None:
            log.warning(
                "bus.dead_lettered",
                **kv(
                    family=family.name,
                    subject=subject,
                    code=code,
                    reason=reason,
                    suppressed=suppressed or None,
                ),
            )

    async def reject(self, msg: Msg, family: subjects.SubjectFamily, exc: Rejected) -> None:
        """Dead-letter a consumed message (its tenant from the subject when it parses),
        count it, then ack it: it is set aside, not retried."""
        tenant: Any = None
        try:
            tenant = family.parse(msg.subject)["tenant"]
        except subjects.SubjectError:
            pass
        await self.put(
            tenant=tenant,
            family=family,
            subject=msg.subject,
            payload=msg.data,
            code=exc.code,
            reason=str(exc),
            attempts=deliveries(msg),
        )
        self._metrics.bus_messages.labels(family.name, "refused").inc()
        await msg.ack()

    async def retry_or_reject(
        self,
        msg: Msg,
        family: subjects.SubjectFamily,
        max_deliver: int,
        exc: BaseException,
        *,
        delay: float,
        hold: bool = False,
    ) -> None:
        """A consumed message whose write failed: redelivered after `delay`, or
        dead-lettered with the error (then acked) when retrying cannot help: a data
        error at once; another non-transient error after GIVE_UP_AFTER deliveries;
        any error on the consumer's last delivery (`max_deliver`), so JetStream never
        drops a message without a dead letter. With `hold` (an ordered consumer,
        which has held and retried it already) never redelivered: a nak would bring
        it back behind newer messages."""
        attempts = deliveries(msg)
        last = 0 < max_deliver <= attempts
        if isinstance(exc, DATA_ERRORS):
            code = "storage.refused"
        elif hold or last or (not is_transient(exc) and attempts >= GIVE_UP_AFTER):
            code = "storage.failed"
        else:
            await msg.nak(delay=delay)
            return
        await self.reject(msg, family, _failed(msg, exc, code))

    async def write_batch(
        self,
        family: subjects.SubjectFamily,
        max_deliver: int,
        items: list[tuple[Msg, T]],
        write: Callable[[list[T]], Awaitable[R]],
        log: logging.Logger,
        *,
        delay: float,
        hold: bool = False,
    ) -> list[tuple[list[Msg], R]]:
        """`write` the items' values in one go; if that fails other than transiently,
        one at a time, so a value PostgreSQL refuses costs only its own message.
        Returns each successful write's messages and result, for the caller to ack;
        the messages of failed writes are naked or dead-lettered (`retry_or_reject`).
        With `hold`, a transient failure raises StorageAway and naks nothing: a
        caller that keeps order retries the same items rather than have them come
        back behind newer ones."""
        try:
            return [([msg for msg, _ in items], await write([value for _, value in items]))]
        except Fenced:
            raise
        except Exception as exc:  # noqa: BLE001 - sorted out below
            failure: BaseException = exc
        log.warning(
            "bus.write_failed",
            **kv(
                family=family.name, count=len(items), error=f"{type(failure).__name__}: {failure}"
            ),
        )
        if hold and not isinstance(failure, DATA_ERRORS) and self._hold_again(items, failure):
            raise StorageAway(str(failure)) from failure
        if len(items) == 1 or is_transient(failure):
            for msg, _ in items:
                await self.retry_or_reject(
                    msg, family, max_deliver, failure, delay=delay, hold=hold
                )
            return []
        done = []
        for msg, value in items:
            try:
                done.append(([msg], await write([value])))
            except Fenced:
                raise
            except Exception as exc:  # noqa: BLE001 - this item alone
                if hold and is_transient(exc):  # the database went away midway: hold
                    raise StorageAway(str(exc)) from exc
                await self.retry_or_reject(msg, family, max_deliver, exc, delay=delay, hold=hold)
        return done

    def _hold_again(self, items: list[tuple[Msg, T]], failure: BaseException) -> bool:
        """With `hold`, every failure but a data error holds the items in order: a
        transient one for as long as it lasts, any other (a surprise) GIVE_UP_AFTER
        times, after which the items are tried one by one and what still fails is
        dead-lettered, never naked (a nak would bring it back behind newer ones)."""
        if is_transient(failure):
            return True
        key = id(items[0][0])
        if len(self._holds) > 10_000:  # only batches that failed, then went through
            self._holds.clear()
        self._holds[key] = self._holds.get(key, 0) + 1
        if self._holds[key] < GIVE_UP_AFTER:
            return True
        del self._holds[key]
        return False
