"""The chaos suite's channel and Gateway traffic (tests/chaos/test_chaos.py): a
Telegram channel instance (against the fake platform) taking webhook updates and
sending deliveries on a few lanes, and a real Gateway agent claiming and running
Cloud-owned edge work on the same `opencode serve` as the Desktop.

Each part runs while a fault strikes (`start`, `stop`), has a probe for the
recovery time, and checks its invariants into the suite's tally
(`tally.count(kind, n, what)`)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
from aiohttp import web
from channelkit import create_instance, wait_ready
from desktopkit import TENANT, eventually
from fakeplatforms.telegram import FakeTelegram
from gateway_agent_kit import create_registration, start_gateway, wait_status
from opencode_env import OPENCODE_VERSION

from edges.gateway._registration import register, version_set
from edges.gateway._store import GatewayStore
from hub.auth import BusKeys, nats_jwt
from hub.auth._permissions import HUB_INBOX_PREFIX, HUB_PERMISSIONS
from hub.core import hub_consumer
from schemas import ChannelOutbound, ChannelTarget, Envelope, Source, subjects

# One admin API call through whichever replica answers (the suite's `_any_hub`).
Api = Callable[..., Awaitable[httpx.Response]]
# The live replicas' base URLs, in the order a platform would try them.
HubUrls = Callable[[], list[str]]

INSTANCE = "tg-chaos"
# The channel router's ack wait: how long a message a killed replica held waits before
# JetStream redelivers it to another.
ROUTER_ACK_WAIT = hub_consumer("hub-channel-router").ack_wait_seconds
CHAT_WORKSPACE = "chat-ws"
LANES = [("100", None), ("200", None), ("300", "55")]  # (chat, thread)
INBOUND_CHAT, INBOUND_USER = "900", "9"
# Seconds between work items enqueued during a fault: the Gateway forwards its runs'
# outputs one at a time, in order (~0.4 s each with this suite's load on 2 cores), so
# faster work traffic builds a backlog the probe waits behind, which is no fault's.
WORK_EVERY = 8.0
FINAL = ("completed", "failed", "dead_lettered", "cancelled")
_update_ids = itertools.count(700_000)


# --- the platform ------------------------------------------------------------------------
class HoldingTelegram(FakeTelegram):
    """Telegram whose API calls wait while a fault strikes (`hold`); then they are
    let through (`let_through`), or refused with a 429 (retry after `retry_after`
    seconds) and recorded nowhere (`refuse_held`). A held call whose sender is gone
    by then is not taken either (no message).

    A send the platform accepts in the instant a replica is killed -9 (or frozen),
    before that replica wrote its sent-ledger, goes out again from the replica that
    takes the instance over: the one duplicate no hub can rule out without the
    platform's help. Refusing what arrives at the instant of the strike keeps that
    window shut, so every other duplicate counts (here and in
    tests/hub/channels/test_channel_replicas.py)."""

    def __init__(self, retry_after: int = 1) -> None:
        super().__init__()
        self._retry_after = retry_after
        self._open = asyncio.Event()
        self._open.set()
        self._refuse = False
        self.waiting = 0
        self.refused = 0
        self.replies: Counter[int] = Counter()  # replied-to message id -> replies

    def hold(self) -> None:
        self._refuse = False
        self._open.clear()

    def let_through(self) -> None:
        self._refuse = False
        self._open.set()

    def refuse_held(self) -> None:
        self._refuse = True
        self._open.set()

    async def _api(self, request: web.Request) -> web.Response:
        if not self._open.is_set():
            self.waiting += 1
            try:
                await self._open.wait()
            finally:
                self.waiting -= 1
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)  # the sender died: nobody to answer
            if self._refuse:
                self.refused += 1
                wait = self._retry_after
                return self._error(429, f"Too Many Requests: retry after {wait}", wait)
        return await super()._api(request)

    def _m_sendMessage(self, params) -> web.Response:
        response = super()._m_sendMessage(params)
        replied = (params.get("reply_parameters") or {}).get("message_id")
        if response.status == 200 and replied is not None:
            self.replies[int(replied)] += 1
        return response

    def lane(self, chat: str, thread: str | None) -> list[str]:
        return [p.text for p in self.chats.get(chat, []) if p.thread_id == thread]


async def hub_bus(urls: str | list[str], keys_dir: Path) -> nats.NATS:
    """A connection with the hub's own permissions: it publishes deliveries as the
    hub's outbox does."""
    keys = BusKeys.load_or_create(keys_dir)
    seed = nats_jwt.new_seed("user")
    user_jwt, _ = keys.mint_user(
        nats_jwt.public_key(seed),
        name="chaos-outbox",
        pub_allow=list(HUB_PERMISSIONS.pub_allow),
        sub_allow=list(HUB_PERMISSIONS.sub_allow),
        ttl_seconds=3600,
    )
    return await nats.connect(
        urls,
        inbox_prefix=HUB_INBOX_PREFIX,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        **nats_jwt.nats_auth_options(user_jwt, seed),
    )


async def _post(hub_url: str, request) -> httpx.Response:
    """The platform's webhook call (channelkit.post_webhook), giving up on a replica
    after 3 s (a frozen one accepts the connection and never answers)."""
    headers = {
        k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
    }
    async with httpx.AsyncClient(base_url=hub_url, timeout=3) as platform:
        return await platform.request(
            request.method,
            f"/webhooks/{INSTANCE}",
            content=request.body,
            headers=headers,
            params=dict(request.query),
        )


def _delivery(delivery_id: str, chat: str, thread: str | None, text: str) -> bytes:
    msg = ChannelOutbound(
        delivery_id=delivery_id,
        idempotency_key=delivery_id,
        type="text",
        target=ChannelTarget(chat_id=chat, thread_id=thread),
        text=text,
    )
    source = Source(principal_kind="hub", principal_id="hub")
    return Envelope.wrap(msg, source=source, tenant=TENANT, workspace=CHAT_WORKSPACE).encode()


class ChaosChannel:
    """The channel instance, its platform, and what one fault's traffic did to it."""

    def __init__(self, platform: HoldingTelegram, nc: nats.NATS, hub_urls: HubUrls, dsn: str):
        self.platform, self.nc, self.hub_urls, self.dsn = platform, nc, hub_urls, dsn
        self.js = nc.jetstream(timeout=2.0)
        self._turn = 0

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, http: httpx.AsyncClient, urls: list[str], keys_dir: Path, **world):
        platform = HoldingTelegram()
        await platform.start()
        nc = await hub_bus(urls, keys_dir)
        try:
            await create_instance(
                http,
                platform,
                instance_id=INSTANCE,
                workspace_id=CHAT_WORKSPACE,
                authority="cloud_worker",
            )
            channel = cls(platform, nc, **world)
            for url in channel.hub_urls():  # every replica hosts it (webhooks)
                async with httpx.AsyncClient(base_url=url, headers=http.headers) as each:
                    await wait_ready(each, INSTANCE, 30)
            yield channel
        finally:
            platform.refuse_held()
            with contextlib.suppress(Exception):
                await nc.close()
            await platform.stop()

    # --- sending and receiving ----------------------------------------------------------------
    async def publish(self, delivery_id: str, lane: int, text: str) -> None:
        """As the hub's outbox does: the same delivery under the same Nats-Msg-Id
        until JetStream stored it."""
        chat, thread = LANES[lane]
        subject = subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=INSTANCE)
        data = _delivery(delivery_id, chat, thread, text)
        while True:
            try:
                await self.js.publish(subject, data, headers={"Nats-Msg-Id": delivery_id})
                return
            except Exception:  # node down, leader moving, reconnecting: try again
                await asyncio.sleep(0.1)

    async def post_update(self, text: str, deadline: float = 60.0) -> int:
        """One Telegram update, to whichever replica answers 200 (the next one when a
        replica fails, as the platform retries): the replied-to message id."""
        update_id = next(_update_ids)
        request = self.platform.signed_message(
            text, chat_id=INBOUND_CHAT, user_id=INBOUND_USER, event_id=str(update_id)
        )
        give_up = time.monotonic() + deadline
        self._turn += 1
        while time.monotonic() < give_up:
            urls = self.hub_urls()
            turn = self._turn % max(1, len(urls))
            for url in urls[turn:] + urls[:turn]:
                with contextlib.suppress(httpx.HTTPError):
                    if (await _post(url, request)).status_code == 200:
                        return 500 + update_id
            await asyncio.sleep(0.2)
        raise AssertionError(f"no replica accepted Telegram update {update_id}")

    # --- around a strike -----------------------------------------------------------------------
    async def before_strike(self) -> None:
        self.platform.hold()
        with contextlib.suppress(AssertionError):  # sends parked at the platform, if any flow
            await eventually(lambda: self.platform.waiting > 0, 0.5, 0.01, "a send parked")

    async def after_strike(self) -> None:
        await asyncio.sleep(0.3)  # a killed sender's connections close at the platform
        self.platform.refuse_held()

    def traffic(self, label: str) -> ChannelTraffic:
        return ChannelTraffic(self, label)

    async def probe(self, label: str, start: float) -> tuple[float, float]:
        """Seconds from `start` (the strike) until a delivery published now is on the
        platform and an update posted now is answered."""

        async def delivered() -> float:
            text = f"probe {label}"
            await self.publish(f"probe-{label}", 0, text)
            await eventually(lambda: text in self.platform.lane(*LANES[0]), 60, 0.05, text)
            return time.monotonic() - start

        async def answered() -> float:
            replied = await self.post_update(f"/probe{label}")
            await eventually(lambda: self.platform.replies[replied], 60, 0.05, "the probe reply")
            return time.monotonic() - start

        sent, reply = await asyncio.gather(delivered(), answered())
        return sent, reply


class ChannelTraffic:
    """Deliveries on every lane and webhook updates, until stopped."""

    def __init__(self, channel: ChaosChannel, label: str) -> None:
        self.channel, self.label = channel, label
        self.sent = [0] * len(LANES)
        self.accepted: dict[int, str] = {}  # replied-to message id -> provider event id
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def text(self, lane: int, n: int) -> str:
        return f"{self.label} lane {lane} #{n}"

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._deliveries()),
            asyncio.create_task(self._updates()),
        ]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _deliveries(self) -> None:
        n = 0
        while not self._stop.is_set():
            for lane in range(len(LANES)):
                await self.channel.publish(f"d-{self.label}-{lane}-{n}", lane, self.text(lane, n))
                self.sent[lane] += 1
            n += 1
            await asyncio.sleep(0.05)

    async def _updates(self) -> None:
        n = 0
        while not self._stop.is_set():
            replied = await self.channel.post_update(f"/chaos {self.label} {n}")
            self.accepted[replied] = str(replied - 500)
            n += 1
            await asyncio.sleep(0.1)

    async def check(self, tally: Any) -> str:
        platform = self.channel.platform
        for lane in range(len(LANES)):
            prefix = f"{self.label} lane {lane} #"

            def numbers(lane: int = lane, prefix: str = prefix) -> list[int]:
                return [
                    int(t.removeprefix(prefix))
                    for t in platform.lane(*LANES[lane])
                    if t.startswith(prefix)
                ]

            with contextlib.suppress(AssertionError):
                await eventually(
                    lambda lane=lane, numbers=numbers: len(set(numbers())) >= self.sent[lane],
                    60,
                    0.2,
                    f"lane {lane}'s deliveries",
                )
            got = numbers()
            missing = sorted(set(range(self.sent[lane])) - set(got))
            tally.count("lost", len(missing), f"lane {lane}'s deliveries {missing[:10]}")
            tally.count(
                "duplicated", len(got) - len(set(got)), f"lane {lane}'s deliveries sent twice"
            )
            back = [(a, b) for a, b in zip(got, got[1:]) if b < a]
            tally.count("reordered", len(back), f"lane {lane}'s deliveries {back[:5]}")
        with contextlib.suppress(AssertionError):
            await eventually(
                lambda: all(platform.replies[m] for m in self.accepted), 60, 0.2, "every reply"
            )
        unanswered = [m for m in self.accepted if platform.replies[m] == 0]
        tally.count("lost", len(unanswered), f"accepted updates never answered {unanswered[:5]}")
        await self._check_stored(tally)  # (a redelivery it waits for could answer again)
        twice = {m: platform.replies[m] for m in self.accepted if platform.replies[m] > 1}
        tally.count(
            "duplicated", sum(n - 1 for n in twice.values()), f"updates answered twice {twice}"
        )
        return (
            f"{sum(self.sent)} deliveries on {len(LANES)} lanes, {len(self.accepted)} webhook "
            f"updates, {platform.refused} sends refused at a strike"
        )

    async def _check_stored(self, tally: Any) -> None:
        """Each accepted update claimed once and handled (status done), its
        `channel.message_accepted` audited once. A replica killed between an update's
        reply and its claim's `done` leaves the message to JetStream, which redelivers
        it to another replica after the router's ack wait: waited for, that long."""
        conn = await asyncpg.connect(self.channel.dsn)
        wanted = list(self.accepted.values())

        async def claims() -> list:
            return await conn.fetch(
                "SELECT c.provider_event_id, c.status, count(a.*) AS audited "
                "FROM channel_inbound_claims c LEFT JOIN audit_log a ON a.tenant = c.tenant "
                "AND a.action = 'channel.message_accepted' AND a.target_id = c.message_id "
                "WHERE c.tenant = $1 AND c.instance_id = $2 AND c.provider_event_id = ANY($3) "
                "GROUP BY c.provider_event_id, c.status",
                TENANT,
                INSTANCE,
                wanted,
            )

        async def all_finished() -> bool:
            rows = await claims()
            finished = {r["provider_event_id"] for r in rows if r["status"] == "done"}
            return finished >= set(wanted) and all(r["audited"] for r in rows)

        try:
            with contextlib.suppress(AssertionError):
                await eventually(all_finished, ROUTER_ACK_WAIT + 15, 0.5, "every update routed")
            rows = await claims()
        finally:
            await conn.close()
        done = {r["provider_event_id"] for r in rows if r["status"] == "done"}
        never = sorted(set(self.accepted.values()) - done)
        tally.count("lost", len(never), f"accepted updates never routed {never[:5]}")
        again = {r["provider_event_id"]: r["audited"] for r in rows if r["audited"] > 1}
        tally.count(
            "duplicated", sum(n - 1 for n in again.values()), f"updates routed twice {again}"
        )
        unaudited = [r["provider_event_id"] for r in rows if r["audited"] == 0]
        tally.count("lost", len(unaudited), f"updates routed but not audited {unaudited[:5]}")


# --- the Gateway ------------------------------------------------------------------------------
class ChaosGateway:
    """A real Gateway agent (edge_worker) on the cluster, running Cloud-owned work on
    the suite's `opencode serve`."""

    def __init__(self, running: Any, registration_id: str, api: Api, opencode_url: str):
        self.running, self.registration_id = running, registration_id
        self.api, self.opencode_url = api, opencode_url

    @classmethod
    @contextlib.asynccontextmanager
    async def running_on(
        cls, http: httpx.AsyncClient, urls: list[str], state_dir: Path, opencode_url: str, api: Api
    ):
        created = await create_registration(http, "edge_worker", name="chaos gateway")
        store = GatewayStore(state_dir)
        await register(created["credential"], urls, store, version_set(OPENCODE_VERSION))
        store.close()
        running = await start_gateway(
            state_dir, opencode_url, heartbeat=1.0, max_concurrent_work=3, nats_url=urls
        )
        try:
            await wait_status(http, created["registrationId"], "active")
            yield cls(running, created["registrationId"], api, opencode_url)
        finally:
            await running.stop()

    async def enqueue(self, key: str, workspace: str) -> str:
        """Work under an idempotency key of ours: resubmitting it through another
        replica when one does not answer is the same item, never a second one."""
        body = {
            "kind": "prompt",
            "sessionRef": {"workspaceId": workspace, "title": key},
            "payload": {"text": f"edge work {key}"},
            "idempotencyKey": key,
        }
        response = await self.api("POST", f"/api/v1/tenants/{TENANT}/work", json=body)
        assert response.status_code in (200, 201), response.text
        return response.json()["workId"]

    async def view(self, work_id: str) -> dict:
        return (await self.api("GET", f"/api/v1/tenants/{TENANT}/work/{work_id}")).json()

    async def finished(self, work_id: str, timeout: float = 180.0) -> dict:
        async def final() -> dict | None:
            view = await self.view(work_id)
            return view if view["state"] in FINAL else None

        try:
            return await eventually(final, timeout, 0.1, f"work {work_id} final")
        except AssertionError:
            view = await self.view(work_id)
            agent = self.running.agent
            raise AssertionError(
                f"work {work_id} not final in {timeout} s: {view['state']}, attempts "
                f"{view['attempts']}, leases {view['leases']}, waiting {view.get('waiting')}; "
                f"the Gateway is {agent.state}, connected {agent.connected.is_set()}, runs "
                f"{list(agent.runners)}"
            ) from None

    def traffic(self, label: str) -> WorkTraffic:
        return WorkTraffic(self, label)

    async def probe(self, label: str, start: float) -> tuple[float, float, int]:
        """Work enqueued now: seconds from `start` (the strike) until it has completed,
        seconds from its enqueueing until it was first claimed, and how many times it
        was leased."""
        view = await self.finished(await self.enqueue(f"probe-{label}", f"edge-{label}"))
        assert view["state"] == "completed", view
        took = time.monotonic() - start
        claimed = datetime.fromisoformat(view["leases"][0]["claimedAt"])
        waited = (claimed - datetime.fromisoformat(view["createdAt"])).total_seconds()
        return took, waited, view["attempts"]


class WorkTraffic:
    """Cloud-owned work enqueued every 2 s, until stopped (each prompt streams ~25
    fenced outputs through the Gateway's one ordered forwarder)."""

    def __init__(self, gateway: ChaosGateway, label: str) -> None:
        self.gateway, self.label = gateway, label
        self.workspace = f"edge-{label}"
        self.items: list[tuple[str, str]] = []  # (work id, title)
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._enqueue())

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            await self._task

    async def _enqueue(self) -> None:
        while not self._stop.is_set():
            title = f"{self.label}-w{len(self.items)}"
            self.items.append((await self.gateway.enqueue(title, self.workspace), title))
            # Within what three runs at once get through on a loaded 2-core machine
            # (a run streams ~25 outputs one at a time): a backlog is not a fault.
            await asyncio.sleep(WORK_EVERY)

    async def check(self, tally: Any, events: Callable[[str], Awaitable[list[dict]]]) -> str:
        """Every item final and completed, run once on the Gateway (one OpenCode session
        of its title), its result stored once and reported once in its workspace."""
        views = {wid: await self.gateway.finished(wid) for wid, _ in self.items}
        failed = {wid: v["state"] for wid, v in views.items() if v["state"] != "completed"}
        tally.count("lost", len(failed), f"work not completed {failed}")
        async with httpx.AsyncClient(base_url=self.gateway.opencode_url, timeout=10) as oc:
            titles = Counter(s.get("title") for s in (await oc.get("/session")).json())
        never = [t for _, t in self.items if titles[t] == 0]
        tally.count("lost", len(never), f"work completed but never run on the Gateway {never[:5]}")
        twice = {t: titles[t] for _, t in self.items if titles[t] > 1}
        tally.count("duplicated", sum(n - 1 for n in twice.values()), f"work run twice {twice}")
        results: Counter[str] = Counter()
        for wid, _ in self.items:
            view = await self.gateway.view(wid)  # the first 500 outputs: a prompt here has fewer
            results[wid] = sum(1 for e in view["events"] if e["kind"] == "result")
        reported = Counter(
            e["payload"]["workId"]
            for e in await events(self.workspace)
            if e["type"] == "work.result"
        )
        for what, counted in (("stored", results), ("reported", reported)):
            missing = [wid for wid, _ in self.items if counted[wid] == 0 and wid not in failed]
            tally.count("lost", len(missing), f"work results never {what} {missing[:5]}")
            again = {wid: counted[wid] for wid, _ in self.items if counted[wid] > 1}
            tally.count(
                "duplicated", sum(n - 1 for n in again.values()), f"results {what} twice {again}"
            )
        retried = sum(1 for v in views.values() if v["attempts"] > 1)
        took = [
            (
                datetime.fromisoformat(v["completedAt"]) - datetime.fromisoformat(v["createdAt"])
            ).total_seconds()
            for v in views.values()
            if v.get("completedAt")
        ]
        return (
            f"{len(self.items)} work items ({retried} claimed again after a lost lease, "
            f"enqueued to done {min(took, default=0):.1f}-{max(took, default=0):.1f} s)"
        )
