"""Bot Framework authentication for the Teams provider, both ways.

Inbound (https://learn.microsoft.com/azure/bot-service/rest-api/bot-framework-rest-connector-authentication):
each activity carries `Authorization: Bearer <JWT>`, RS256-signed by a key the
Bot Framework publishes in the JWKS its OpenID metadata names. A token is
accepted only when its `kid` is a published key, the signature verifies, `iss`
is the Bot Framework's, `aud` is the bot's app id, `exp`/`nbf` hold within five
minutes of skew, and its `serviceurl` claim is the activity's serviceUrl.

Outbound: a client-credentials token for the connector API, cached until a
minute before it expires.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .._provider import VerificationFailed

ISSUER = "https://api.botframework.com"
SKEW_SECONDS = 300


def _b64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise VerificationFailed("signature.invalid", "the token is not base64url") from None


def _json(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise VerificationFailed("signature.invalid", f"the token {what} is not JSON") from None
    if not isinstance(value, dict):
        raise VerificationFailed("signature.invalid", f"the token {what} is not an object")
    return value


def rsa_keys(jwks: Any) -> dict[str, rsa.RSAPublicKey]:
    """The RSA signing keys of a JWKS document, by kid (others ignored)."""
    keys: dict[str, rsa.RSAPublicKey] = {}
    for jwk in jwks.get("keys", []) if isinstance(jwks, dict) else []:
        if not isinstance(jwk, dict) or jwk.get("kty") != "RSA" or not jwk.get("kid"):
            continue
        try:
            n = int.from_bytes(_b64url(str(jwk["n"])), "big")
            e = int.from_bytes(_b64url(str(jwk["e"])), "big")
            keys[str(jwk["kid"])] = rsa.RSAPublicNumbers(e, n).public_key()
        except (KeyError, ValueError, VerificationFailed):
            continue
    return keys


def verify_token(
    header_value: str,
    keys: dict[str, rsa.RSAPublicKey],
    *,
    audience: str,
    service_url: str | None,
    now: float | None = None,
) -> dict[str, Any]:
    """The verified claims of `Authorization: Bearer <JWT>`, or VerificationFailed."""
    scheme, _, token = header_value.partition(" ")
    if scheme != "Bearer" or token.count(".") != 2:
        raise VerificationFailed("signature.invalid", "the Bot Framework bearer token is missing")
    head_b64, claims_b64, signature_b64 = token.split(".")
    header = _json(_b64url(head_b64), "header")
    if header.get("alg") != "RS256":
        raise VerificationFailed("signature.invalid", "the token is not RS256")
    key = keys.get(str(header.get("kid", "")))
    if key is None:
        raise VerificationFailed(
            "signature.unknown_key",
            "the token is signed by a key the Bot Framework does not publish",
        )
    try:
        key.verify(
            _b64url(signature_b64),
            f"{head_b64}.{claims_b64}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except InvalidSignature:
        raise VerificationFailed(
            "signature.invalid", "the token signature does not match"
        ) from None
    claims = _json(_b64url(claims_b64), "claims")
    _check_claims(claims, audience, service_url, time.time() if now is None else now)
    return claims


def _check_claims(
    claims: dict[str, Any], audience: str, service_url: str | None, now: float
) -> None:
    if claims.get("iss") != ISSUER:
        raise VerificationFailed("signature.invalid", "the token is not the Bot Framework's")
    aud = claims.get("aud")
    if aud != audience and not (isinstance(aud, list) and audience in aud):
        raise VerificationFailed("signature.invalid", "the token is for another bot (audience)")
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if not isinstance(exp, (int, float)) or exp + SKEW_SECONDS < now:
        raise VerificationFailed("signature.stale", "the token has expired")
    if isinstance(nbf, (int, float)) and nbf - SKEW_SECONDS > now:
        raise VerificationFailed("signature.stale", "the token is not valid yet")
    claimed = claims.get("serviceurl") or claims.get("serviceUrl")
    if service_url is not None and claimed is not None:
        if str(claimed).rstrip("/") != service_url.rstrip("/"):
            raise VerificationFailed(
                "signature.invalid", "the token is for another service URL than the activity's"
            )
