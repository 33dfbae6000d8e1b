"""`cowork gateway ...`: register a Standalone Team Gateway with Cloud, run it, show it.

Every failure is one line on stderr and a non-zero exit, never a traceback.
`status` needs no network and never prints a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, TypedDict

from ..common import (
    DEFAULT_OPENCODE_URL,
    ReconnectPolicy,
    add_opencode_server,
    add_state_dir,
    add_status_command,
    documented_command,
    fail,
    http_url,
    hub_urls,
    interval_seconds,
    number_between,
    run_subcommand,
    serve,
)
from ._agent import GatewayAgent
from ._registration import RegistrationFailed, opencode_version, register, version_set
from ._store import GatewayStore, GatewayStoreError, default_state_dir

ENV_HELP = """\
environment (flags win over variables):
  COWORK_GATEWAY_STATE_DIR    where the Gateway keeps its credential, registration, audit
                              log and work journal (default: $XDG_STATE_HOME/cowork/gateway)
  COWORK_GATEWAY_CREDENTIAL   the registration credential (register; keeps it out of
                              shell history)
  COWORK_HUB_URL              the hub's NATS URL(s), comma separated (register)
  COWORK_GATEWAY_NATS_URL     NATS URL to connect to instead of the registered hub URLs,
                              e.g. the appliance's leaf node (run)
  COWORK_OPENCODE_URL         the Gateway's private OpenCode (default http://127.0.0.1:4096)
  COWORK_OPENCODE_PASSWORD    OpenCode's server password, if it has one (also read from
                              OPENCODE_SERVER_PASSWORD)
  COWORK_EDGE_RECONNECT_WAIT, COWORK_EDGE_RECONNECT_MAX_WAIT, COWORK_EDGE_CONNECT_TIMEOUT,
  COWORK_EDGE_CONNECT_TIMEOUT_MAX
                              how the agent dials the hub's NATS again (run; seconds:
                              0.5, 10, 5, 30; docs/operations.md)
"""

EXIT_REVOKED = 3


class GatewayCommands(TypedDict):
    """What `add_gateway_commands` returns: the sub-parsers, and the sub-command action."""

    register: argparse.ArgumentParser
    run: argparse.ArgumentParser
    status: argparse.ArgumentParser
    _commands: argparse._SubParsersAction[argparse.ArgumentParser]


def add_gateway_commands(commands: Any) -> GatewayCommands:
    """Add `gateway` to the `cowork` parser; returns its sub-parsers by name, and the
    sub-command action under "_commands" so the hub can add `up` (edges never import
    hub code)."""
    gateway = documented_command(
        commands,
        "gateway",
        help="register this Team Gateway with Cloud and run it (outbound only)",
        description="A Standalone Team Gateway dials out to Cloud's NATS: it heartbeats, "
        "syncs redacted external-workspace metadata and, when its registration "
        "allows, runs Cloud-owned work on its private OpenCode under a lease. "
        "No inbound port is opened.",
        epilog=ENV_HELP,
    )
    sub = gateway.add_subparsers(dest="gateway_command", metavar="GATEWAY_COMMAND", required=True)

    p = documented_command(
        sub,
        "register",
        help="exchange a registration credential for this Gateway's NATS identity",
        description="Exchange the registration credential (from POST /api/v1/tenants/T/"
        "gateway-registrations, or a rotation) for NATS credentials for a key made "
        "on this machine, and store them in the state directory. Registering again "
        "replaces the stored credential.",
        epilog=ENV_HELP,
    )
    p.add_argument(
        "--hub",
        type=hub_urls,
        default=os.environ.get("COWORK_HUB_URL"),
        help="Cloud's NATS URL(s), e.g. nats://cloud.example.com:4222 (env COWORK_HUB_URL)",
    )
    given = p.add_mutually_exclusive_group()
    given.add_argument(
        "--credential",
        help="the cwgr_… credential (prefer --credential-file or COWORK_GATEWAY_CREDENTIAL)",
    )
    given.add_argument(
        "--credential-file", type=Path, help="read the credential from this file ('-' for stdin)"
    )
    p.add_argument(
        "--opencode",
        default=os.environ.get("COWORK_OPENCODE_URL", DEFAULT_OPENCODE_URL),
        type=http_url,
        help="OpenCode, asked for its version (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds to wait for the hub (default: %(default)s)",
    )
    _state_dir(p)

    r = documented_command(
        sub,
        "run",
        help="run the registered Gateway until stopped",
        description="Connect to Cloud, heartbeat, advertise capabilities, sync metadata and "
        "run claimed Cloud-owned work on OpenCode. Ctrl-C (or SIGTERM) stops "
        "cleanly: running work is aborted and its leases expire for another "
        "Gateway to take.",
        epilog=ENV_HELP,
    )
    add_opencode_server(r)
    r.add_argument(
        "--nats",
        type=hub_urls,
        default=os.environ.get("COWORK_GATEWAY_NATS_URL"),
        help="connect here instead of the registered hub URLs (e.g. the leaf node)",
    )
    r.add_argument(
        "--max-work",
        type=_work_count,
        default=1,
        help="Cloud-owned work items run at once (default: %(default)s)",
    )
    r.add_argument(
        "--heartbeat-interval",
        type=interval_seconds,
        default=None,
        help="seconds between heartbeats (default: what the hub asked for, or 5)",
    )
    r.add_argument(
        "--sync-interval",
        type=interval_seconds,
        default=30.0,
        help="seconds between metadata syncs (default: %(default)s)",
    )
    _state_dir(r)

    s = add_status_command(sub, "show this Gateway's registration (offline; no secrets)")
    _state_dir(s)
    return {"register": p, "run": r, "status": s, "_commands": sub}


def _state_dir(p: argparse.ArgumentParser) -> None:
    add_state_dir(p, default_state_dir(), "COWORK_GATEWAY_STATE_DIR")


_work_count = number_between(int, 0, 1000)


def run_gateway(args: argparse.Namespace) -> int:
    return run_subcommand(
        args,
        args.gateway_command,
        GatewayStore(args.state_dir),
        {"register": _register, "run": _run, "status": _status},
        GatewayStoreError,
    )


def _credential(args: argparse.Namespace) -> str | None:
    if args.credential:
        return args.credential
    if args.credential_file:
        if str(args.credential_file) == "-":
            return sys.stdin.readline().strip()
        try:
            return args.credential_file.read_text().strip()
        except OSError as exc:
            raise GatewayStoreError(f"cannot read {args.credential_file}: {exc.strerror}") from None
    return os.environ.get("COWORK_GATEWAY_CREDENTIAL")


def _register(args: argparse.Namespace, store: GatewayStore) -> int:
    if not args.hub:
        return fail("no hub given: pass --hub nats://HOST:PORT or set COWORK_HUB_URL", 2)
    credential = _credential(args)
    if not credential:
        return fail(
            "no credential given: pass --credential-file FILE, set "
            "COWORK_GATEWAY_CREDENTIAL, or --credential",
            2,
        )
    version = asyncio.run(opencode_version(args.opencode))
    if version is None:
        print(
            f"warning: OpenCode at {args.opencode} did not answer; registering with an "
            "unknown OpenCode version (the hub pauses the registration until `cowork "
            "gateway run` reports it)",
            file=sys.stderr,
        )
    print(f"Registering with {', '.join(args.hub)} ...", file=sys.stderr)
    try:
        gateway = asyncio.run(
            register(credential, args.hub, store, version_set(version), timeout=args.timeout)
        )
    except RegistrationFailed as exc:
        hint = f" (try again in {exc.retry_after:.0f} s)" if exc.retry_after else ""
        return fail(f"registration failed [{exc.code}]: {exc}{hint}")
    print(
        f"Registered {gateway.registration_id} ({gateway.display_name!r}) as "
        f"{gateway.kind} with tenant {gateway.tenant}; state {gateway.state}."
    )
    print(f"Credential: {store.creds_path}")
    state = (
        ""
        if Path(store.directory).resolve() == Path(default_state_dir()).resolve()
        else f" --state-dir {shlex.quote(str(store.directory))}"
    )
    print(f"Next: cowork gateway run{state} --opencode {args.opencode}")
    print(
        f"  or, the appliance (own leaf NATS and PostgreSQL): cowork gateway up{state} "
        f"--opencode {args.opencode}"
    )
    print(
        "  (`gateway up` dials Cloud's leaf-node port, 7422 unless `cowork up` was given "
        "another --leaf-port: then pass the same as --cloud-leaf-port)"
    )
    return 0


def _run(args: argparse.Namespace, store: GatewayStore) -> int:
    gateway = store.load()
    interval = args.heartbeat_interval or gateway.heartbeat_interval_seconds or 5.0
    try:
        reconnect = ReconnectPolicy.from_env()
    except ValueError as exc:
        return fail(str(exc), 2)
    agent = GatewayAgent(
        store,
        args.opencode,
        opencode_password=args.opencode_password,
        max_concurrent_work=args.max_work,
        heartbeat_interval=interval,
        sync_interval=args.sync_interval,
        nats_url=args.nats,
        reconnect=reconnect,
    )
    print(
        f"Gateway {agent.registration_id} ({gateway.kind}, tenant {agent.tenant}) running "
        f"OpenCode at {args.opencode}; Ctrl-C stops.",
        file=sys.stderr,
    )
    asyncio.run(serve(agent))
    if agent.fatal:
        return fail(agent.fatal, EXIT_REVOKED if agent.gateway.revoked else 1)
    return 0


def status_report(store: GatewayStore) -> dict[str, Any]:
    """What is stored, never a secret (the credential file is named, not read)."""
    gateway = store.load()
    journal = store.journal()
    last = journal[-1] if journal else None
    return {
        "registrationId": gateway.registration_id,
        "tenant": gateway.tenant,
        "displayName": gateway.display_name,
        "kind": gateway.kind,
        "state": "revoked" if gateway.revoked else gateway.state,
        "scopes": gateway.scopes,
        "syncScopes": gateway.sync_scopes,
        "hub": gateway.hub_urls,
        "registeredAt": gateway.registered_at,
        # The bus credential (the .creds JWT, refreshed while running), not the
        # registration credential whose expiry the API shows as credentialExpiresAt.
        "busCredentialExpiresAt": gateway.credential_expires_at,
        "credential": str(store.creds_path) if store.creds_path.exists() else None,
        "revokedAt": gateway.revoked_at,
        "revokeReason": gateway.revoke_reason,
        "work": store.journal_counts(),
        "lastWork": None
        if last is None
        else {
            "workId": last.work_id,
            "attempt": last.attempt,
            "state": last.state,
            "startedAt": last.started_at,
            "detail": last.detail,
        },
    }


def _status(args: argparse.Namespace, store: GatewayStore) -> int:
    report = status_report(store)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if value is not None and value != {}:
            text = json.dumps(value) if isinstance(value, (dict, list)) else value
            print(f"{key:>20}: {text}")
    return 0
