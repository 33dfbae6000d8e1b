"""`cowork gateway up`: the Team Gateway appliance's embedded pieces, supervised.

Runs, on this machine and all outbound:
- the appliance's own nats-server as a leaf node of Cloud NATS (edges/gateway/_leaf.py),
  loopback only, JetStream domain `gw-<registrationId>`, authenticated to Cloud
  with the Gateway's `.creds` from `cowork gateway register`;
- an embedded PostgreSQL for the appliance's own services; its DSN is written
  to `<state-dir>/appliance.env` (0600) as COWORK_GATEWAY_DATABASE_URL;
- the gateway agent, connected to the LEAF (not to Cloud directly), with its
  fenced writes going through a JetStream outbox on the leaf, so a Cloud outage
  only delays them.

Ctrl-C (or SIGTERM) stops the agent, then the servers; no child outlives us
(the servers also get a parent-death signal, see edges/local/_servers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..common import EdgeCredentials, dial_once, honour_dropped_cancel, port_number
from ..local import (
    EmbeddedError,
    EmbeddedPostgres,
    ensure_port_free,
    ensure_writable_dir,
    free_port,
    lock_dir,
    nats_server_binary,
    run_until_stopped,
    say,
    step,
    stop_on_signals,
    supervise_children,
)
from ._leaf import (
    DEFAULT_CLOUD_LEAF_PORT,
    GatewayLeafServer,
    check_domain,
    check_leaf_url,
    cloud_leaf_urls,
    gateway_domain,
)

DATABASE_ENV = "COWORK_GATEWAY_DATABASE_URL"
DEFAULT_NATS_PORT = 4223  # not 4222: `cowork up` may run on the same machine
CLOUD_LINK_WAIT_SECONDS = 10.0
LINK_CHECK_SECONDS = 1.0  # how often the Cloud link is looked at
LINK_GRACE_SECONDS = 3.0  # a link down this long is reported (a blip is not)
CREDENTIAL_PROBE_SECONDS = 5.0  # while down: does Cloud still accept our credential?
EXIT_REVOKED = 3
_REFUSED_WORDS = ("authorization", "authentication", "revoked")

ENV_HELP = """\
environment (flags win over variables):
  COWORK_GATEWAY_STATE_DIR   the Gateway's state directory (from `cowork gateway register`)
  COWORK_CLOUD_LEAF_URL      Cloud's leaf-node URL(s), comma separated
                             (default: the registered hub hosts, port 7422)
  COWORK_GATEWAY_NATS_PORT   the leaf server's loopback client port (default 4223)
  COWORK_GATEWAY_DOMAIN      its JetStream domain (default gw-<registrationId>)
  COWORK_OPENCODE_URL        the Gateway's private OpenCode (default http://127.0.0.1:4096)
  COWORK_OPENCODE_PASSWORD   OpenCode's server password, if it has one
"""


class GatewayUpError(Exception):
    """A one-line, user-facing reason `gateway up` cannot start."""


@dataclass
class GatewayUpOptions:
    state_dir: Path
    nats_port: int = DEFAULT_NATS_PORT
    cloud_leaf_urls: list[str] | None = None  # None: derived from the registered hub URLs
    cloud_leaf_port: int = DEFAULT_CLOUD_LEAF_PORT
    domain: str | None = None
    postgres_port: int = 0
    opencode_url: str = "http://127.0.0.1:4096"
    opencode_password: str | None = None


# --------------------------------------------------------------------------
# CLI wiring (the lead adds `up` under `cowork gateway` with these two)
# --------------------------------------------------------------------------


def add_gateway_up_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of `cowork gateway up` to its (sub-)parser."""
    from ._store import default_state_dir

    env = os.environ.get
    parser.description = (
        "Run the Team Gateway appliance: its own nats-server as a leaf node "
        "of Cloud NATS (outbound only), an embedded PostgreSQL, and the "
        "gateway agent. Needs a prior `cowork gateway register`."
    )
    parser.epilog = ENV_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=default_state_dir(),
        help="state directory (default: %(default)s)",
    )
    parser.add_argument(
        "--cloud-leaf-url",
        type=_leaf_urls,
        default=env("COWORK_CLOUD_LEAF_URL"),
        help="Cloud's leaf-node URL(s), e.g. nats-leaf://hub.example.com:7422 "
        "(default: the registered hub hosts on --cloud-leaf-port)",
    )
    parser.add_argument(
        "--cloud-leaf-port",
        type=port_number,
        default=DEFAULT_CLOUD_LEAF_PORT,
        help="Cloud's leaf-node port when no URL is given (default: %(default)s)",
    )
    parser.add_argument(
        "--nats-port",
        type=port_number,
        default=port_number(env("COWORK_GATEWAY_NATS_PORT", str(DEFAULT_NATS_PORT))),
        help="the leaf server's client port, on 127.0.0.1 (default: %(default)s)",
    )
    parser.add_argument(
        "--domain",
        type=_domain,
        default=env("COWORK_GATEWAY_DOMAIN"),
        help="the leaf's JetStream domain (default: gw-<registrationId>)",
    )
    parser.add_argument(
        "--postgres-port",
        type=port_number,
        default=0,
        help="embedded PostgreSQL port on 127.0.0.1 (default: a free one)",
    )
    parser.add_argument(
        "--opencode",
        default=env("COWORK_OPENCODE_URL", "http://127.0.0.1:4096"),
        type=_http_url,
        help="the private OpenCode server (default: %(default)s)",
    )
    parser.add_argument(
        "--opencode-password",
        default=env("COWORK_OPENCODE_PASSWORD") or env("OPENCODE_SERVER_PASSWORD"),
        help="OpenCode server password (prefer the environment variable)",
    )
    return parser


def options_from_args(args: argparse.Namespace) -> GatewayUpOptions:
    return GatewayUpOptions(
        state_dir=args.state_dir,
        nats_port=args.nats_port,
        cloud_leaf_urls=args.cloud_leaf_url,
        cloud_leaf_port=args.cloud_leaf_port,
        domain=args.domain,
        postgres_port=args.postgres_port,
        opencode_url=args.opencode,
        opencode_password=args.opencode_password,
    )


def run_gateway_up(args: argparse.Namespace) -> int:
    """`cowork gateway up`: runs until Ctrl-C; exit 0, 1 on a failure, 3 when revoked."""
    try:
        return asyncio.run(gateway_up(options_from_args(args)))
    except (GatewayUpError, EmbeddedError) as exc:
        print(f"cowork: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        return 130


def _leaf_urls(text: str) -> list[str]:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise argparse.ArgumentTypeError("no leaf-node URL given")
    try:
        return [check_leaf_url(u) for u in urls]
    except EmbeddedError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _domain(text: str) -> str:
    try:
        return check_domain(text)
    except EmbeddedError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _http_url(text: str) -> str:
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL")
    return text


# --------------------------------------------------------------------------
# The appliance
# --------------------------------------------------------------------------


class Appliance:
    """Leaf NATS, PostgreSQL, outbox connection and agent; stopped in reverse order."""

    def __init__(self, opts: GatewayUpOptions) -> None:
        from ._store import GatewayStore, GatewayStoreError

        self.opts = opts
        self.store = GatewayStore(opts.state_dir)
        try:
            self.gateway = self.store.load()
        except GatewayStoreError as exc:
            raise GatewayUpError(str(exc)) from None
        if self.gateway.revoked:
            raise GatewayUpError(
                "this Gateway's registration was revoked; register it again "
                "with a new credential (`cowork gateway register`)"
            )
        if not self.store.creds_path.is_file():
            raise GatewayUpError(
                f"{self.store.creds_path} is missing; run `cowork gateway register` again"
            )
        self.domain = opts.domain or gateway_domain(self.gateway.registration_id)
        urls = opts.cloud_leaf_urls or cloud_leaf_urls(self.gateway.hub_urls, opts.cloud_leaf_port)
        self.leaf = GatewayLeafServer(
            store_dir=opts.state_dir / "nats",
            cloud_urls=urls,
            credentials=self.store.creds_path,
            domain=self.domain,
            port=opts.nats_port,
            monitor_port=free_port(),
        )
        self.postgres = EmbeddedPostgres(
            data_dir=opts.state_dir / "postgres", port=opts.postgres_port
        )
        self.env_path = opts.state_dir / "appliance.env"
        self.outbox_nc: Any = None
        self.outbox: Any = None
        self.agent: Any = None
        self.agent_task: asyncio.Task | None = None
        self.credential_refused: str | None = None  # Cloud refuses our key: why

    async def start(self) -> None:
        g = self.gateway
        say(f"Starting the cowork Gateway appliance in {self.opts.state_dir}")
        say(
            f"  Gateway {g.display_name!r} ({g.kind}), registration {g.registration_id}, "
            f"tenant {g.tenant}"
        )
        port = self.opts.nats_port or "a free port"
        await step(
            f"leaf NATS on 127.0.0.1:{port} (JetStream domain {self.domain})", self.leaf.start
        )
        await self._report_cloud_link()
        await step("PostgreSQL (embedded)", self.postgres.start)
        self._write_env()
        await step("outbox (local JetStream, survives Cloud outages)", self._open_outbox)
        await step("gateway agent (on the leaf, not on Cloud directly)", self._start_agent)
        self._banner()

    async def _report_cloud_link(self) -> None:
        urls = ", ".join(self.leaf.cloud_urls)
        print(f"  Cloud link to {urls} ...", end="", flush=True)
        if await self.leaf.wait_linked(CLOUD_LINK_WAIT_SECONDS):
            print(" connected", flush=True)
        else:
            print(
                " not reachable yet (retrying every second; outputs are kept locally "
                f"until it is; see {self.leaf.log_path})",
                flush=True,
            )

    def _write_env(self) -> None:
        # 0600: the DSN carries the database password.
        text = (
            f"# Written by `cowork gateway up` at each start.\n{DATABASE_ENV}={self.postgres.dsn}\n"
        )
        tmp = self.env_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, self.env_path)
        os.chmod(self.env_path, 0o600)

    async def _open_outbox(self) -> None:
        import nats

        from ._outbox import JetStreamOutbox

        # Its own local connection: the outbox must keep working whatever the
        # agent's connection is doing (reconnecting, refreshing its JWT).
        self.outbox_nc = await nats.connect(
            self.leaf.url,
            name="gateway-outbox",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
        self.outbox = JetStreamOutbox.on(self.outbox_nc, self.domain)
        await self.outbox.ensure()

    async def _start_agent(self) -> None:
        from ._agent import GatewayAgent
        from ._store import GatewayStoreError

        try:
            self.agent = GatewayAgent(
                self.store,
                self.opts.opencode_url,
                opencode_password=self.opts.opencode_password,
                nats_url=self.leaf.url,
                outbox=self.outbox,
            )
        except (GatewayStoreError, ValueError) as exc:  # (ValueError: a COWORK_EDGE_* setting)
            raise GatewayUpError(str(exc)) from None
        self.agent_task = asyncio.create_task(self.agent.run(), name="gateway-agent")

    def _banner(self) -> None:
        say("")
        say("cowork gateway is up")
        say(f"  Leaf NATS    {self.leaf.url}   (loopback only; JetStream domain {self.domain})")
        say(f"  Cloud        {', '.join(self.leaf.cloud_urls)}   (outbound leaf connection)")
        say(f"  PostgreSQL   embedded; DSN in {self.env_path} ({DATABASE_ENV})")
        say(f"  OpenCode     {self.opts.opencode_url}")
        say(f"  State dir    {self.opts.state_dir}")
        say("Press Ctrl-C to stop.")

    async def supervise(self) -> tuple[int, str | None]:
        """Restart a crashed server; return (exit code, reason) when the appliance must end."""
        assert self.agent_task is not None
        watcher = asyncio.create_task(self._watch_cloud_link(), name="cloud-link")
        try:
            reason = await supervise_children(
                {"leaf NATS": self.leaf, "PostgreSQL": self.postgres},
                "cowork gateway",
                until=self.agent_task,
                restarted=self._restarted,
            )
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        return self._agent_outcome() if reason is None else (1, reason)

    async def _watch_cloud_link(self) -> None:
        """Say once when the Cloud link goes down (and how much waits locally) and once
        when it is back. While it is down, ask Cloud's NATS directly whether it still
        accepts this Gateway's credential: the leaf would retry a revoked or replaced
        key forever, so a refusal stops the appliance with the reason (exit 3)."""
        loop = asyncio.get_running_loop()
        down_since: float | None = None
        reported = False
        probed = 0.0
        while True:
            honour_dropped_cancel()
            await asyncio.sleep(LINK_CHECK_SECONDS)
            if await self.leaf.cloud_linked():
                if reported:
                    say(
                        f"cowork gateway: Cloud reachable again; forwarding "
                        f"{await self._buffered()} buffered outputs"
                    )
                down_since, reported = None, False
                continue
            now = loop.time()
            down_since = down_since if down_since is not None else now
            if now - down_since < LINK_GRACE_SECONDS:
                continue
            if not reported:
                reported = True
                say(
                    f"cowork gateway: Cloud unreachable, buffering {await self._buffered()} "
                    f"outputs locally (retrying every second; see {self.leaf.log_path})"
                )
            if now - probed >= CREDENTIAL_PROBE_SECONDS:
                probed = now
                refusal = await self._credential_refusal()
                if refusal is not None:
                    self.credential_refused = (
                        "Cloud refuses this Gateway's credential "
                        f"({refusal}): it was revoked, rotated or replaced by registering "
                        "again; run `cowork gateway register` with a current credential"
                    )
                    self.agent.stop()
                    return

    async def _buffered(self) -> int | str:
        try:
            return await self.outbox.count()
        except Exception:  # the local server is restarting: say so rather than guess
            return "the"

    async def _credential_refusal(self) -> str | None:
        """Cloud's complaint about our credential, or None (accepted, or unreachable)."""
        try:
            creds = EdgeCredentials.from_creds_file(self.store.creds_path)
            nc = await dial_once(
                list(self.gateway.hub_urls), 5.0, name="gateway-probe", **creds.connect_options()
            )
        except ConnectionError as exc:
            text = str(exc)
            return (
                text.removeprefix("nats: ")
                if any(w in text.lower() for w in _REFUSED_WORDS)
                else None
            )
        except Exception:  # an unreadable creds file is the agent's to report
            return None
        await _quietly(nc.close())
        return None

    def _restarted(self, child: Any) -> None:
        if child is self.postgres:
            self._write_env()  # a free port may have changed

    def _agent_outcome(self) -> tuple[int, str | None]:
        assert self.agent_task is not None
        exc = self.agent_task.exception()
        if exc is not None:
            return 1, f"the gateway agent failed: {type(exc).__name__}: {exc}"
        if self.credential_refused is not None:
            return EXIT_REVOKED, self.credential_refused
        if self.agent.gateway.revoked:
            return EXIT_REVOKED, self.agent.fatal or "this Gateway's registration was revoked"
        if self.agent.fatal:
            return 1, self.agent.fatal
        return 0, None

    async def stop(self) -> None:
        if self.agent_task is not None and not self.agent_task.done():
            self.agent.stop()  # graceful: a last "stopping" heartbeat, runners aborted
            try:
                await asyncio.wait_for(asyncio.shield(self.agent_task), 10.0)
            except Exception:  # stuck or failed: cancel it, keep stopping the rest
                self.agent_task.cancel()
                await asyncio.gather(self.agent_task, return_exceptions=True)
        if self.outbox_nc is not None and not self.outbox_nc.is_closed:
            await _quietly(self.outbox_nc.close())
        await _quietly(self.leaf.stop())
        await _quietly(self.postgres.stop())
        self.store.close()


async def _quietly(awaitable: Awaitable[object]) -> None:
    try:
        await asyncio.wait_for(awaitable, 9.0)
    except Exception as exc:  # shutting down: report, keep stopping the rest
        print(f"cowork gateway: while stopping: {exc}", file=sys.stderr)


async def gateway_up(opts: GatewayUpOptions, stop: asyncio.Event | None = None) -> int:
    """Run the appliance until `stop` is set (Ctrl-C / SIGTERM) or it must end."""
    opts.state_dir = ensure_writable_dir(opts.state_dir, "--state-dir")
    lock_dir(opts.state_dir, "--state-dir")  # before any server touches its stores
    nats_server_binary()
    if opts.nats_port:
        ensure_port_free("127.0.0.1", opts.nats_port, "--nats-port")
    if opts.postgres_port:
        ensure_port_free("127.0.0.1", opts.postgres_port, "--postgres-port")
    appliance = Appliance(opts)
    stop = stop or asyncio.Event()
    with stop_on_signals(stop):
        try:
            code, reason = await _run(appliance, stop)
            if reason:
                print(f"cowork gateway: {'error: ' if code == 1 else ''}{reason}", file=sys.stderr)
            return code
        finally:
            say("\nStopping the cowork Gateway appliance ...")
            await appliance.stop()
            say("Stopped.")


async def _run(appliance: Appliance, stop: asyncio.Event) -> tuple[int, str | None]:
    try:
        outcome = await run_until_stopped(appliance.start, appliance.supervise, stop)
    except (EmbeddedError, GatewayUpError) as exc:
        return 1, str(exc)
    return outcome or (0, None)
