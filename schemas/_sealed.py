"""The wire format of sealed pairings (docs/sealed.md): signed commands and sealed content.

A controller (a web or phone client, `cowork remote`, an automation) signs every
command it sends to a sealed Desktop with its Ed25519 key, over `CommandClaims`:
everything that gives the command its meaning. What it asks for (the payload) is
sealed to the Desktop's X25519 key. What the Desktop sends back (event payloads,
command results) is encrypted under a content key that only the Desktop and the
enrolled controllers hold, wrapped to each controller's X25519 key. The hub
passes all of it through; it holds no key that opens or signs any of it.

Byte rules a client must follow (no whitespace, keys sorted, UTF-8):

- signed bytes: `cowork.command.v1\\n` + canonical JSON of the claims (camelCase
  keys, every field present, `sessionId` null when none; ints and strings only);
- `payloadHash`: lower-case hex SHA-256 of the UTF-8 of `sealedPayload` ("" when none);
- sealed boxes (`sealedPayload`, each wrapped key): `<ephemeral X25519 public>.<nonce +
  ChaCha20-Poly1305 ciphertext>`, both unpadded base64url; the key is HKDF-SHA256
  over the X25519 shared secret, salt = ephemeral public + recipient public, info =
  `SEAL_INFO_PAYLOAD` or `SEAL_INFO_WRAP`; associated data as `payload_aad` and
  `wrap_aad` say;
- content: ChaCha20-Poly1305 under the 32-byte content key, 12-byte `nonce`,
  associated data `content_aad(...)`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal

from pydantic import Field

from ._base import WireModel
from ._tokens import TenantId, TokenId
from ._vocabulary import CommandKind

__all__ = [
    "CLAIMS_PREFIX",
    "CommandClaims",
    "ControllerEnrolPayload",
    "EnrolInvite",
    "SEAL_INFO_INVITE",
    "SEAL_INFO_PAYLOAD",
    "SEAL_INFO_WRAP",
    "SealedContent",
    "SignedCommand",
    "WrappedKey",
    "claims_bytes",
    "content_aad",
    "invite_aad",
    "payload_aad",
    "payload_hash",
    "wrap_aad",
]

CLAIMS_PREFIX = b"cowork.command.v1\n"
SEAL_INFO_PAYLOAD = b"cowork-sealed-payload-v1"
SEAL_INFO_WRAP = b"cowork-sealed-wrap-v1"
SEAL_INFO_INVITE = b"cowork-sealed-invite-v1"
B64 = r"^[A-Za-z0-9_-]*$"
Key32 = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{43}$")]  # 32 bytes, base64url
SealedBox = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{43}\.[A-Za-z0-9_-]+$")]


class CommandClaims(WireModel):
    """What a controller signs. The Desktop checks each field against the command
    the hub pushed (a claim bound to another tenant, pairing, command, kind,
    workspace or session is refused), and the times against its own clock."""

    v: Literal[1]
    tenant: TenantId
    pairing_id: TokenId
    command_id: TokenId
    controller_id: TokenId
    controller_sequence: int = Field(
        ge=1, description="Per controller, strictly increasing: the Desktop's replay window"
    )
    kind: CommandKind
    workspace_id: TokenId
    session_id: TokenId | None = None  # signed as null when absent (claims_bytes)
    payload_hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    issued_at: int = Field(ge=0, description="Unix seconds")
    expires_at: int = Field(ge=0, description="Unix seconds")


class SignedCommand(WireModel):
    """A command of a controller: its claims, the Ed25519 signature over
    `claims_bytes(claims)`, and its payload sealed to the Desktop's X25519 key."""

    claims: CommandClaims
    signature: str = Field(pattern=r"^[A-Za-z0-9_-]{86}$", description="Ed25519, base64url")
    sealed_payload: SealedBox | None = Field(default=None, max_length=400_000)


class WrappedKey(WireModel):
    """A content key sealed to one enrolled controller's X25519 key."""

    controller_id: TokenId
    wrapped: SealedBox = Field(max_length=256)


class SealedContent(WireModel):
    """An event payload or command result encrypted on the Desktop. `keyId` names
    the content key (a fresh one per time window and whenever a controller is
    added or removed); `keys` is that key wrapped to each controller enrolled when
    it was made, so a removed controller finds no key for what follows."""

    v: Literal[1]
    key_id: TokenId
    nonce: str = Field(pattern=r"^[A-Za-z0-9_-]{16}$")
    ciphertext: str = Field(pattern=B64, max_length=1_400_000)
    keys: list[WrappedKey] = Field(max_length=64)


class EnrolInvite(WireModel):
    """A one-time invite the Desktop made (`cowork desktop controllers invite`), as
    the controller presents it: the invite's id, and its secret sealed to the
    Desktop's X25519 key with associated data `invite_aad(...)`, which names this
    controller's keys and label. The hub sees neither the secret nor a value it
    could bind to keys of its own."""

    id: TokenId
    sealed_secret: SealedBox = Field(max_length=256)


class ControllerEnrolPayload(WireModel):
    """A controller asking to be enrolled. Without `invite` the Desktop only records
    it and a person there approves it (`cowork desktop controllers add FINGERPRINT`).
    With a valid, unexpired, unused invite the Desktop enrols it at once; otherwise
    it refuses with `invite.unknown`, `invite.invalid`, `invite.used` or
    `invite.expired`."""

    label: str = Field(min_length=1, max_length=128)
    signing_key: Key32 = Field(description="Ed25519 public key, base64url")
    encryption_key: Key32 = Field(description="X25519 public key, base64url")
    invite: EnrolInvite | None = None


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def claims_bytes(claims: CommandClaims) -> bytes:
    """The exact bytes a controller signs and the Desktop verifies."""
    return CLAIMS_PREFIX + _canonical(claims.model_dump(mode="json", by_alias=True))


def payload_hash(sealed_payload: str | None) -> str:
    return hashlib.sha256((sealed_payload or "").encode()).hexdigest()


def payload_aad(tenant: str, pairing_id: str, command_id: str) -> bytes:
    return _canonical({"command": command_id, "pairing": pairing_id, "tenant": tenant})


def invite_aad(
    tenant: str, pairing_id: str, invite_id: str, label: str, signing_key: str, encryption_key: str
) -> bytes:
    """Binds an invite's sealed secret to the controller presenting it: another
    label or key (the hub's own) and the secret does not open."""
    return _canonical(
        {
            "encryptionKey": encryption_key,
            "invite": invite_id,
            "label": label,
            "pairing": pairing_id,
            "signingKey": signing_key,
            "tenant": tenant,
        }
    )


def wrap_aad(key_id: str, controller_id: str) -> bytes:
    return _canonical({"controller": controller_id, "key": key_id})


def content_aad(
    tenant: str, pairing_id: str, purpose: Literal["event", "result"], id: str
) -> bytes:
    """Binds content to where it belongs: an event id or a command id of one pairing,
    so the hub cannot move a ciphertext to another event or command."""
    return _canonical({"id": id, "pairing": pairing_id, "purpose": purpose, "tenant": tenant})
