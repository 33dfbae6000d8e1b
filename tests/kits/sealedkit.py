"""Helpers for sealed pairings: a controller enrolled on a running Desktop (asked
through the hub, approved locally as a person would), and the Desktop sealed."""

from __future__ import annotations

from pathlib import Path

from desktopkit import TENANT, RunningDesktop

from edges.desktop._sealed import enrol, set_trust
from edges.desktop._store import DesktopStore
from edges.remote import ControllerStore, PairingLink, RemoteClient


async def enrolled_controller(
    hub, desktop: RunningDesktop, state_dir: Path, label: str = "test controller"
) -> RemoteClient:
    """A controller with fresh keys in `state_dir`, enrolled on `desktop`: the
    request goes through the hub, the approval is local (the Desktop's files)."""
    store = ControllerStore(state_dir)
    keys = store.create_keys(label)
    link = PairingLink(desktop.pairing_id, TENANT, hub.http_url, None, None)
    client = RemoteClient(store, link, hub.test_admin_token, keys=keys)
    desktop_store = desktop.agent.store
    expected = desktop.agent.guard.key.fingerprint
    shown = await client.request_enrolment(expect_desktop=expected)
    enrol(DesktopStore(desktop_store.directory), shown["controllerFingerprint"])
    return client


def seal(desktop: RunningDesktop) -> None:
    set_trust(DesktopStore(desktop.agent.store.directory), "sealed")
