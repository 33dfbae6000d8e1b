"""`cowork channel enrol INSTANCE LINK`: enrol a chat channel instance as a controller
of its sealed Desktop (docs/sealed.md, "Channels").

The instance's keys are made here, enrolled on the Desktop with the one-time invite
it showed (the same `controller.enrol` as `cowork remote enrol LINK`, the Desktop key
taken from the link), then handed to the hub, which hosts the instance's router and
renderer and so signs the chat's commands and opens what the chat is shown. The hub
then holds this controller's keys and can act as it; nothing stays on this machine.
The Desktop owner removes it like any controller (`cowork desktop controllers remove`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path
from typing import Any

import httpx

from schemas import SealError

from ..common import InviteLink, fail, http_url
from ._client import RemoteClient, RemoteError, _error_text
from ._store import ControllerStore, PairingLink, RemoteStoreError


def add_channel_enrol_command(sub: Any) -> None:
    enrol = sub.add_parser(
        "enrol",
        help="enrol a channel instance as a controller of its sealed Desktop",
        description="Make controller keys for the instance, enrol them on the Desktop with "
        "the one-time link `cowork desktop controllers invite` printed there, and hand them "
        "to the hub that hosts the instance. The hub then holds them (it can act as this "
        "controller), and the chat platform sees the conversation.",
    )
    enrol.add_argument("instance", metavar="INSTANCE", help="the channel instance id")
    enrol.add_argument("link", metavar="LINK", help="the cowork+enrol:// link")
    enrol.add_argument(
        "--hub",
        type=http_url,
        default=os.environ.get("COWORK_HUB_HTTP"),
        help="hub HTTP URL (default: $COWORK_HUB_HTTP, else the link's)",
    )
    enrol.set_defaults(channel_handler=run_channel_enrol)


def run_channel_enrol(args: argparse.Namespace) -> int:
    token = os.environ.get("COWORK_ADMIN_TOKEN")
    if not token:
        return fail("set COWORK_ADMIN_TOKEN to a token the hub's API takes", 2)
    try:
        invite = InviteLink.parse(args.link)
    except SealError as exc:
        return fail(f"[controller.bad_link] {exc}", 2)
    hub = args.hub or invite.hub_url
    if not hub:
        return fail("no hub given: pass --hub https://HOST or set COWORK_HUB_HTTP", 2)
    try:
        view = asyncio.run(enrol_channel(hub, token, args.instance, invite))
    except (RemoteStoreError, RemoteError) as exc:
        return fail(f"[{getattr(exc, 'code', 'remote.state')}] {exc}")
    except (OSError, httpx.HTTPError) as exc:
        return fail(f"cannot reach the hub: {exc}")
    print(
        f"Channel instance {args.instance} is enrolled on pairing {invite.pairing_id} as "
        f"controller {view['controllerId']} (fingerprint {view['fingerprint']})."
    )
    print(f"The Desktop's fingerprint: {invite.desktop_fingerprint}")
    print("The hub holds this controller's keys; the chat platform sees the conversation.")
    return 0


async def enrol_channel(hub: str, token: str, instance: str, invite: InviteLink) -> dict:
    """Enrol fresh keys for `instance` with `invite`, then store them on the hub."""
    with tempfile.TemporaryDirectory(prefix="cowork-channel-enrol-") as directory:
        store = ControllerStore(Path(directory))
        try:
            keys = store.create_keys(f"channel {instance}")
            link = PairingLink(invite.pairing_id, invite.tenant, hub, None, None)
            async with RemoteClient(store, link, token, keys=keys) as client:
                await client.enrol_with_invite(invite)
        finally:
            store.close()
    body = {
        "pairingId": invite.pairing_id,
        "keys": keys.to_json(),
        "desktopKey": invite.desktop_key,
        "nextSequence": 1,
    }
    url = (
        f"{hub.rstrip('/')}/api/v1/tenants/{invite.tenant}/channel-instances/{instance}/controller"
    )
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
        response = await http.put(url, json=body, timeout=30)
    if response.status_code != 200:
        raise RemoteError(
            f"hub.{response.status_code}",
            f"{_error_text(response)} (the Desktop enrolled the keys: remove controller "
            f"{keys.controller_id} there with `cowork desktop controllers remove`)",
        )
    return dict(response.json())
