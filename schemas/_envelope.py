"""The envelope every bus message travels in."""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from datetime import UTC, datetime
from typing import Annotated, Generic, TypedDict, TypeVar, Unpack, cast

from pydantic import Field, TypeAdapter, ValidationError

from ._base import Message, WireModel
from ._storable import UNSTORABLE_CODE, unstorable_json
from ._tokens import TenantId, TokenId, check_tenant, check_token
from ._vocabulary import ExecutionAuthority, PrincipalKind

D = TypeVar("D", bound=Message)

_Ref = Annotated[str, Field(min_length=1, max_length=128)]


ID_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
# Two digits per 10-bit value: 8 lookups write the 80 random bits.
_PAIRS = [ID_ALPHABET[i >> 5] + ID_ALPHABET[i & 31] for i in range(1024)]
_time_digits: tuple[int, str] = (-1, "")  # (ms, its 10 digits): reused within a millisecond
# The random bits are os.urandom's, 10 bytes an id, read 4,090 at a time: one system
# call per 409 ids instead of one each (a relayed event takes two ids on the Desktop
# and one on the hub). Two threads never take the same bytes, and a forked child
# starts with bytes of its own.
_RANDOM_CHUNK = 4090
_random_lock = threading.Lock()
_random: list = [b"", _RANDOM_CHUNK]  # [bytes, offset of the next unused byte]


def _fresh_random() -> None:
    global _random_lock
    _random_lock = threading.Lock()
    _random[0], _random[1] = b"", _RANDOM_CHUNK


os.register_at_fork(after_in_child=_fresh_random)


def _random_bits80() -> int:
    with _random_lock:
        offset = _random[1]
        if offset >= _RANDOM_CHUNK:
            _random[0], offset = os.urandom(_RANDOM_CHUNK), 0
        _random[1] = offset + 10
        chunk = _random[0]
    return int.from_bytes(chunk[offset : offset + 10], "big")


def new_id() -> str:
    """A 26-character, time-ordered, URL- and subject-safe id (48-bit ms time + 80 random bits).

    The 128-bit value `ms << 80 | random` in 26 base-32 digits, most significant
    first. The first 10 digits are the milliseconds alone (digit boundaries fall
    on bit 80), so they are computed once per millisecond; the random 80 bits
    are 8 table lookups. This runs once per bus message."""
    global _time_digits
    ms = time.time_ns() // 1_000_000
    cached = _time_digits
    if cached[0] != ms:  # at a few hundred ids a second, most calls: 5 lookups, 2 digits each
        cached = _time_digits = (
            ms,
            _PAIRS[ms >> 40 & 1023]
            + _PAIRS[ms >> 30 & 1023]
            + _PAIRS[ms >> 20 & 1023]
            + _PAIRS[ms >> 10 & 1023]
            + _PAIRS[ms & 1023],
        )
    r = _random_bits80()
    return cached[1] + "".join(
        [
            _PAIRS[r >> 70],
            _PAIRS[r >> 60 & 1023],
            _PAIRS[r >> 50 & 1023],
            _PAIRS[r >> 40 & 1023],
            _PAIRS[r >> 30 & 1023],
            _PAIRS[r >> 20 & 1023],
            _PAIRS[r >> 10 & 1023],
            _PAIRS[r & 1023],
        ]
    )


def utc_now() -> datetime:
    return datetime.now(UTC)


class Source(WireModel):
    """Who sent the message, and on which execution authority's behalf."""

    principal_kind: PrincipalKind
    principal_id: TokenId
    authority: ExecutionAuthority | None = None


class EnvelopeFields(TypedDict, total=False):
    """The envelope fields `Envelope.wrap` takes besides type, version, data, source
    and tenant (validated by the envelope's own rules)."""

    id: str
    time: datetime
    workspace: str | None
    correlation_id: str | None
    causation_id: str | None
    idempotency_key: str | None


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
    def wrap(
        cls,
        data: Message,
        *,
        source: Source,
        tenant: str | None = None,
        **fields: Unpack[EnvelopeFields],
    ) -> Envelope:
        """Put a message in an envelope, taking type and version from its class."""
        return envelope_class(type(data))(
            type=data.message_type,
            schema_version=data.schema_version,
            tenant=tenant,
            source=source,
            data=data,
            **fields,
        )

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True, exclude_none=True).encode()


def envelope_class(message_type: type[D]) -> type[Envelope[D]]:
    """`Envelope[message_type]`, for a message class known only at run time.

    Pydantic parametrizes a generic model at run time (`Envelope[X]` is
    `Envelope.__class_getitem__(X)`); mypy cannot type a subscription by a
    runtime value, so the call is spelled out and its result cast to the class
    it is (pydantic types it as any model)."""
    return cast("type[Envelope[D]]", _parametrized(message_type))


@functools.cache
def _parametrized(message_type: type[Message]) -> object:
    """Pydantic's own cache of parametrized classes holds them weakly: once the
    garbage collector has run, the next `Envelope[X]` builds the class and its
    validation schema again (milliseconds, where a wrap or decode takes tens of
    microseconds). This one keeps them, one per message class."""
    return Envelope.__class_getitem__(message_type)


_TIME = TypeAdapter(datetime)


class EnvelopeTemplate:
    """`Envelope.wrap(data, ...).encode()` for many messages of one type from one sender.

    Everything but `id`, `time` and `data` is fixed per sender, so it is encoded
    once and each message's JSON is spliced in. The bytes are the ones
    `Envelope.wrap(data, source=source, tenant=tenant, workspace=workspace,
    id=..., time=...).encode()` gives (same field order, camelCase, no nulls),
    without the generic envelope's per-message model build and validation: the
    message was validated when it was built, and the fixed fields are checked
    here, once, by the same rules as the envelope's."""

    def __init__(
        self,
        message: type[Message],
        *,
        source: Source,
        tenant: str | None = None,
        workspace: str | None = None,
    ) -> None:
        if tenant is not None:
            check_tenant(tenant)
        if workspace is not None:
            check_token(workspace, "workspace")
        source = Source.model_validate(source.model_dump())
        self.message = message
        head = {"type": message.message_type, "schemaVersion": message.schema_version}
        fixed = {"tenant": tenant, "workspace": workspace}
        members = [
            _fields({k: v for k, v in fixed.items() if v is not None}),
            b'"source":' + source.model_dump_json(by_alias=True, exclude_none=True).encode(),
        ]
        self._head = b'",' + _fields(head) + b',"time":'
        self._tail = b"," + b",".join(m for m in members if m) + b',"data":'

    def encode(
        self, data: Message, *, id: str | None = None, time: datetime | None = None
    ) -> bytes:
        if type(data) is not self.message:
            raise TypeError(
                f"this template encodes {self.message.__name__} messages, not {type(data).__name__}"
            )
        return self.encode_json(
            data.model_dump_json(by_alias=True, exclude_none=True).encode(), id=id, time=time
        )

    def encode_json(
        self, data: bytes, *, id: str | None = None, time: datetime | None = None
    ) -> bytes:
        """The same from the message's JSON (`model_dump_json(by_alias=True,
        exclude_none=True)` of a valid message, or the same bytes built by its
        sender from already validated fields, without building the model)."""
        return b"".join(
            (
                b'{"id":"',
                check_token(id).encode() if id is not None else new_id().encode(),
                self._head,
                _TIME.dump_json(time if time is not None else utc_now()),
                self._tail,
                data,
                b"}",
            )
        )


def _fields(values: dict[str, object]) -> bytes:
    """`"a":1,"b":"x"`: JSON object members without the braces."""
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False)[1:-1].encode()


class ContractError(ValueError):
    """A bus message that does not satisfy the contract; `reason` says why, in one line."""

    def __init__(self, reason: str, code: str = "contract.invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


def decode(raw: bytes | str, model: type[D]) -> Envelope[D]:
    """Validate raw bytes as an envelope carrying `model`, or raise ContractError."""
    try:
        envelope = envelope_class(model).model_validate_json(raw)
    except ValidationError as exc:
        raise ContractError(_summarise(exc)) from None
    problem = unstorable_json(raw)
    if problem is not None:
        raise ContractError(problem, code=UNSTORABLE_CODE)
    if envelope.type != model.message_type:
        raise ContractError(
            f"type {envelope.type!r} where {model.message_type!r} was expected",
            code="contract.wrong_type",
        )
    if envelope.schema_version > model.schema_version:
        raise ContractError(
            f"{model.message_type} schema version {envelope.schema_version} is newer than "
            f"the supported {model.schema_version}",
            code="contract.unsupported_version",
        )
    return envelope


def _summarise(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
