"""The hub's NATS key hierarchy (operator mode), kept in one directory.

    operator (identity key: signs only the operator JWT)
    └── operator signing key ── signs the account JWTs
        ├── SYS     system account; its signing key signs the hub's system user
        └── COWORK  the one application account, JetStream enabled; its signing
                    key(s) sign every edge and hub user (tenants are separated by
                    per-user subject permissions, which the server enforces)

On disk (`directory`, 0700): `keys.json` (0600) holds the public keys and the
seeds, every seed encrypted with Fernet; the Fernet key is COWORK_SECRET_KEY
when given, else `secret.key` (0600) generated once next to it. Losing the
secret makes the keys useless; a wrong one is refused at load.

JWT issue times are stored too, so `server_config()` is deterministic across
restarts: its preloaded account JWTs keep the issue time of the last key change,
and nats-server's full resolver keeps whichever JWT on disk is newer. A COWORK
JWT pushed later with revocations (always issued after that time, see
`app_account_jwt`) therefore survives a server restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from schemas import BOOTSTRAP_ACCOUNT_PUBLIC, BOOTSTRAP_SUBJECTS, nats_conf_string

from . import _jwt

__all__ = ["BusKeys", "KeyStoreError", "SYSTEM_USER_PUB_ALLOW"]

OPERATOR_NAME = "cowork"
SYSTEM_ACCOUNT_NAME = "SYS"
APP_ACCOUNT_NAME = "COWORK"
BOOTSTRAP_ACCOUNT_NAME = "BOOTSTRAP"
# Bootstrap clients connect, send one request and leave: small, bounded footprint.
BOOTSTRAP_LIMITS = {
    "conn": 1024,
    "subs": 4096,
    "payload": 16_384,
    "leaf": 0,
    "exports": 0,
    "imports": len(BOOTSTRAP_SUBJECTS),
}

# What the hub's system user may publish: account pushes and lookups, nothing
# else in $SYS (it must not, e.g., be able to shut down or profile servers).
SYSTEM_USER_PUB_ALLOW = (
    "$SYS.REQ.CLAIMS.UPDATE",
    "$SYS.REQ.ACCOUNT.*.CLAIMS.UPDATE",
    "$SYS.REQ.CLAIMS.LOOKUP",
    "$SYS.REQ.ACCOUNT.*.CLAIMS.LOOKUP",
    # The bootstrap connection guard: list the public account's connections, and
    # close those of an address over its share (hub/auth/_bootstrap_guard.py).
    "$SYS.REQ.ACCOUNT.*.CONNZ",
    "$SYS.REQ.SERVER.*.KICK",
    # The health center: every server's statistics and leaf node connections
    # (read-only answers; hub/core/_health.py).
    "$SYS.REQ.SERVER.PING.STATSZ",
    "$SYS.REQ.SERVER.PING.LEAFZ",
)

_STORE_FILE = "keys.json"
_SECRET_FILE = "secret.key"
_FORMAT_VERSION = 1


class KeyStoreError(Exception):
    """A one-line, user-facing reason the key store cannot be used."""


@dataclass(frozen=True)
class _Key:
    public: str
    seed: bytes = field(repr=False)

    @classmethod
    def new(cls, kind: _jwt.KeyKind) -> _Key:
        seed = _jwt.new_seed(kind)
        return cls(_jwt.public_key(seed), seed)


class BusKeys:
    """Operator, SYS and COWORK keys; mints the JWTs the hub and nats-server need."""

    def __init__(
        self,
        directory: Path,
        fernet: Fernet,
        secret_origin: str,
        *,
        operator: _Key,
        operator_signing: _Key,
        system: _Key,
        system_signing: _Key,
        app: _Key,
        app_signing: list[_Key],
        issued_at: dict[str, int],
    ) -> None:
        self.directory = directory
        self._fernet = fernet
        self._secret_origin = secret_origin  # "env" or "file": which secret to ask for
        self._operator = operator
        self._operator_signing = operator_signing
        self._system = system
        self._system_signing = system_signing
        self._app = app
        self._app_signing = app_signing  # the last one signs new users
        self._issued_at = issued_at  # "operator", "system", "app": unix seconds

    def __repr__(self) -> str:
        return f"BusKeys({str(self.directory)!r}, operator={self.operator_public})"

    # --- loading and storing -----------------------------------------------------

    @classmethod
    def load_or_create(cls, directory: Path, secret_key: bytes | None = None) -> BusKeys:
        """The keys stored in `directory`, created (with the dir) on first use.

        `secret_key` is a Fernet key (COWORK_SECRET_KEY); None uses or creates
        `directory/secret.key`. Raises KeyStoreError with a one-line reason.
        """
        directory = Path(directory).resolve()
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            store = directory / _STORE_FILE
            exists = store.exists()
            if secret_key is not None:
                origin, fernet = "env", _fernet(secret_key)
            elif exists and _stored_origin(store) == "env":
                raise KeyStoreError(
                    f"the bus keys in {directory} are encrypted with "
                    "COWORK_SECRET_KEY, which is not set"
                )
            else:
                # Never generate a new secret for existing keys: they would be lost.
                origin, fernet = "file", _fernet(_file_secret(directory, create=not exists))
            if not exists:
                created = cls._create(directory, fernet, origin)
                if _write_new(store, created._to_json()):
                    return created
                # Another process created the store first: use theirs.
            return cls._from_json(directory, fernet, origin, store.read_text())
        except OSError as exc:
            raise KeyStoreError(
                f"cannot use the bus key dir {directory}: {exc.strerror or exc}"
            ) from None

    @classmethod
    def _create(cls, directory: Path, fernet: Fernet, origin: str) -> BusKeys:
        now = int(time.time())
        return cls(
            directory,
            fernet,
            origin,
            operator=_Key.new("operator"),
            operator_signing=_Key.new("operator"),
            system=_Key.new("account"),
            system_signing=_Key.new("account"),
            app=_Key.new("account"),
            app_signing=[_Key.new("account")],
            issued_at={"operator": now, "system": now, "app": now},
        )

    def _to_json(self) -> str:
        def key(k: _Key) -> dict[str, str]:
            return {"public": k.public, "seed": self._fernet.encrypt(k.seed).decode()}

        return (
            json.dumps(
                {
                    "version": _FORMAT_VERSION,
                    "secret": self._secret_origin,
                    "operator": key(self._operator),
                    "operator_signing": key(self._operator_signing),
                    "system": key(self._system),
                    "system_signing": key(self._system_signing),
                    "app": key(self._app),
                    "app_signing": [key(k) for k in self._app_signing],
                    "issued_at": self._issued_at,
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def _from_json(cls, directory: Path, fernet: Fernet, origin: str, text: str) -> BusKeys:
        def key(entry: dict[str, str]) -> _Key:
            try:
                seed = fernet.decrypt(entry["seed"].encode())
            except InvalidToken:
                raise KeyStoreError(
                    f"cannot decrypt the bus keys in {directory}: wrong COWORK_SECRET_KEY?"
                ) from None
            if _jwt.public_key(seed) != entry["public"]:
                raise KeyStoreError(
                    f"the bus key store in {directory} is corrupt "
                    f"(seed does not match {entry['public']})"
                )
            return _Key(entry["public"], seed)

        try:
            data = json.loads(text)
            if data.get("version") != _FORMAT_VERSION:
                raise KeyStoreError(f"unsupported bus key store version in {directory}")
            return cls(
                directory,
                fernet,
                origin,
                operator=key(data["operator"]),
                operator_signing=key(data["operator_signing"]),
                system=key(data["system"]),
                system_signing=key(data["system_signing"]),
                app=key(data["app"]),
                app_signing=[key(k) for k in data["app_signing"]],
                issued_at={k: int(v) for k, v in data["issued_at"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise KeyStoreError(
                f"the bus key store in {directory} is corrupt ({type(exc).__name__}: {exc})"
            ) from None

    def _save(self) -> None:
        _write_replace(self.directory / _STORE_FILE, self._to_json())

    # --- public keys -------------------------------------------------------------

    @property
    def operator_public(self) -> str:
        return self._operator.public

    @property
    def system_account_public(self) -> str:
        return self._system.public

    @property
    def app_account_public(self) -> str:
        return self._app.public

    @property
    def app_signing_keys(self) -> list[str]:
        """COWORK's valid signing keys; the last one signs new users."""
        return [k.public for k in self._app_signing]

    # --- server side JWTs ----------------------------------------------------------

    def operator_jwt(self) -> str:
        return _jwt.operator_jwt(
            self._operator.seed,
            name=OPERATOR_NAME,
            signing_keys=[self._operator_signing.public],
            system_account=self._system.public,
            iat=self._issued_at["operator"],
        )

    def system_account_jwt(self) -> str:
        return _jwt.account_jwt(
            self._system.public,
            name=SYSTEM_ACCOUNT_NAME,
            operator_signing_seed=self._operator_signing.seed,
            signing_keys=[self._system_signing.public],
            jetstream=False,
            iat=self._issued_at["system"],
        )

    def app_account_jwt(self, revocations: dict[str, int] | None = None) -> str:
        """The COWORK account JWT carrying `revocations` (user public key -> unix
        time; JWTs of that user issued at or before it are refused).

        Signed anew at each call, for pushing on `$SYS.REQ.CLAIMS.UPDATE`. Its
        issue time is after that of the preloaded JWT (see `server_config`), so
        the full resolver prefers it, also after a restart. The list must be
        complete each time: a push replaces the account's previous JWT.
        """
        iat = max(int(time.time()), self._issued_at["app"] + 1)
        return self._app_jwt(revocations or {}, iat)

    def _app_jwt(self, revocations: dict[str, int], iat: int) -> str:
        exports = [
            {"name": subject, "subject": subject, "type": "service", "response_type": "Singleton"}
            for subject in BOOTSTRAP_SUBJECTS
        ]
        return _jwt.account_jwt(
            self._app.public,
            name=APP_ACCOUNT_NAME,
            operator_signing_seed=self._operator_signing.seed,
            signing_keys=self.app_signing_keys,
            jetstream=True,
            revocations=revocations,
            exports=exports,
            iat=iat,
        )

    def bootstrap_account_jwt(self) -> str:
        """The public BOOTSTRAP account (see schemas._bootstrap): no JetStream, tight
        limits, and only the two bootstrap services of COWORK, imported with the
        client's info shared so the hub can rate-limit per source address."""
        imports = [
            {
                "name": subject,
                "subject": subject,
                "account": self._app.public,
                "type": "service",
                "share": True,
            }
            for subject in BOOTSTRAP_SUBJECTS
        ]
        return _jwt.account_jwt(
            BOOTSTRAP_ACCOUNT_PUBLIC,
            name=BOOTSTRAP_ACCOUNT_NAME,
            operator_signing_seed=self._operator_signing.seed,
            signing_keys=[BOOTSTRAP_ACCOUNT_PUBLIC],
            jetstream=False,
            imports=imports,
            limits=BOOTSTRAP_LIMITS,
            iat=self._issued_at["app"],
        )

    def server_config(self, resolver_dir: Path) -> str:
        """The nats-server config block for operator mode (append to its config).

        The full resolver stores account JWTs in `resolver_dir` and accepts
        pushes from the system account; the preloads seed it on first start and
        never overwrite a newer JWT already there (e.g. one with revocations).
        Deterministic for a given key state, so rewriting it at each start is safe.
        """
        q = nats_conf_string
        resolver = Path(resolver_dir).resolve()  # the server's cwd is not ours
        return "\n".join(
            [
                "# Operator mode (decentralized JWT auth), written by cowork.",
                f"operator: {q(self.operator_jwt())}",
                f"system_account: {self._system.public}",
                "resolver: {",
                "  type: full",
                f"  dir: {q(resolver)}",
                "  allow_delete: false",
                '  interval: "2m"',
                "}",
                "resolver_preload: {",
                f"  {self._system.public}: {q(self.system_account_jwt())}",
                f"  {self._app.public}: {q(self._app_jwt({}, self._issued_at['app']))}",
                f"  {BOOTSTRAP_ACCOUNT_PUBLIC}: {q(self.bootstrap_account_jwt())}",
                "}",
                "",
            ]
        )

    def derive_key(self, purpose: str) -> bytes:
        """A stable 32-byte secret for one purpose (e.g. hashing pairing codes),
        derived from the COWORK account seed, so it needs no storage of its own."""
        return hmac.new(
            self._app.seed, b"cowork-derive:" + purpose.encode(), hashlib.sha256
        ).digest()

    # --- users ---------------------------------------------------------------------

    def mint_user(
        self,
        user_public: str,
        *,
        name: str,
        pub_allow: Iterable[str],
        sub_allow: Iterable[str],
        pub_deny: Iterable[str] = (),
        sub_deny: Iterable[str] = (),
        allow_responses: bool | dict | None = None,
        ttl_seconds: int | None,
        tags: Iterable[str] = (),
        limits: Mapping[str, int] | None = None,
    ) -> tuple[str, int | None]:
        """A COWORK user JWT for `user_public` (the holder keeps the seed) and its
        expiry (unix seconds; None: no expiry, only revocation ends it)."""
        _require_user_key(user_public)
        expires_at = None if ttl_seconds is None else int(time.time()) + int(ttl_seconds)
        token = _jwt.user_jwt(
            user_public,
            name=name,
            account_public=self._app.public,
            account_signing_seed=self._app_signing[-1].seed,
            pub_allow=pub_allow,
            pub_deny=pub_deny,
            sub_allow=sub_allow,
            sub_deny=sub_deny,
            allow_responses=allow_responses,
            expires_at=expires_at,
            tags=tags,
            limits=limits,
        )
        return token, expires_at

    def mint_system_user(
        self,
        user_public: str,
        *,
        name: str,
        pub_allow: Iterable[str] = SYSTEM_USER_PUB_ALLOW,
        sub_allow: Iterable[str] = ("_INBOX.>",),
        ttl_seconds: int | None = None,
    ) -> str:
        """A SYS-account user JWT for the hub's account pushes (request/reply on
        `$SYS.REQ.CLAIMS.UPDATE`; replies come back on `_INBOX.>`)."""
        _require_user_key(user_public)
        expires_at = None if ttl_seconds is None else int(time.time()) + int(ttl_seconds)
        return _jwt.user_jwt(
            user_public,
            name=name,
            account_public=self._system.public,
            account_signing_seed=self._system_signing.seed,
            pub_allow=pub_allow,
            sub_allow=sub_allow,
            expires_at=expires_at,
        )

    # --- signing key rotation ------------------------------------------------------

    def rotate_account_signing_key(self) -> str:
        """Add a new COWORK signing key, used from now on for new users; returns it.

        Procedure (no connection is dropped):
        1. `rotate_account_signing_key()`: users minted from now on are signed
           by the new key; the old keys stay in the account JWT, so JWTs they
           signed remain valid.
        2. Push `app_account_jwt(current revocations)` to the servers
           (`$SYS.REQ.CLAIMS.UPDATE`), so they accept the new key; until then
           users signed by it are refused. Restart the servers with a fresh
           `server_config()` or rely on the push (the resolver keeps it).
        3. Wait until every JWT signed by the old key has been refreshed or has
           expired (the longest user TTL).
        4. `retire_signing_key(old)` and push again: the servers then refuse the
           old key and drop connections still using it.
        """
        key = _Key.new("account")
        self._app_signing.append(key)
        self._key_set_changed()
        return key.public

    def retire_signing_key(self, public: str) -> None:
        """Remove an old COWORK signing key (step 4 of `rotate_account_signing_key`)."""
        if public == self._app_signing[-1].public:
            raise ValueError("cannot retire the current signing key; rotate first")
        if public not in self.app_signing_keys:
            raise ValueError(f"{public} is not a signing key of {APP_ACCOUNT_NAME}")
        self._app_signing = [k for k in self._app_signing if k.public != public]
        self._key_set_changed()

    def _key_set_changed(self) -> None:
        # The preloaded JWT must now carry the new key set, so it gets a new
        # issue time; pushes after it get later ones (app_account_jwt).
        self._issued_at["app"] = max(int(time.time()), self._issued_at["app"] + 1)
        self._save()


# --------------------------------------------------------------------------
# Files and secrets
# --------------------------------------------------------------------------


def _require_user_key(value: str) -> None:
    try:
        _jwt.check_public_key(value, "user")
    except _jwt.JwtError as exc:
        raise ValueError(str(exc)) from None


def _fernet(secret: bytes) -> Fernet:
    try:
        return Fernet(secret.strip())
    except (ValueError, TypeError):
        raise KeyStoreError(
            "COWORK_SECRET_KEY is not a Fernet key (urlsafe base64 of 32 bytes)"
        ) from None


def _stored_origin(store: Path) -> str | None:
    try:
        return json.loads(store.read_text()).get("secret")
    except (OSError, ValueError, AttributeError):
        return None  # no store yet, or a corrupt one (reported when loaded)


def _file_secret(directory: Path, *, create: bool) -> bytes:
    """The generated secret key of this dir (0600), created with the store."""
    path = directory / _SECRET_FILE
    if create:
        _write_new(path, Fernet.generate_key().decode() + "\n")  # no-op if it exists
    elif not path.exists():
        raise KeyStoreError(
            f"cannot decrypt the bus keys in {directory}: {path} is missing "
            "(restore it, or set COWORK_SECRET_KEY to its content)"
        )
    return path.read_bytes()


def _write_new(path: Path, text: str) -> bool:
    """Write `path` (0600) only if it does not exist; False if it did.

    Written to a temp file and hard-linked into place, so a concurrent reader
    never sees a half-written file and only one creator wins.
    """
    tmp = _write_temp(path, text)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _write_replace(path: Path, text: str) -> None:
    os.replace(_write_temp(path, text), path)


def _write_temp(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, 0o600)  # umask cannot loosen it, but a stale tmp could be looser
    return tmp
