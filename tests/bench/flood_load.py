"""The flood side of tests/bench/test_bench_floods.py, run as its own process.

The flood must not share the measured hub's event loop (nor its GIL), so the
benchmark starts this file with `python tests/bench/flood_load.py`, hands it a
JSON spec on stdin, reads one `ready` line once it is connected and has built its
messages, then one JSON result line when it is done.

Three modes (`mode` in the spec, camelCase JSON):

- `poison`: a paired Desktop's own credential (`url`, `creds`, `inbox`, `tenant`,
  `pairingId`, `workspace`) publishes `count` contract-valid session events whose
  payload holds a NUL character (which PostgreSQL cannot store), ids
  `<idPrefix><n>`, as fast as JetStream acks them (batches of 1000 async publishes,
  as the Desktop's outbox drain does). Result: published, seconds, rate.
- `events`: the same with honest text events; with `desktops` (a list of
  objects with the per-Desktop keys above), for each of them at once, one
  connection each (tests/bench/test_bench_replicas.py): once every event is
  built and every connection open it says `ready`, then waits for a `go` line
  on stdin, so several load processes start publishing together. The result
  then also says the CPU seconds this process used from `go` to the end
  (`cpuSeconds`).
- `redeem`: the public bootstrap identity (`url`) sends pairing-code redemptions
  with wrong codes to `cw.bootstrap.pairing.redeem` for `seconds`, keeping
  `window` requests in flight on one connection. Every answer is classified by
  its text: refused in memory (rate or in-flight gate), refused from PostgreSQL
  (the source's lockout), an invalid code (a redemption attempted in
  PostgreSQL), other. Result: sent, answered, per-class counts, lost, rate.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from datetime import UTC, datetime

import nats

from edges.common._bootstrap import bootstrap_options
from edges.common._credentials import EdgeCredentials, new_user_seed
from hub.desktop._pairing import new_code
from schemas import (
    DeviceEvent,
    Envelope,
    PairingRedeemRequest,
    PrincipalKind,
    ReplyKey,
    Source,
    subjects,
)

# Reply text -> class (see hub/bus/_bootstrap_limits.py and hub/desktop/_bootstrap.py).
CLASSES = (
    (b"slow down", "memory_rate"),
    (b"in flight", "memory_pending"),
    (b"too many failed", "db_lockout"),
    (b"pairing.invalid_code", "db_invalid_code"),
)


def device_event(
    tenant: str, pairing_id: str, event_id: str, payload: dict, workspace: str
) -> bytes:
    """A Desktop's session event as its relay sends it (envelope from the Desktop)."""
    event = DeviceEvent(
        id=event_id,
        pairing_id=pairing_id,
        type="session.event",
        workspace_id=workspace,
        session_id="ses1",
        occurred_at=datetime.now(UTC),
        payload=payload,
    )
    source = Source(principal_kind=PrincipalKind.DESKTOP, principal_id=pairing_id)
    return Envelope.wrap(event, source=source, tenant=tenant).encode()


async def poison(spec: dict) -> dict:
    return await publish_events(
        spec, lambda n: {"type": "tool", "output": f"binary\u0000output {n}"}
    )


async def events(spec: dict) -> dict:
    def text(n: int) -> dict:
        return {"type": "text", "text": f"event {n}"}

    if "desktops" not in spec:
        return await publish_events(spec, text)
    ready = asyncio.Event()
    desktops = [{**spec, **desktop} for desktop in spec["desktops"]]
    connected: list[asyncio.Event] = [asyncio.Event() for _ in desktops]

    async def one(i: int, desktop: dict) -> dict:
        return await publish_events(desktop, text, connected[i], ready)

    runs = [asyncio.create_task(one(i, d)) for i, d in enumerate(desktops)]
    await asyncio.gather(*(c.wait() for c in connected))
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    cpu, started = time.process_time(), time.perf_counter()
    ready.set()
    results = await asyncio.gather(*runs)
    seconds = time.perf_counter() - started
    published = sum(r["published"] for r in results)
    return {
        "published": published,
        "seconds": seconds,
        "rate": published / seconds,
        "cpuSeconds": time.process_time() - cpu,
    }


async def publish_events(
    spec: dict,
    payload,
    connected: asyncio.Event | None = None,
    go: asyncio.Event | None = None,
) -> dict:
    """One Desktop's events; alone it says `ready` itself, with `connected` and `go`
    it sets the one and waits for the other instead."""
    tenant, pid, count = spec["tenant"], spec["pairingId"], int(spec["count"])
    subject = subjects.DEVICE_EVENT.build(tenant=tenant, device_id=pid, event_kind="session")
    bodies = [
        device_event(tenant, pid, f"{spec['idPrefix']}{n}", payload(n), spec["workspace"])
        for n in range(count)
    ]
    nc = await nats.connect(spec["url"], user_credentials=spec["creds"], inbox_prefix=spec["inbox"])
    js = nc.jetstream(timeout=30)
    if connected is None or go is None:
        print("ready", flush=True)
    else:
        connected.set()
        await go.wait()
    started = time.perf_counter()
    for at in range(0, count, 1000):
        futures = [await js.publish_async(subject, body) for body in bodies[at : at + 1000]]
        await asyncio.gather(*futures)
    seconds = time.perf_counter() - started
    await nc.close()
    return {"published": count, "seconds": seconds, "rate": count / seconds}


async def redeem(spec: dict) -> dict:
    window, duration = int(spec["window"]), float(spec["seconds"])
    source = Source(principal_kind=PrincipalKind.DESKTOP, principal_id="unpaired")
    bodies = [
        Envelope.wrap(
            PairingRedeemRequest(
                code=new_code(),  # wrong: no pairing has it
                public_key=EdgeCredentials("", new_user_seed()).public_key,
                reply_key=ReplyKey().public,
                device_name="flood",
                client_version="flood",
            ),
            source=source,
        ).encode()
        for _ in range(256)
    ]
    nc = await nats.connect(
        spec["url"], name="bench-bootstrap-flood", allow_reconnect=False, **bootstrap_options()
    )
    subject = subjects.PAIRING_REDEEM.build()
    prefix = nc.new_inbox()
    outstanding: dict[str, float] = {}
    classes: Counter[str] = Counter()
    other: list[str] = []
    space = asyncio.Event()

    async def on_reply(msg) -> None:
        if outstanding.pop(msg.subject.rsplit(".", 1)[1], None) is None:
            classes["late"] += 1
            return
        for needle, name in CLASSES:
            if needle in msg.data:
                classes[name] += 1
                break
        else:
            classes["other"] += 1
            if len(other) < 3:
                other.append(msg.data[:300].decode(errors="replace"))
        if len(outstanding) < window // 2:
            space.set()

    await nc.subscribe(prefix + ".*", cb=on_reply, pending_msgs_limit=1_000_000)
    await nc.flush()
    print("ready", flush=True)
    sent, lost, error = 0, 0, None
    started = time.perf_counter()
    deadline = started + duration
    try:
        while time.perf_counter() < deadline:
            while len(outstanding) < window:
                rid = str(sent)
                outstanding[rid] = time.perf_counter()
                await nc.publish(subject, bodies[sent % len(bodies)], reply=f"{prefix}.{rid}")
                sent += 1
            space.clear()
            if len(outstanding) < window // 2:
                continue
            try:
                await asyncio.wait_for(space.wait(), 1.0)
            except TimeoutError:  # answers went missing: forget those older than 2 s
                now = time.perf_counter()
                for rid in [r for r, t in outstanding.items() if now - t > 2.0]:
                    del outstanding[rid]
                    lost += 1
        stopped = time.perf_counter()
        end = time.monotonic() + 5.0
        while outstanding and time.monotonic() < end:
            await asyncio.sleep(0.05)
    except Exception as exc:  # the hub or the connection guard cut us off: say so
        stopped, error = time.perf_counter(), f"{type(exc).__name__}: {exc}"
    lost += len(outstanding)
    await nc.close()
    seconds = stopped - started
    answered = sum(n for name, n in classes.items() if name != "late")
    return {
        "sent": sent,
        "answered": answered,
        "lost": lost,
        "classes": dict(classes),
        "other": other,
        "seconds": seconds,
        "sentRate": sent / seconds,
        "answeredRate": answered / seconds,
        "error": error,
    }


def main() -> None:
    spec = json.loads(sys.stdin.readline())
    mode = {"poison": poison, "events": events, "redeem": redeem}[spec["mode"]]
    print(json.dumps(asyncio.run(mode(spec))), flush=True)


if __name__ == "__main__":
    main()
