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
import signal
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ._desktop import DesktopAgent, PairingFailed, notify_hub_of_revocation, pair, revoke_locally
from ._desktop_store import DesktopStore, StoreError, default_state_dir

ENV_HELP = """\
environment (flags win over variables):
  COWORK_DESKTOP_STATE_DIR  where the Desktop keeps its credential, pairing and journal
                            (default: $XDG_STATE_HOME/cowork/desktop)
  COWORK_HUB_URL            the hub's NATS URL(s), comma separated (pair)
  COWORK_OPENCODE_URL       the local OpenCode server (run; default http://127.0.0.1:4096)
  COWORK_OPENCODE_PASSWORD  OpenCode's server password, if it has one (run; also read
                            from OPENCODE_SERVER_PASSWORD)
"""

EXIT_REVOKED = 3


def add_desktop_commands(commands: Any) -> dict[str, argparse.ArgumentParser]:
    """Add `desktop` to the `cowork` parser; returns its sub-parsers by name."""
    desktop = commands.add_parser(
        "desktop", help="pair this machine's OpenCode with a hub and relay it (outbound only)",
        description="A paired Desktop dials out to the hub's NATS: no inbound port is opened. "
                    "It stays the execution authority: the hub's commands run only under its "
                    "local policy.", epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = desktop.add_subparsers(dest="desktop_command", metavar="DESKTOP_COMMAND",
                                 required=True)

    p = sub.add_parser("pair", help="redeem a one-time pairing code from the hub",
                       description="Redeem CODE (from POST /api/v1/tenants/T/pairings) over "
                                   "NATS and store the credential in the state directory.",
                       epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("code", metavar="CODE", help="the pairing code, e.g. 7KQ2-M9XD-4F")
    p.add_argument("--hub", type=_hub_urls, default=os.environ.get("COWORK_HUB_URL"),
                   help="the hub's NATS URL(s), e.g. nats://hub.example.com:4222 "
                        "(env COWORK_HUB_URL)")
    p.add_argument("--device-name", help="how the hub lists this Desktop (default: host name)")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds to wait for the hub (default: %(default)s)")
    _state_dir(p)

    r = sub.add_parser("run", help="serve the paired Desktop until stopped",
                       description="Connect to the hub, take its commands and relay OpenCode's "
                                   "events (redacted). Buffers on disk while the hub is away.",
                       epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--opencode", default=os.environ.get("COWORK_OPENCODE_URL",
                                                        "http://127.0.0.1:4096"),
                   type=_http_url, help="OpenCode server URL (default: %(default)s)")
    r.add_argument("--opencode-password",
                   default=os.environ.get("COWORK_OPENCODE_PASSWORD")
                   or os.environ.get("OPENCODE_SERVER_PASSWORD"),
                   help="OpenCode server password (prefer the environment variable)")
    r.add_argument("--heartbeat-interval", type=_positive, default=5.0,
                   help="seconds between presence heartbeats (default: %(default)s)")
    _state_dir(r)

    s = sub.add_parser("status", help="show this Desktop's pairing (works offline)")
    s.add_argument("--json", action="store_true", help="print JSON")
    _state_dir(s)

    v = sub.add_parser("revoke", help="revoke this pairing (local first; tells the hub if it can)")
    v.add_argument("--reason", default="revoked on the Desktop", help="recorded in both audits")
    _state_dir(v)
    return {"pair": p, "run": r, "status": s, "revoke": v}


def _state_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=default_state_dir(),
                   help="state directory (default: %(default)s; env COWORK_DESKTOP_STATE_DIR)")


def _hub_urls(text: str) -> list[str]:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    for url in urls:
        parsed = urlparse(url)
        if parsed.scheme not in ("nats", "tls", "ws", "wss") or not parsed.hostname:
            raise argparse.ArgumentTypeError(f"{url!r} is not a NATS URL like nats://HOST:4222")
    if not urls:
        raise argparse.ArgumentTypeError("no NATS URL given")
    return urls


def _http_url(text: str) -> str:
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL")
    return text


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.2 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be between 0.2 and 3600 seconds")
    return value


def run_desktop(args: argparse.Namespace) -> int:
    store = DesktopStore(args.state_dir)
    try:
        if args.desktop_command == "pair":
            return _pair(args, store)
        if args.desktop_command == "run":
            return _run(args, store)
        if args.desktop_command == "status":
            return _status(args, store)
        if args.desktop_command == "revoke":
            return _revoke(args, store)
    except StoreError as exc:
        return _fail(str(exc))
    finally:
        store.close()
    return 2


def _fail(message: str, code: int = 1) -> int:
    print(f"cowork: error: {message}", file=sys.stderr)
    return code


def _pair(args: argparse.Namespace, store: DesktopStore) -> int:
    if not args.hub:
        return _fail("no hub given: pass --hub nats://HOST:PORT or set COWORK_HUB_URL", 2)
    print(f"Redeeming the code at {', '.join(args.hub)} ...", file=sys.stderr)
    try:
        pairing = asyncio.run(pair(args.code, args.hub, store, device_name=args.device_name,
                                   timeout=args.timeout))
    except PairingFailed as exc:
        hint = f" (try again in {exc.retry_after:.0f} s)" if exc.retry_after else ""
        return _fail(f"pairing failed [{exc.code}]: {exc}{hint}")
    print(f"Paired as {pairing.pairing_id} ({pairing.label!r}) with tenant {pairing.tenant}.")
    print(f"Credential: {store.creds_path}")
    print("Next: cowork desktop run --opencode http://127.0.0.1:4096")
    return 0


def _run(args: argparse.Namespace, store: DesktopStore) -> int:
    agent = DesktopAgent(store, args.opencode, opencode_password=args.opencode_password,
                         heartbeat_interval=args.heartbeat_interval)
    print(f"Serving pairing {agent.pairing_id} (tenant {agent.tenant}) for OpenCode at "
          f"{args.opencode}; Ctrl-C stops.", file=sys.stderr)
    asyncio.run(_serve(agent))
    if agent.pairing.revoked:
        return _fail(f"this pairing was revoked ({agent.pairing.revoke_reason}); "
                     "pair again with a new code", EXIT_REVOKED)
    return 0


async def _serve(agent: DesktopAgent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    await agent.run()


def _status(args: argparse.Namespace, store: DesktopStore) -> int:
    pairing = store.load_pairing()
    state = pairing.state
    report = {
        "pairingId": pairing.pairing_id, "tenant": pairing.tenant, "label": pairing.label,
        "hub": pairing.hub_urls, "deviceName": pairing.device_name, "pairedAt": pairing.paired_at,
        "status": "revoked" if pairing.revoked else
                  ("enabled" if state.get("enabled", True) else "disabled"),
        "revokedAt": pairing.revoked_at, "revokeReason": pairing.revoke_reason,
        "credential": str(store.creds_path) if store.creds_path.exists() else None,
        "policy": state.get("policy"), "allowedWorkspaceIds": state.get("allowedWorkspaceIds"),
        "allowedSessionIds": state.get("allowedSessionIds"),
        "outboxEvents": store.outbox_size(), "lastCommandSequence": store.last_command_sequence(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if value is not None:
            print(f"{key:>20}: {value if not isinstance(value, (dict, list)) else json.dumps(value)}")
    return 0


def _revoke(args: argparse.Namespace, store: DesktopStore) -> int:
    pairing = store.load_pairing()
    told = False
    if not pairing.revoked and store.creds_path.exists():
        told = asyncio.run(notify_hub_of_revocation(store, pairing, args.reason))
    revoke_locally(store, args.reason)
    print(f"Revoked pairing {pairing.pairing_id} locally; the credential is deleted.")
    print("The hub acknowledged the revocation." if told else
          "The hub could not be told now; it sees this Desktop as revoked-or-offline, and an "
          "admin can revoke it there too.")
    return 0
