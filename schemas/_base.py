"""Model base classes shared by every message: camelCase on the wire, strict input."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    """Any object on the wire: camelCase JSON, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=False,
        ser_json_timedelta="float",
    )


class Message(WireModel):
    """The `data` of an envelope. Subclasses name their wire type and version."""

    message_type: ClassVar[str]
    schema_version: ClassVar[int] = 1
