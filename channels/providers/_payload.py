"""Reading platform payloads defensively, and building the normalised message.

Every inbound payload is attacker-shaped until proven otherwise (even a signed
one may be of a kind or version we do not know): the accessors here check types
and sizes and raise `BadRequest` with a clear reason, so a provider's parse()
never fails with anything but a `ChannelError`.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Literal, overload

from pydantic import ValidationError

from schemas import ChannelInbound

from .._provider import BadRequest, InstanceConfig, WebhookRequest, message_id

_COMMAND_NAME = re.compile(r"[a-z0-9_-]{1,32}")
_MAX_ARGS = 64


def json_object(raw: bytes | str, what: str = "body") -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("payload.invalid_json", f"the {what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("payload.invalid", f"the {what} is not a JSON object")
    return value


@overload
def obj(data: dict[str, Any], key: str, *, required: Literal[True]) -> dict[str, Any]: ...
@overload
def obj(data: dict[str, Any], key: str, *, required: bool = False) -> dict[str, Any] | None: ...
def obj(data: dict[str, Any], key: str, *, required: bool = False) -> dict[str, Any] | None:
    value = data.get(key)
    if value is None:
        if required:
            raise BadRequest("payload.invalid", f"{key!r} is missing")
        return None
    if not isinstance(value, dict):
        raise BadRequest("payload.invalid", f"{key!r} must be an object")
    return value


def items(data: dict[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("payload.invalid", f"{key!r} must be a list")
    return value


@overload
def text(
    data: dict[str, Any], key: str, *, required: Literal[True], max_length: int = ...
) -> str: ...
@overload
def text(
    data: dict[str, Any], key: str, *, required: bool = False, max_length: int = ...
) -> str | None: ...
def text(
    data: dict[str, Any], key: str, *, required: bool = False, max_length: int = 16_384
) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise BadRequest("payload.invalid", f"{key!r} is missing")
        return None
    if not isinstance(value, str):
        raise BadRequest("payload.invalid", f"{key!r} must be a string")
    if required and not value:
        raise BadRequest("payload.invalid", f"{key!r} is empty")
    if len(value) > max_length:
        raise BadRequest("payload.too_large", f"{key!r} is longer than {max_length}")
    return value


@overload
def ident(data: dict[str, Any], key: str, *, required: Literal[True]) -> str: ...
@overload
def ident(data: dict[str, Any], key: str, *, required: bool = False) -> str | None: ...
def ident(data: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    """A platform id (Telegram sends integers, Discord and Slack strings) as text."""
    value = data.get(key)
    if value is None:
        if required:
            raise BadRequest("payload.invalid", f"{key!r} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRequest("payload.invalid", f"{key!r} must be an id")
    result = str(value)
    if not result or len(result) > 256:
        raise BadRequest("payload.invalid", f"{key!r} is not a valid id")
    return result


def integer(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest("payload.invalid", f"{key!r} must be an integer")
    return value


def flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise BadRequest("payload.invalid", f"{key!r} must be a boolean")
    return value


def split_command(raw: str) -> tuple[str, str | None, list[str]] | None:
    """`/name@bot arg1 arg2` -> ("name", "bot" or None, ["arg1", "arg2"]); None when
    the text is not a command. Names are lower-cased; args split on whitespace."""
    if len(raw) < 2 or raw[0] != "/" or raw[1].isspace():
        return None
    parts = raw[1:].split(maxsplit=1)
    if not parts:
        return None
    head, rest = parts[0], parts[1] if len(parts) > 1 else ""
    name, _, mention = head.partition("@")
    name = name.lower()
    if not _COMMAND_NAME.fullmatch(name):
        return None
    args = rest.split()
    if len(args) > _MAX_ARGS:
        args = args[: _MAX_ARGS - 1] + [" ".join(args[_MAX_ARGS - 1 :])]
    return name, (mention or None), args


def command_fields(raw: str) -> dict[str, Any]:
    """`is_command`, `command` and `command_args` of a message whose text is
    `/name args` (for the platforms that have no command events of their own)."""
    parts = split_command(raw)
    if parts is None:
        return {}
    return {"is_command": True, "command": parts[0], "command_args": parts[2]}


def inbound(
    config: InstanceConfig,
    request: WebhookRequest,
    *,
    event_type: str,
    provider_event_id: str,
    **fields: Any,
) -> ChannelInbound:
    """The normalised message; a payload that does not fit the contract (an
    over-long name, too many attachments...) is a BadRequest, not a crash.

    Nested parts (target, sender, attachments, interaction) may be plain dicts
    of field names: the whole message is then validated in one pass, which is
    much cheaper than building each part as a model first (webhook hot path)."""
    fields.update(
        id=message_id(config.tenant, config.instance_id, event_type, provider_event_id),
        event_type=event_type,
        provider_event_id=provider_event_id,
        provider=config.instance_id,
        provider_kind=config.kind,
        workspace_id=config.workspace_id,
        received_at=request.received_at,
    )
    try:
        return ChannelInbound.model_validate(fields)
    except ValidationError as exc:
        raise BadRequest("payload.invalid", _contract_reason(exc)) from None


def body_invalid(code: str, exc: ValidationError) -> BadRequest:
    """A body that failed its pydantic model, as a 400 naming the first bad field."""
    where, message = _first_error(exc)
    return BadRequest(code, f"{where or 'body'}: {message}")


def _contract_reason(exc: ValidationError) -> str:
    where, message = _first_error(exc)
    return f"the event does not fit a channel message ({where}: {message})"


def _first_error(exc: ValidationError) -> tuple[str, str]:
    """(where, message) of the first error: ("", "invalid") when there is none."""
    errors = exc.errors()
    if not errors:
        return "", "invalid"
    first = errors[0]
    return ".".join(str(part) for part in first["loc"]), first["msg"]


def contract_errors(parse):
    """Decorator for parse(): a nested model (sender, target, attachment) that
    refuses a platform value becomes a BadRequest like any other bad field."""

    @functools.wraps(parse)
    def guarded(self, request):
        try:
            return parse(self, request)
        except ValidationError as exc:
            raise BadRequest("payload.invalid", _contract_reason(exc)) from None

    return guarded
