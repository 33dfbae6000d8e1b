"""What the channel processes run from a machine (`cowork channel cli`, `cowork
channel run`) share: their bus arguments, the credential file and its bound
workspace, and the connection made with it."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
from pathlib import Path
from typing import Any

import nats

from schemas import InvalidTokenError, check_tenant, check_token, parse_creds, subjects

EXIT_USAGE, EXIT_CREDS, EXIT_CONNECT, EXIT_QUEUE = 2, 3, 4, 5
CONNECT_SECONDS = 10.0


class CommandFailed(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def token_type(kind: str):
    """An argparse type checking a tenant id or another token kind."""

    def check(text: str) -> str:
        try:
            return check_tenant(text) if kind == "tenant" else check_token(text, kind)
        except InvalidTokenError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return check


def add_instance_command(
    sub: Any, name: str, *, help: str, description: str, instance_help: str
) -> argparse.ArgumentParser:
    """A `cowork channel NAME INSTANCE` subcommand with the bus arguments."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "instance", metavar="INSTANCE", type=token_type("instance_id"), help=instance_help
    )
    add_bus_arguments(parser)
    return parser


def add_bus_arguments(parser: argparse.ArgumentParser) -> None:
    """--nats, --creds, --tenant and --workspace."""
    parser.add_argument(
        "--nats",
        required=True,
        metavar="URL",
        help="the hub's NATS URL(s), comma separated, e.g. nats://hub:4222",
    )
    parser.add_argument(
        "--creds", required=True, type=Path, metavar="FILE", help="the instance's NATS .creds file"
    )
    parser.add_argument("--tenant", required=True, type=token_type("tenant"), help="the tenant id")
    parser.add_argument(
        "--workspace",
        type=token_type("workspace_id"),
        help="the workspace the instance is bound to (default: the one the credential is bound to)",
    )


def bound_workspace(user_jwt: str, tenant: str, instance: str) -> str | None:
    """The workspace a channel credential may send into: the last token of its one
    `cw.<tenant>.chan.<instance>.in.<workspace>` publish permission."""
    try:
        claims_b64 = user_jwt.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(claims_b64 + "=" * (-len(claims_b64) % 4)))
        allowed = claims["nats"]["pub"]["allow"]
    except (IndexError, ValueError, KeyError, TypeError):
        return None
    prefix = f"cw.{tenant}.chan.{instance}.in."
    found = {s[len(prefix) :] for s in allowed if isinstance(s, str) and s.startswith(prefix)}
    return found.pop() if len(found) == 1 else None


def check_creds(path: Path) -> None:
    try:
        parse_creds(path.read_text())
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror}", EXIT_CREDS) from None
    except (ValueError, UnicodeDecodeError):
        raise CommandFailed(f"{path} is not a NATS .creds file", EXIT_CREDS) from None


def credential_workspace(args: argparse.Namespace) -> str:
    """--workspace, checked against the credential's; or the credential's."""
    check_creds(args.creds)
    user_jwt, _ = parse_creds(args.creds.read_text())
    bound = bound_workspace(user_jwt, args.tenant, args.instance)
    if args.workspace and bound and args.workspace != bound:
        raise CommandFailed(
            f"this credential is bound to workspace {bound!r}, not "
            f"{args.workspace!r}; leave --workspace out",
            EXIT_CREDS,
        )
    workspace: str | None = args.workspace or bound
    if workspace:
        return workspace
    raise CommandFailed(
        f"cannot tell the workspace from {args.creds} (is it for instance "
        f"{args.instance!r} of tenant {args.tenant!r}?); give --workspace",
        EXIT_CREDS,
    )


async def connect_bus(args: argparse.Namespace, errors: list[str], *, reconnect: bool) -> Any:
    """A NATS connection with the instance's credential (`args.nats`, `args.creds`),
    or CommandFailed once every server refused or CONNECT_SECONDS passed; what the
    servers reported goes to `errors`."""
    servers = [s.strip() for s in args.nats.split(",") if s.strip()]
    failed = asyncio.Event()
    seen = len(errors)

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)
        # nats-py keeps retrying a first connect; give up once every server failed.
        if len(errors) - seen >= len(servers):
            failed.set()

    connect = asyncio.ensure_future(
        nats.connect(
            servers,
            user_credentials=str(args.creds),
            error_cb=on_error,
            inbox_prefix=subjects.inbox_prefix(args.tenant, "channel", args.instance),
            connect_timeout=5,
            allow_reconnect=reconnect,
            name=f"cowork-channel-{args.instance}",
        )
    )
    gave_up = asyncio.ensure_future(failed.wait())
    await asyncio.wait(
        {connect, gave_up}, timeout=CONNECT_SECONDS, return_when=asyncio.FIRST_COMPLETED
    )
    gave_up.cancel()
    if connect.done() and connect.exception() is None:
        return connect.result()
    connect.cancel()
    with contextlib.suppress(BaseException):
        await connect
    detail = errors[-1] if len(errors) > seen else "no answer"
    raise CommandFailed(f"cannot connect to NATS at {', '.join(servers)}: {detail}", EXIT_CONNECT)
