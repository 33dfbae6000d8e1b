"""Identifier rules for anything that is placed into a NATS subject token.

A NATS subject is split on `.`, and `*` / `>` are wildcards; whitespace ends the
subject in the protocol. An id that carried any of those could widen a
permission or address another principal's subjects, so every id that reaches a
subject is checked here, in one place.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, StringConstraints

# Letters, digits, `_` and `-` only: no `.`, `*`, `>`, `$`, whitespace or control
# characters. 128 keeps subjects well under server limits.
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_TOKEN = re.compile(TOKEN_PATTERN)
# Tenants are lower-case, start with an alphanumeric, and may not take a name
# the taxonomy uses for its own non-tenant roots.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_TENANT = re.compile(TENANT_PATTERN)
RESERVED_TENANTS = frozenset({"bootstrap", "system", "all", "hub"})


class InvalidTokenError(ValueError):
    """An id that cannot be used as a subject token."""


def check_token(value: str, what: str = "id") -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise InvalidTokenError(
            f"{what} {value!r} is not a valid subject token (1-128 characters from A-Z a-z 0-9 _ -)"
        )
    return value


def check_tenant(value: str) -> str:
    if not isinstance(value, str) or not _TENANT.fullmatch(value):
        raise InvalidTokenError(
            f"tenant {value!r} is not valid (1-63 characters from a-z 0-9 _ -, "
            "starting with a letter or digit)"
        )
    if value in RESERVED_TENANTS:
        raise InvalidTokenError(f"tenant {value!r} is a reserved name")
    return value


def _not_reserved(value: str) -> str:
    if value in RESERVED_TENANTS:
        raise InvalidTokenError(f"tenant {value!r} is a reserved name")
    return value


# In a model the patterns are checked by pydantic-core itself (no Python call per
# field: a relayed event's envelope holds seven of them, checked on the hub's hot
# path), and they are part of the generated JSON Schema.
TokenId = Annotated[str, StringConstraints(pattern=TOKEN_PATTERN)]
"""An id that is safe to put into a subject token."""

TenantId = Annotated[str, StringConstraints(pattern=TENANT_PATTERN), AfterValidator(_not_reserved)]
"""A tenant id: a restricted, lower-case subject token."""
