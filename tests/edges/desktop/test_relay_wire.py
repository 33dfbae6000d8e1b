"""The relay's hot path without its models: the event bytes it builds by hand are the
model's, and the sealed marker, stat'ed once per event-loop turn, still seals every
event that reaches the relay after another process sealed the pairing."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime

import pytest
from desktopkit import TENANT

from edges.desktop._relay import device_event_json
from edges.desktop._sealed import SealedGuard, set_trust
from edges.desktop._store import DesktopStore, PairingFile
from schemas import DeviceEvent, DeviceEventType

PAYLOADS = [
    None,
    {},
    {
        "type": "message.part.delta",
        "properties": {"sessionID": "ses_1", "delta": "héllo \u2028 \U0001f600", "n": 2**70},
    },
    {"a": None, "b": {"c": None, "d": [None, 1.5, -0.0, True, "x"]}, "e": [{"f": None}]},
    {"sealed": {"v": 1, "ct": "AAAA"}},
    {"nan": float("nan"), "inf": [float("inf"), float("-inf")], "big": 1e300},
]


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize(
    ("kind", "workspace", "session", "command"),
    [
        (DeviceEventType.SESSION_EVENT, "local", "ses_abc-1", None),
        (DeviceEventType.STATUS, None, None, None),
        (DeviceEventType.COMMAND_COMPLETED, "local", "ses_abc", "cmd_0123"),
    ],
)
def test_event_json_is_the_models_bytes(kind, workspace, session, command, payload):
    at = datetime(2026, 12, 7, 2, 40, 1, 123456, tzinfo=UTC)
    made = device_event_json("evt01", "pairing-1", kind, workspace, session, command, at, payload)
    model = DeviceEvent(
        id="evt01",
        pairing_id="pairing-1",
        type=kind,
        workspace_id=workspace,
        session_id=session,
        command_id=command,
        occurred_at=at,
        payload=payload,
    )
    assert made == model.model_dump_json(by_alias=True, exclude_none=True).encode()
    assert DeviceEvent.model_validate_json(made).model_dump_json() == model.model_dump_json()


def _guard(tmp_path) -> tuple[SealedGuard, DesktopStore]:
    store = DesktopStore(tmp_path / "desk")
    store.save_pairing(
        PairingFile(TENANT, "pairing-1", "desk", ["nats://127.0.0.1:4222"], "desk", "now")
    )
    # Another process's view of the same state directory (the CLI that seals it).
    return SealedGuard(store, TENANT, "pairing-1"), DesktopStore(tmp_path / "desk")


async def test_an_event_after_another_process_sealed_is_sealed(tmp_path, monkeypatch):
    guard, cli = _guard(tmp_path)
    stats = 0
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        nonlocal stats
        stats += path == guard._trust_path
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    burst = [guard.seal_event(f"evt{i}", {"i": i}) for i in range(200)]
    assert burst == [{"i": i} for i in range(200)]
    assert stats == 1  # one stat for the whole turn's burst

    set_trust(cli, "sealed")
    await asyncio.sleep(0)  # the reader's next wake-up: a later turn
    after = guard.seal_event("evt-after", {"secret": "plain text"})
    assert set(after) == {"sealed"} and "plain text" not in str(after)
    assert stats == 2

    # A reading that sees the change within a turn (a command's check) applies at once.
    await asyncio.sleep(0)
    assert guard.seal_event("evt-a", {"i": 1}).keys() == {"sealed"}
    set_trust(cli, "hub")
    assert not guard.sealed  # what a command's check reads
    assert guard.seal_event("evt-b", {"i": 2}) == {"i": 2}


def test_without_an_event_loop_every_event_stats(tmp_path):
    guard, cli = _guard(tmp_path)
    assert guard.seal_event("evt1", {"i": 1}) == {"i": 1}
    set_trust(cli, "sealed")
    assert guard.seal_event("evt2", {"i": 2}).keys() == {"sealed"}
