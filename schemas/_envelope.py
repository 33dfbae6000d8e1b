"""The envelope every bus message travels in."""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from typing import Annotated, Generic, TypeVar

from pydantic import Field, ValidationError

from ._base import Message, WireModel
from ._tokens import TenantId, TokenId
from ._vocabulary import ExecutionAuthority, PrincipalKind

D = TypeVar("D", bound=Message)

_Ref = Annotated[str, Field(min_length=1, max_length=128)]


def new_id() -> str:
    """A 26-character, time-ordered, URL- and subject-safe id (48-bit ms time + 80 random bits)."""
    value = (time.time_ns() // 1_000_000) << 80 | secrets.randbits(80)
    alphabet = "0123456789abcdefghjkmnpqrstvwxyz"
    return "".join(alphabet[(value >> shift) & 31] for shift in range(125, -1, -5))


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Source(WireModel):
    """Who sent the message, and on which execution authority's behalf."""

    principal_kind: PrincipalKind
    principal_id: TokenId
    authority: ExecutionAuthority | None = None


class Envelope(WireModel, Generic[D]):
    """Version 1 of the bus envelope.

    `tenant` is absent only on bootstrap requests (pairing redemption, gateway
    registration), which happen before the sender has a tenant-scoped credential.
    """

    id: TokenId = Field(default_factory=new_id)
    type: str = Field(min_length=1, max_length=64)
    schema_version: int = Field(ge=1, le=1000)
    time: datetime = Field(default_factory=utc_now)
    tenant: TenantId | None = None
    workspace: TokenId | None = None
    source: Source
    correlation_id: _Ref | None = None
    causation_id: _Ref | None = None
    idempotency_key: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    data: D

    @classmethod
    def wrap(cls, data: Message, *, source: Source, tenant: str | None = None,
             **fields: object) -> "Envelope":
        """Put a message in an envelope, taking type and version from its class."""
        return Envelope[type(data)](  # type: ignore[misc]
            type=data.message_type, schema_version=data.schema_version,
            tenant=tenant, source=source, data=data, **fields,
        )

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


class ContractError(ValueError):
    """A bus message that does not satisfy the contract; `reason` says why, in one line."""

    def __init__(self, reason: str, code: str = "contract.invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def decode(raw: bytes | str, model: type[D]) -> Envelope[D]:
    """Validate raw bytes as an envelope carrying `model`, or raise ContractError."""
    try:
        envelope = Envelope[model].model_validate_json(raw)  # type: ignore[valid-type]
    except ValidationError as exc:
        raise ContractError(_summarise(exc)) from None
    if envelope.type != model.message_type:
        raise ContractError(
            f"type {envelope.type!r} where {model.message_type!r} was expected",
            code="contract.wrong_type")
    if envelope.schema_version > model.schema_version:
        raise ContractError(
            f"{model.message_type} schema version {envelope.schema_version} is newer than "
            f"the supported {model.schema_version}", code="contract.unsupported_version")
    return envelope


def _summarise(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
