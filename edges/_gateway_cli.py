"""`cowork gateway ...`: register a Standalone Team Gateway with Cloud, run it, show it.

Every failure is one line on stderr and a non-zero exit, never a traceback.
`status` needs no network and never prints a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from ._desktop_cli import _http_url, _hub_urls, _positive
from ._gateway import GatewayAgent, RegistrationFailed, opencode_version, register, version_set
from ._gateway_store import GatewayStore, GatewayStoreError, default_state_dir

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
"""

EXIT_REVOKED = 3


def add_gateway_commands(commands: Any) -> dict[str, argparse.ArgumentParser]:
    """Add `gateway` to the `cowork` parser; returns its sub-parsers by name, and the
    sub-command action under "_commands" so the hub can add `up` (edges never import
    hub code)."""
    gateway = commands.add_parser(
        "gateway", help="register this Team Gateway with Cloud and run it (outbound only)",
        description="A Standalone Team Gateway dials out to Cloud's NATS: it heartbeats, "
                    "syncs redacted external-workspace metadata and, when its registration "
                    "allows, runs Cloud-owned work on its private OpenCode under a lease. "
                    "No inbound port is opened.", epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = gateway.add_subparsers(dest="gateway_command", metavar="GATEWAY_COMMAND",
                                 required=True)

    p = sub.add_parser(
        "register", help="exchange a registration credential for this Gateway's NATS identity",
        description="Exchange the registration credential (from POST /api/v1/tenants/T/"
                    "gateway-registrations, or a rotation) for NATS credentials for a key made "
                    "on this machine, and store them in the state directory. Registering again "
                    "replaces the stored credential.",
        epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hub", type=_hub_urls, default=os.environ.get("COWORK_HUB_URL"),
                   help="Cloud's NATS URL(s), e.g. nats://cloud.example.com:4222 "
                        "(env COWORK_HUB_URL)")
    given = p.add_mutually_exclusive_group()
    given.add_argument("--credential", help="the cwgr_… credential (prefer --credential-file "
                                            "or COWORK_GATEWAY_CREDENTIAL)")
    given.add_argument("--credential-file", type=Path,
                       help="read the credential from this file ('-' for stdin)")
    p.add_argument("--opencode", default=os.environ.get("COWORK_OPENCODE_URL",
                                                        "http://127.0.0.1:4096"),
                   type=_http_url, help="OpenCode, asked for its version (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the hub (default: %(default)s)")
    _state_dir(p)

    r = sub.add_parser(
        "run", help="run the registered Gateway until stopped",
        description="Connect to Cloud, heartbeat, advertise capabilities, sync metadata and "
                    "run claimed Cloud-owned work on OpenCode. Ctrl-C (or SIGTERM) stops "
                    "cleanly: running work is aborted and its leases expire for another "
                    "Gateway to take.", epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--opencode", default=os.environ.get("COWORK_OPENCODE_URL",
                                                        "http://127.0.0.1:4096"),
                   type=_http_url, help="OpenCode server URL (default: %(default)s)")
    r.add_argument("--opencode-password",
                   default=os.environ.get("COWORK_OPENCODE_PASSWORD")
                   or os.environ.get("OPENCODE_SERVER_PASSWORD"),
                   help="OpenCode server password (prefer the environment variable)")
    r.add_argument("--nats", type=_hub_urls, default=os.environ.get("COWORK_GATEWAY_NATS_URL"),
                   help="connect here instead of the registered hub URLs (e.g. the leaf node)")
    r.add_argument("--max-work", type=_work_count, default=1,
                   help="Cloud-owned work items run at once (default: %(default)s)")
    r.add_argument("--heartbeat-interval", type=_positive, default=None,
                   help="seconds between heartbeats (default: what the hub asked for, or 5)")
    r.add_argument("--sync-interval", type=_positive, default=30.0,
                   help="seconds between metadata syncs (default: %(default)s)")
    _state_dir(r)

    s = sub.add_parser("status", help="show this Gateway's registration (offline; no secrets)")
    s.add_argument("--json", action="store_true", help="print JSON")
    _state_dir(s)
    return {"register": p, "run": r, "status": s, "_commands": sub}


def _state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=default_state_dir(),
                   help="state directory (default: %(default)s; env COWORK_GATEWAY_STATE_DIR)")


def _work_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be between 0 and 1000")
    return value


def run_gateway(args: argparse.Namespace) -> int:
    store = GatewayStore(args.state_dir)
    try:
        if args.gateway_command == "register":
            return _register(args, store)
        if args.gateway_command == "run":
            return _run(args, store)
        if args.gateway_command == "status":
            return _status(args, store)
    except GatewayStoreError as exc:
        return _fail(str(exc))
    finally:
        store.close()
    return 2


def _fail(message: str, code: int = 1) -> int:
    print(f"cowork: error: {message}", file=sys.stderr)
    return code


def _credential(args: argparse.Namespace) -> str | None:
    if args.credential:
        return args.credential
    if args.credential_file:
        if str(args.credential_file) == "-":
            return sys.stdin.readline().strip()
        try:
            return args.credential_file.read_text().strip()
        except OSError as exc:
            raise GatewayStoreError(f"cannot read {args.credential_file}: {exc.strerror}") \
                from None
    return os.environ.get("COWORK_GATEWAY_CREDENTIAL")


def _register(args: argparse.Namespace, store: GatewayStore) -> int:
    if not args.hub:
        return _fail("no hub given: pass --hub nats://HOST:PORT or set COWORK_HUB_URL", 2)
    credential = _credential(args)
    if not credential:
        return _fail("no credential given: pass --credential-file FILE, set "
                     "COWORK_GATEWAY_CREDENTIAL, or --credential", 2)
    version = asyncio.run(opencode_version(args.opencode))
    if version is None:
        print(f"warning: OpenCode at {args.opencode} did not answer; registering with an "
              "unknown OpenCode version (the hub pauses the registration until `cowork "
              "gateway run` reports it)", file=sys.stderr)
    print(f"Registering with {', '.join(args.hub)} ...", file=sys.stderr)
    try:
        gateway = asyncio.run(register(credential, args.hub, store, version_set(version),
                                       timeout=args.timeout))
    except RegistrationFailed as exc:
        hint = f" (try again in {exc.retry_after:.0f} s)" if exc.retry_after else ""
        return _fail(f"registration failed [{exc.code}]: {exc}{hint}")
    print(f"Registered {gateway.registration_id} ({gateway.display_name!r}) as "
          f"{gateway.kind} with tenant {gateway.tenant}; state {gateway.state}.")
    print(f"Credential: {store.creds_path}")
    print("Next: cowork gateway run --opencode http://127.0.0.1:4096")
    return 0


def _run(args: argparse.Namespace, store: GatewayStore) -> int:
    gateway = store.load()
    interval = args.heartbeat_interval or gateway.heartbeat_interval_seconds or 5.0
    agent = GatewayAgent(store, args.opencode, opencode_password=args.opencode_password,
                         max_concurrent_work=args.max_work, heartbeat_interval=interval,
                         sync_interval=args.sync_interval, nats_url=args.nats)
    print(f"Gateway {agent.registration_id} ({gateway.kind}, tenant {agent.tenant}) running "
          f"OpenCode at {args.opencode}; Ctrl-C stops.", file=sys.stderr)
    asyncio.run(_serve(agent))
    if agent.fatal:
        return _fail(agent.fatal, EXIT_REVOKED if agent.gateway.revoked else 1)
    return 0


async def _serve(agent: GatewayAgent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    await agent.run()


def status_report(store: GatewayStore) -> dict[str, Any]:
    """What is stored, never a secret (the credential file is named, not read)."""
    gateway = store.load()
    journal = store.journal()
    last = journal[-1] if journal else None
    return {
        "registrationId": gateway.registration_id, "tenant": gateway.tenant,
        "displayName": gateway.display_name, "kind": gateway.kind,
        "state": "revoked" if gateway.revoked else gateway.state,
        "scopes": gateway.scopes, "syncScopes": gateway.sync_scopes, "hub": gateway.hub_urls,
        "registeredAt": gateway.registered_at,
        "credentialExpiresAt": gateway.credential_expires_at,
        "credential": str(store.creds_path) if store.creds_path.exists() else None,
        "revokedAt": gateway.revoked_at, "revokeReason": gateway.revoke_reason,
        "work": store.journal_counts(),
        "lastWork": None if last is None else {
            "workId": last.work_id, "attempt": last.attempt, "state": last.state,
            "startedAt": last.started_at, "detail": last.detail},
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
