"""The Cloud-side hub: store, auth, bus services and HTTP.

Public face: `Hub` (the composition root), `HubSettings` and `StartupError`.
The `cowork` command lives in `hub.cli`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._service import Hub, StartupError
    from .core import HubSettings

__all__ = ["Hub", "HubSettings", "StartupError"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: `cowork desktop …` and the other edge commands import
    # `hub.cli`, and should not pay for the whole hub (about a second) at every start.
    if name in ("Hub", "StartupError"):
        from . import _service

        return getattr(_service, name)
    if name == "HubSettings":
        from .core import HubSettings

        return HubSettings
    raise AttributeError(f"module 'hub' has no attribute {name!r}")
