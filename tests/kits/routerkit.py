"""The channel router under test: a real hub with stand-in instances, and helpers
that drive inbound messages through it (tests/hub/channels and tests/channels).
"""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime

from desktopkit import eventually

from channels import message_id
from schemas import ChannelInbound, ChannelOutbound, Envelope, Source, decode, subjects

TENANT = "acme"
_n = itertools.count()


class Instances:
    """Stand-in for ChannelService.instance()."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def instance(self, instance_id: str) -> dict | None:
        return self.rows.get(instance_id)


class Actions:
    """Stand-in for ActionTokens: single use, bound to chat and user."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}

    def add(self, token: str, **row) -> None:
        self.rows[token] = row

    async def consume(self, conn, tenant, token, *, instance_id, chat_id, user_id):
        row = self.rows.get(token)
        if row is None or row["chat_id"] != chat_id or row["instance_id"] != instance_id:
            return None
        del self.rows[token]
        return row


class Kit:
    def __init__(self, hub) -> None:
        self.hub, self.router = hub, hub.channel_router
        self.instances, self.actions = Instances(), Actions()
        self.router.instances = self.instances
        self.router.chat._actions = self.actions
        self.subs: dict[str, object] = {}

    async def instance(self, http, authority: str = "desktop_paired", **extra) -> dict:
        iid = f"tg-{next(_n)}-{datetime.now(UTC).strftime('%H%M%S%f')}"
        if authority == "desktop_paired":
            r = await http.post(f"/api/v1/tenants/{TENANT}/pairings", json={"label": iid})
            assert r.status_code == 201, r.text
            workspace = r.json()["pairingId"]
            await self.hub.pool.execute(
                "UPDATE pairings SET status = 'paired_offline' "
                "WHERE tenant = $1 AND pairing_id = $2",
                TENANT,
                workspace,
            )
        else:
            workspace = f"ws-{iid}"
        row = {
            "tenant": TENANT,
            "instance_id": iid,
            "kind": "telegram",
            "workspace_id": workspace,
            "authority": authority,
            "default_agent": "build",
            "enabled": True,
            "display_name": f"Bot {iid}",
            "revision": 1,
            "capabilities": None,
            **extra,
        }
        self.instances.rows[iid] = row
        self.subs[iid] = await self.hub.js.pull_subscribe(
            subjects.CHANNEL_OUTBOUND.build(tenant=TENANT, instance_id=iid),
            durable=None,
            stream="CW_CHANNEL_OUTBOUND",
        )
        return row

    async def role(self, inst: dict, user: str, role: str) -> None:
        await self.hub.pool.execute(
            "INSERT INTO channel_users (tenant, instance_id, provider_user_id, role) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (tenant, instance_id, provider_user_id) "
            "DO UPDATE SET role = EXCLUDED.role",
            TENANT,
            inst["instance_id"],
            user,
            role,
        )

    @staticmethod
    def inbound(
        inst: dict,
        text: str = "",
        *,
        user: str = "u1",
        chat: str = "c1",
        thread: str | None = None,
        event_type: str = "message",
        event_id: str | None = None,
        command: str | None = None,
        args: list[str] | None = None,
        interaction: dict | None = None,
        workspace: str | None = None,
    ) -> ChannelInbound:
        event_id = event_id or f"ev-{next(_n)}"
        if text.startswith("/") and command is None:
            head, *rest = text[1:].split()
            command, args = head, rest
        return ChannelInbound.model_validate(
            {
                "id": message_id(TENANT, inst["instance_id"], event_type, event_id),
                "eventType": event_type,
                "providerEventId": event_id,
                "providerMessageId": f"pm-{event_id}",
                "provider": inst["instance_id"],
                "providerKind": "telegram",
                "workspaceId": workspace or inst["workspace_id"],
                "target": {"chatId": chat, "threadId": thread, "userId": user},
                "sender": {"providerUserId": user, "username": user, "displayName": user.upper()},
                "text": text,
                "rawText": text,
                "isCommand": command is not None,
                "command": command,
                "commandArgs": args or [],
                "interaction": interaction,
                "receivedAt": datetime.now(UTC).isoformat(),
            }
        )

    async def publish(
        self,
        inst: dict,
        inbound: ChannelInbound,
        *,
        msg_id: str | None = None,
        source: str | None = None,
        workspace: str | None = None,
        raw: bytes | None = None,
    ) -> None:
        subject = subjects.CHANNEL_INBOUND.build(
            tenant=TENANT,
            instance_id=inst["instance_id"],
            workspace_id=workspace or inst["workspace_id"],
        )
        env = Envelope.wrap(
            inbound,
            source=Source(principal_kind="channel", principal_id=source or inst["instance_id"]),
            tenant=TENANT,
        )
        await self.hub.js.publish(
            subject,
            raw if raw is not None else env.encode(),
            headers={"Nats-Msg-Id": msg_id or inbound.id},
        )

    async def send(self, inst: dict, text: str, **kw) -> ChannelInbound:
        inbound = self.inbound(inst, text, **kw)
        await self.publish(inst, inbound)
        await self.processed(inst, inbound)
        return inbound

    async def processed(self, inst: dict, inbound: ChannelInbound) -> dict:
        async def check():
            row = await self.claim(inst, inbound)
            return row if row and row["status"] in ("done", "waiting") else None

        return await eventually(check, timeout=10)

    async def claim(self, inst: dict, inbound: ChannelInbound) -> dict | None:
        row = await self.hub.pool.fetchrow(
            "SELECT * FROM channel_inbound_claims WHERE tenant = $1 AND instance_id = $2 AND "
            "provider_event_id = $3",
            TENANT,
            inst["instance_id"],
            inbound.provider_event_id,
        )
        return dict(row) if row else None

    async def replies(self, inst: dict, count: int = 1, timeout: float = 5.0) -> list:
        """The next `count` deliveries to the instance (decoded ChannelOutbound)."""
        out: list[ChannelOutbound] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < count and asyncio.get_running_loop().time() < deadline:
            try:
                msgs = await self.subs[inst["instance_id"]].fetch(
                    batch=count - len(out), timeout=0.5
                )
            except Exception:
                continue
            for m in msgs:
                out.append(decode(m.data, ChannelOutbound).data)
                await m.ack()
        return out

    async def reply(self, inst: dict) -> str:
        got = await self.replies(inst, 1)
        assert got, "no reply"
        return got[0].text or ""

    async def no_reply(self, inst: dict) -> None:
        assert await self.replies(inst, 1, timeout=1.0) == []

    async def commands(self, inst: dict, at_least: int = 0) -> list[dict]:
        """The pairing's commands; with `at_least`, waits until that many exist (the
        router may submit after it has marked the message)."""

        async def fetch() -> list[dict] | None:
            rows = await self.hub.pool.fetch(
                "SELECT * FROM pairing_commands WHERE tenant = $1 AND pairing_id = $2 "
                "ORDER BY sequence",
                TENANT,
                inst["workspace_id"],
            )
            return [dict(r) for r in rows] if len(rows) >= at_least else None

        if at_least == 0:
            return await fetch() or []
        return await eventually(fetch, timeout=10)

    async def claim_status(self, inst: dict, inbound: ChannelInbound, status: str) -> dict:
        """The message's claim row once it has `status`."""

        async def check() -> dict | None:
            row = await self.claim(inst, inbound)
            return row if row and row["status"] == status else None

        return await eventually(check, timeout=10)

    async def complete(self, command: dict, result: dict, status: str = "completed") -> None:
        """What CommandService._finish hands to on_final, as the Desktop would make it."""
        row = dict(command, state="done", result_status=status, result=result)
        await self.hub.pool.execute(
            "UPDATE pairing_commands SET state = 'done', result_status = $3, result = $4 "
            "WHERE tenant = $1 AND command_id = $2",
            TENANT,
            command["command_id"],
            status,
            result,
        )
        await self.router.on_command_final(TENANT, row)
