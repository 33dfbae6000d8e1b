"""CPU per relayed event on each side, in-process, without NATS or PostgreSQL: the
part of the relay bench's CPU (tests/bench/test_bench_desktop.py, section 2 of
docs/performance.md) that is this project's own Python, measured steadily enough
to compare two versions of the code on a busy machine (the bench's end-to-end
numbers swing with the machine's load).

    .venv/bin/python tests/bench/relay_cpu.py

- Desktop: `EventRelay.relay()` of the bench's `message.part.delta` events (each
  with its own part id), 100 per event-loop turn, and the per-turn outbox write
  (SQLite, a temporary directory), on a hub-trust pairing with its sealed.json
  check; the best of 5 rounds of 4,000 events.
- Hub: per event of a batch of 250, what the projector does in Python besides
  NATS and PostgreSQL: subject parse, envelope decode, the pairing's checks, the
  NewEvent, its payload's jsonb encoding and its live JSON; the best of 30 rounds.

Prints the process time per event (time.process_time) and the 1-minute load. To
compare with another version, check its `schemas edges hub` out over this tree's
(`git checkout <commit> -- schemas edges hub`), run, and check HEAD's back out.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from nats.aio.msg import Msg
from pydantic_core import to_json

sys.path.insert(0, str(Path(__file__).parent))
from relay_load import delta_event  # noqa: E402

from edges.desktop._relay import EventRelay  # noqa: E402
from edges.desktop._sealed import SealedGuard, sealing_key  # noqa: E402
from edges.desktop._store import DesktopStore, PairingFile  # noqa: E402
from hub.core import db  # noqa: E402
from hub.workspaces import _projection  # noqa: E402
from schemas import (  # noqa: E402
    DeviceEvent,
    DeviceEventType,
    EnvelopeTemplate,
    ExecutionAuthority,
    PairingState,
    PrincipalKind,
    Source,
    new_id,
    subjects,
)

SESSION = "ses_benchrelay0000000001"


def _payload_jsonb(payload: dict | None) -> bytes:
    """The payload's jsonb bytes as the projector's statement sends them (pre-encoded
    by pydantic-core since JsonbText; json.dumps in the codec before, so that the
    script also measures the code before it)."""
    if hasattr(db, "JsonbText"):
        return db._jsonb(db.JsonbText(to_json(payload)))
    return b"\x01" + json.dumps(payload).encode()


async def desktop() -> float:
    store = DesktopStore(Path(tempfile.mkdtemp()) / "desk")
    store.save_pairing(PairingFile("acme", "pairing-1", "desk", ["nats://x"], "desk", "now"))
    sealing_key(store)
    state = PairingState(
        pairing_id="pairing-1", revision=1, enabled=True, allowed_workspace_ids=["local"]
    )
    guard = SealedGuard(store, "acme", "pairing-1")
    relay = EventRelay(store, store.load_pairing(), None, lambda: state, guard=guard)  # type: ignore[arg-type]
    best = float("inf")
    for round_ in range(5):
        c0 = time.process_time()
        for start in range(0, 4000, 100):
            for i in range(start, start + 100):
                relay.relay(delta_event(SESSION, round_ * 4000 + i))
            await asyncio.sleep(0)
        relay.persist()
        best = min(best, (time.process_time() - c0) / 4000)
        store.outbox_remove_through(2**62)
    return best


def hub() -> float:
    source = Source(
        principal_kind=PrincipalKind.DESKTOP,
        principal_id="pairing-1",
        authority=ExecutionAuthority.DESKTOP_LOCAL,
    )
    template = EnvelopeTemplate(DeviceEvent, source=source, tenant="acme")
    subject = subjects.DEVICE_EVENT.build(
        tenant="acme", device_id="pairing-1", event_kind="session"
    )
    msgs = [
        Msg(
            _client=None,  # type: ignore[arg-type]
            subject=subject,
            data=template.encode(
                DeviceEvent(
                    id=new_id(),
                    pairing_id="pairing-1",
                    type=DeviceEventType.SESSION_EVENT,
                    workspace_id="local",
                    session_id=SESSION,
                    occurred_at=datetime.now(UTC),
                    payload=delta_event(SESSION, i),
                )
            ),
        )
        for i in range(250)
    ]
    projector = _projection.EventProjector.__new__(_projection.EventProjector)
    pairing = {
        "status": "active",
        "enabled": True,
        "allowed_workspace_ids": ["local"],
        "allowed_session_ids": None,
    }
    best = float("inf")
    for _ in range(30):
        c0 = time.process_time()
        for msg in msgs:
            tenant, env = projector._parse(msg)
            projector._check_allowed(pairing, env.data)
            new = _projection._new_event(tenant, env)
            _payload_jsonb(new.payload)
            new.live_json(7)
        best = min(best, (time.process_time() - c0) / len(msgs))
    return best


def main() -> None:
    d = asyncio.run(desktop())
    h = hub()
    load = os.getloadavg()[0]
    print(f"Desktop relay() + outbox write: {d * 1e6:.1f} us CPU per event")
    print(f"hub projector's per-event Python: {h * 1e6:.1f} us CPU per event")
    print(f"1-minute load {load:.2f} ({load / (os.cpu_count() or 1):.2f} per CPU)")


if __name__ == "__main__":
    main()
