"""HTTP read timeouts and bounded accept-error logs (issue 14, item 8).

A real hub (operator-mode NATS, PostgreSQL) with short read timeouts: clients
that send half a request head or half a body are disconnected within the
timeout while /healthz keeps answering. A flood of idle sockets past the
process's file limit writes a bounded number of log lines and the server
answers again once the timeouts free the descriptors.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from desktopkit import TENANT

pytestmark = pytest.mark.timeout(90)

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
SLACK = 1.5  # the event loop's timer rounding and a loaded 2-core machine


@pytest.fixture(scope="module")
def hub_options() -> dict:
    return {
        "http_header_timeout_seconds": HEADER_TIMEOUT,
        "http_body_timeout_seconds": BODY_TIMEOUT,
    }


async def _open(hub) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", hub.http_port)


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (reads to EOF); fails past `limit`."""
    started = time.monotonic()
    async with asyncio.timeout(limit):
        while await reader.read(65536):
            pass
    return time.monotonic() - started


async def _healthz_while(hub, seconds: float) -> list[float]:
    """Latencies of /healthz asked every 100 ms for `seconds` (each must answer 200)."""
    latencies = []
    async with httpx.AsyncClient(base_url=hub.http_url, timeout=2) as http:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.monotonic()
            response = await http.get("/healthz")
            assert response.status_code == 200
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.1)
    return latencies


async def test_half_sent_requests_are_cut_while_healthz_answers(hub):
    token = hub.test_admin_token
    half_heads, half_bodies = [], []
    for _ in range(20):  # a head without its blank line, and a head then a trickle
        reader, writer = await _open(hub)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: hub\r\nX-Slow: ")
        half_heads.append((reader, writer))
    for _ in range(20):  # a whole head, then 10 of 100 announced bytes
        reader, writer = await _open(hub)
        writer.write(
            f"POST /api/v1/tenants/{TENANT}/pairings HTTP/1.1\r\nHost: hub\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            'Content-Length: 100\r\n\r\n{"label":'.encode()
        )
        half_bodies.append((reader, writer))
    dripper_reader, dripper = await _open(hub)

    async def drip() -> None:  # a byte of head every 300 ms never extends the deadline
        for byte in b"GET /healthz HTTP/1.1\r\nHost: hub\r\n":
            if dripper.is_closing():
                return
            dripper.write(bytes([byte]))
            await asyncio.sleep(0.3)

    dripping = asyncio.create_task(drip())
    try:
        health = asyncio.create_task(_healthz_while(hub, HEADER_TIMEOUT + SLACK))
        heads = [_closed_after(r, HEADER_TIMEOUT + SLACK) for r, _ in half_heads]
        bodies = [_closed_after(r, BODY_TIMEOUT + SLACK) for r, _ in half_bodies]
        cut = await asyncio.gather(*heads, *bodies, _closed_after(dripper_reader, 3.0))
        latencies = await health
    finally:
        dripping.cancel()
        for _, writer in [*half_heads, *half_bodies, (None, dripper)]:
            writer.close()
    assert max(cut) < max(HEADER_TIMEOUT, BODY_TIMEOUT) + SLACK
    assert latencies and max(latencies) < 0.5, latencies
    # Nothing was half-created: the cut body never reached the handler's insert.
    async with httpx.AsyncClient(
        base_url=hub.http_url, headers={"Authorization": f"Bearer {token}"}, timeout=5
    ) as http:
        assert (await http.get("/readyz")).status_code == 200


async def test_a_slow_but_steady_request_within_the_timeouts_is_served(hub):
    """The cut is a deadline on receipt, not on the handler: a body that arrives in
    time is answered normally, and an idle keep-alive connection is reusable."""
    reader, writer = await _open(hub)
    try:
        body = b'{"label": "slow but fine"}'
        writer.write(
            f"POST /api/v1/tenants/{TENANT}/pairings HTTP/1.1\r\nHost: hub\r\n"
            f"Authorization: Bearer {hub.test_admin_token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        await asyncio.sleep(BODY_TIMEOUT / 2)
        writer.write(body)
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 201"), status
    finally:
        writer.close()


# --- a descriptor flood: bounded log lines, then the server answers again ----------------
_FLOODED_SERVER = textwrap.dedent(
    """
    import asyncio, logging, resource, sys
    from aiohttp import web
    from hub.core import configure_logging
    from hub.core import LogBudget
    from hub.http import HttpServer

    async def healthz(request):
        return web.json_response({"status": "ok"})

    async def main():
        configure_logging("info", "text")
        resource.setrlimit(resource.RLIMIT_NOFILE, (__NOFILE__, __NOFILE__))
        app = web.Application()
        app.router.add_get("/healthz", healthz)
        server = HttpServer(app, "127.0.0.1", 0, header_timeout=__TIMEOUT__, budget=LogBudget())
        port = await server.start()
        print(port, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_a_descriptor_flood_writes_bounded_logs_and_the_server_recovers(tmp_path: Path):
    nofile, idle_clients, header_timeout = 64, 400, 1.0
    script = tmp_path / "flooded.py"
    script.write_text(
        _FLOODED_SERVER.replace("__NOFILE__", str(nofile)).replace(
            "__TIMEOUT__", str(header_timeout)
        )
    )
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=Path(__file__).resolve().parents[3],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    sockets: list[asyncio.StreamWriter] = []
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)  # type: ignore[union-attr]
        port = int(line)
        started = time.monotonic()
        for _ in range(idle_clients):  # connect and say nothing: each holds a descriptor
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            sockets.append(writer)
        await asyncio.sleep(3.0)  # the flood: accept fails for as long as they are held
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.get(f"http://127.0.0.1:{port}/healthz")
        recovered = time.monotonic() - started
        assert response.status_code == 200
        flooded_for = time.monotonic() - started
    finally:
        for writer in sockets:
            writer.close()
        proc.terminate()
        proc.wait(10)
    lines = stderr.read_text().splitlines()
    accept_lines = [line for line in lines if "accept" in line.lower()]
    assert accept_lines, "the flood never hit the descriptor limit: raise idle_clients"
    assert not [line for line in lines if "Traceback" in line]
    # LogBudget: a burst of 5, then at most one a second (each counting what it dropped).
    assert len(accept_lines) <= 5 + flooded_for + 1, accept_lines
    assert any("suppressed" in line for line in accept_lines[1:]), accept_lines
    assert recovered < 30
