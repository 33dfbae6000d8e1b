"""Identifier rules for anything that is placed into a NATS subject token.

A NATS subject is split on `.`, and `*` / `>` are wildcards; whitespace ends the
subject in the protocol. An id that carried any of those could widen a
permission or address another principal's subjects, so every id that reaches a
subject is checked here, in one place.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

# Letters, digits, `_` and `-` only: no `.`, `*`, `>`, `$`, whitespace or control
# characters. 128 keeps subjects well under server limits.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Tenants are lower-case, start with an alphanumeric, and may not take a name
# the taxonomy uses for its own non-tenant roots.
_TENANT = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
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


def _token(value: str) -> str:
    return check_token(value)


TokenId = Annotated[str, AfterValidator(_token)]
"""An id that is safe to put into a subject token."""

TenantId = Annotated[str, AfterValidator(check_tenant)]
"""A tenant id: a restricted, lower-case subject token."""
