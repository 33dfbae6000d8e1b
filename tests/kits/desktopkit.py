"""Helpers for tests that pair a real Desktop agent with a real hub.

`paired_desktop` creates a pairing through the admin API, redeems its code
over the operator-mode NATS server with the public bootstrap identity (as
`cowork desktop pair` does), runs the DesktopAgent against an OpenCode URL,
and waits until the hub shows it online.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats

from edges.desktop._agent import DesktopAgent, pair
from edges.desktop._store import DesktopStore
from schemas import DeviceEvent, Envelope, Source, subjects

TENANT = "acme"
COWORK = str(Path(sys.executable).parent / "cowork")


async def eventually(
    check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll an (a)sync check until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def cowork(
    *args: str, env: dict | None = None, stdin: bytes | None = None
) -> tuple[int, str, str]:
    """Run the `cowork` command as a user would: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        COWORK,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 60)
    return process.returncode, out.decode(), err.decode()


async def api(
    http: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    expect: tuple[int, ...] = (200,),
    **request: Any,
) -> Any:
    """One admin API call that must answer with a status in `expect`: its JSON."""
    response = await http.request(method, path, **request)
    assert response.status_code in expect, response.text
    return response.json()


async def create_pairing(http: httpx.AsyncClient, **body: Any) -> dict:
    body.setdefault("label", "test laptop")
    return await api(http, "POST", f"/api/v1/tenants/{TENANT}/pairings", json=body, expect=(201,))


async def get_pairing(http: httpx.AsyncClient, pairing_id: str) -> dict:
    return await api(http, "GET", f"/api/v1/tenants/{TENANT}/pairings/{pairing_id}")


async def submit(
    http: httpx.AsyncClient,
    pairing_id: str,
    kind: str,
    session_id: str | None = None,
    payload: dict | None = None,
    **extra: Any,
) -> dict:
    body: dict[str, Any] = {"kind": kind, **extra}
    if session_id:
        body["sessionId"] = session_id
    if payload is not None:
        body["payload"] = payload
    return await api(
        http,
        "POST",
        f"/api/v1/tenants/{TENANT}/pairings/{pairing_id}/commands",
        json=body,
        expect=(200, 201),
    )


async def command(http: httpx.AsyncClient, pairing_id: str, command_id: str) -> dict:
    return await api(
        http, "GET", f"/api/v1/tenants/{TENANT}/pairings/{pairing_id}/commands/{command_id}"
    )


async def finished(
    http: httpx.AsyncClient, pairing_id: str, command_id: str, timeout: float = 20.0
) -> dict:
    async def done() -> dict | None:
        view = await command(http, pairing_id, command_id)
        return view if view["state"] == "done" else None

    return await eventually(done, timeout, 0.05, f"command {command_id} to finish")


async def run_command(
    http: httpx.AsyncClient,
    pairing_id: str,
    kind: str,
    session_id: str | None = None,
    payload: dict | None = None,
    **extra: Any,
) -> dict:
    submitted = await submit(http, pairing_id, kind, session_id, payload, **extra)
    return await finished(http, pairing_id, submitted["commandId"])


async def events(http: httpx.AsyncClient, workspace: str, after: int = 0) -> list[dict]:
    items: list[dict] = []
    while True:
        page = (
            await api(
                http,
                "GET",
                f"/api/v1/tenants/{TENANT}/workspaces/{workspace}/events",
                params={"after": after, "limit": 500},
            )
        )["items"]
        if not page:
            return items
        items += page
        after = page[-1]["sequence"]


def opencode_events(items: list[dict], kind: str, session_id: str | None = None) -> list[dict]:
    """The relayed OpenCode events of one type (optionally of one session)."""
    return [
        i["payload"]
        for i in items
        if i["type"] == "session.event"
        and i["payload"].get("type") == kind
        and (session_id is None or i["sessionId"] == session_id)
    ]


class SseReader:
    """Reads `id:`/`data:` frames of the hub's live tail into a list."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.frames: list[dict] = []
        self.arrival: list[float] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        data: list[str] = []
        async for line in self.response.aiter_lines():
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif line == "" and data:
                self.frames.append(json.loads("\n".join(data)))
                self.arrival.append(time.monotonic())
                data = []

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@contextlib.asynccontextmanager
async def sse(
    http: httpx.AsyncClient, workspace: str, last_event_id: int | None = None
) -> AsyncIterator[SseReader]:
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = str(last_event_id)
    async with http.stream(
        "GET",
        f"/api/v1/tenants/{TENANT}/workspaces/{workspace}/events",
        headers=headers,
        timeout=None,
    ) as response:
        assert response.status_code == 200
        reader = SseReader(response)
        try:
            yield reader
        finally:
            await reader.close()


async def redeem(
    http: httpx.AsyncClient, nats_url: str, state_dir: Path, **pairing: Any
) -> tuple[dict, DesktopStore]:
    """Create a pairing and redeem its code into `state_dir` (the store comes back
    closed: its paths are usable, and its database reopens on use)."""
    created = await create_pairing(http, **pairing)
    store = DesktopStore(state_dir)
    await pair(created["code"], [nats_url], store, device_name="test-box")
    store.close()
    return created, store


class RunningAgent:
    """An edge agent's `run()` as a task of the test's event loop; subclasses say
    which agent on which store, and how long connecting and stopping may take."""

    agent_type: type
    store_type: type
    connect_timeout = 10.0
    stop_timeout = 15.0

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.task = asyncio.create_task(agent.run())

    @classmethod
    async def start(
        cls, state_dir: Path, opencode_url: str, *, heartbeat: float = 0.5, **options: Any
    ) -> Any:
        """Run an agent on `state_dir` and wait until it is connected; if it stopped
        instead, raise why."""
        running = cls(
            cls.agent_type(
                cls.store_type(state_dir), opencode_url, heartbeat_interval=heartbeat, **options
            )
        )
        what = f"the {cls.agent_type.__name__} to connect"
        await eventually(
            lambda: running.agent.connected.is_set() or running.task.done(),
            cls.connect_timeout,
            what=what,
        )
        if running.task.done():
            running.task.result()
        return running

    async def stop(self) -> None:
        self.agent.stop()
        await asyncio.wait_for(self.task, self.stop_timeout)


class RunningDesktop(RunningAgent):
    agent_type, store_type = DesktopAgent, DesktopStore

    def __init__(self, agent: DesktopAgent) -> None:
        super().__init__(agent)
        self.pairing_id = agent.pairing_id

    async def listening(self, timeout: float = 30.0) -> None:
        """Until the relay reads OpenCode's event stream. The agent takes commands as
        soon as NATS is up: one run before the stream opens (at load 19 it opened 2 s
        after the hub showed the Desktop online) waits for it up to 5 s, then runs,
        and its messages are relayed once the stream opens, but not its streamed
        deltas, which tests of live streaming look for."""

        def reading() -> bool:
            return self.agent.relay.events.connected

        await eventually(reading, timeout, what="the Desktop's relay to read OpenCode's events")

    async def kill(self) -> None:
        """A crash: no goodbye, nothing flushed."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if self.agent.nc is not None and not self.agent.nc.is_closed:
            await self.agent.nc.close()
        await self.agent.opencode.aclose()
        self.agent.store.close()


start_desktop = RunningDesktop.start


async def pair_and_start(
    http: httpx.AsyncClient,
    nats_url: str,
    state_dir: Path,
    opencode_url: str,
    *,
    heartbeat: float = 0.5,
    **pairing: Any,
) -> RunningDesktop:
    """Redeem a new pairing, run its Desktop, and wait until the hub shows it online
    and its relay reads OpenCode's events."""
    created, _ = await redeem(http, nats_url, state_dir, **pairing)
    running = await start_desktop(state_dir, opencode_url, heartbeat=heartbeat)
    running.pairing_id = created["pairingId"]
    await wait_online(http, running.pairing_id)
    await running.listening()
    return running


async def wait_online(
    http: httpx.AsyncClient, pairing_id: str, online: bool = True, timeout: float = 10.0
) -> dict:
    async def check() -> dict | None:
        view = await get_pairing(http, pairing_id)
        return view if view["online"] is online else None

    return await eventually(check, timeout, 0.05, f"pairing online={online}")


def desktop_event(
    pid: str, payload: dict, *, tenant: str = TENANT, workspace: str = "ws1"
) -> tuple[str, bytes]:
    """A contract-valid Desktop event of pairing `pid` (workspace ws1, session
    ses1), sealed in its envelope as the Desktop would publish it: (id, bytes)."""
    event = DeviceEvent(
        id=f"ev{uuid.uuid4().hex[:20]}",
        pairing_id=pid,
        type="session.event",
        workspace_id=workspace,
        session_id="ses1",
        occurred_at=datetime.now(UTC),
        payload=payload,
    )
    source = Source(principal_kind="desktop", principal_id=pid)
    return event.id, Envelope.wrap(event, source=source, tenant=tenant).encode()


async def all_pages(
    http: httpx.AsyncClient, path: str, limit: int, *, key: str = "items", **params: Any
) -> tuple[list[dict], int]:
    """Every item of a cursor-paged list (`nextCursor`; the items under `key`), and
    how many pages it took."""
    items: list[dict] = []
    cursor, pages = None, 0
    while True:
        query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        body = await api(http, "GET", path, params=query)
        items += body[key]
        pages += 1
        cursor = body["nextCursor"]
        if cursor is None:
            return items, pages


async def raw_desktop(http: httpx.AsyncClient, url: str, state_dir: Path) -> tuple[str, Any]:
    """A paired Desktop's own NATS connection without the agent (to publish events
    as the relay does): (pairing id, connection)."""
    _, store = await redeem(http, url, state_dir, allowedWorkspaceIds=["ws1"])
    pid = store.load_pairing().pairing_id
    nc = await nats.connect(
        url,
        user_credentials=str(store.creds_path),
        inbox_prefix=subjects.inbox_prefix(TENANT, "desktop", pid),
    )
    return pid, nc


async def offline_pairings(hub, count: int, label: str = "fleet") -> list[str]:
    """`count` paired Desktops on `hub`, offline (rows as redemption leaves them)."""
    batch = uuid.uuid4().hex[:8]  # a module's tests share its hub (and its database)
    ids = [f"{label}{batch}{i:04d}" for i in range(count)]
    await hub.pool.execute(
        """INSERT INTO pairings (tenant, pairing_id, label, code_expires_at, redeemed_at,
               status, allowed_workspace_ids, policy, created_by)
           SELECT $1, id, $3, now(), now(), 'paired_offline', '{}', '{}'::jsonb, 'test'
           FROM unnest($2::text[]) AS id""",
        TENANT,
        ids,
        label,
    )
    return ids
