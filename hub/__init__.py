"""The Cloud-side hub: store, auth, bus services and HTTP.

Public face: `Hub` (the composition root), `HubSettings` and `StartupError`.
The `cowork` command lives in `hub.cli`.
"""

from ._service import Hub, StartupError
from .core import HubSettings

__all__ = ["Hub", "HubSettings", "StartupError"]
