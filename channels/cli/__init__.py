"""`cowork channel login`, `cowork channel cli` and `cowork channel run`."""

from __future__ import annotations

from ._command import add_channel_commands

__all__ = ["add_channel_commands"]
