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
- `stop`: answers {stopped} and ends.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    spec = json.loads(await reader.readline())

    def answer(body: dict) -> None:
        sys.stdout.write(json.dumps(body) + "\n")
        sys.stdout.flush()

    headers = {"Authorization": f"Bearer {spec['token']}"}
    async with httpx.AsyncClient(base_url=spec["url"], headers=headers, timeout=30) as http:
        answer({"ready": True})
        while line := (await reader.readline()).decode().strip():
            if line == "stop":
                break
            n = int(json.loads(line)["n"])
            spans, cpu = [], time.process_time()
            for _ in range(n):
                t0 = time.perf_counter()
                r = await http.post(spec["path"], params={"wait": 20}, json={"kind": "status"})
                view = r.json()
                t1 = time.perf_counter()
                if r.status_code != 201 or view.get("state") != "done":
                    answer({"error": f"{r.status_code}: {r.text[:500]}"})
                    break
                spans.append([view["commandId"], t0, t1, view.get("status")])
            else:
                answer({"spans": spans, "cpuSeconds": time.process_time() - cpu})
    answer({"stopped": True})


if __name__ == "__main__":
    asyncio.run(main())
