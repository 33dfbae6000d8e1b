"""A chat channel instance enrolled as a controller of its sealed Desktop
(docs/sealed.md, "Channels").

The instance's controller keys are enrolled on the Desktop with a one-time invite
(`cowork channel enrol INSTANCE LINK`), then kept here, Fernet-encrypted like the
instance's secrets. The hub hosts the instance's router and renderer, so it holds
these keys: it signs the chat's commands with them (the Desktop verifies them as
any controller's) and opens the sealed events and results the chat is shown. Whoever
controls the hub can therefore act as this controller, and only this one; the
Desktop owner removes it like any other (`cowork desktop controllers remove`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from schemas import ControllerKeys, SealedContent, SealError, content_aad

from ._store import SecretBox


@dataclass
class ChannelController:
    tenant: str
    instance_id: str
    pairing_id: str
    desktop_key: str
    keys: ControllerKeys


class ChannelControllers:
    def __init__(self, pool: asyncpg.Pool, box: SecretBox) -> None:
        self._pool, self._box = pool, box
        # keys_enc -> keys, so content keys unwrapped once are kept (ControllerKeys)
        self._keys: dict[bytes, ControllerKeys] = {}

    async def save(
        self,
        conn: asyncpg.Connection,
        tenant: str,
        instance_id: str,
        pairing_id: str,
        keys: ControllerKeys,
        desktop_key: str,
        next_sequence: int,
    ) -> None:
        await conn.execute(
            """INSERT INTO channel_controllers (instance_id, tenant, pairing_id, controller_id,
                   desktop_key, keys_enc, next_sequence) VALUES ($1, $2, $3, $4, $5, $6, $7)
               ON CONFLICT (instance_id) DO UPDATE SET tenant = $2, pairing_id = $3,
                   controller_id = $4, desktop_key = $5, keys_enc = $6, next_sequence = $7,
                   created_at = now()""",
            instance_id,
            tenant,
            pairing_id,
            keys.controller_id,
            desktop_key,
            self._box.seal(keys.to_json()),
            next_sequence,
        )

    async def remove(self, conn: asyncpg.Connection, tenant: str, instance_id: str) -> bool:
        done = await conn.execute(
            "DELETE FROM channel_controllers WHERE tenant = $1 AND instance_id = $2",
            tenant,
            instance_id,
        )
        return done != "DELETE 0"

    async def get(self, tenant: str, instance_id: str) -> ChannelController | None:
        row = await self._pool.fetchrow(
            "SELECT * FROM channel_controllers WHERE tenant = $1 AND instance_id = $2",
            tenant,
            instance_id,
        )
        return None if row is None else self._controller(row)

    def _controller(self, row: Any) -> ChannelController:
        token = bytes(row["keys_enc"])
        keys = self._keys.get(token)
        if keys is None:
            keys = self._keys[token] = ControllerKeys.from_json(self._box.open(token))
        return ChannelController(
            row["tenant"], row["instance_id"], row["pairing_id"], row["desktop_key"], keys
        )

    async def submit_signed(
        self,
        tenant: str,
        instance_id: str,
        pairing_id: str,
        submit: Callable[[dict], Awaitable[None]],
        *,
        command_id: str,
        kind: str,
        workspace_id: str,
        session_id: str | None,
        payload: dict | None,
    ) -> bool:
        """Sign the command with the instance's keys and `submit` its `signed` body
        (camelCase JSON); False when the instance has no controller on this pairing.

        The controller's row stays locked from taking the sequence until the command
        is queued, so commands are queued (and so run) in the order of their
        sequences, across chats and hub replicas: the Desktop refuses a sequence
        that is not above the last it took. A submit that fails takes no sequence."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM channel_controllers WHERE tenant = $1 AND instance_id = $2 "
                "AND pairing_id = $3 FOR UPDATE",
                tenant,
                instance_id,
                pairing_id,
            )
            if row is None:
                return False
            controller = self._controller(row)
            signed = controller.keys.sign(
                tenant=tenant,
                pairing_id=pairing_id,
                command_id=command_id,
                sequence=int(row["next_sequence"]),
                kind=kind,
                workspace_id=workspace_id,
                session_id=session_id,
                payload=payload,
                desktop_key=controller.desktop_key,
            )
            await submit(signed.model_dump(mode="json", by_alias=True))
            await conn.execute(
                "UPDATE channel_controllers SET next_sequence = next_sequence + 1 "
                "WHERE instance_id = $1",
                instance_id,
            )
        return True

    @staticmethod
    def open(
        controller: ChannelController,
        sealed: Any,
        purpose: Literal["event", "result"],
        item_id: str,
    ) -> Any:
        """The JSON the Desktop sealed, or SealError (no key for it, or tampered)."""
        try:
            content = SealedContent.model_validate(sealed)
        except ValueError as exc:
            raise SealError("malformed sealed content: " + str(exc).splitlines()[0]) from None
        aad = content_aad(controller.tenant, controller.pairing_id, purpose, item_id)
        return json.loads(controller.keys.open(content, aad))
