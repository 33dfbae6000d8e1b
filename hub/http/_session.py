"""Who is calling the admin API: the admin or viewer bearer token, or a console
session (a signed cookie the console's sign-in exchanges a token for).

A session cookie is `<payload>.<mac>`: the payload names the role, the expiry and
a random nonce; the MAC is HMAC-SHA256 under a key derived from the admin token,
so changing the token ends every session. The CSRF token is a second MAC of the
nonce: a page carries it, and every change (any method but GET/HEAD) must send
it back in `X-CSRF-Token`. A viewer (by token or session) may only read.

Sessions live in PostgreSQL (`console_sessions`, `SessionStore`), which every
replica of the hub shares: a cookie is honoured while its session's row is there,
so signing out on one replica (the row deleted) ends the session on all of them.
While the database cannot be reached, a well-signed unexpired cookie may still
read (the health center says what is wrong) but not change anything.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import asyncpg
from aiohttp import web

from ..core import is_transient

Role = Literal["admin", "viewer"]
COOKIE = "cw_console"
CSRF_HEADER = "X-CSRF-Token"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
STORE_TIMEOUT = 3.0  # seconds to ask the session store before taking it for away


@dataclass(frozen=True)
class Caller:
    """Who an admin API request comes from, and what the session allows."""

    role: Role
    via: Literal["bearer", "session"]
    nonce: str = ""
    expires: float = 0.0
    # False: the session store could not be asked (the database is away); such a
    # caller may read but not change anything.
    confirmed: bool = True


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionStore:
    """The console sessions every replica shares (`console_sessions`), keyed by a
    digest of each session's nonce. `pool` gives the started hub's database pool."""

    def __init__(self, pool: Callable[[], asyncpg.Pool]) -> None:
        self._started_pool = pool

    @property
    def _pool(self) -> asyncpg.Pool:
        return self._started_pool()

    async def add(self, caller: Caller) -> None:
        """Record a new session (and forget the expired ones)."""
        expires = datetime.fromtimestamp(caller.expires, UTC)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM console_sessions WHERE expires_at < now()")
            await conn.execute(
                "INSERT INTO console_sessions (nonce_digest, role, expires_at) VALUES ($1, $2, $3)",
                _nonce_key(caller.nonce),
                caller.role,
                expires,
            )

    async def live(self, nonce: str, role: Role) -> bool:
        """Whether the session is still there (not signed out on any replica)."""
        found = await self._pool.fetchval(
            "SELECT 1 FROM console_sessions WHERE nonce_digest = $1 AND role = $2 "
            "AND expires_at > now()",
            _nonce_key(nonce),
            role,
        )
        return found is not None

    async def remove(self, nonce: str) -> None:
        await self._pool.execute(
            "DELETE FROM console_sessions WHERE nonce_digest = $1", _nonce_key(nonce)
        )


def _nonce_key(nonce: str) -> str:
    return hashlib.sha256(nonce.encode()).hexdigest()


class ApiAuth:
    """The admin API's credentials: the tokens' digests, the session signer and the
    shared session store."""

    def __init__(
        self,
        admin_token: str | None,
        viewer_token: str | None,
        session_seconds: float,
        store: SessionStore,
    ) -> None:
        self.admin = _digest(admin_token) if admin_token else None
        self.viewer = _digest(viewer_token) if viewer_token else None
        self.session_seconds = session_seconds
        # No admin token: no session can be made (sign-in refuses), so any key will do.
        admin_key = self.admin or os.urandom(32)
        self._key = hmac.new(admin_key, b"console-session", hashlib.sha256).digest()
        self.store = store

    @property
    def enabled(self) -> bool:
        return self.admin is not None

    def token_role(self, presented: str) -> Role | None:
        """The role a token grants (compared as digests, in constant time), or None."""
        digest = _digest(presented.strip())
        admin = self.admin is not None and hmac.compare_digest(digest, self.admin)
        viewer = self.viewer is not None and hmac.compare_digest(digest, self.viewer)
        return "admin" if admin else "viewer" if viewer else None

    async def sign_in(self, role: Role) -> tuple[str, Caller]:
        """A new session for `role` in the shared store: its cookie value, and the
        caller it stands for."""
        expires = float(int(time.time() + self.session_seconds))
        caller = Caller(role, "session", _b64(os.urandom(16)), expires)
        payload = _b64(json.dumps({"r": role, "e": int(expires), "n": caller.nonce}).encode())
        await self.store.add(caller)
        return f"{payload}.{self._mac(payload)}", caller

    async def session(self, cookie: str | None) -> Caller | None:
        """The caller a cookie stands for, or None (forged, expired, signed out on
        any replica). With the store away, a well-signed unexpired cookie stands for
        an unconfirmed caller (who may only read)."""
        caller = self.signed(cookie)
        if caller is None:
            return None
        try:
            async with asyncio.timeout(STORE_TIMEOUT):  # a database that hangs is away too
                live = await self.store.live(caller.nonce, caller.role)
        except Exception as exc:
            if not is_transient(exc):
                raise
            return Caller(caller.role, "session", caller.nonce, caller.expires, confirmed=False)
        return caller if live else None

    def signed(self, cookie: str | None) -> Caller | None:
        """The caller a cookie's payload names, if its MAC is ours and it has not
        expired (the store is not asked)."""
        if not cookie or "." not in cookie:
            return None
        payload, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac.encode(), self._mac(payload).encode()):
            return None
        try:
            data = json.loads(_unb64(payload))
            role, expires, nonce = data["r"], float(data["e"]), str(data["n"])
        except (ValueError, KeyError, TypeError):
            return None
        if role not in ("admin", "viewer") or expires < time.time():
            return None
        return Caller(role, "session", nonce, expires)

    def csrf_token(self, caller: Caller) -> str:
        return self._mac(f"csrf:{caller.nonce}")

    def csrf_ok(self, caller: Caller, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(
            (presented or "").encode(), self.csrf_token(caller).encode()
        )

    async def sign_out(self, caller: Caller) -> None:
        """End the session on every replica."""
        await self.store.remove(caller.nonce)

    def _mac(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())


@dataclass(frozen=True)
class Denied:
    """Why an admin API request is refused: its status, code and message."""

    status: int
    code: str
    message: str
    challenge: bool = False


async def api_caller(request: web.Request, auth: ApiAuth) -> Caller | Denied:
    """The caller of an admin API request, or why it is refused. A bearer token wins
    over a cookie; a session's change needs its CSRF token; a viewer reads only."""
    if not auth.enabled:
        return Denied(
            503, "admin_api_disabled", "no admin token is configured (COWORK_ADMIN_TOKEN)"
        )
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    caller: Caller | None
    if header:
        if scheme.lower() != "bearer" or not presented:
            return Denied(
                401,
                "unauthenticated",
                "send the admin token as 'Authorization: Bearer <token>'",
                True,
            )
        role = auth.token_role(presented)
        if role is None:
            return Denied(401, "invalid_token", "the admin token is not valid", True)
        caller = Caller(role, "bearer")
    else:
        caller = await auth.session(request.cookies.get(COOKIE))
        if caller is None:
            return Denied(
                401,
                "unauthenticated",
                "send the admin token as 'Authorization: Bearer <token>' (or sign in at /console)",
                True,
            )
        if request.method not in READ_METHODS and not auth.csrf_ok(
            caller, request.headers.get(CSRF_HEADER)
        ):
            return Denied(
                403, "csrf_failed", "a change from a console session needs its CSRF token"
            )
        if not caller.confirmed and request.method not in READ_METHODS:
            return Denied(
                503,
                "backend_unavailable",
                "the hub cannot reach its database to check this session: "
                "reads go on, changes wait until it is back",
            )
    if caller.role == "viewer" and request.method not in READ_METHODS:
        return Denied(403, "read_only", "a viewer may read but not change anything")
    return caller
