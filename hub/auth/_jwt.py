"""NATS JWTs (decentralized auth, "operator mode") minted with `nkeys` and the stdlib.

Pure functions, no I/O. The format is the one nats-io/jwt v2 writes and
nats-server verifies:

- header `{"typ":"JWT","alg":"ed25519-nkey"}`, then the claims, each as
  base64url without padding, then an Ed25519 signature over `header.claims`
  made with the issuer's nkey;
- `iss` is the signer's public nkey, `sub` the subject's, `iat` unix seconds;
- `jti` is base32 (no padding) of SHA-512/256 of the claims serialised
  without `jti`, the way the Go library computes it (the server does not
  recompute it; it is an id, but keeping the convention keeps tools happy);
- the NATS-specific part lives under `"nats"` with `"type"` and `"version": 2`.

We write this ourselves because the `nats-jwt` PyPI package is unmaintained
and buggy.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import nkeys
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas import render_creds

__all__ = [
    "JwtError",
    "account_jwt",
    "check_public_key",
    "creds_file",
    "decode",
    "encode",
    "new_seed",
    "operator_jwt",
    "public_key",
    "user_jwt",
]

KeyKind = Literal["operator", "account", "user"]

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_PREFIXES: dict[str, int] = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}
# "No limit" in NATS JWT limits. Fields left out decode as 0 on the server,
# which for several of them means "none allowed", so every limit is explicit.
_UNLIMITED = -1


class JwtError(ValueError):
    """A token that is malformed, tampered with, badly signed, expired or untrusted."""


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------


def new_seed(kind: KeyKind) -> bytes:
    """A fresh nkey seed (`SO…`, `SA…` or `SU…`) from the OS CSPRNG."""
    seed = nkeys.encode_seed(os.urandom(32), _PREFIXES[kind])
    nkeys.from_seed(bytearray(seed))  # round-trip: raises if we built it wrong
    return bytes(seed)


def public_key(seed: bytes) -> str:
    """The public nkey (`O…`, `A…`, `U…`) of a seed."""
    return _keypair(seed).public_key.decode()


def _keypair(seed: bytes | str) -> nkeys.KeyPair:
    raw = seed.encode() if isinstance(seed, str) else seed
    try:
        return nkeys.from_seed(bytearray(raw))
    except (nkeys.ErrInvalidSeed, nkeys.ErrInvalidPrefixByte, binascii.Error) as exc:
        raise JwtError(f"invalid nkey seed: {type(exc).__name__}") from None


def check_public_key(value: str, kind: KeyKind) -> str:
    """`value` if it is a well-formed public nkey of that kind, else JwtError.

    For keys received from outside (a device sends only its public key).
    """
    _verify_key(value)
    if base64.b32decode(value + "=" * (-len(value) % 8))[0] != _PREFIXES[kind]:
        raise JwtError(f"{value!r} is not a public {kind} nkey")
    return value


def _verify_key(public: str) -> Ed25519PublicKey:
    """The Ed25519 key inside a public nkey, after checking its prefix and CRC.

    nkeys can only verify with a seed in hand, so we unpack the public key
    ourselves: base32 of prefix byte + 32 key bytes + CRC16 (little endian).
    """
    try:
        raw = base64.b32decode(public + "=" * (-len(public) % 8))
    except (binascii.Error, ValueError, TypeError):
        raise JwtError(f"{public!r} is not an nkey") from None
    if len(raw) != 35 or not nkeys.valid_public_prefix_byte(raw[0]):
        raise JwtError(f"{public!r} is not a public nkey")
    if nkeys.crc16(bytearray(raw[:33])) != int.from_bytes(raw[33:], "little"):
        raise JwtError(f"{public!r} fails its nkey checksum")
    return Ed25519PublicKey.from_public_bytes(raw[1:33])


# --------------------------------------------------------------------------
# Encoding and decoding
# --------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JwtError("token is not base64url") from None


def _compact(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _jti(claims: Mapping[str, Any]) -> str:
    """The NATS convention: base32 of SHA-512/256 of the claims without `jti`."""
    digest = hashlib.new("sha512_256", _compact(claims)).digest()
    return base64.b32encode(digest).rstrip(b"=").decode()


def encode(claims: dict, signer_seed: bytes) -> str:
    """Sign `claims` with `signer_seed`; sets `iss`, `iat` (unless given) and `jti`."""
    kp = _keypair(signer_seed)
    try:
        body = {k: v for k, v in claims.items() if k != "jti"}
        body["iss"] = kp.public_key.decode()
        body.setdefault("iat", int(time.time()))
        body["jti"] = _jti(body)
        signing_input = f"{_b64(_compact(_HEADER))}.{_b64(_compact(body))}"
        return f"{signing_input}.{_b64(kp.sign(signing_input.encode()))}"
    finally:
        kp.wipe()


def decode(token: str, *, verify: bool = True, trusted_issuers: set[str] | None = None) -> dict:
    """The claims of `token`; with `verify`, only if signed by `iss`, unexpired
    and (when `trusted_issuers` is given) issued by one of them."""
    header, claims, signing_input, signature = _split(token)
    if not verify:
        return claims
    if header.get("alg") != _HEADER["alg"]:
        raise JwtError(f"unsupported JWT algorithm {header.get('alg')!r}")
    issuer = claims.get("iss")
    if not isinstance(issuer, str):
        raise JwtError("token has no issuer")
    try:
        _verify_key(issuer).verify(signature, signing_input)
    except InvalidSignature:
        raise JwtError("bad signature") from None
    if trusted_issuers is not None and issuer not in trusted_issuers:
        raise JwtError(f"issuer {issuer} is not trusted")
    _check_times(claims)
    return claims


def _split(token: str) -> tuple[dict, dict, bytes, bytes]:
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtError("token does not have three parts")
    try:
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise JwtError("token parts are not JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise JwtError("token parts are not JSON objects")
    return header, claims, f"{parts[0]}.{parts[1]}".encode(), _unb64(parts[2])


def _check_times(claims: Mapping[str, Any], now: float | None = None) -> None:
    # Same rule as the server: a token is dead once the clock passes `exp`.
    now = time.time() if now is None else now
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if exp and now > exp:
        raise JwtError("token expired")
    if nbf and now < nbf:
        raise JwtError("token not yet valid")


# --------------------------------------------------------------------------
# Operator, account and user claims
# --------------------------------------------------------------------------


def _claims(
    subject: str, name: str, nats: dict, *, iat: int | None = None, exp: int | None = None
) -> dict:
    claims: dict[str, Any] = {"name": name, "sub": subject, "nats": {**nats, "version": 2}}
    if iat is not None:
        claims["iat"] = iat
    if exp is not None:
        claims["exp"] = exp
    return claims


def operator_jwt(
    operator_seed: bytes,
    *,
    name: str,
    signing_keys: list[str],
    system_account: str,
    strict_signing_key_usage: bool = True,
    iat: int | None = None,
) -> str:
    """The self-signed operator JWT the server trusts (`operator:` in its config).

    With strict signing-key usage the server accepts accounts only when signed
    by one of `signing_keys`, so the operator identity key signs nothing but
    this JWT. A fixed `iat` makes the result deterministic (Ed25519 is).
    """
    nats: dict[str, object] = {
        "type": "operator",
        "signing_keys": list(signing_keys),
        "system_account": system_account,
    }
    if strict_signing_key_usage:
        nats["strict_signing_key_usage"] = True
    return encode(_claims(public_key(operator_seed), name, nats, iat=iat), operator_seed)


def _account_limits(jetstream: bool) -> dict[str, Any]:
    limits: dict[str, Any] = {
        "subs": _UNLIMITED,
        "data": _UNLIMITED,
        "payload": _UNLIMITED,
        "imports": _UNLIMITED,
        "exports": _UNLIMITED,
        "wildcards": True,
        "conn": _UNLIMITED,
        "leaf": _UNLIMITED,
    }
    if jetstream:
        # The server enables JetStream for an account only when its JWT grants
        # storage; a JWT without these (or with 0) means "JetStream disabled".
        limits.update(
            {
                "mem_storage": _UNLIMITED,
                "disk_storage": _UNLIMITED,
                "streams": _UNLIMITED,
                "consumer": _UNLIMITED,
                "max_ack_pending": _UNLIMITED,
                "mem_max_stream_bytes": _UNLIMITED,
                "disk_max_stream_bytes": _UNLIMITED,
                "max_bytes_required": False,
            }
        )
    return limits


def account_jwt(
    account_public: str,
    *,
    name: str,
    operator_signing_seed: bytes,
    signing_keys: list[str],
    jetstream: bool,
    revocations: dict[str, int] | None = None,
    exports: list[dict] | None = None,
    imports: list[dict] | None = None,
    limits: dict[str, Any] | None = None,
    iat: int | None = None,
) -> str:
    """An account JWT signed by an operator signing key.

    `signing_keys` are the account keys allowed to sign its users.
    `revocations` maps a user public key to a unix time: that user's JWTs with
    `iat` <= the time are refused and its live connections dropped.
    """
    nats: dict[str, Any] = {
        "type": "account",
        "limits": {**_account_limits(jetstream), **(limits or {})},
        "signing_keys": list(signing_keys),
        "default_permissions": {"pub": {}, "sub": {}},
    }
    if revocations:
        nats["revocations"] = {user: int(at) for user, at in revocations.items()}
    if exports:
        nats["exports"] = list(exports)
    if imports:
        nats["imports"] = list(imports)
    return encode(_claims(account_public, name, nats, iat=iat), operator_signing_seed)


def _permission(allow: Iterable[str], deny: Iterable[str]) -> dict[str, list[str]]:
    """JWT `pub`/`sub`: our allow lists are exhaustive, NATS's are not.

    To NATS an absent (empty) allow list means "everything", so "allowed
    nothing" must be written as a deny of `>`. Replies permitted by `resp`
    still go through: the server checks them after the allow/deny lists.
    """
    allow, deny = list(allow), list(deny)
    if not allow:
        return {"deny": [">"]}
    return {"allow": allow, "deny": deny} if deny else {"allow": allow}


def _responses(allow_responses: bool | dict | None) -> dict[str, int] | None:
    """JWT `resp`: may publish to reply subjects of requests it received.

    True means one reply per request within the server default window; a dict
    `{"max": n, "ttl": seconds}` sets both (the JWT holds ttl in nanoseconds).
    """
    if not allow_responses:
        return None
    if allow_responses is True:
        return {"max": 1, "ttl": 0}
    return {
        "max": int(allow_responses.get("max", 1)),
        "ttl": int(float(allow_responses.get("ttl", 0)) * 1_000_000_000),
    }


def user_jwt(
    user_public: str,
    *,
    name: str,
    account_public: str,
    account_signing_seed: bytes,
    pub_allow: Iterable[str] = (),
    pub_deny: Iterable[str] = (),
    sub_allow: Iterable[str] = (),
    sub_deny: Iterable[str] = (),
    allow_responses: bool | dict | None = None,
    expires_at: int | None = None,
    tags: Iterable[str] = (),
    limits: Mapping[str, int] | None = None,
) -> str:
    """A user JWT signed by an account signing key (`issuer_account` says whose).

    The allow lists are exhaustive: an empty one allows nothing (pass `[">"]`
    for everything); the deny lists carve exceptions out of them. `limits` sets
    any of `payload` (largest message it may publish, in bytes), `subs`
    (subscriptions per connection) and `data`; absent ones are unlimited.
    """
    nats: dict[str, Any] = {
        "type": "user",
        "issuer_account": account_public,
        "pub": _permission(pub_allow, pub_deny),
        "sub": _permission(sub_allow, sub_deny),
        "subs": _UNLIMITED,
        "data": _UNLIMITED,
        "payload": _UNLIMITED,
    }
    for key, value in (limits or {}).items():
        if key not in ("subs", "data", "payload"):
            raise ValueError(f"unknown user limit {key!r}")
        nats[key] = int(value)
    if resp := _responses(allow_responses):
        nats["resp"] = resp
    if tags := list(tags):
        nats["tags"] = tags
    return encode(_claims(user_public, name, nats, exp=expires_at), account_signing_seed)


# --------------------------------------------------------------------------
# Credentials file
# --------------------------------------------------------------------------


def creds_file(jwt: str, seed: bytes) -> str:
    """The text of a standard `.creds` file (what nats-py `user_credentials=` reads)."""
    return render_creds(jwt, seed)


def nats_auth_options(user_jwt: str, seed: bytes) -> dict[str, Any]:
    """nats-py connect options that authenticate with a JWT and an in-memory seed:
    the JWT is sent at every (re)connect and the server's nonce signed here."""
    import base64 as _base64

    def sign(nonce: str) -> bytes:
        kp = _keypair(seed)
        try:
            return _base64.b64encode(kp.sign(nonce.encode()))
        finally:
            kp.wipe()

    return {"user_jwt_cb": lambda: user_jwt.encode(), "signature_cb": sign}
