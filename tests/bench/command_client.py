"""The HTTP client of the command round-trip bench (tests/bench/test_bench_desktop.py),
run as its own process.

The client is a load generator for the hub, like the Desktop
(tests/bench/command_desktop.py): it must not share the hub's event loop (nor its
GIL), or its own HTTP work would be counted as the hub's. The benchmark starts
this with `python tests/bench/command_client.py`, hands it a JSON spec on stdin
({url, token, path}: the hub's HTTP address, an admin bearer token and the
pairing's commands path) and talks to it in JSON lines:

- `{"n": N}`: send N `status` commands one after another, each `POST <path>?wait=20`
  and parsed; answer {"spans": [[command id, sent, answered], ...], "cpuSeconds"}:
  `time.perf_counter()` (CLOCK_MONOTONIC, one clock for every process on the
  machine, so the bench lines the spans up with the hub's and the Desktop's
  stages) when the request was sent and when its answer, `state: done`, was
  parsed, and this process's CPU for the whole run;
- `{"raw": N}`: N `GET /healthz` one after another on the same connection, the
  bare HTTP round trip of this client to the hub; answer {"samples": [seconds, ...],
  "cpuSeconds"};
- `stop`: answers {stopped} and ends.

The client is aiohttp's (C-accelerated parser, the hub's own HTTP library): until
2026-12-07 it was httpx, whose pure-Python HTTP/1.1 (h11) cost this process about
2.6 ms of CPU per command, on the path of every command, and the bench counted it
as the hub's overhead (docs/performance.md, "Fourth round").
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


async def commands(http: aiohttp.ClientSession, path: str, n: int) -> dict:
    spans, cpu = [], time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        async with http.post(path, params={"wait": "20"}, json={"kind": "status"}) as r:
            view = await r.json()
            t1 = time.perf_counter()
            if r.status != 201 or view.get("state") != "done":
                return {"error": f"{r.status}: {json.dumps(view)[:500]}"}
        spans.append([view["commandId"], t0, t1, view.get("status")])
    return {"spans": spans, "cpuSeconds": time.process_time() - cpu}


async def raw(http: aiohttp.ClientSession, n: int) -> dict:
    samples, cpu = [], time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        async with http.get("/healthz") as r:
            await r.read()
            if r.status != 200:
                return {"error": f"/healthz answered {r.status}"}
        samples.append(time.perf_counter() - t0)
    return {"samples": samples, "cpuSeconds": time.process_time() - cpu}


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())

    def answer(body: dict) -> None:
        sys.stdout.write(json.dumps(body) + "\n")
        sys.stdout.flush()

    headers = {"Authorization": f"Bearer {spec['token']}"}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(spec["url"], headers=headers, timeout=timeout) as http:
        answer({"ready": True})
        while line := (await reader.readline()).decode().strip():
            if line == "stop":
                break
            asked = json.loads(line)
            if "raw" in asked:
                answer(await raw(http, int(asked["raw"])))
            else:
                answer(await commands(http, spec["path"], int(asked["n"])))
    answer({"stopped": True})


if __name__ == "__main__":
    asyncio.run(main())
