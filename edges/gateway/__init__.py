"""The Standalone Team Gateway agent: registration, heartbeats, claims and
lease-fenced work, the JetStream outbox, the leaf node, `cowork gateway` and the
`cowork gateway up` appliance.
"""

from __future__ import annotations

from ._agent import GatewayAgent
from ._appliance import add_gateway_up_arguments, run_gateway_up
from ._cli import add_gateway_commands, run_gateway
from ._registration import RegistrationFailed, register
from ._store import GatewayStore, GatewayStoreError

__all__ = [
    "GatewayAgent",
    "GatewayStore",
    "GatewayStoreError",
    "RegistrationFailed",
    "add_gateway_commands",
    "add_gateway_up_arguments",
    "register",
    "run_gateway",
    "run_gateway_up",
]
