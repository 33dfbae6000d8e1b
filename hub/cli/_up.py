"""`cowork up`: NATS (JetStream) + PostgreSQL + the hub, supervised, in one command."""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from edges.local import (
    EmbeddedError,
    EmbeddedPostgres,
    NatsServer,
    ensure_port_free,
    ensure_writable_dir,
    lock_dir,
    nats_server_binary,
    run_until_stopped,
    say,
    step,
    stop_on_signals,
    supervise_children,
)

from .. import Hub, HubSettings, StartupError
from ..auth import BusKeys
from ..core import LogFormat, LogLevel
from ._loop import settle_heap


@dataclass
class UpOptions:
    data_dir: Path
    host: str
    http_port: int
    nats_port: int
    postgres_port: int
    log_level: LogLevel
    log_format: LogFormat
    leaf_port: int = 7422  # Team Gateways' leaf nodes dial in here (0 = no listener)


def secret_key_from_env() -> bytes | None:
    value = os.environ.get("COWORK_SECRET_KEY")
    return value.encode() if value else None


def admin_token(data_dir: Path) -> tuple[str, str]:
    """The admin token and where it came from (env wins; else the 0600 file, made once)."""
    from_env = os.environ.get("COWORK_ADMIN_TOKEN")
    if from_env:
        return from_env, "from COWORK_ADMIN_TOKEN"
    path = data_dir / "admin-token"
    if path.exists():
        return path.read_text().strip(), f"stored in {path}"
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token, f"generated, stored in {path}"


def owner_only(data_dir: Path) -> None:
    """The data dir (keys, admin token, databases, logs) for its owner only: 0700, or
    0711 as root, where the embedded PostgreSQL runs as its own OS user and must
    traverse it (and its `postgres` dir) to its pgdata, without listing anything."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    as_root = os.name == "posix" and os.geteuid() == 0
    os.chmod(data_dir, 0o711 if as_root else 0o700)
    postgres = data_dir / "postgres"
    if postgres.is_dir():
        os.chmod(postgres, 0o711 if as_root else 0o700)


def _leafnode_listener(opts: UpOptions) -> str:
    """Where Gateway appliances' leaf nodes connect; each authenticates with its own
    Gateway credential, so it gets exactly that Gateway's subject permissions."""
    if not opts.leaf_port:
        return ""
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    return f'leafnodes {{\n  listen: "{host}:{opts.leaf_port}"\n}}\n'


class Stack:
    """The running pieces, stopped in reverse order of start."""

    def __init__(self, opts: UpOptions) -> None:
        self.opts = opts
        # Operator mode from the first start: every bus connection is authenticated.
        self.keys = BusKeys.load_or_create(opts.data_dir / "keys", secret_key_from_env())
        nats_dir = opts.data_dir / "nats"
        self.nats = NatsServer(
            store_dir=nats_dir,
            host=opts.host,
            port=opts.nats_port,
            extra_config=self.keys.server_config(nats_dir / "resolver") + _leafnode_listener(opts),
        )
        external_db = os.environ.get("COWORK_DATABASE_URL")
        self.postgres = (
            None
            if external_db
            else EmbeddedPostgres(data_dir=opts.data_dir / "postgres", port=opts.postgres_port)
        )
        self.database_url = external_db
        self.hub: Hub | None = None
        self.token = ""

    async def start(self) -> None:
        o = self.opts
        owner_only(o.data_dir)
        self.token, token_origin = admin_token(o.data_dir)
        say(f"Starting cowork in {o.data_dir}")
        await step(f"NATS with JetStream on {self.nats.url}", self.nats.start)
        if self.postgres is not None:
            await step("PostgreSQL (embedded)", self.postgres.start)
            self.database_url = self.postgres.dsn
            owner_only(o.data_dir)  # the embedded server's setup opens its parents (as root)
        settings = HubSettings(
            nats_url=self.nats.url,
            database_url=None if self.database_url is None else SecretStr(self.database_url),
            admin_token=SecretStr(self.token),
            http_host=o.host,
            http_port=o.http_port,
            log_level=o.log_level,
            log_format=o.log_format,
        )
        self.hub = Hub(settings, keys=self.keys)
        await step("hub (migrations, streams, HTTP)", self.hub.start)
        settle_heap()
        self._banner(token_origin)

    def _banner(self, token_origin: str) -> None:
        assert self.hub is not None
        url = self.hub.http_url
        db = "embedded" if self.postgres else "external (COWORK_DATABASE_URL)"
        say("")
        say("cowork is up")
        say(f"  Hub HTTP     {url}")
        say(f"  Console      {url}/console   (sign in with the admin token)")
        say(f"  Health       {url}/readyz")
        say(f"  Metrics      {url}/metrics")
        say(
            f"  NATS         {self.nats.url}   (operator mode; keys in {self.opts.data_dir / 'keys'})"
        )
        say(f"  PostgreSQL   {db}")
        say(f"  Admin token  {token_origin}")  # where it is, never the token itself
        say(f"  Data dir     {self.opts.data_dir}")
        say(f"Pair a Desktop, register a Gateway, connect a chat: {url}/console, or the API:")
        say('Pair a Desktop: POST /api/v1/tenants/<tenant>/pairings {"label": ...} for a code,')
        say(f"  then on the Desktop: cowork desktop pair CODE --hub {self.nats.url}")
        if self.opts.leaf_port:
            say("Register a Team Gateway: POST /api/v1/tenants/<tenant>/gateway-registrations,")
            say(
                f"  then on the Gateway: cowork gateway register --hub {self.nats.url} "
                "--credential-file FILE"
            )
            extra = (
                "" if self.opts.leaf_port == 7422 else f" --cloud-leaf-port {self.opts.leaf_port}"
            )
            say(
                f"  and cowork gateway up{extra} (its leaf node dials {self.opts.host}:"
                f"{self.opts.leaf_port})"
            )
        say(
            "Connect a chat: POST /api/v1/tenants/<tenant>/channel-instances "
            '{"instanceId", "kind", "workspaceId", ...};'
        )
        say(f"  the platform's webhook is {url}/webhooks/<instanceId> (see docs/channels.md)")
        say("Press Ctrl-C to stop.")

    async def stop(self) -> None:
        if self.hub is not None:
            await _quietly(self.hub.stop())
        await _quietly(self.nats.stop())
        if self.postgres is not None:
            await _quietly(self.postgres.stop())

    async def supervise(self) -> str:
        """Restart a crashed server; returns a reason when one keeps crashing."""
        children: dict[str, Any] = {"NATS": self.nats}
        if self.postgres is not None:
            children["PostgreSQL"] = self.postgres
        reason = await supervise_children(children, "cowork")
        return f"{reason}; giving up"


async def _quietly(awaitable: Awaitable[object]) -> None:
    try:
        await asyncio.wait_for(awaitable, 9.0)
    except Exception as exc:  # shutting down: report, keep stopping the rest
        print(f"cowork: while stopping: {exc}", file=sys.stderr)


async def run_up(opts: UpOptions) -> int:
    opts.data_dir = ensure_writable_dir(opts.data_dir)
    lock_dir(opts.data_dir)  # before any server touches its stores
    nats_server_binary()
    ensure_port_free(opts.host, opts.nats_port, "--nats-port")
    ensure_port_free(opts.host, opts.http_port, "--http-port")
    if opts.leaf_port:
        ensure_port_free(opts.host, opts.leaf_port, "--leaf-port")
    if opts.postgres_port:
        ensure_port_free("127.0.0.1", opts.postgres_port, "--postgres-port")

    stop = asyncio.Event()
    with stop_on_signals(stop):
        stack = Stack(opts)
        try:
            reason = await _run(stack, stop)
            if reason:
                print(f"cowork: error: {reason}", file=sys.stderr)
        finally:
            say("\nStopping cowork ...")
            await stack.stop()
            say("Stopped.")
    return 1 if reason else 0


async def _run(stack: Stack, stop: asyncio.Event) -> str | None:
    try:
        return await run_until_stopped(stack.start, stack.supervise, stop)
    except (EmbeddedError, StartupError) as exc:
        return str(exc)
