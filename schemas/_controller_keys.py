"""A controller's keys (Ed25519 to sign commands, X25519 to open what a sealed Desktop
sends it) and the public half a Desktop enrols. Pure cryptography, no I/O: the
controller library (`edges.remote`), the Desktop (`edges.desktop`) and a hub-hosted
chat channel enrolled as a controller (`hub.channels`, docs/sealed.md "Channels")
all use this one implementation. Byte rules: `schemas._sealed` and docs/sealed.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ._bootstrap import SealError, b64url, open_sealed, seal, unb64url
from ._sealed import (
    SEAL_INFO_PAYLOAD,
    SEAL_INFO_WRAP,
    CommandClaims,
    SealedContent,
    SignedCommand,
    claims_bytes,
    payload_aad,
    payload_hash,
    wrap_aad,
)

__all__ = [
    "ControllerKeys",
    "ControllerPublic",
    "controller_id_of",
    "decrypt_content",
    "fingerprint",
]

_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
_RAW_PRIVATE = (
    serialization.Encoding.Raw,
    serialization.PrivateFormat.Raw,
    serialization.NoEncryption(),
)
# 16 base32 symbols: 80 bits. A hub that wanted to slip its own key under a
# fingerprint a person approves would need a second preimage of that size.
FINGERPRINT_SYMBOLS = 16


b64, unb64 = b64url, unb64url


def fingerprint(kind: str, *public_keys: str) -> str:
    """A short, typeable digest of public keys, e.g. `K7QD-2MXA-PL4F-9RTB`."""
    digest = hashlib.sha256(f"cowork-{kind}-v1".encode() + b"".join(map(unb64, public_keys)))
    text = base64.b32encode(digest.digest()).decode()[:FINGERPRINT_SYMBOLS]
    return "-".join(text[i : i + 4] for i in range(0, FINGERPRINT_SYMBOLS, 4))


def controller_id_of(fingerprint_text: str) -> str:
    return "ctl-" + fingerprint_text.replace("-", "").lower()


@dataclass(frozen=True)
class ControllerPublic:
    """An enrolled (or asking) controller as the Desktop knows it."""

    label: str
    signing_key: str  # Ed25519, base64url
    encryption_key: str  # X25519, base64url

    @property
    def fingerprint(self) -> str:
        return fingerprint("controller", self.signing_key, self.encryption_key)

    @property
    def controller_id(self) -> str:
        return controller_id_of(self.fingerprint)

    @cached_property
    def _verifier(self) -> Ed25519PublicKey | None:
        """The signing key, parsed once (the Desktop keeps its controllers)."""
        try:
            return Ed25519PublicKey.from_public_bytes(unb64(self.signing_key))
        except ValueError:
            return None

    def verify(self, signed: SignedCommand) -> bool:
        if self._verifier is None:
            return False
        try:
            self._verifier.verify(unb64(signed.signature), claims_bytes(signed.claims))
        except (InvalidSignature, ValueError):
            return False
        return True


class ControllerKeys:
    """A controller's own keys, made where it runs; the private halves never leave it."""

    def __init__(self, signing: Ed25519PrivateKey, encryption: X25519PrivateKey, label: str):
        self.signing, self.encryption, self.label = signing, encryption, label
        self.public = ControllerPublic(
            label,
            b64(signing.public_key().public_bytes(*_RAW)),
            b64(encryption.public_key().public_bytes(*_RAW)),
        )
        self.controller_id = self.public.controller_id
        self._content_keys: dict[str, bytes] = {}  # key id -> content key, once unwrapped

    @classmethod
    def generate(cls, label: str) -> ControllerKeys:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate(), label)

    def to_json(self) -> dict[str, str]:
        return {
            "label": self.label,
            "signingSeed": b64(self.signing.private_bytes(*_RAW_PRIVATE)),
            "encryptionSeed": b64(self.encryption.private_bytes(*_RAW_PRIVATE)),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ControllerKeys:
        try:
            return cls(
                Ed25519PrivateKey.from_private_bytes(unb64(data["signingSeed"])),
                X25519PrivateKey.from_private_bytes(unb64(data["encryptionSeed"])),
                str(data["label"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SealError(f"controller keys are damaged: {exc}") from exc

    def sign(
        self,
        *,
        tenant: str,
        pairing_id: str,
        command_id: str,
        sequence: int,
        kind: str,
        workspace_id: str,
        session_id: str | None,
        payload: dict | None,
        desktop_key: str,
        lifetime: float = 300.0,
        issued_at: float | None = None,
    ) -> SignedCommand:
        """A signed command whose payload only the Desktop holding `desktop_key` reads."""
        sealed = None
        if payload is not None:
            sealed = seal(
                json.dumps(payload).encode(),
                desktop_key,
                info=SEAL_INFO_PAYLOAD,
                aad=payload_aad(tenant, pairing_id, command_id),
            )
        now = int(time.time() if issued_at is None else issued_at)
        claims = CommandClaims(
            v=1,
            tenant=tenant,
            pairing_id=pairing_id,
            command_id=command_id,
            controller_id=self.controller_id,
            controller_sequence=sequence,
            kind=kind,  # type: ignore[arg-type]  # validated into CommandKind
            workspace_id=workspace_id,
            session_id=session_id,
            payload_hash=payload_hash(sealed),
            issued_at=now,
            expires_at=int(now + lifetime),
        )
        signature = b64(self.signing.sign(claims_bytes(claims)))
        return SignedCommand(claims=claims, signature=signature, sealed_payload=sealed)

    def open(self, content: SealedContent, aad: bytes) -> bytes:
        """Decrypt content the Desktop sealed; SealError if this controller holds no
        key for it (not enrolled when it was made) or it was tampered with."""
        key = self._content_keys.get(content.key_id)
        if key is None:
            wrapped = next((w for w in content.keys if w.controller_id == self.controller_id), None)
            if wrapped is None:
                raise SealError(f"no content key {content.key_id} for this controller")
            key = open_sealed(
                self.encryption,
                wrapped.wrapped,
                info=SEAL_INFO_WRAP,
                aad=wrap_aad(content.key_id, self.controller_id),
            )
            self._content_keys[content.key_id] = key
        return decrypt_content(key, content, aad)


def decrypt_content(key: bytes, content: SealedContent, aad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(unb64(content.nonce), unb64(content.ciphertext), aad)
    except (InvalidTag, ValueError) as exc:
        raise SealError("sealed content failed authentication") from exc
