"""`cowork channel login` and `cowork channel cli`."""

from __future__ import annotations

from ._command import add_channel_commands

__all__ = ["add_channel_commands"]
