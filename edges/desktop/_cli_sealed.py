"""`cowork desktop controllers invite|add|list|remove` and `cowork desktop trust sealed|hub`.

Local only, by design: they change files in the state directory and nothing else,
with no network at all. The running agent picks the change up at its next command
or event. This is where a person consents to a controller, and where a pairing
becomes sealed or goes back to trusting the hub: the hub can do neither.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

import segno

from ..common import fail, http_url
from ._sealed import MAX_INVITE_TTL, create_invite, enrol, remove, set_trust, trust_summary
from ._store import DesktopStore, StoreError

_UNITS = {"s": 1, "m": 60, "h": 3600}


def ttl_seconds(text: str) -> float:
    """An invite's lifetime: `90s`, `10m`, `1h`, or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 10m or 1h")
    seconds = float(match[1]) * _UNITS[match[2] or "s"]
    if not 1 <= seconds <= MAX_INVITE_TTL:
        raise argparse.ArgumentTypeError("an invite lives from 1s to 24h")
    return seconds


def add_sealed_commands(sub: Any, state_dir: Any) -> dict[str, argparse.ArgumentParser]:
    c = sub.add_parser(
        "controllers",
        help="enrol, list and remove the controllers that may drive a sealed pairing",
        description="A controller (cowork remote, a web or phone client) asks to be enrolled "
        "through the hub; it shows a fingerprint. Compare it with the one listed here and "
        "approve it with `add`. Nothing the hub sends enrols a controller.",
    )
    ops = c.add_subparsers(dest="controllers_command", metavar="OPERATION", required=True)
    invite = ops.add_parser(
        "invite",
        help="make a one-time enrolment link (and QR code) for a controller",
        description="Prints a cowork+enrol:// link and its QR code. A controller that "
        "presents it (`cowork remote enrol LINK`) is enrolled at once, once, before it "
        "expires. The link holds a secret: show it only to the controller you mean. The "
        "hub relays the request but never sees the secret.",
    )
    invite.add_argument(
        "--ttl", type=ttl_seconds, default=600.0, help="how long it is valid (default: 10m)"
    )
    invite.add_argument(
        "--hub",
        type=http_url,
        default=os.environ.get("COWORK_HUB_HTTP"),
        help="the hub's HTTP URL to put in the link (env COWORK_HUB_HTTP)",
    )
    invite.add_argument("--no-qr", action="store_true", help="print the link only")
    add = ops.add_parser("add", help="approve a pending request by its fingerprint")
    add.add_argument("fingerprint", help="as the controller shows it, e.g. K7QD-2MXA-PL4F-9RTB")
    remove_parser = ops.add_parser(
        "remove", help="remove a controller: it cannot open what this Desktop sends from now on"
    )
    remove_parser.add_argument("controller", help="its id, fingerprint or label")
    listing = ops.add_parser("list", help="enrolled controllers and pending requests")
    listing.add_argument("--json", action="store_true", help="print JSON")
    for p in (invite, add, remove_parser, listing):
        state_dir(p)

    t = sub.add_parser(
        "trust",
        help="seal this pairing to its controllers, or let the hub drive it again",
        description="sealed: only signed commands of enrolled controllers run, and what "
        "this Desktop sends is encrypted to them. hub: today's behaviour (chat channels and "
        "Cloud renderers need it). Only this machine can switch.",
    )
    t.add_argument("mode", choices=("sealed", "hub"))
    state_dir(t)
    return {"controllers": c, "trust": t}


def run_controllers(args: argparse.Namespace, store: DesktopStore) -> int:
    try:
        if args.controllers_command == "invite":
            link = create_invite(store, args.ttl, args.hub)
            text = link.to_text()
            print(f"One-time enrolment link, valid for {args.ttl:g} s (it holds a secret):")
            print(text)
            if not args.no_qr:
                segno.make(text, error="l").terminal(out=sys.stdout, compact=True)
            print(f"On the controller: cowork remote enrol '{text}'")
            print(f"This Desktop's fingerprint: {link.desktop_fingerprint}")
            return 0
        if args.controllers_command == "add":
            controller = enrol(store, args.fingerprint)
            print(f"Enrolled {controller.label!r} as {controller.controller_id}.")
            print(f"This Desktop's fingerprint: {trust_summary(store)['desktopFingerprint']}")
            return 0
        if args.controllers_command == "remove":
            removed = remove(store, args.controller)
            print(f"Removed {removed}: what this Desktop sends from now on is sealed without it.")
            return 0
    except KeyError as exc:
        return fail(str(exc.args[0]))
    except (ValueError, StoreError) as exc:
        return fail(str(exc))
    summary = trust_summary(store)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"trust: {summary['trust']}   Desktop fingerprint: {summary['desktopFingerprint']}")
    for item in summary["controllers"]:
        print(f"enrolled  {item['fingerprint']}  {item['id']}  {item['label']!r}")
    for item in summary["pending"]:
        print(f"pending   {item['fingerprint']}  {item['label']!r}  since {item['requestedAt']}")
    for item in summary["invites"]:
        print(f"invite    {item['id']}  {item['state']}  until {item['expiresAt']}")
    return 0


def run_trust(args: argparse.Namespace, store: DesktopStore) -> int:
    trust = set_trust(store, args.mode)
    if args.mode == "sealed" and not trust.controllers:
        print("Sealed, with no controller enrolled yet: nothing can drive this Desktop remotely.")
    else:
        print(f"This pairing now trusts: {args.mode}.")
    return 0
