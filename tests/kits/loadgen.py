"""An HTTP/1.1 keep-alive load generator, run as its own process.

It must not share the measured server's event loop (nor its GIL), so the
benchmark starts it with `python tests/kits/loadgen.py` and hands it a JSON spec on
stdin; it prints one JSON result line on stdout. Raw asyncio streams, not an
HTTP client library: httpx spends more CPU per request than the servers we
measure, which would make the client the bottleneck.

Spec (camelCase JSON):
  host, port, path, headers {name: value}, bodyTemplate (str), placeholder (str,
  every occurrence replaced by a unique integer per request), firstId (int),
  concurrency (connections, one request in flight each), warmupSeconds,
  durationSeconds, timeoutSeconds (per request).

Result: requests/ok/errors counted over the measured window only (completions
inside it), statuses {code: count}, rps, and latency percentiles in ms.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field


@dataclass
class Tally:
    measuring: bool = False
    stopping: bool = False
    ok: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


class Requests:
    """Builds request bytes with a fresh id each time (no per-request formatting of
    the fixed parts)."""

    def __init__(self, spec: dict) -> None:
        self.next_id = int(spec["firstId"])
        self.pieces = [p.encode() for p in spec["bodyTemplate"].split(spec["placeholder"])]
        headers = "".join(f"{k}: {v}\r\n" for k, v in spec["headers"].items())
        self.head = (
            f"POST {spec['path']} HTTP/1.1\r\nHost: {spec['host']}:{spec['port']}\r\n"
            f"Connection: keep-alive\r\n{headers}Content-Length: "
        ).encode()

    def build(self) -> bytes:
        uid = str(self.next_id).encode()
        self.next_id += 1
        body = uid.join(self.pieces)
        return b"".join((self.head, str(len(body)).encode(), b"\r\n\r\n", body))


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, server keeps the connection open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    keep = b"connection: close" not in lower
    at = lower.find(b"content-length:")
    if at >= 0:
        end = lower.index(b"\r\n", at)
        length = int(lower[at + 15 : end])
        if length:
            await reader.readexactly(length)
    elif b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        keep = False  # body delimited by close: read it all
        await reader.read()
    return status, keep


async def worker(spec: dict, requests: Requests, tally: Tally) -> None:
    host, port, timeout = spec["host"], int(spec["port"]), float(spec["timeoutSeconds"])
    reader = writer = None
    while not tally.stopping:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            data = requests.build()
            started = time.perf_counter()
            writer.write(data)
            status, keep = await asyncio.wait_for(read_response(reader), timeout)
            elapsed = time.perf_counter() - started
            if tally.measuring:
                tally.statuses[status] = tally.statuses.get(status, 0) + 1
                if status == 200:
                    tally.ok += 1
                    tally.latencies.append(elapsed)
                else:
                    tally.errors += 1
            if not keep:
                writer.close()
                reader = writer = None
        except (
            TimeoutError,
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ) as exc:
            if tally.measuring:
                tally.errors += 1
                name = type(exc).__name__
                tally.error_kinds[name] = tally.error_kinds.get(name, 0) + 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run(spec: dict) -> dict:
    tally, requests = Tally(), Requests(spec)
    tasks = [
        asyncio.create_task(worker(spec, requests, tally)) for _ in range(int(spec["concurrency"]))
    ]
    await asyncio.sleep(float(spec["warmupSeconds"]))
    tally.measuring = True
    started = time.perf_counter()
    await asyncio.sleep(float(spec["durationSeconds"]))
    tally.measuring = False
    seconds = time.perf_counter() - started
    tally.stopping = True
    await asyncio.wait(tasks, timeout=float(spec["timeoutSeconds"]) + 1)
    for task in tasks:
        task.cancel()
    lat = sorted(tally.latencies)
    ms = 1000.0
    return {
        "ok": tally.ok,
        "errors": tally.errors,
        "seconds": seconds,
        "rps": tally.ok / seconds,
        "statuses": {str(k): v for k, v in tally.statuses.items()},
        "errorKinds": tally.error_kinds,
        "lastId": requests.next_id - 1,
        "p50Ms": percentile(lat, 0.50) * ms,
        "p90Ms": percentile(lat, 0.90) * ms,
        "p99Ms": percentile(lat, 0.99) * ms,
        "maxMs": (lat[-1] * ms) if lat else float("nan"),
        "meanMs": (sum(lat) / len(lat) * ms) if lat else float("nan"),
    }


def main() -> None:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(asyncio.run(run(spec))), flush=True)


if __name__ == "__main__":
    main()
