"""Standalone Team Gateways: registration and bootstrap, version policy,
heartbeats, sync reports, sweeps, and their HTTP routes.
"""

from __future__ import annotations

from ._bootstrap import GatewayBootstrap
from ._routes import REGISTRATION_STATUSES, add_routes
from ._service import GatewayRegistry

__all__ = ["REGISTRATION_STATUSES", "GatewayBootstrap", "GatewayRegistry", "add_routes"]
