"""`cowork channel run INSTANCE`: serve a channel instance's outbound transport from
this machine (a Gateway appliance, any edge), so the platform is reached by
dialing out and nothing needs an inbound port.

The process connects to NATS with the instance's own credential file (from
`cowork channel login`, as `cowork channel cli`), reads the platform settings
and secrets from a local JSON file (`{"kind", "settings", "secrets"}`,
readable by its owner only: the hub never hands secrets out), and runs the
channel runtime for that one instance: it takes the instance's transport lease
(one connection per instance among hub replicas and edge processes), stores
what arrives in the instance's inbound stream, and resumes from the durable
cursor after a drop. For a `transportHost: edge` instance it also delivers
the instance's replies while it holds the lease (the hub then does not).
State changes are printed to stderr, one line each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .._provider import InstanceConfig
from .._registry import PROVIDERS, TRANSPORTS
from ..runtime import ChannelRuntime, RuntimeOptions
from ._bus import (
    EXIT_USAGE,
    CommandFailed,
    add_instance_command,
    check_creds,
    connect_bus,
    credential_workspace,
)

EXIT_CONFIG = 7
STATUS_SECONDS = 0.5


def add_run_command(sub: Any) -> None:
    run = add_instance_command(
        sub,
        "run",
        help="serve an instance's outbound transport (polling, websocket) from here",
        description=__doc__ or "",
        instance_help="the channel instance id (its settings say transport: outbound)",
    )
    run.add_argument(
        "--config",
        required=True,
        type=Path,
        metavar="FILE",
        help='JSON {"kind": ..., "settings": {...}, "secrets": {...}}, mode 0600',
    )
    run.add_argument(
        "--lease-seconds",
        type=float,
        default=6.0,
        metavar="SECONDS",
        help="the hub's partition lease TTL (COWORK_PARTITION_LEASE_SECONDS; default 6)",
    )
    run.set_defaults(channel_handler=run_transport_command)


def run_transport_command(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(ChannelRun(args).run())
    except CommandFailed as exc:
        print(f"cowork: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


def load_instance_file(path: Path, instance: str) -> tuple[str, Any, Any]:
    """(kind, settings, secrets) from the file, validated by the provider's models.
    Errors name fields, never values (the file holds secrets)."""
    try:
        mode = path.stat().st_mode
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror}", EXIT_CONFIG) from None
    except (ValueError, UnicodeDecodeError):
        raise CommandFailed(f"{path} is not JSON", EXIT_CONFIG) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CommandFailed(
            f"{path} holds secrets: make it readable by you only (chmod 600 {path})", EXIT_CONFIG
        )
    if not isinstance(raw, dict) or not isinstance(raw.get("kind"), str):
        raise CommandFailed(f'{path}: expected {{"kind", "settings", "secrets"}}', EXIT_CONFIG)
    kind = raw["kind"]
    if kind not in TRANSPORTS:
        raise CommandFailed(
            f"{path}: kind {kind[:40]!r} has no outbound transport; "
            f"these do: {', '.join(sorted(TRANSPORTS))}",
            EXIT_CONFIG,
        )
    cls = PROVIDERS[kind]
    try:
        settings = cls.settings_model.model_validate(raw.get("settings") or {})
        secrets = cls.secrets_model.model_validate(raw.get("secrets") or {})
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "?" for e in exc.errors()})
        raise CommandFailed(f"{path}: invalid {', '.join(fields)}", EXIT_CONFIG) from None
    if getattr(settings, "transport", "webhook") != "outbound":
        raise CommandFailed(
            f"{path}: instance {instance!r} must have settings.transport 'outbound' "
            "(a webhook instance is served by the hub)",
            EXIT_USAGE,
        )
    return kind, settings, secrets


class ChannelRun:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        kind, settings, secrets = load_instance_file(args.config, args.instance)
        check_creds(args.creds)
        self.config = InstanceConfig(
            tenant=args.tenant,
            instance_id=args.instance,
            kind=kind,
            workspace_id=credential_workspace(args),
            settings=settings,
            secrets=secrets,
        )
        self.errors: list[str] = []
        self.runtime = ChannelRuntime(
            connect=self._connect,
            options=RuntimeOptions(
                transport_holder=f"edge {socket.gethostname()} pid {os.getpid()}",
                transport_hosts=frozenset({"any", "edge"}),
                transport_lease_seconds=args.lease_seconds,
                deliver_with_transport=settings.transport_host == "edge",
            ),
            deliver_all=False,
        )

    async def _connect(self, config: InstanceConfig) -> Any:
        return await connect_bus(self.args, self.errors, reconnect=True)

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.runtime.start()
        try:
            await self.runtime.apply(self.config)
            last = None
            while not stop.is_set():
                line = self._status()
                if line != last:
                    print(line, file=sys.stderr, flush=True)
                    last = line
                try:
                    async with asyncio.timeout(STATUS_SECONDS):
                        await stop.wait()
                except TimeoutError:
                    pass
        finally:
            await self.runtime.stop()
        return 0

    def _status(self) -> str:
        health = self.runtime.health(self.args.instance)
        transport = health.get("transport") or {}
        return (
            f"cowork: {self.args.instance}: {health['state']} ({health['detail']}); "
            f"transport {transport.get('state', '?')}: {transport.get('detail', '')}"
        )
