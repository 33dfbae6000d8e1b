"""The `cowork` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from edges.common import port_number

from ._loop import EVENT_LOOP_ENV, settle_heap, use_event_loop

DESCRIPTION = """\
cowork: the NATS-centred hub for Cloud, Team Gateways and paired Desktops.

Start everything on this machine (NATS with JetStream, PostgreSQL, the hub):
  cowork up

Run only the hub against an external NATS cluster and PostgreSQL:
  COWORK_NATS_URL=nats://... COWORK_DATABASE_URL=postgresql://... cowork hub serve

Pair this machine's OpenCode with a hub (outbound only), then serve it:
  cowork desktop pair CODE --hub nats://HOST:4222
  cowork desktop run --opencode http://127.0.0.1:4096

Register a Standalone Team Gateway with Cloud (outbound only), then run it:
  COWORK_GATEWAY_CREDENTIAL=cwgr_... cowork gateway register --hub nats://HOST:4222
  cowork gateway run --opencode http://127.0.0.1:4096

Drive a sealed Desktop as one of its controllers (docs/sealed.md):
  cowork remote init --label "my laptop"
  cowork remote enrol --hub https://HUB --tenant T --pairing P
"""

ENV_HELP = """\
environment (flags win over variables):
  COWORK_NATS_URL        NATS server URL(s), comma separated (hub serve)
  COWORK_NATS_CREDS      NATS .creds file for the hub's user (hub serve)
  COWORK_DATABASE_URL    PostgreSQL DSN (hub serve; with `up`, replaces the embedded server)
  COWORK_ADMIN_TOKEN     bearer token for /api/ (with `up`, default: generated into the data dir)
  COWORK_KEYS_DIR        bus key hierarchy; the hub then mints and revokes credentials (hub serve)
  COWORK_SECRET_KEY      Fernet key that encrypts the signing keys at rest
  COWORK_HTTP_HOST, COWORK_HTTP_PORT, COWORK_LOG_LEVEL, COWORK_LOG_FORMAT
  COWORK_EVENT_LOOP      auto (uvloop where installed), uvloop or asyncio

signals: SIGINT or SIGTERM stops a command cleanly; SIGUSR1 prints every thread's
stack to stderr and the command goes on.
"""


def _env(name: str, default: str) -> str:
    return os.environ.get(f"COWORK_{name}", default)


def _add_logging(p: argparse.ArgumentParser, default_format: str) -> None:
    p.add_argument(
        "--log-level",
        default=_env("LOG_LEVEL", "info").lower(),
        choices=["debug", "info", "warning", "error"],
        help="log level (default: %(default)s)",
    )
    p.add_argument(
        "--log-format",
        default=_env("LOG_FORMAT", default_format),
        choices=["json", "text"],
        help="log line format (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cowork",
        description=DESCRIPTION,
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cowork {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = commands.add_parser(
        "up",
        help="run NATS + PostgreSQL + the hub on this machine",
        description="Start NATS (JetStream), PostgreSQL and the hub, supervise them, and stop "
        "them all on Ctrl-C. Data is kept in --data-dir across runs.",
    )
    up.add_argument(
        "--data-dir",
        type=Path,
        default=Path(_env("DATA_DIR", ".cowork")),
        help="where NATS, PostgreSQL and keys keep their data (default: %(default)s)",
    )
    up.add_argument(
        "--host",
        default=_env("HOST", "127.0.0.1"),
        help="address to listen on (default: %(default)s)",
    )
    up.add_argument(
        "--http-port",
        type=port_number,
        default=port_number(_env("HTTP_PORT", "8080")),
        help="hub HTTP port (default: %(default)s)",
    )
    up.add_argument(
        "--nats-port",
        type=port_number,
        default=port_number(_env("NATS_PORT", "4222")),
        help="NATS client port (default: %(default)s)",
    )
    up.add_argument(
        "--postgres-port",
        type=port_number,
        default=port_number(_env("POSTGRES_PORT", "0")),
        help="embedded PostgreSQL port on 127.0.0.1 (default: a free port)",
    )
    up.add_argument(
        "--leaf-port",
        type=port_number,
        default=port_number(_env("LEAF_PORT", "7422")),
        help="NATS leaf-node port that Team Gateway appliances dial "
        "(default: %(default)s; 0 turns it off)",
    )
    _add_logging(up, "text")

    hub = commands.add_parser("hub", help="hub service commands")
    hub_commands = hub.add_subparsers(dest="hub_command", metavar="HUB_COMMAND", required=True)
    serve = hub_commands.add_parser(
        "serve",
        help="run only the hub against external NATS and PostgreSQL",
        description="Run the hub service. NATS and PostgreSQL come from COWORK_NATS_URL and "
        "COWORK_DATABASE_URL (the production shape).",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("--http-host", help="address for HTTP (env COWORK_HTTP_HOST)")
    serve.add_argument("--http-port", type=port_number, help="port for HTTP (env COWORK_HTTP_PORT)")
    serve.add_argument("--nats-url", help="NATS URL(s) (env COWORK_NATS_URL)")
    serve.add_argument(
        "--stream-replicas",
        type=int,
        default=int(_env("STREAM_REPLICAS", "1")),
        choices=[1, 3, 5],
        help="JetStream replicas for the hub's streams "
        "(3 on a 3-node cluster; default: %(default)s)",
    )
    _add_logging(serve, "json")

    schema = commands.add_parser("schema", help="contract documents")
    schema_commands = schema.add_subparsers(
        dest="schema_command", metavar="SCHEMA_COMMAND", required=True
    )
    export = schema_commands.add_parser(
        "export",
        help="write JSON Schema per message and the AsyncAPI 3 document",
        description="Generate docs/schemas/<type>.json and docs/asyncapi.json from schemas/.",
    )
    export.add_argument(
        "--out", type=Path, default=Path("docs"), help="output directory (default: %(default)s)"
    )
    export.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the files differ from the code",
    )

    keys = commands.add_parser("keys", help="the bus key hierarchy (NATS operator mode)")
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    server_config = keys_commands.add_parser(
        "server-config",
        help="create the keys if needed and print the nats-server config block",
        description="Print the operator/resolver block to include in every nats-server config "
        "of the cluster (the hub then issues and revokes all credentials at runtime). "
        "The signing keys are encrypted with COWORK_SECRET_KEY, or a key file "
        "created beside them.",
    )
    server_config.add_argument(
        "--keys-dir",
        type=Path,
        default=Path(_env("KEYS_DIR", ".cowork/keys")),
        help="where the keys live (default: %(default)s)",
    )
    server_config.add_argument(
        "--resolver-dir",
        type=Path,
        required=True,
        help="the nats-server's own JWT resolver directory",
    )
    from edges.desktop import add_desktop_commands

    _add_logging(add_desktop_commands(commands)["run"], "text")
    from edges.gateway import add_gateway_commands

    gateway = add_gateway_commands(commands)
    _add_logging(gateway["run"], "text")
    from edges.gateway import add_gateway_up_arguments

    up_parser = gateway["_commands"].add_parser(
        "up", help="run the Gateway appliance: leaf NATS, PostgreSQL and the agent"
    )
    _add_logging(add_gateway_up_arguments(up_parser), "text")
    from edges.remote import add_channel_enrol_command, add_remote_commands

    add_remote_commands(commands)
    from channels import add_channel_commands

    add_channel_commands(commands, more=add_channel_enrol_command)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cowork-hub")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # `kill -USR1 <pid>` prints every thread's stack to stderr and the process goes
    # on: how an operator (or a test) finds where a stuck command waits.
    with contextlib.suppress(OSError, ValueError):  # a stderr without a file (embedded)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        use_event_loop(os.environ.get(EVENT_LOOP_ENV, "auto"))
    except ValueError as exc:
        return fail(str(exc))
    try:
        if args.command == "up":
            return _cmd_up(args)
        if args.command == "hub":
            return _cmd_serve(args)
        if args.command == "schema":
            return _cmd_schema_export(args)
        if args.command == "keys":
            return _cmd_keys_server_config(args)
        if args.command == "desktop":
            return _cmd_desktop(args)
        if args.command == "gateway":
            return _cmd_gateway(args)
        if args.command == "remote":
            from edges.remote import run_remote

            return run_remote(args)
        if args.command == "channel":
            return args.channel_handler(args)
    except KeyboardInterrupt:
        return 130
    return 2


def fail(message: str, code: int = 1) -> int:
    print(f"cowork: error: {message}", file=sys.stderr)
    return code


def _cmd_up(args: argparse.Namespace) -> int:
    from edges.local import EmbeddedError

    from ..core import configure_logging
    from ._up import UpOptions, run_up

    configure_logging(args.log_level, args.log_format)
    opts = UpOptions(
        data_dir=args.data_dir,
        host=args.host,
        http_port=args.http_port,
        nats_port=args.nats_port,
        postgres_port=args.postgres_port,
        leaf_port=args.leaf_port,
        log_level=args.log_level,
        log_format=args.log_format,
    )
    try:
        return asyncio.run(run_up(opts))
    except EmbeddedError as exc:
        return fail(str(exc))


def _cmd_serve(args: argparse.Namespace) -> int:
    from .. import Hub, HubSettings, StartupError
    from ..core import configure_logging

    overrides = {
        k: v
        for k, v in {
            "http_host": args.http_host,
            "http_port": args.http_port,
            "nats_url": args.nats_url,
            "log_level": args.log_level,
            "log_format": args.log_format,
        }.items()
        if v is not None
    }
    try:
        settings = HubSettings(**overrides)
    except ValidationError as exc:
        return fail(
            "invalid configuration: "
            + "; ".join(
                f"COWORK_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
            )
        )
    configure_logging(settings.log_level, settings.log_format)
    from ..auth import BusKeys, KeyStoreError

    try:
        keys = None
        if settings.keys_dir is not None:
            secret = (
                settings.secret_key.get_secret_value().encode() if settings.secret_key else None
            )
            keys = BusKeys.load_or_create(settings.keys_dir, secret)
        hub = Hub(settings, stream_replicas=args.stream_replicas, keys=keys)
        if settings.admin_token is None:  # every /api/ call would be refused
            return fail(
                "no admin token configured: set COWORK_ADMIN_TOKEN (the bearer "
                "token for /api/; e.g. `openssl rand -hex 24`)"
            )
        return asyncio.run(_serve(hub))
    except (StartupError, KeyStoreError) as exc:
        return fail(str(exc))


async def _serve(hub: object) -> int:
    from .. import Hub

    assert isinstance(hub, Hub)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await hub.start()
        settle_heap()
        await stop.wait()
    finally:
        await hub.stop()
    return 0


def _cmd_desktop(args: argparse.Namespace) -> int:
    from edges.desktop import run_desktop

    if args.desktop_command == "run":
        from ..core import configure_logging

        configure_logging(args.log_level, args.log_format)
    return run_desktop(args)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from edges.gateway import run_gateway

    if args.gateway_command in ("run", "up"):
        from ..core import configure_logging

        configure_logging(args.log_level, args.log_format)
    if args.gateway_command == "up":
        from edges.gateway import run_gateway_up

        return run_gateway_up(args)
    return run_gateway(args)


def _cmd_keys_server_config(args: argparse.Namespace) -> int:
    from ..auth import BusKeys, KeyStoreError
    from ._up import secret_key_from_env

    try:
        keys = BusKeys.load_or_create(args.keys_dir, secret_key_from_env())
    except KeyStoreError as exc:
        return fail(str(exc))
    print(keys.server_config(args.resolver_dir))
    return 0


def _cmd_schema_export(args: argparse.Namespace) -> int:
    from ._schema_export import export

    differing = export(args.out, check=args.check)
    if args.check and differing:
        return fail(
            "contract documents are out of date; run `cowork schema export`:\n  "
            + "\n  ".join(str(p) for p in differing)
        )
    if not args.check:
        print(f"wrote {args.out}/asyncapi.json and {args.out}/schemas/*.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
