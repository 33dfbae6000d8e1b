"""The cryptography of sealed pairings, for both ends: the Desktop and its controllers.

Wire format and byte rules: `schemas._sealed` and docs/sealed.md. Ed25519 signs
commands; X25519 sealed boxes (`schemas.seal`: ephemeral ECDH + HKDF-SHA256 +
ChaCha20-Poly1305) carry command payloads to the Desktop and content keys to the
controllers; ChaCha20-Poly1305 under a content key encrypts what the Desktop
sends back. The hub imports none of this module. A controller's own keys are
`schemas.ControllerKeys`, which a hub-hosted chat channel enrolled as a controller
uses too (docs/sealed.md, "Channels").
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from schemas import (
    SEAL_INFO_INVITE,
    SEAL_INFO_PAYLOAD,
    SEAL_INFO_WRAP,
    ControllerPublic,
    EnrolInvite,
    SealedContent,
    SealError,
    SignedCommand,
    WrappedKey,
    b64url,
    fingerprint,
    invite_aad,
    new_id,
    open_sealed,
    payload_aad,
    seal,
    unb64url,
    wrap_aad,
)

_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
_RAW_PRIVATE = (
    serialization.Encoding.Raw,
    serialization.PrivateFormat.Raw,
    serialization.NoEncryption(),
)
b64, unb64 = b64url, unb64url


def normalise_fingerprint(text: str) -> str:
    """What a person typed, as `fingerprint` writes it (case, spaces, dashes ignored)."""
    bare = "".join(c for c in text.upper() if c.isalnum())
    return "-".join(bare[i : i + 4] for i in range(0, len(bare), 4))


@dataclass
class ContentKey:
    """One content key of the Desktop, wrapped to the controllers enrolled when it was
    made. Replaced (never extended) when that set changes or its window ends."""

    recipients: dict[str, str]  # controller id -> X25519 public key
    key_id: str = field(default_factory=lambda: "ck" + new_id())
    key: bytes = field(default_factory=lambda: os.urandom(32))
    made_at: float = field(default_factory=time.monotonic)
    wraps: list[WrappedKey] = field(init=False)

    def __post_init__(self) -> None:
        self._aead = ChaCha20Poly1305(self.key)
        self.wraps = [
            WrappedKey(
                controller_id=cid,
                wrapped=seal(self.key, pub, info=SEAL_INFO_WRAP, aad=wrap_aad(self.key_id, cid)),
            )
            for cid, pub in sorted(self.recipients.items())
        ]

        self._wraps_json = [w.model_dump(mode="json", by_alias=True) for w in self.wraps]

    def seal_json(self, plaintext: bytes, aad: bytes) -> dict[str, Any]:
        """`SealedContent` as its JSON object, built directly: the relay seals every
        event, and a model's validation and dump would cost more than the cipher."""
        nonce = os.urandom(12)
        return {
            "v": 1,
            "keyId": self.key_id,
            "nonce": b64(nonce),
            "ciphertext": b64(self._aead.encrypt(nonce, plaintext, aad)),
            "keys": self._wraps_json,
        }

    def seal(self, plaintext: bytes, aad: bytes) -> SealedContent:
        return SealedContent.model_validate(self.seal_json(plaintext, aad))


INVITE_SCHEME = "cowork+enrol"


@dataclass(frozen=True)
class InviteLink:
    """A one-time enrolment invite as the Desktop shows it (a link and its QR code):
    where to ask (hub, tenant, pairing), which invite, its secret, and the Desktop's
    X25519 key. The link is read off the Desktop's screen, not from the hub, so the
    Desktop key in it is the real one. It holds a secret: whoever has the link may
    enrol once, until it expires."""

    tenant: str
    pairing_id: str
    invite_id: str
    secret: str  # 32 random bytes, base64url
    desktop_key: str  # X25519, base64url
    hub_url: str | None = None

    @property
    def desktop_fingerprint(self) -> str:
        return fingerprint("desktop", self.desktop_key)

    def to_text(self) -> str:
        query = {
            "v": "1",
            "tenant": self.tenant,
            "pairing": self.pairing_id,
            "invite": self.invite_id,
            "secret": self.secret,
            "desktop": self.desktop_key,
        }
        if self.hub_url:
            query["hub"] = self.hub_url
        return f"{INVITE_SCHEME}://enrol?{urlencode(query)}"

    @classmethod
    def parse(cls, text: str) -> InviteLink:
        """The link `to_text` wrote, or SealError saying what is wrong with it."""
        parsed = urlparse(text.strip())
        if parsed.scheme != INVITE_SCHEME:
            raise SealError(f"not an enrolment link (it starts with {INVITE_SCHEME}://)")
        query = {k: v[0] for k, v in parse_qs(parsed.query).items() if v}
        missing = [
            k for k in ("tenant", "pairing", "invite", "secret", "desktop") if k not in query
        ]
        if missing or query.get("v") != "1":
            raise SealError(f"the enrolment link is incomplete (missing {', '.join(missing)})")
        try:
            if len(unb64(query["secret"])) != 32 or len(unb64(query["desktop"])) != 32:
                raise ValueError
        except ValueError:
            raise SealError("the enrolment link is damaged (secret or Desktop key)") from None
        return cls(
            query["tenant"],
            query["pairing"],
            query["invite"],
            query["secret"],
            query["desktop"],
            query.get("hub"),
        )

    def present(self, controller: ControllerPublic) -> EnrolInvite:
        """The invite as the controller sends it: its secret sealed to the Desktop's key,
        bound to this controller's keys and label (the hub can neither read it nor move
        it to keys of its own)."""
        aad = invite_aad(
            self.tenant,
            self.pairing_id,
            self.invite_id,
            controller.label,
            controller.signing_key,
            controller.encryption_key,
        )
        sealed = seal(unb64(self.secret), self.desktop_key, info=SEAL_INFO_INVITE, aad=aad)
        return EnrolInvite(id=self.invite_id, sealed_secret=sealed)


class DesktopSealingKey:
    """The Desktop's X25519 key: controllers seal command payloads to it."""

    def __init__(self, private: X25519PrivateKey) -> None:
        self._private = private
        self.public = b64(private.public_key().public_bytes(*_RAW))
        self.fingerprint = fingerprint("desktop", self.public)

    @classmethod
    def generate(cls) -> DesktopSealingKey:
        return cls(X25519PrivateKey.generate())

    def to_text(self) -> str:
        return b64(self._private.private_bytes(*_RAW_PRIVATE))

    @classmethod
    def from_text(cls, text: str) -> DesktopSealingKey:
        try:
            return cls(X25519PrivateKey.from_private_bytes(unb64(text.strip())))
        except ValueError as exc:
            raise SealError(f"the Desktop's sealing key is damaged: {exc}") from exc

    def open_invite(self, invite: EnrolInvite, aad: bytes) -> bytes:
        """An invite's secret as a controller sealed it, or SealError."""
        return open_sealed(self._private, invite.sealed_secret, info=SEAL_INFO_INVITE, aad=aad)

    def open_payload(self, signed: SignedCommand) -> dict | None:
        if signed.sealed_payload is None:
            return None
        claims = signed.claims
        plain = open_sealed(
            self._private,
            signed.sealed_payload,
            info=SEAL_INFO_PAYLOAD,
            aad=payload_aad(claims.tenant, claims.pairing_id, claims.command_id),
        )
        value = json.loads(plain)
        if not isinstance(value, dict):
            raise SealError("a sealed payload is a JSON object")
        return value
