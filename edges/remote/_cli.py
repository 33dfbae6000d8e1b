"""`cowork remote ...`: drive a sealed Desktop as one of its controllers.

    cowork remote init --label "my laptop"
    cowork remote enrol 'cowork+enrol://...'      (a one-time link the Desktop made)
    cowork remote enrol --hub https://HUB --tenant T --pairing P [--expect-desktop FP]
    cowork remote send prompt --session S --payload '{"text": "hi"}'
    cowork remote events [--after N] [--follow]

Every failure is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import httpx

from schemas import SealError

from ..common import InviteLink, add_state_dir, documented_command, fail, http_url
from ._client import WAIT_SECONDS, RemoteClient, RemoteError
from ._store import ControllerStore, PairingLink, RemoteStoreError, default_state_dir

ENV_HELP = """\
environment (flags win over variables):
  COWORK_REMOTE_STATE_DIR  where this controller keeps its keys and enrolments
                           (default: $XDG_STATE_HOME/cowork/remote)
  COWORK_HUB_HTTP          the hub's HTTP URL (enrol)
  COWORK_ADMIN_TOKEN       the bearer token the hub's API takes
"""
KINDS = (
    "create_session",
    "prompt",
    "abort",
    "permission.respond",
    "question.reply",
    "question.reject",
    "status",
    "policy.set",
)


def add_remote_commands(commands: Any) -> dict[str, argparse.ArgumentParser]:
    remote = documented_command(
        commands,
        "remote",
        help="drive a sealed Desktop as an enrolled controller",
        description="A controller signs every command with its own key, and only it (and "
        "the other enrolled controllers) can open what a sealed Desktop sends back. The "
        "hub relays both without being able to read or forge them.",
        epilog=ENV_HELP,
    )
    sub = remote.add_subparsers(dest="remote_command", metavar="REMOTE_COMMAND", required=True)
    init = sub.add_parser("init", help="make this controller's keys and show its fingerprint")
    init.add_argument("--label", required=True, help="how the Desktop lists this controller")

    enrol = sub.add_parser(
        "enrol",
        help="ask a Desktop (through the hub) to enrol this controller",
        description="With a one-time link from `cowork desktop controllers invite`, the "
        "Desktop enrols this controller at once. Without one, it asks, and a person on the "
        "Desktop approves the fingerprint this prints.",
    )
    enrol.add_argument("link", nargs="?", help="a cowork+enrol:// link (it names the pairing)")
    enrol.add_argument(
        "--hub", type=http_url, default=os.environ.get("COWORK_HUB_HTTP"), help="hub HTTP URL"
    )
    enrol.add_argument("--tenant")
    enrol.add_argument("--pairing")
    enrol.add_argument(
        "--expect-desktop",
        help="the Desktop's fingerprint as `cowork desktop controllers list` shows it there",
    )

    send = sub.add_parser("send", help="sign and send one command; prints its opened result")
    send.add_argument("kind", choices=KINDS)
    send.add_argument("--session")
    send.add_argument("--payload", type=_json_object, help="the payload, a JSON object")
    send.add_argument("--wait", type=int, default=WAIT_SECONDS, help="seconds (0-60)")

    events = sub.add_parser("events", help="print the workspace's events, opened (JSON lines)")
    events.add_argument("--after", type=int, default=0, help="after this sequence")
    events.add_argument("--follow", action="store_true", help="keep following the live tail")

    for p in (init, enrol, send, events):
        add_state_dir(p, default_state_dir(), "COWORK_REMOTE_STATE_DIR")
    for p in (send, events):
        p.add_argument("--pairing", help="which enrolment (needed when there are several)")
    return {"init": init, "enrol": enrol, "send": send, "events": events}


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("the payload is a JSON object")
    return value


def run_remote(args: argparse.Namespace) -> int:
    store = ControllerStore(args.state_dir)
    try:
        if args.remote_command == "init":
            keys = store.create_keys(args.label)
            print(f"Controller {keys.controller_id}, fingerprint {keys.public.fingerprint}")
            return 0
        token = os.environ.get("COWORK_ADMIN_TOKEN")
        if not token:
            return fail("set COWORK_ADMIN_TOKEN to a token the hub's API takes", 2)
        return asyncio.run(_online(args, store, token))
    except (RemoteStoreError, RemoteError) as exc:
        return fail(f"[{getattr(exc, 'code', 'remote.state')}] {exc}")
    except SealError as exc:  # a damaged or foreign link
        return fail(f"[controller.bad_link] {exc}", 2)
    except (OSError, httpx.HTTPError) as exc:
        return fail(f"cannot reach the hub: {exc}")
    finally:
        store.close()


async def _online(args: argparse.Namespace, store: ControllerStore, token: str) -> int:
    if args.remote_command == "enrol":
        invite = InviteLink.parse(args.link) if args.link else None
        hub = args.hub or (invite.hub_url if invite else None)
        if not hub:
            return fail("no hub given: pass --hub https://HOST or set COWORK_HUB_HTTP", 2)
        if invite is not None:
            link = PairingLink(invite.pairing_id, invite.tenant, hub, None, None)
            async with RemoteClient(store, link, token, keys=store.load_keys()) as client:
                shown = await client.enrol_with_invite(invite)
            print(f"Enrolled on pairing {invite.pairing_id} with the invite.")
            print(f"The Desktop's fingerprint: {shown['desktopFingerprint']}")
            return 0
        if not (args.tenant and args.pairing):
            return fail("pass an enrolment link, or --tenant and --pairing", 2)
        link = PairingLink(args.pairing, args.tenant, hub, None, None)
        async with RemoteClient(store, link, token, keys=store.load_keys()) as client:
            shown = await client.request_enrolment(args.expect_desktop)
        print("Asked. On the Desktop, compare and approve this controller's fingerprint:")
        print(f"  cowork desktop controllers add {shown['controllerFingerprint']}")
        print(f"The Desktop's fingerprint (compare it there): {shown['desktopFingerprint']}")
        return 0
    keys = store.load_keys()
    async with RemoteClient(store, store.link(args.pairing), token, keys=keys) as client:
        if args.remote_command == "send":
            view = await client.send(args.kind, args.session, args.payload, wait=args.wait)
            print(json.dumps(view, indent=2))
            return 0 if (view.get("result") or {}).get("ok") else 1
        if args.follow:
            async for item in client.follow(args.after):
                print(json.dumps(item), flush=True)
        else:
            for item in await client.events(args.after):
                print(json.dumps(item))
        sys.stdout.flush()
    return 0
