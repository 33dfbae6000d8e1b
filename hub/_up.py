"""`cowork up`: NATS (JetStream) + PostgreSQL + the hub, supervised, in one command."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, TypeVar

from ._embedded import (
    EmbeddedError,
    EmbeddedPostgres,
    NatsServer,
    ensure_port_free,
    ensure_writable_dir,
    lock_dir,
    nats_server_binary,
)
from ._keys import BusKeys
from ._service import Hub, StartupError
from ._settings import HubSettings

# A child that dies this many times within the window is not restarted again.
MAX_RESTARTS = 3
RESTART_WINDOW_SECONDS = 60.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


@dataclass
class UpOptions:
    data_dir: Path
    host: str
    http_port: int
    nats_port: int
    postgres_port: int
    log_level: str
    log_format: str
    leaf_port: int = 7422  # Team Gateways' leaf nodes dial in here (0 = no listener)


def secret_key_from_env() -> bytes | None:
    value = os.environ.get("COWORK_SECRET_KEY")
    return value.encode() if value else None


def say(text: str) -> None:
    print(text, flush=True)


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


async def step(label: str, action: Callable[[], Awaitable[object]]) -> None:
    print(f"  {label} ...", end="", flush=True)
    started = time.monotonic()
    try:
        await action()
    except BaseException:
        print(" failed", flush=True)
        raise
    print(f" ready ({time.monotonic() - started:.1f}s)", flush=True)


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
        self.nats = NatsServer(store_dir=nats_dir, host=opts.host, port=opts.nats_port,
                               extra_config=self.keys.server_config(nats_dir / "resolver")
                               + _leafnode_listener(opts))
        external_db = os.environ.get("COWORK_DATABASE_URL")
        self.postgres = None if external_db else EmbeddedPostgres(
            data_dir=opts.data_dir / "postgres", port=opts.postgres_port)
        self.database_url = external_db
        self.hub: Hub | None = None
        self.token = ""

    async def start(self) -> None:
        o = self.opts
        self.token, token_origin = admin_token(o.data_dir)
        say(f"Starting cowork in {o.data_dir}")
        await step(f"NATS with JetStream on {self.nats.url}", self.nats.start)
        if self.postgres is not None:
            await step("PostgreSQL (embedded)", self.postgres.start)
            self.database_url = self.postgres.dsn
        settings = HubSettings(
            nats_url=self.nats.url, database_url=self.database_url, admin_token=self.token,
            http_host=o.host, http_port=o.http_port, log_level=o.log_level,
            log_format=o.log_format)
        self.hub = Hub(settings, keys=self.keys)
        await step("hub (migrations, streams, HTTP)", self.hub.start)
        self._banner(token_origin)

    def _banner(self, token_origin: str) -> None:
        assert self.hub is not None
        url = self.hub.http_url
        db = "embedded" if self.postgres else "external (COWORK_DATABASE_URL)"
        say("")
        say("cowork is up")
        say(f"  Hub HTTP     {url}")
        say(f"  Health       {url}/readyz")
        say(f"  Metrics      {url}/metrics")
        say(f"  NATS         {self.nats.url}   (operator mode; keys in {self.opts.data_dir / 'keys'})")
        say(f"  PostgreSQL   {db}")
        say(f"  Admin token  {self.token}   ({token_origin})")
        say(f"  Data dir     {self.opts.data_dir}")
        say("Pair a Desktop: POST /api/v1/tenants/<tenant>/pairings {\"label\": ...} for a code,")
        say(f"  then on the Desktop: cowork desktop pair CODE --hub {self.nats.url}")
        if self.opts.leaf_port:
            say("Register a Team Gateway: POST /api/v1/tenants/<tenant>/gateway-registrations,")
            say(f"  then on the Gateway: cowork gateway register --hub {self.nats.url} "
                "--credential-file FILE")
            extra = "" if self.opts.leaf_port == 7422 else \
                f" --cloud-leaf-port {self.opts.leaf_port}"
            say(f"  and cowork gateway up{extra} (its leaf node dials {self.opts.host}:"
                f"{self.opts.leaf_port})")
        say("Connect a chat: POST /api/v1/tenants/<tenant>/channel-instances "
            "{\"instanceId\", \"kind\", \"workspaceId\", ...};")
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


# --------------------------------------------------------------------------
# Shared with `cowork gateway up` (hub/_gateway_up.py)
# --------------------------------------------------------------------------

@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Ctrl-C and SIGTERM set `stop` while inside (instead of raising in the middle
    of a start or a stop)."""
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


async def run_until_stopped(start: Callable[[], Awaitable[object]],
                            supervise: Callable[[], Awaitable[T]],
                            stop: asyncio.Event) -> T | None:
    """`start`, then `supervise` until `stop` is set. Returns what `supervise` returned
    when it ended first; None when stopped, also while starting (the start is
    abandoned). A failed start raises its error."""
    stopper = asyncio.create_task(stop.wait())
    startup = asyncio.create_task(start())
    await asyncio.wait({startup, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not startup.done():
        startup.cancel()
        await asyncio.gather(startup, return_exceptions=True)
        return None
    if startup.exception() is not None:
        stopper.cancel()
        startup.result()  # raises the start's error
    supervisor = asyncio.create_task(supervise())
    await asyncio.wait({supervisor, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if supervisor.done():
        stopper.cancel()
        return supervisor.result()
    supervisor.cancel()
    await asyncio.gather(supervisor, return_exceptions=True)
    return None


class _CrashCounter:
    """Each child's exits within the last RESTART_WINDOW_SECONDS."""

    def __init__(self) -> None:
        self._times: dict[str, list[float]] = {}

    def crashed(self, name: str) -> int:
        """Count one exit of `name`; returns its exits within the window."""
        now = time.monotonic()
        recent = [t for t in self._times.get(name, []) if now - t < RESTART_WINDOW_SECONDS]
        self._times[name] = recent + [now]
        return len(self._times[name])


async def supervise_children(children: dict[str, Any], program: str, *,
                             until: asyncio.Task | None = None,
                             restarted: Callable[[Any], None] | None = None) -> str | None:
    """Restart a child server (`start()`/`wait()`) when it exits, calling `restarted`
    with it. Returns why supervision ends: a child exited more than MAX_RESTARTS
    times within the window (the reason), or `until` finished (None)."""
    crashes = _CrashCounter()
    waits = {asyncio.create_task(c.wait()): name for name, c in children.items()}
    watched = {until} if until is not None else set()
    try:
        while True:
            done, _ = await asyncio.wait({*waits, *watched}, return_when=asyncio.FIRST_COMPLETED)
            if until is not None and until in done:
                return None
            for task in done:
                name = waits.pop(task)
                count = crashes.crashed(name)
                if count > MAX_RESTARTS:
                    return f"{name} exited {count} times within a minute"
                say(f"{program}: {name} exited unexpectedly (code {task.result()}); restarting")
                await children[name].start()
                if restarted is not None:
                    restarted(children[name])
                waits[asyncio.create_task(children[name].wait())] = name
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
