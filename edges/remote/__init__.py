"""A controller of sealed Desktops: the importable client (`RemoteClient`) and the
`cowork remote` command. It makes its own keys, asks a Desktop to enrol it (a person
on the Desktop approves), signs commands, and opens what the Desktop sealed, as it
comes through the hub's events page and SSE tail (docs/sealed.md).
"""

from __future__ import annotations

from ._channel import add_channel_enrol_command, enrol_channel
from ._cli import add_remote_commands, run_remote
from ._client import RemoteClient, RemoteError
from ._store import ControllerStore, PairingLink

__all__ = [
    "ControllerStore",
    "PairingLink",
    "RemoteClient",
    "RemoteError",
    "add_channel_enrol_command",
    "enrol_channel",
    "add_remote_commands",
    "run_remote",
]
