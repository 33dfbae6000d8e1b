"""`cowork desktop ...`: pair, run, status and revoke a paired Desktop.

Every failure is one line on stderr and a non-zero exit, never a traceback.
`status` and `revoke` need no network: revocation is local first, and the hub
is told only if it can be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..common import (
    ReconnectPolicy,
    add_opencode_server,
    add_state_dir,
    add_status_command,
    documented_command,
    fail,
    hub_urls,
    interval_seconds,
    run_subcommand,
    serve,
)
from ._agent import DesktopAgent, PairingFailed, notify_hub_of_revocation, pair, revoke_locally
from ._cli_sealed import add_sealed_commands, run_controllers, run_trust
from ._sealed import load_trust
from ._store import DesktopStore, StoreError, default_state_dir

ENV_HELP = """\
environment (flags win over variables):
  COWORK_DESKTOP_STATE_DIR  where the Desktop keeps its credential, pairing and journal
                            (default: $XDG_STATE_HOME/cowork/desktop)
  COWORK_HUB_URL            the hub's NATS URL(s), comma separated (pair)
  COWORK_OPENCODE_URL       the local OpenCode server (run; default http://127.0.0.1:4096)
  COWORK_OPENCODE_PASSWORD  OpenCode's server password, if it has one (run; also read
                            from OPENCODE_SERVER_PASSWORD)
  COWORK_EDGE_RECONNECT_WAIT, COWORK_EDGE_RECONNECT_MAX_WAIT, COWORK_EDGE_CONNECT_TIMEOUT,
  COWORK_EDGE_CONNECT_TIMEOUT_MAX
                            how the agent dials the hub's NATS again (run; seconds:
                            0.5, 10, 5, 30; docs/operations.md)
"""

EXIT_REVOKED = 3


def add_desktop_commands(commands: Any) -> dict[str, argparse.ArgumentParser]:
    """Add `desktop` to the `cowork` parser; returns its sub-parsers by name."""
    desktop = documented_command(
        commands,
        "desktop",
        help="pair this machine's OpenCode with a hub and relay it (outbound only)",
        description="A paired Desktop dials out to the hub's NATS: no inbound port is opened. "
        "It stays the execution authority: the hub's commands run only under its "
        "local policy.",
        epilog=ENV_HELP,
    )
    sub = desktop.add_subparsers(dest="desktop_command", metavar="DESKTOP_COMMAND", required=True)

    p = documented_command(
        sub,
        "pair",
        help="redeem a one-time pairing code from the hub",
        description="Redeem CODE (from POST /api/v1/tenants/T/pairings) "
        "over NATS and store the credential in the state "
        "directory.",
        epilog=ENV_HELP,
    )
    p.add_argument(
        "code",
        metavar="CODE",
        help="the pairing code, e.g. 7KQ2-M9XD-4F, or the pairing link the console shows "
        "(it names the hub too)",
    )
    p.add_argument(
        "--hub",
        type=hub_urls,
        default=os.environ.get("COWORK_HUB_URL"),
        help="the hub's NATS URL(s), e.g. nats://hub.example.com:4222 (env COWORK_HUB_URL)",
    )
    p.add_argument("--device-name", help="how the hub lists this Desktop (default: host name)")
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
        help="serve the paired Desktop until stopped",
        description="Connect to the hub, take its commands and relay "
        "OpenCode's events (redacted). Buffers on disk while "
        "the hub is away.",
        epilog=ENV_HELP,
    )
    add_opencode_server(r)
    r.add_argument(
        "--heartbeat-interval",
        type=interval_seconds,
        default=5.0,
        help="seconds between presence heartbeats (default: %(default)s)",
    )
    _state_dir(r)

    s = add_status_command(sub, "show this Desktop's pairing (works offline)")
    _state_dir(s)

    v = sub.add_parser("revoke", help="revoke this pairing (local first; tells the hub if it can)")
    v.add_argument("--reason", default="revoked on the Desktop", help="recorded in both audits")
    _state_dir(v)
    return {"pair": p, "run": r, "status": s, "revoke": v, **add_sealed_commands(sub, _state_dir)}


def _state_dir(p: argparse.ArgumentParser) -> None:
    add_state_dir(p, default_state_dir(), "COWORK_DESKTOP_STATE_DIR")


def run_desktop(args: argparse.Namespace) -> int:
    return run_subcommand(
        args,
        args.desktop_command,
        DesktopStore(args.state_dir),
        {
            "pair": _pair,
            "run": _run,
            "status": _status,
            "revoke": _revoke,
            "controllers": run_controllers,
            "trust": run_trust,
        },
        StoreError,
    )


def _pair(args: argparse.Namespace, store: DesktopStore) -> int:
    if "://" in args.code:
        try:
            args.code, linked_hub = parse_pairing_link(args.code)
        except ValueError as exc:
            return fail(f"not a pairing link: {exc}", 2)
        args.hub = args.hub or linked_hub
    if not args.hub:
        return fail("no hub given: pass --hub nats://HOST:PORT or set COWORK_HUB_URL", 2)
    print(f"Redeeming the code at {', '.join(args.hub)} ...", file=sys.stderr)
    try:
        pairing = asyncio.run(
            pair(args.code, args.hub, store, device_name=args.device_name, timeout=args.timeout)
        )
    except PairingFailed as exc:
        hint = f" (try again in {exc.retry_after:.0f} s)" if exc.retry_after else ""
        return fail(f"pairing failed [{exc.code}]: {exc}{hint}")
    print(f"Paired as {pairing.pairing_id} ({pairing.label!r}) with tenant {pairing.tenant}.")
    print(f"Credential: {store.creds_path}")
    print("Next: cowork desktop run --opencode http://127.0.0.1:4096")
    return 0


def _run(args: argparse.Namespace, store: DesktopStore) -> int:
    try:
        reconnect = ReconnectPolicy.from_env()
    except ValueError as exc:
        return fail(str(exc), 2)
    agent = DesktopAgent(
        store,
        args.opencode,
        opencode_password=args.opencode_password,
        heartbeat_interval=args.heartbeat_interval,
        reconnect=reconnect,
    )
    print(
        f"Serving pairing {agent.pairing_id} (tenant {agent.tenant}) for OpenCode at "
        f"{args.opencode}; Ctrl-C stops.",
        file=sys.stderr,
    )
    asyncio.run(serve(agent))
    if agent.pairing.revoked:
        return fail(
            f"this pairing was revoked ({agent.pairing.revoke_reason}); pair again with a new code",
            EXIT_REVOKED,
        )
    return 0


def _status(args: argparse.Namespace, store: DesktopStore) -> int:
    pairing = store.load_pairing()
    state = pairing.state
    report = {
        "pairingId": pairing.pairing_id,
        "tenant": pairing.tenant,
        "label": pairing.label,
        "hub": pairing.hub_urls,
        "deviceName": pairing.device_name,
        "pairedAt": pairing.paired_at,
        "status": "revoked"
        if pairing.revoked
        else ("enabled" if state.get("enabled", True) else "disabled"),
        "revokedAt": pairing.revoked_at,
        "revokeReason": pairing.revoke_reason,
        "credential": str(store.creds_path) if store.creds_path.exists() else None,
        "policy": state.get("policy"),
        "allowedWorkspaceIds": state.get("allowedWorkspaceIds"),
        "allowedSessionIds": state.get("allowedSessionIds"),
        "trust": load_trust(store).trust,
        "controllers": len(load_trust(store).controllers),
        "outboxEvents": store.outbox_size(),
        "lastCommandSequence": store.last_command_sequence(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if value is not None:
            print(
                f"{key:>20}: {value if not isinstance(value, (dict, list)) else json.dumps(value)}"
            )
    return 0


def _revoke(args: argparse.Namespace, store: DesktopStore) -> int:
    pairing = store.load_pairing()
    told = False
    if not pairing.revoked and store.creds_path.exists():
        told = asyncio.run(notify_hub_of_revocation(store, pairing, args.reason))
    revoke_locally(store, args.reason)
    print(f"Revoked pairing {pairing.pairing_id} locally; the credential is deleted.")
    print(
        "The hub acknowledged the revocation."
        if told
        else "The hub could not be told now; it sees this Desktop as revoked-or-offline, and an "
        "admin can revoke it there too."
    )
    return 0


def parse_pairing_link(link: str) -> tuple[str, list[str]]:
    """The code and the hub's NATS URL(s) from a pairing link
    (`https://HUB/console/pair#code=...&hub=...`; the fragment, or the query)."""
    parts = urlsplit(link.strip())
    fields = parse_qs(parts.fragment or parts.query)
    code = (fields.get("code") or [""])[0].strip()
    if not code:
        raise ValueError("it carries no code (copy the whole link)")
    hubs = [u.strip() for u in (fields.get("hub") or [""])[0].split(",") if u.strip()]
    try:
        return code, hub_urls(",".join(hubs)) if hubs else []
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
