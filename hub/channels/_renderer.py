"""Session events -> chat deliveries, per workspace, strictly in sequence.

For each workspace that has active bindings, one batch at a time: lock the
workspace's render cursor row (SKIP LOCKED: another replica rendering it is
left alone), read the events after the cursor, route each to the bindings its
session (or its command/work submission) belongs to, render them
(hub/channels/_render_text.py), publish the deliveries through the outbox
(awaiting JetStream's acks: the only slow thing done in the transaction),
save the chat state and advance the cursor, then commit. A crash before the
commit re-renders the batch from the same state with the same delivery ids,
which JetStream and the instance drop as duplicates.

Live workspace events (core NATS, queue group) only nudge a workspace; a sweep
every second is the safety net and also sends throttled edits that came due. A
nudge of a workspace that had no active binding at the last sweep is left to the
next sweep (which finds a binding made since): most workspaces have no chat, and
their events cost no transaction here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

import asyncpg
from nats.aio.client import Client as NATS

from schemas import ChannelButton, ChannelOutbound, ChannelTarget, SealError, subjects

from ..core import HubMetrics, kv
from . import _render_store as store
from ._actions import ActionTokens
from ._approval_outcome import record_approval_message
from ._outbox import ChannelOutbox, delivery_id
from ._render_items import Approval, button_rows, fallback_text
from ._render_store import Binding
from ._render_text import ChatRender, Op, RenderMemory, opencode_event
from ._session_link import adopt_session, reported_session

log = logging.getLogger("cowork.hub.channels.renderer")
QUEUE_GROUP = "hub-channel-renderer"
FAMILY = "CHANNEL_RENDER"


class ChannelRenderer:
    def __init__(
        self,
        nc: NATS,
        pool: asyncpg.Pool,
        metrics: HubMetrics,
        *,
        hub_id: str,
        instances: Any,
        outbox: ChannelOutbox,
        actions: ActionTokens,
        sweep_interval: float = 1.0,
        batch: int = 500,
    ) -> None:
        self._nc, self._pool, self._metrics = nc, pool, metrics
        self._instances, self._outbox, self._actions = instances, outbox, actions
        self._hub_id, self._sweep_interval, self._batch = hub_id, sweep_interval, batch
        self._memory = RenderMemory()
        self._nudged: set[tuple[str, str]] = set()
        self._bound: set[tuple[str, str]] = set()  # with active bindings at the last sweep
        self._wake = asyncio.Event()
        self._sub: Any = None
        self._task: asyncio.Task | None = None
        self._batch_lock = asyncio.Lock()  # held while a batch renders
        self._stopping = False

    async def start(self) -> None:
        self._stopping = False
        self._sub = await self._nc.subscribe(
            subjects.WORKSPACE_EVENT.filter(), queue=QUEUE_GROUP, cb=self._on_event
        )
        self._task = asyncio.create_task(self._run(), name="channel-renderer")

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection is already closed: nothing to undo
                pass
            self._sub = None
        if self._task is not None:
            # Let a batch in flight commit: its deliveries are already published.
            self._stopping = True
            try:
                await asyncio.wait_for(self._batch_lock.acquire(), timeout=10)
                self._batch_lock.release()
            except TimeoutError:
                pass
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _on_event(self, msg: Any) -> None:
        try:
            where = subjects.WORKSPACE_EVENT.parse(msg.subject)
        except subjects.SubjectError:
            return
        self._nudged.add((where["tenant"], where["workspace_id"]))
        self._wake.set()

    async def _run(self) -> None:
        last_sweep = 0.0
        while True:
            try:
                async with asyncio.timeout(self._sweep_interval):  # wait_for may eat a cancel
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            due, self._nudged = self._nudged, set()
            try:
                if time.monotonic() - last_sweep >= self._sweep_interval:
                    last_sweep = time.monotonic()
                    self._bound = set(await store.bound_workspaces(self._pool))
                    due = set(self._bound)  # a sweep renders every bound workspace
                else:
                    due &= self._bound
                for tenant, workspace in sorted(due):
                    while await self._render_guarded(tenant, workspace):
                        pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database or NATS is away: the sweep retries
                log.warning("channel_render.failed", **kv(error=str(exc)))
                self._nudged |= due

    async def _render_guarded(self, tenant: str, workspace: str) -> bool:
        async with self._batch_lock:
            if self._stopping:
                return False
            return await self.render_workspace(tenant, workspace)

    # --- one batch ----------------------------------------------------------------------------
    async def render_workspace(self, tenant: str, workspace: str) -> bool:
        """Render one batch of the workspace; True when more events are waiting."""
        async with self._pool.acquire() as conn, conn.transaction():
            bindings = [
                b
                for b in await store.active_bindings(conn, tenant, workspace)
                if self._instance(tenant, b) is not None
            ]
            if not bindings:
                return False
            cursor = await store.lock_render_cursor(conn, tenant, workspace)
            if cursor is None:
                return False  # another replica holds it
            sessions = sorted({b.session_id for b in bindings if b.session_id})
            upto, rows = await store.next_events(
                conn, tenant, workspace, cursor, self._batch, sessions
            )
            routed = await self._route(conn, tenant, bindings, rows)
            involved = {b.binding_id: b for b, _, _ in routed} | {b.binding_id: b for b in bindings}
            bases = sorted({base for _, _, event in routed for base in _part_bases(event)})
            prefixes = sorted(
                {f"w.{e['workId']}." for _, _, e in routed if e["type"] == "cw.result"}
            )
            slots = await store.load_slots(conn, tenant, list(involved), bases, prefixes)
            now = time.time()
            chats = {
                bid: ChatRender(
                    instance["capabilities"],
                    slots[bid],
                    self._memory,
                    _ids(tenant, bid),
                    binding_id=bid,
                    now=now,
                )
                for bid, b in involved.items()
                if (instance := self._instance(tenant, b)) is not None
            }
            for binding, sequence, event in routed:
                chat = chats.get(binding.binding_id)
                if chat is not None:
                    _apply(chat, sequence, event)
            for chat in chats.values():
                chat.flush()
            await self._deliver(conn, tenant, workspace, involved, chats)
            await store.save_slots(
                conn,
                tenant,
                [(bid, s) for bid, chat in chats.items() for s in chat.slots.values() if s.changed],
            )
            await store.advance_cursor(conn, tenant, workspace, upto)
        self._memory.trim()
        return upto - cursor >= self._batch

    def _instance(self, tenant: str, binding: Binding) -> dict | None:
        """The binding's instance if it is enabled and the tenant's (else skipped)."""
        inst = self._instances.instance(binding.instance_id)
        if (
            not inst
            or inst.get("tenant") != tenant
            or inst.get("enabled") is False
            or inst.get("capabilities") is None
        ):
            return None
        return inst

    async def _route(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        bindings: list[Binding],
        rows: list[asyncpg.Record],
    ) -> list[tuple[Binding, int, dict]]:
        """(binding, sequence, renderable event) for each event a chat should see."""
        work_ids = [
            r["payload"].get("workId")
            for r in rows
            if r["type"].startswith("work.") and isinstance(r["payload"], dict)
        ]
        ids = [r["command_id"] for r in rows if r["command_id"]] + [
            w for w in work_ids if isinstance(w, str)
        ]
        submitted = await store.submissions(conn, tenant, sorted(set(ids)))
        by_session: dict[str, list[Binding]] = {}
        for b in bindings:
            if b.session_id:
                by_session.setdefault(b.session_id, []).append(b)
        routed = []
        opener = _Opener(self._instances, tenant)
        for row in rows:
            if _is_sealed(row):  # a sealed Desktop's: opened per instance, if it can
                owner = submitted.get(row["command_id"] or "")
                targets = [owner] if owner is not None else by_session.get(row["session_id"], [])
                for b in targets:
                    opened = await opener.event(b.instance_id, row)
                    if opened is not None and (event := _renderable(opened)) is not None:
                        routed.append((b, row["sequence"], event))
                continue
            event = _renderable(row)
            if event is None:
                continue
            owner = submitted.get(row["command_id"] or event.get("workId") or "")
            targets = [owner] if owner is not None else by_session.get(row["session_id"], [])
            routed += [(b, row["sequence"], event) for b in targets]
            if row["type"] == "work.result" and owner is not None and owner.session_id is None:
                session = reported_session(row["payload"].get("body"))
                if session is not None:  # the chat's next prompt continues this session
                    await adopt_session(conn, tenant, owner.binding_id, session)
        return routed

    async def _deliver(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        workspace: str,
        bindings: dict[str, Binding],
        chats: dict[str, ChatRender],
    ) -> None:
        edits = [op.edit_of for chat in chats.values() for op in chat.ops if op.edit_of]
        known = await store.provider_message_ids(conn, tenant, edits)
        for bid, chat in chats.items():
            binding = bindings[bid]
            target = ChannelTarget(
                chat_id=binding.chat_id,
                is_direct=binding.is_direct,
                thread_id=binding.thread_key or None,
            )
            for op in chat.ops:
                delivery = await self._outbound(tenant, workspace, binding, chat, op, target, known)
                await self._outbox.send(tenant, binding.instance_id, delivery, conn=conn)
                self._metrics.bus_messages.labels(FAMILY, str(delivery.type)).inc()

    async def _outbound(
        self,
        tenant: str,
        workspace: str,
        binding: Binding,
        chat: ChatRender,
        op: Op,
        target: ChannelTarget,
        known: dict[str, str],
    ) -> ChannelOutbound:
        fields: dict[str, Any] = {
            "delivery_id": op.delivery_id,
            "idempotency_key": op.delivery_id,
            "target": target,
            "type": op.type,
            "text": op.text,
        }
        if op.type == "edit":
            fields["edit_of_delivery_id"] = op.edit_of
            fields["edit_message_id"] = known.get(op.edit_of or "")
        elif op.approval is not None:
            fields.update(
                await self._approval(tenant, workspace, binding, chat, op.approval, op.delivery_id)
            )
        return ChannelOutbound(**fields)

    async def _approval(
        self,
        tenant: str,
        workspace: str,
        binding: Binding,
        chat: ChatRender,
        approval: Approval,
        delivery: str,
    ) -> dict[str, Any]:
        """Buttons when they fit the platform, else the text commands. Tokens (and
        the message they are on, for its outcome later) are committed on their own
        connection first: if this batch is rendered again, the deduplicated
        delivery keeps showing tokens that exist."""
        probe_len = len("ca") + 20
        rows = button_rows(len(approval.choices), chat.caps.buttons, probe_len)
        choices = approval.choices if rows is not None else approval.fallback
        async with self._pool.acquire() as own, own.transaction():
            await record_approval_message(
                own, tenant, delivery, binding.instance_id, binding.binding_id, approval.prompt
            )
            tokens = [
                await self._actions.issue(
                    own,
                    tenant=tenant,
                    instance_id=binding.instance_id,
                    binding_id=binding.binding_id,
                    workspace_id=workspace,
                    session_id=approval.session_id,
                    kind=approval.kind,
                    request_id=approval.request_id,
                    action=c.action,
                    answer=c.answer,
                    delivery_id=delivery,
                )
                for c in choices
            ]
        if rows is None:
            return {"type": "text", "text": fallback_text(approval.prompt, choices, tokens)}
        buttons, at = [], 0
        for width in rows:
            buttons.append(
                [
                    ChannelButton(label=c.label, token=t, style=c.style)
                    for c, t in zip(choices[at : at + width], tokens[at : at + width])
                ]
            )
            at += width
        return {"type": "buttons", "text": approval.prompt, "buttons": buttons}


def _ids(tenant: str, binding_id: str):
    return lambda *parts: delivery_id(tenant, binding_id, *parts)


def _is_sealed(row: Mapping[str, Any]) -> bool:
    """A sealed Desktop's event payload, or its sealed command result (command.failed)."""
    payload = row["payload"]
    if not isinstance(payload, dict):
        return False
    result = payload.get("result")
    return bool(payload.get("sealed")) or (isinstance(result, dict) and bool(result.get("sealed")))


class _Opener:
    """Opens a sealed Desktop's events with a channel instance's controller keys
    (docs/sealed.md, "Channels"): only for an instance enrolled on that Desktop. What
    does not open (no keys, made before the enrolment or after a removal) is not
    rendered; each is logged (its id and why, never content)."""

    def __init__(self, instances: Any, tenant: str) -> None:
        self._instances, self._tenant = instances, tenant
        self._held: dict[str, Any] = {}

    @property
    def _controllers(self) -> Any:
        return self._instances.controllers

    async def event(self, instance_id: str, row: Mapping[str, Any]) -> dict | None:
        if instance_id not in self._held:
            self._held[instance_id] = await self._controllers.get(self._tenant, instance_id)
        controller = self._held[instance_id]
        if controller is None:
            return None
        payload = row["payload"]
        try:
            if payload.get("sealed"):
                opened = self._controllers.open(
                    controller, payload["sealed"], "event", row["event_id"]
                )
            else:  # a command's outcome: its result is sealed, under the command's id
                result = self._controllers.open(
                    controller, payload["result"]["sealed"], "result", row["command_id"]
                )
                opened = {**payload, "result": result}
        except SealError as exc:
            log.warning(
                "channel.sealed_unreadable",
                **kv(instance=instance_id, event=row["event_id"], reason=str(exc)),
            )
            return None
        if not isinstance(opened, dict):
            return None
        return {"type": row["type"], "payload": opened}


def _renderable(row: Mapping[str, Any]) -> dict | None:
    """An OpenCode event, or one of the hub's own (`cw.*`) for command/work outcomes."""
    kind, payload = row["type"], row["payload"]
    event = opencode_event(kind, payload)
    if isinstance(payload, dict) and kind.startswith("work."):
        work = payload.get("workId")
        raw_body = payload.get("body")
        body = raw_body if isinstance(raw_body, dict) else {}
        if event is not None:
            return {**event, "workId": work}
        if kind in ("work.fail", "work.dead_lettered", "work.cancelled"):
            return {
                "type": "cw.failed",
                "workId": work,
                "reason": _reason(body),
                "cancelled": kind == "work.cancelled",
            }
        if kind == "work.result":
            return {"type": "cw.result", "workId": work, "text": str(body.get("text") or "")}
        if kind == "work.status" and body.get("state") == "running":
            return {"type": "cw.started", "workId": work}
        return None
    if event is not None:
        return event
    if kind == "command.accepted":
        return {"type": "cw.started"}
    if kind == "command.failed" and isinstance(payload, dict):
        raw_result = payload.get("result")
        result = raw_result if isinstance(raw_result, dict) else {}
        return {"type": "cw.failed", "reason": _reason(result)}
    return None


def _apply(chat: ChatRender, sequence: int, event: dict) -> None:
    kind = event["type"]
    work = event.get("workId")
    scope = f"w.{work}." if isinstance(work, str) else ""
    if kind == "cw.started":
        chat.typing(sequence)
    elif kind == "cw.failed":
        chat.finish_all()
        chat.notice(
            sequence,
            "failed",
            f"stopped: {event['reason']}"
            if event.get("cancelled")
            else f"could not run: {event['reason']}",
        )
    elif kind == "cw.result":
        # Streamed already (its events were rendered)? Then the result adds nothing.
        if not any(k.startswith(scope) for k in chat.slots) and event["text"].strip():
            chat.set_text(scope + "result", event["text"], final=True)
        chat.finish_all()
    else:
        chat.apply(event, sequence, scope)


def _part_bases(event: dict) -> list[str]:
    """Slot key bases an event touches (so their finished slots are loaded too)."""
    work = event.get("workId")
    scope = f"w.{work}." if isinstance(work, str) else ""
    raw_props = event.get("properties")
    props = raw_props if isinstance(raw_props, dict) else {}
    raw_part = props.get("part")
    part = raw_part if isinstance(raw_part, dict) else {}
    found = [p for p in (part.get("id"), props.get("partID")) if isinstance(p, str)]
    if event.get("type") == "cw.result":
        found.append("result")
    return [scope + p for p in found]


def _reason(body: dict) -> str:
    for key in ("message", "error", "reason"):
        if isinstance(body.get(key), str) and body[key].strip():
            return " ".join(body[key].split())[:500]
    return "unknown error"
