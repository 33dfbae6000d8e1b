"""Bounds on the public BOOTSTRAP account's connections, enforced by the servers.

Anyone may connect as the bootstrap identity (it is public), so the account's
connection cap is shared by the whole internet: one client holding it full would
block every real pairing and Gateway registration. A bootstrap client connects,
sends one request and leaves, so the guard asks the servers for the account's
connections (`$SYS.REQ.ACCOUNT.<acc>.CONNZ`, every server of a cluster answers)
and closes (`$SYS.REQ.SERVER.<id>.KICK`):

- the newest connections of an address holding more than `per_source`;
- any connection older than `max_age` (nothing legitimate stays that long).

Every replica may run it: kicking an already closed connection is harmless.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nats.aio.client import Client as NATS

from schemas import BOOTSTRAP_ACCOUNT_PUBLIC

from ..core import BackgroundTask, every, kv

log = logging.getLogger("cowork.hub.bootstrap")

PER_SOURCE = 32  # bootstrap connections one address may hold at once
MAX_AGE = timedelta(seconds=30)
INTERVAL = 0.5  # seconds between sweeps
_GATHER = 0.25  # seconds to collect every server's answer


@dataclass(frozen=True)
class BootstrapConnection:
    server_id: str
    cid: int
    ip: str
    started: datetime


class BootstrapConnectionGuard:
    def __init__(
        self,
        system_nc: NATS,
        *,
        per_source: int = PER_SOURCE,
        max_age: timedelta = MAX_AGE,
        interval: float = INTERVAL,
    ) -> None:
        self._nc, self.per_source, self.max_age = system_nc, per_source, max_age
        self._task = BackgroundTask(
            "bootstrap-guard",
            lambda: every(interval, self.sweep_once, log, "bootstrap.guard_failed"),
        )

    def start(self) -> None:
        self._task.start()

    async def stop(self) -> None:
        await self._task.stop()

    async def sweep_once(self) -> int:
        """Close what is over the bounds; returns how many connections were closed."""
        doomed = self.over_bounds(await self.connections(), datetime.now(UTC))
        for conn in doomed:
            await self._kick(conn)
        if doomed:
            log.warning(
                "bootstrap.connections_closed",
                **kv(closed=len(doomed), sources=len({c.ip for c in doomed})),
            )
        return len(doomed)

    def over_bounds(
        self, conns: list[BootstrapConnection], now: datetime
    ) -> list[BootstrapConnection]:
        old = [c for c in conns if now - c.started > self.max_age]
        by_ip: dict[str, list[BootstrapConnection]] = defaultdict(list)
        for conn in conns:
            if conn not in old:
                by_ip[conn.ip].append(conn)
        crowd = [
            c
            for held in by_ip.values()
            if len(held) > self.per_source
            for c in sorted(held, key=lambda c: c.started)[self.per_source :]
        ]
        return old + crowd

    async def connections(self) -> list[BootstrapConnection]:
        """The account's client connections on every server that answers in time."""
        inbox = self._nc.new_inbox()
        sub = await self._nc.subscribe(inbox)
        found: list[BootstrapConnection] = []
        try:
            await self._nc.publish(
                f"$SYS.REQ.ACCOUNT.{BOOTSTRAP_ACCOUNT_PUBLIC}.CONNZ",
                json.dumps({"limit": 100_000}).encode(),
                reply=inbox,
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _GATHER
            while (left := deadline - loop.time()) > 0:
                try:
                    msg = await sub.next_msg(timeout=left)
                except TimeoutError:
                    break
                found.extend(_parse(msg.data))
        finally:
            await sub.unsubscribe()
        return found

    async def _kick(self, conn: BootstrapConnection) -> None:
        try:
            await self._nc.request(
                f"$SYS.REQ.SERVER.{conn.server_id}.KICK",
                json.dumps({"cid": conn.cid}).encode(),
                timeout=2,
            )
        except Exception as exc:  # gone already, or the server is away: next sweep
            log.info("bootstrap.kick_failed", **kv(cid=conn.cid, error=str(exc)))


def _parse(raw: bytes) -> list[BootstrapConnection]:
    try:
        body = json.loads(raw)
        server_id = body["server"]["id"]
        return [
            BootstrapConnection(
                server_id, int(c["cid"]), str(c.get("ip", "")), _timestamp(c["start"])
            )
            for c in body["data"].get("connections") or []
            if c.get("kind", "Client") == "Client"
        ]
    except (ValueError, KeyError, TypeError) as exc:
        log.info("bootstrap.connz_unreadable", **kv(error=str(exc)))
        return []


def _timestamp(value: str) -> datetime:
    # The server writes nanoseconds; Python parses microseconds.
    head, _, rest = value.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{head}.{rest[:6] or '0'}+00:00")
