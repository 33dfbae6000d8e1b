"""One-shot bootstrap requests from an edge that holds no credential yet.

Pairing a Desktop and registering a Gateway work the same way: the edge dials
the hub's NATS with the public bootstrap identity (which may only publish on
`cw.bootstrap.>`), sends one request carrying a one-time secret and the public
half of a reply key it just made, and gets back either a plain refusal
(`AckReply`) or its credential sealed to that reply key, so nobody else on the
bootstrap subjects can read it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS

from schemas import (
    BOOTSTRAP_USER_JWT,
    BOOTSTRAP_USER_SEED,
    AckReply,
    ContractError,
    Envelope,
    Message,
    ReplyKey,
    SealedReply,
    SealError,
    Source,
    decode,
)

from ._credentials import EdgeCredentials

M = TypeVar("M", bound=Message)


class BootstrapFailed(RuntimeError):
    """A bootstrap request was refused or impossible; the message says why, in one line."""

    default_code = "bootstrap.failed"

    def __init__(
        self, message: str, code: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code or self.default_code
        self.retry_after = retry_after


def bootstrap_options() -> dict[str, Any]:
    """nats-py connect options for the public bootstrap identity."""
    return EdgeCredentials(BOOTSTRAP_USER_JWT, BOOTSTRAP_USER_SEED).connect_options()


async def dial_once(urls: list[str], timeout: float, **options: Any) -> NATS:
    """One connection attempt per server, bounded by `timeout`, for one-shot requests.

    nats-py keeps cycling servers on the first connect when reconnects are off and
    prints each failure; this tries each URL at most twice, quietly, and raises
    ConnectionError with the server's last complaint."""
    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        errors.append(exc)

    try:
        return await asyncio.wait_for(
            nats.connect(
                urls,
                connect_timeout=min(timeout, 5.0),
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.1,
                error_cb=remember,
                **options,
            ),
            timeout,
        )
    except Exception as exc:  # nats-py raises several unrelated types here
        last = errors[-1] if errors else exc
        raise ConnectionError(str(last) or type(last).__name__) from None


async def bootstrap_request(
    hub_urls: list[str],
    subject: str,
    data: bytes,
    timeout: float,
    *,
    what: str,
    error: type[BootstrapFailed] = BootstrapFailed,
    client_name: str = "cowork-edge-bootstrap",
) -> bytes:
    """Send one request as the bootstrap identity; `what` names it in errors
    ("pairing", "registration"), `error` is the exception type raised."""
    try:
        nc = await dial_once(hub_urls, timeout, name=client_name, **bootstrap_options())
    except Exception as exc:  # nats-py raises several unrelated types here
        text = str(exc) or type(exc).__name__
        if "authorization" in text.lower():
            raise error(
                f"{', '.join(hub_urls)} refused the bootstrap identity: is it "
                "a cowork hub's NATS server in operator mode?",
                "bootstrap.refused",
            ) from None
        raise error(
            f"cannot reach {', '.join(hub_urls)}: {text}", "bootstrap.unreachable"
        ) from None
    try:
        msg = await nc.request(subject, data, timeout=timeout)
        return msg.data
    except nats.errors.NoRespondersError:
        raise error(
            f"no hub is answering {what} requests on that server", "bootstrap.no_hub"
        ) from None
    except nats.errors.TimeoutError:
        raise error(f"the hub did not answer within {timeout:g} s", "bootstrap.timeout") from None
    finally:
        await nc.close()


def open_sealed_reply(
    raw: bytes,
    reply_key: ReplyKey,
    model: type[M],
    *,
    error: type[BootstrapFailed] = BootstrapFailed,
) -> M:
    """The hub's answer: a refusal raises `error` with its code, a sealed reply is
    opened with `reply_key` and decoded as `model`."""
    try:
        kind = json.loads(raw).get("type")
        if kind == AckReply.message_type:
            refusal = decode(raw, AckReply).data
            raise error(
                refusal.reason or "refused", refusal.code or "refused", refusal.retry_after_seconds
            )
        sealed = decode(raw, SealedReply).data.sealed
        return decode(reply_key.open(sealed), model).data
    except (ValueError, AttributeError, ContractError, SealError) as exc:
        raise error(f"the hub's reply could not be read: {exc}", "contract.invalid") from None


async def bootstrap_exchange(
    hub_urls: list[str],
    subject: str,
    request: Message,
    sender: Source,
    reply_key: ReplyKey,
    reply_model: type[M],
    *,
    timeout: float,
    what: str,
    error: type[BootstrapFailed] = BootstrapFailed,
) -> M:
    """The whole exchange of an edge that has no identity yet: `request`, from
    `sender`, goes out as the bootstrap identity, and the hub's answer comes back
    sealed to `reply_key` (nobody else on the bus can read the credential in it)."""
    env = Envelope.wrap(request, source=sender)
    raw = await bootstrap_request(
        hub_urls,
        subject,
        env.encode(),
        timeout,
        what=what,
        error=error,
        client_name=f"cowork-{sender.principal_kind}-bootstrap",
    )
    return open_sealed_reply(raw, reply_key, reply_model, error=error)
