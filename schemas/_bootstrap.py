"""The public bootstrap identity and the sealed replies of bootstrap requests.

A Desktop redeeming a pairing code (or a Gateway exchanging its registration
credential) has no bus credential yet, and nats-server in operator mode admits
no anonymous client. Every deployment therefore trusts one well-known, public
BOOTSTRAP account (its operator signs that account's JWT, with tight limits and
one import: the two bootstrap services of the COWORK account). The account's
only user is the JWT below; the account's private key was discarded when the
JWT was made, so nobody, not even a hub, can mint another BOOTSTRAP user with
wider rights. The user's seed is public on purpose: it proves nothing.

What that user may do (the server enforces it from the JWT): publish requests
on `cw.bootstrap.pairing.redeem` and `cw.bootstrap.gateway.register`, and
subscribe to `_INBOX.>` for the replies. It cannot subscribe to the request
subjects, so it never sees another client's code. It can see other clients'
replies, so every reply is sealed to an X25519 key sent in the request
(ephemeral ECDH + HKDF-SHA256 + ChaCha20-Poly1305): a listener learns nothing.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._creds import render_creds

__all__ = [
    "BOOTSTRAP_ACCOUNT_PUBLIC",
    "BOOTSTRAP_USER_JWT",
    "BOOTSTRAP_USER_SEED",
    "BOOTSTRAP_SUBJECTS",
    "bootstrap_creds",
    "ReplyKey",
    "b64url",
    "unb64url",
    "open_sealed",
    "seal",
    "SealError",
]

# Made once (v1). The user JWT is signed by the account key, which no longer exists.
BOOTSTRAP_ACCOUNT_PUBLIC = "AATNUGYA5UY2D6PAEWELVBJKUMXRMDDXXM55SHVJXD45GE3WU32ZPPQE"
BOOTSTRAP_USER_SEED = b"SUAOTFRKO7P4DUGQA6FFC477C7N6PBULSGPSWIG5ORCXIFOO6ZIWGKOZG4"
BOOTSTRAP_USER_JWT = (
    "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJuYW1lIjoiY293b3JrLWJvb3RzdHJhcCIsInN1"
    "YiI6IlVBNlBHUzY0VTdFU1lLUE0zNVdPS0xET0dXNE1VM0dDR0hSTlVGNzdMT0xBUklaRE9DSkU0SEc2IiwibmF0"
    "cyI6eyJ0eXBlIjoidXNlciIsImlzc3Vlcl9hY2NvdW50IjoiQUFUTlVHWUE1VVkyRDZQQUVXRUxWQkpLVU1YUk1E"
    "RFhYTTU1U0hWSlhENDVHRTNXVTMyWlBQUUUiLCJwdWIiOnsiYWxsb3ciOlsiY3cuYm9vdHN0cmFwLnBhaXJpbmcu"
    "cmVkZWVtIiwiY3cuYm9vdHN0cmFwLmdhdGV3YXkucmVnaXN0ZXIiXX0sInN1YiI6eyJhbGxvdyI6WyJfSU5CT1gu"
    "PiJdfSwic3VicyI6LTEsImRhdGEiOi0xLCJwYXlsb2FkIjotMSwidmVyc2lvbiI6Mn0sImlzcyI6IkFBVE5VR1lB"
    "NVVZMkQ2UEFFV0VMVkJKS1VNWFJNRERYWE01NVNIVkpYRDQ1R0UzV1UzMlpQUFFFIiwiaWF0IjoxNzk1NTIxNjU2"
    "LCJqdGkiOiJONFAzRUI1WkJCVU5GWlhQWUxJRk4yN0xKNTJTWkdWSlNOQlVOVUtOSzRJWk5PVU9TVU9RIn0.2eID"
    "7NJYUxnpbCyF-6LdNVawXd9cPxwoZt_Ysck8-PzNrMfQp8pBjj3_K8lgVRGTLUaHdLw6G2DPoo1RXcNfDA"
)
BOOTSTRAP_SUBJECTS = ("cw.bootstrap.pairing.redeem", "cw.bootstrap.gateway.register")

_INFO = b"cowork-bootstrap-reply-v1"
_NONCE_BYTES = 12


def bootstrap_creds() -> str:
    """The public bootstrap user as a standard `.creds` file."""
    return render_creds(BOOTSTRAP_USER_JWT, BOOTSTRAP_USER_SEED)


class SealError(ValueError):
    """A sealed reply that cannot be opened (wrong key, tampered, malformed)."""


def b64url(data: bytes) -> str:
    """Unpadded base64url, as every key and sealed box of the contract is written."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64url(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise SealError("not base64url") from exc


def _derive(
    shared: bytes, ephemeral_public: bytes, recipient_public: bytes, info: bytes = _INFO
) -> bytes:
    salt = ephemeral_public + recipient_public  # binds the key to both public keys
    return HKDF(hashes.SHA256(), 32, salt, info).derive(shared)


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def seal(
    plaintext: bytes, recipient_public: str, *, info: bytes = _INFO, aad: bytes | None = None
) -> str:
    """Encrypt `plaintext` for the holder of `recipient_public` (base64url X25519).

    Returns `<ephemeral public>.<nonce + ciphertext>`, both base64url. `info` separates
    uses (bootstrap replies, sealed command payloads, wrapped content keys); `aad` binds
    the ciphertext to what it travels with (opening fails if that differs).
    """
    try:
        recipient = X25519PublicKey.from_public_bytes(unb64url(recipient_public))
    except ValueError as exc:
        raise SealError("reply key is not an X25519 public key") from exc
    ephemeral = X25519PrivateKey.generate()
    eph_raw = _raw(ephemeral.public_key())
    key = _derive(ephemeral.exchange(recipient), eph_raw, _raw(recipient), info)
    nonce = os.urandom(_NONCE_BYTES)
    return (
        f"{b64url(eph_raw)}.{b64url(nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad))}"
    )


def open_sealed(
    private: X25519PrivateKey, sealed: str, *, info: bytes = _INFO, aad: bytes | None = None
) -> bytes:
    """The plaintext of what `seal` made for `private`'s public key, or SealError."""
    try:
        eph_text, body_text = sealed.split(".", 1)
        eph_raw, body = unb64url(eph_text), unb64url(body_text)
        ephemeral = X25519PublicKey.from_public_bytes(eph_raw)
    except ValueError as exc:
        raise SealError("malformed sealed box") from exc
    if len(body) <= _NONCE_BYTES:
        raise SealError("malformed sealed box")
    key = _derive(private.exchange(ephemeral), eph_raw, _raw(private.public_key()), info)
    try:
        return ChaCha20Poly1305(key).decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise SealError("sealed box failed authentication") from exc


class ReplyKey:
    """The requester's side: a fresh X25519 key per request; `public` goes in the
    request, `open()` reads the sealed reply."""

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = b64url(_raw(self._private.public_key()))

    def open(self, sealed: str) -> bytes:
        return open_sealed(self._private, sealed)
