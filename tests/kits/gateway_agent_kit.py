"""Helpers for tests that register a real Gateway agent with a real hub.

`registered` creates a registration through the admin API and exchanges its
credential over the operator-mode NATS server (as `cowork gateway register`
does); `start_gateway` runs a GatewayAgent in-process against an OpenCode URL;
`enqueue` and `work_view` drive Cloud-owned work through the admin API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from desktopkit import TENANT, RunningAgent, api, eventually
from opencode_env import OPENCODE_VERSION

from edges.gateway._agent import GatewayAgent
from edges.gateway._registration import register, version_set
from edges.gateway._store import GatewayStore

BASE = f"/api/v1/tenants/{TENANT}"


async def create_registration(
    http: httpx.AsyncClient,
    kind: str = "edge_worker",
    *,
    trust: str = "self_hosted_same_operator",
    name: str = "test gateway",
    **body: Any,
) -> dict:
    return await api(
        http,
        "POST",
        f"{BASE}/gateway-registrations",
        json={"displayName": name, "kind": kind, "trustModel": trust, **body},
        expect=(201,),
    )


async def get_registration(http: httpx.AsyncClient, registration_id: str) -> dict:
    return await api(http, "GET", f"{BASE}/gateway-registrations/{registration_id}")


async def admin(http: httpx.AsyncClient, registration_id: str, action: str, **body: Any) -> dict:
    return await api(
        http, "POST", f"{BASE}/gateway-registrations/{registration_id}/{action}", json=body
    )


async def registered(
    http: httpx.AsyncClient, nats_url: str, state_dir: Path, kind: str = "edge_worker", **body: Any
) -> tuple[dict, GatewayStore]:
    """Create a registration and register a Gateway with it into `state_dir`."""
    created = await create_registration(http, kind, **body)
    store = GatewayStore(state_dir)
    await register(created["credential"], [nats_url], store, version_set(OPENCODE_VERSION))
    store.close()
    return created, store


class RunningGateway(RunningAgent):
    agent_type, store_type = GatewayAgent, GatewayStore
    connect_timeout, stop_timeout = 15.0, 20.0

    def __init__(self, agent: GatewayAgent) -> None:
        super().__init__(agent)
        self.registration_id = agent.registration_id


start_gateway = RunningGateway.start


async def wait_status(
    http: httpx.AsyncClient, registration_id: str, status: str, timeout: float = 15.0
) -> dict:
    async def check() -> dict | None:
        view = await get_registration(http, registration_id)
        return view if view["status"] == status else None

    return await eventually(check, timeout, 0.1, f"registration {status}")


async def enqueue(
    http: httpx.AsyncClient,
    text: str,
    *,
    title: str = "edge work",
    workspace: str = "cloud-ws",
    **body: Any,
) -> str:
    created = await api(
        http,
        "POST",
        f"{BASE}/work",
        json={
            "kind": "prompt",
            "sessionRef": {"workspaceId": workspace, "title": title},
            "payload": {"text": text},
            **body,
        },
        expect=(200, 201),
    )
    return created["workId"]


async def work_view(http: httpx.AsyncClient, work_id: str) -> dict:
    """The work item with all of its outputs (every page)."""
    view: dict | None = None
    outputs: list[dict] = []
    while True:
        after = outputs[-1]["sequence"] if outputs else 0
        page = await api(http, "GET", f"{BASE}/work/{work_id}", params={"afterSequence": after})
        view = view or page
        if not page["events"]:
            break
        outputs += page["events"]
    view["events"] = outputs
    return view


async def work_state(
    http: httpx.AsyncClient, work_id: str, states: tuple[str, ...], timeout: float = 60.0
) -> dict:
    async def check() -> dict | None:
        view = await api(http, "GET", f"{BASE}/work/{work_id}")
        return view if view["state"] in states else None

    await eventually(check, timeout, 0.1, f"work {work_id} in {states}")
    return await work_view(http, work_id)
