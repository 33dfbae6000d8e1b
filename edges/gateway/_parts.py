"""What the parts of `GatewayAgent` share: its state, and each other's methods.

`GatewayAgent` (edges/gateway/_agent.py) is composed of `GatewayConnection`
(_bus.py), `GatewayStatus` (_status.py) and `GatewayClaims` (_claims.py). Each
part uses attributes the agent sets in `__init__` and methods another part
defines; `AgentParts`, their common base, declares them so that each part type
checks on its own. It adds nothing at run time: the attributes are annotations
only and the methods are declared for the type checker alone, so the agent's
method resolution order is the same as without it.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import TYPE_CHECKING, Literal, TypeVar

from schemas import EnvelopeTemplate, Message, WorkClaimRequest

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS

    from ..common import AnswerTimes, EdgeCredentials, OpenCodeClient, ReconnectPolicy, Repeats
    from ._bus import Refused
    from ._outbox import Outbox
    from ._store import GatewayFile, GatewayStore
    from ._work import SessionEvents, WorkRunner

M = TypeVar("M", bound=Message)

# What the agent reports of its OpenCode (and of itself) in a heartbeat.
Health = Literal["healthy", "degraded", "unhealthy"]
Liveness = Literal["alive", "stopping"]


class AgentParts:
    """The agent's state and methods its parts use (set or defined in GatewayAgent
    unless noted)."""

    store: GatewayStore
    gateway: GatewayFile
    creds: EdgeCredentials
    opencode: OpenCodeClient
    events: SessionEvents
    outbox: Outbox
    max_concurrent_work: int
    heartbeat_interval: float
    sync_interval: float
    max_run_seconds: float
    nats_urls: list[str]
    reconnect: ReconnectPolicy
    nc: NATS | None
    state: str  # the registration's state, as the hub last reported it (wire value)
    drain_deadline: datetime | None
    runners: dict[str, WorkRunner]
    fatal: str | None
    connected: asyncio.Event
    _tasks: dict[str, asyncio.Task]
    _stopped: asyncio.Event
    _stopping: bool
    _claim_wanted: asyncio.Event
    _offered: list[str]
    _claim: WorkClaimRequest | None  # the claim attempt not yet answered (GatewayClaims)
    _answer_times: AnswerTimes  # how long the hub usually takes (GatewayConnection.request)
    _envelopes: dict[type[Message], EnvelopeTemplate]  # per request type (GatewayConnection)
    _gone: set[str]
    _unsent: int
    _auth_failures: int
    _repeats: Repeats
    _health: Health
    _opencode_version: str | None
    _opencode_checked_at: float  # (time.monotonic() of the last health check)
    opencode_check_interval: float
    _last_error: str | None

    if TYPE_CHECKING:
        # GatewayAgent
        @property
        def can_claim(self) -> bool: ...

        def _fail(self, message: str) -> None: ...

        async def _bus(self) -> None: ...

        async def _announce(self) -> None: ...

        # GatewayConnection (_bus.py)
        @property
        def tenant(self) -> str: ...

        @property
        def registration_id(self) -> str: ...

        async def request(
            self,
            subject: str,
            message: Message,
            reply_model: type[M],
            timeout: float = ...,
            *,
            again: bool = ...,
            repeat_codes: frozenset[str] = ...,
        ) -> M: ...

        # GatewayStatus (_status.py)
        async def _heartbeat(self, liveness: Liveness = "alive") -> None: ...

        def _terminal(self, exc: Refused) -> None: ...

        # GatewayClaims (_claims.py)
        def _want_claim(self) -> None: ...
