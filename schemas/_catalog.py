"""Every message type, keyed by its wire name: the registry docs and decoders use."""

from __future__ import annotations

from . import _messages as m
from ._base import Message

MESSAGES: dict[str, type[Message]] = {
    cls.message_type: cls
    for cls in vars(m).values()
    if isinstance(cls, type) and issubclass(cls, Message) and cls is not Message
}


def message_model(message_type: str) -> type[Message]:
    try:
        return MESSAGES[message_type]
    except KeyError:
        raise KeyError(f"unknown message type {message_type!r}") from None
