"""Channel instance rows, their validation against each provider's models, and the
encryption of their secrets at rest.

Secrets live only in `channel_instances.secrets_enc` (a Fernet token of the JSON
object of secrets) and in memory; nothing here returns them in a view, and no
error message quotes a submitted value (only field names and pydantic's message,
which does not carry the input).
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import asyncpg
from cryptography.fernet import Fernet, InvalidToken
from pydantic import BaseModel, SecretBytes, SecretStr, ValidationError

from channels import UnknownProvider, provider_class
from schemas import CHANNEL_INSTANCE_ID

from ..core import Refusal, like_escaped

INSTANCE_ID = re.compile(CHANNEL_INSTANCE_ID)
AUTHORITIES = ("desktop_paired", "cloud_worker")


class ChannelInstanceError(Refusal):
    """A refused channel-instance operation."""


def not_found(instance_id: str) -> ChannelInstanceError:
    return ChannelInstanceError(
        "channel_instance.not_found",
        f"no channel instance {instance_id!r} in this tenant",
        status=404,
    )


# --- secrets at rest -------------------------------------------------------------------------
class SecretBox:
    """Fernet with a key derived from the hub's 32-byte channel-secrets key."""

    def __init__(self, secret_key: bytes) -> None:
        raw = secret_key if len(secret_key) == 32 else hashlib.sha256(secret_key).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(raw))

    def seal(self, secrets: dict[str, Any]) -> bytes:
        return self._fernet.encrypt(json.dumps(secrets, sort_keys=True).encode())

    def open(self, token: bytes) -> dict[str, Any]:
        try:
            value = json.loads(self._fernet.decrypt(bytes(token)))
        except (InvalidToken, ValueError):
            raise ChannelInstanceError(
                "channel_instance.secrets_unreadable",
                "the instance's secrets cannot be decrypted with this hub's key "
                "(was the channel secrets key changed?); set them again",
                status=500,
            ) from None
        if not isinstance(value, dict):
            raise ChannelInstanceError(
                "channel_instance.secrets_unreadable",
                "the instance's stored secrets are not an object",
                status=500,
            )
        return value


# --- validation against the provider's models ------------------------------------------------
def provider_for(kind: str) -> Any:
    try:
        return provider_class(kind)
    except UnknownProvider as exc:
        raise ChannelInstanceError(
            "channel_instance.unknown_kind", str(exc.args[0]), status=422
        ) from None


def _summary(what: str, exc: ValidationError) -> str:
    """Pydantic errors as one line naming fields only (never the submitted values)."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or what
        if err["type"] == "missing":
            parts.append(f"missing {what} {where!r}")
        elif err["type"] == "extra_forbidden":
            parts.append(f"unknown {what} {where!r}")
        else:
            parts.append(f"{what} {where!r}: {err['msg']}")
    return "; ".join(parts)


def _plain(value: Any) -> Any:
    """A model dump with secret wrappers opened, so it can be stored and re-validated."""
    if isinstance(value, (SecretStr, SecretBytes)):
        inner = value.get_secret_value()
        return inner.decode() if isinstance(inner, bytes) else inner
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(by_alias=True, exclude_none=True))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _validated(model: type[BaseModel], raw: Any, what: str) -> BaseModel:
    """`raw` as the provider's model, or a 422 naming the fields (never the values)."""
    code = f"channel_instance.invalid_{what}s"
    if not isinstance(raw, dict):
        raise ChannelInstanceError(code, f"{what}s must be a JSON object", status=422)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ChannelInstanceError(code, _summary(what, exc), status=422) from None


def validate_settings(kind: str, raw: Any) -> tuple[BaseModel, dict[str, Any]]:
    """The provider's settings model instance and what is stored (as given, camelCase)."""
    value = _validated(provider_for(kind).settings_model, raw, "setting")
    return value, json.loads(value.model_dump_json(by_alias=True, exclude_unset=True))


def validate_secrets(kind: str, raw: Any) -> tuple[BaseModel, dict[str, Any]]:
    """The provider's secrets model instance and the plaintext object to seal."""
    value = _validated(provider_for(kind).secrets_model, raw, "secret")
    plain = _plain(value.model_dump(by_alias=True, exclude_none=True))
    try:
        json.dumps(plain)
    except (TypeError, ValueError):
        raise ChannelInstanceError(
            "channel_instance.invalid_secrets", "secrets must be JSON values", status=422
        ) from None
    return value, plain


def merge_secrets(kind: str, current: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`current` with the patched keys replaced; a null value removes that secret.
    Keys may be given by field name or wire name; stored keys are wire names."""
    model = provider_for(kind).secrets_model
    wire = {}
    for name, field in model.model_fields.items():
        wire[name] = wire[field.alias or name] = field.alias or name
    merged = dict(current)
    for key, value in patch.items():
        if key not in wire:
            raise ChannelInstanceError(
                "channel_instance.invalid_secrets", f"unknown secret {key!r}", status=422
            )
        if value is None:
            merged.pop(wire[key], None)
        else:
            merged[wire[key]] = value
    return merged


def secret_names(plain: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in plain.items() if v is not None)


# --- rows --------------------------------------------------------------------------------------
@dataclass
class NewInstance:
    instance_id: str
    tenant: str
    kind: str
    workspace_id: str
    authority: str
    display_name: str
    default_agent: str | None
    settings: dict[str, Any]
    secrets_enc: bytes
    secret_names: list[str]
    enabled: bool
    created_by: str


COLUMNS = (
    "instance_id, tenant, kind, display_name, workspace_id, authority, default_agent, "
    "settings, secret_names, enabled, revision, created_by, created_at, updated_at"
)
UPDATABLE = (
    "display_name",
    "workspace_id",
    "authority",
    "default_agent",
    "settings",
    "secrets_enc",
    "secret_names",
    "enabled",
)


def _row(record: asyncpg.Record | None) -> dict[str, Any] | None:
    return None if record is None else _row_of(record)


def _row_of(record: asyncpg.Record) -> dict[str, Any]:
    row = dict(record)
    if isinstance(row.get("settings"), str):
        row["settings"] = json.loads(row["settings"])
    return row


class InstanceStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def insert(self, new: NewInstance, conn: asyncpg.Connection) -> dict[str, Any] | None:
        """The new row, or None when the id is taken (by any tenant)."""
        return _row(
            await conn.fetchrow(
                f"""INSERT INTO channel_instances (instance_id, tenant, kind, display_name,
                    workspace_id, authority, default_agent, settings, secrets_enc,
                    secret_names, enabled, created_by)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12)
                ON CONFLICT (instance_id) DO NOTHING RETURNING {COLUMNS}""",
                new.instance_id,
                new.tenant,
                new.kind,
                new.display_name,
                new.workspace_id,
                new.authority,
                new.default_agent,
                json.dumps(new.settings),
                new.secrets_enc,
                new.secret_names,
                new.enabled,
                new.created_by,
            )
        )

    async def reactivate_principal(
        self, conn: asyncpg.Connection, tenant: str, instance_id: str
    ) -> None:
        """Deleting an instance revokes its bus principal; an instance created again
        under the same id is a new principal. Its old keys stay revoked (bus_credentials),
        so reactivating the principal lets only newly issued keys in."""
        await conn.execute(
            """UPDATE bus_principals SET status = 'active', revoked_at = NULL,
                      revoke_reason = NULL
                WHERE tenant = $1 AND kind = 'channel' AND principal_id = $2""",
            tenant,
            instance_id,
        )

    async def get(
        self,
        tenant: str,
        instance_id: str,
        *,
        conn: asyncpg.Connection | None = None,
        for_update: bool = False,
        with_secrets: bool = False,
    ) -> dict[str, Any] | None:
        extra = ", secrets_enc" if with_secrets else ""
        lock = " FOR UPDATE" if for_update else ""
        sql = (
            f"SELECT {COLUMNS}{extra} FROM channel_instances "
            f"WHERE tenant = $1 AND instance_id = $2{lock}"
        )
        return _row(await (conn or self._pool).fetchrow(sql, tenant, instance_id))

    async def list(
        self,
        tenant: str,
        limit: int,
        *,
        after: str | None = None,
        kind: str | None = None,
        workspace: str | None = None,
        enabled: bool | None = None,
        label: str | None = None,
    ) -> list[dict[str, Any]]:
        """By instance id, keyset-paged after the previous page's last id (a walk of
        channel_instances_tenant); filters: kind, workspace, enabled, and `label`, a
        part of the display name (any case, taken literally)."""
        rows = await self._pool.fetch(
            _LIST,
            tenant,
            after,
            limit,
            kind,
            workspace,
            enabled,
            like_escaped(label) if label is not None else None,
        )
        return [_row_of(r) for r in rows]

    async def revisions(self) -> dict[str, int]:
        """Every instance's revision: the cheap poll that tells what changed."""
        rows = await self._pool.fetch("SELECT instance_id, revision FROM channel_instances")
        return {r["instance_id"]: r["revision"] for r in rows}

    async def get_any(self, instance_ids: builtins.list[str]) -> builtins.list[dict[str, Any]]:
        rows = await self._pool.fetch(
            f"SELECT {COLUMNS}, secrets_enc FROM channel_instances "
            f"WHERE instance_id = ANY($1::text[])",
            instance_ids,
        )
        return [_row_of(r) for r in rows]

    async def update(
        self, conn: asyncpg.Connection, tenant: str, instance_id: str, changes: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Apply `changes` (columns in UPDATABLE) and bump the revision."""
        sets, args = [], [tenant, instance_id]
        for column, value in changes.items():
            if column not in UPDATABLE:
                raise ValueError(f"not an updatable column: {column}")
            args.append(json.dumps(value) if column == "settings" else value)
            cast = "::jsonb" if column == "settings" else ""
            sets.append(f"{column} = ${len(args)}{cast}")
        sets += ["revision = revision + 1", "updated_at = now()"]
        return _row(
            await conn.fetchrow(
                f"UPDATE channel_instances SET {', '.join(sets)} "
                f"WHERE tenant = $1 AND instance_id = $2 RETURNING {COLUMNS}",
                *args,
            )
        )

    async def delete(
        self, conn: asyncpg.Connection, tenant: str, instance_id: str
    ) -> dict[str, Any] | None:
        return _row(
            await conn.fetchrow(
                f"DELETE FROM channel_instances WHERE tenant = $1 AND instance_id = $2 "
                f"RETURNING {COLUMNS}",
                tenant,
                instance_id,
            )
        )


_LIST = f"""
    SELECT {COLUMNS} FROM channel_instances
    WHERE tenant = $1 AND instance_id > coalesce($2::text, '')
      AND ($4::text IS NULL OR kind = $4) AND ($5::text IS NULL OR workspace_id = $5)
      AND ($6::bool IS NULL OR enabled = $6)
      AND ($7::text IS NULL OR display_name ILIKE '%' || $7 || '%' ESCAPE '\\')
    ORDER BY instance_id LIMIT $3"""
