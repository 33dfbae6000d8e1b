"""An edge's bus credential: its own nkey seed and the user JWT the hub issued for it.

The seed is created here and never leaves the machine; the hub only ever sees
the public key. The JWT is swapped in place when it is refreshed, so the next
(re)connect presents the new one without the application noticing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nkeys
from nats.aio.client import Client as NATS

from schemas import (
    AckReply,
    ContractError,
    CredentialRefreshReply,
    CredentialRefreshRequest,
    Envelope,
    PrincipalKind,
    Source,
    decode,
    parse_creds,
    render_creds,
    subjects,
)

from ._cancel import honour_dropped_cancel

log = logging.getLogger("cowork.edge.credentials")


class CredentialRefreshError(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def new_user_seed() -> bytes:
    """A fresh nkey user seed, made on this machine."""
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)


class EdgeCredentials:
    def __init__(self, user_jwt: str, seed: bytes) -> None:
        self._jwt = user_jwt
        self._seed = bytes(seed)
        self.public_key = _public(seed)

    # --- persistence: a standard .creds file any NATS client can use ------------
    @classmethod
    def from_creds_file(cls, path: Path) -> EdgeCredentials:
        try:
            user_jwt, seed = parse_creds(Path(path).read_text())
        except ValueError:
            raise ValueError(f"{path} is not a NATS .creds file") from None
        return cls(user_jwt, seed)

    def write_creds_file(self, path: Path) -> None:
        """Write atomically with mode 0600 (the seed is the edge's private key)."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(render_creds(self._jwt, self._seed))
        os.replace(tmp, path)

    # --- use -----------------------------------------------------------------------
    @property
    def user_jwt(self) -> str:
        return self._jwt

    @property
    def expires_at(self) -> int | None:
        """The JWT's `exp` (unix seconds), read without verifying: the server verifies."""
        payload = self._jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return claims.get("exp")

    def replace_jwt(self, user_jwt: str) -> None:
        self._jwt = user_jwt

    def connect_options(self) -> dict[str, Callable[..., Any]]:
        """nats-py options: the JWT is read at every (re)connect, the nonce signed here."""

        def sign(nonce: str) -> bytes:
            kp = nkeys.from_seed(bytearray(self._seed))
            try:
                return base64.b64encode(kp.sign(nonce.encode()))
            finally:
                kp.wipe()

        return {"user_jwt_cb": lambda: self._jwt.encode(), "signature_cb": sign}


def _public(seed: bytes) -> str:
    kp = nkeys.from_seed(bytearray(seed))
    try:
        return kp.public_key.decode()
    finally:
        kp.wipe()


async def refresh_once(
    nc: NATS,
    creds: EdgeCredentials,
    *,
    tenant: str,
    kind: str,
    principal_id: str,
    timeout: float = 5.0,
) -> CredentialRefreshReply:
    """Ask the hub for a fresh JWT for this key and swap it in."""
    request = Envelope.wrap(
        CredentialRefreshRequest(public_key=creds.public_key),
        source=Source(principal_kind=PrincipalKind(kind), principal_id=principal_id),
        tenant=tenant,
    )
    subject = subjects.CREDENTIAL_REFRESH.build(
        tenant=tenant, principal_kind=kind, principal_id=principal_id
    )
    reply = await nc.request(subject, request.encode(), timeout=timeout)
    try:
        kind_of_reply = json.loads(reply.data).get("type")
    except (ValueError, AttributeError):
        raise CredentialRefreshError("contract.invalid", "the hub's reply is not JSON") from None
    try:
        if kind_of_reply == AckReply.message_type:  # a refusal
            refusal = decode(reply.data, AckReply).data
            raise CredentialRefreshError(refusal.code or "refused", refusal.reason or "")
        body = decode(reply.data, CredentialRefreshReply).data
    except ContractError as exc:
        raise CredentialRefreshError(exc.code, exc.reason) from None
    creds.replace_jwt(body.user_jwt)
    return body


async def refresh_forever(
    nc: NATS,
    creds: EdgeCredentials,
    *,
    tenant: str,
    kind: str,
    principal_id: str,
    fraction: float = 0.75,
    on_refresh: Callable[[EdgeCredentials], None] | None = None,
) -> None:
    """Refresh at `fraction` of each JWT's remaining life; retry with backoff on errors.

    A refused refresh (revoked) ends the loop: the server will disconnect this
    edge at expiry, which is what revocation means. Pass `allow_reconnect=True`
    (the nats-py default) to the connection: the swap is a forced reconnect.
    """
    backoff = 1.0
    while True:
        honour_dropped_cancel()
        exp = creds.expires_at
        if exp is None:
            return
        await asyncio.sleep(max(0.0, (exp - time.time()) * fraction))
        try:
            await refresh_once(nc, creds, tenant=tenant, kind=kind, principal_id=principal_id)
        except CredentialRefreshError as exc:
            log.warning("credentials.refresh_refused", extra={"fields": {"code": exc.code}})
            return
        except Exception as exc:  # hub or NATS briefly away: try again soon
            log.info("credentials.refresh_retry", extra={"fields": {"error": str(exc)}})
            await asyncio.sleep(backoff + random.random())
            backoff = min(backoff * 2, 30.0)
            continue
        backoff = 1.0
        # The server ends a connection when the JWT it was opened with expires, and
        # nats-py treats that as final. Reconnecting now presents the new JWT while
        # nats-py buffers publishes, so no traffic is dropped.
        await nc.force_reconnect()
        if on_refresh:
            on_refresh(creds)
