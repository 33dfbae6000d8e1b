"""How edges dial the hub's NATS and come back after a restart (edges/common/_reconnect.py).

A real nats-server is restarted under a herd of connections made by the edges'
own `dial`: every one comes back, and not all in the same instant. The connect
timeout grows with failures in a row, the first connect is one attempt (not
nats-py's own loop), and the COWORK_EDGE_* settings are read and checked.
"""

from __future__ import annotations

import asyncio
import json
import time

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from edges.common import EdgeCredentials, ReconnectPolicy, dial, new_user_seed
from edges.local import NatsServer, free_port
from hub.auth import _jwt
from hub.core import flushed

pytestmark = pytest.mark.timeout(60)

HERD = 40


def _busiest(times: list[float], window: float = 0.1) -> int:
    """The most of `times` that fall in any one `window` of seconds."""
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t - start < window) for i, start in enumerate(times))


class Doorman:
    """Stands on the server's port while nats-server is away: greets every client as
    a NATS server would, notes who dialled when (the name in its CONNECT), and hangs
    up, so each attempt fails and is counted."""

    def __init__(self) -> None:
        self.attempts: dict[str, list[float]] = {}
        self.server: asyncio.Server | None = None

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._greet, "127.0.0.1", port)

    async def _greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "doorman", "version": "2.11.0", "proto": 1, "max_payload": 1 << 20}
        writer.write(f"INFO {json.dumps(info)}\r\n".encode())
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            if line.startswith(b"CONNECT "):
                name = json.loads(line[8:]).get("name", "?")
                self.attempts.setdefault(name, []).append(time.monotonic())
        except (TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def firsts(self, prefix: str) -> list[float]:
        return [times[0] for name, times in self.attempts.items() if name.startswith(prefix)]

    def count(self, prefix: str) -> int:
        return sum(len(t) for name, t in self.attempts.items() if name.startswith(prefix))


async def test_a_herd_of_edges_comes_back_after_a_restart_spread_out(tmp_path):
    """nats-server goes away under 40 edges for 3 s: their attempts meanwhile are
    spread out (nats-py's own schedule sends them all in the same instant, every
    0.5 s: measured alongside, printed), and every edge is back once it returns."""
    port = free_port()
    server = NatsServer(store_dir=tmp_path / "nats", port=port)
    await server.start()
    policy = ReconnectPolicy(wait=2.0, max_wait=4.0, connect_timeout=2.0)
    back: list[float] = []
    edges: list[NATS] = []
    plain: list[NATS] = []
    doorman = Doorman()

    async def quiet(_: Exception) -> None:
        pass

    async def reconnected() -> None:
        back.append(time.monotonic())

    try:
        for i in range(HERD):
            edges.append(
                await dial(
                    [server.url],
                    policy,
                    name=f"edge-{i}",
                    error_cb=quiet,
                    reconnected_cb=reconnected,
                )
            )
            if i % 4:
                continue
            plain.append(  # nats-py's own schedule, for the report (a quarter as many)
                await nats.connect(
                    server.url,
                    name=f"plain-{i}",
                    reconnect_time_wait=0.5,  # (what the edges used before)
                    max_reconnect_attempts=-1,
                    error_cb=quiet,
                )
            )
        await server.stop()
        await doorman.start(port)
        await asyncio.sleep(3.0)
        await doorman.stop()
        await server.start()
        restarted = time.monotonic()
        deadline = restarted + 20
        while len(back) < HERD and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(back) == HERD, f"{len(back)} of {HERD} edges came back in 20 s"
        # Connected for real: a message from every one of them.
        got: list[bytes] = []

        async def note(msg: Msg) -> None:
            got.append(msg.data)

        sub = await edges[0].subscribe("herd.check", cb=note)
        # The other edges publish next: the SUB must be at the server first (nats-py's
        # flush() may PING ahead of it; hub.core._flush).
        await flushed(edges[0])
        for i, nc in enumerate(edges):
            await nc.publish("herd.check", str(i).encode())
            await nc.flush(timeout=5)
        while len(got) < HERD and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert sorted(got) == sorted(str(i).encode() for i in range(HERD))
        await sub.unsubscribe()
        firsts, plain_firsts = doorman.firsts("edge-"), doorman.firsts("plain-")
        busiest = _busiest(firsts)
        print(
            f"\n{HERD} edges: first attempts spread over {max(firsts) - min(firsts):.2f} s, "
            f"at most {busiest} in any 100 ms, {doorman.count('edge-')} attempts in 3 s, "
            f"all back {max(back) - restarted:.2f} s after the restart; {len(plain)} on nats-py's own "
            f"schedule: {max(plain_firsts) - min(plain_firsts):.2f} s, at most "
            f"{_busiest(plain_firsts)} in any 100 ms, {doorman.count('plain-')} attempts"
        )
        assert len(firsts) == HERD, "every edge tried while the server was away"
        assert busiest <= HERD // 2, f"{busiest} of {HERD} edges tried in one 100 ms"
        assert max(firsts) - min(firsts) >= 0.5
    finally:
        for nc in edges + plain:
            await nc.close()
        await server.stop()


async def test_the_first_connect_is_one_attempt_whose_timeout_grows_with_failures():
    """A server that accepts and never greets: each attempt gives up after its own
    timeout, which doubles with the failures before it, up to the ceiling."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    url = f"nats://127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    policy = ReconnectPolicy(connect_timeout=0.2, max_connect_timeout=0.8)
    try:
        for failures, timeout in ((0, 0.2), (1, 0.4), (4, 0.8)):
            started = time.monotonic()
            with pytest.raises((asyncio.TimeoutError, nats.errors.Error, OSError)):
                await dial([url], policy, failures=failures)
            took = time.monotonic() - started
            assert timeout * 0.9 <= took < timeout + 1.5, (failures, took)
        # Nobody listening: refused at once, not retried on nats-py's own schedule,
        # and a failed attempt is not a closed connection (a Gateway would start over).
        closed: list[bool] = []

        async def on_closed() -> None:
            closed.append(True)

        started = time.monotonic()
        with pytest.raises((nats.errors.Error, OSError)):
            await dial([f"nats://127.0.0.1:{free_port()}"], policy, closed_cb=on_closed)
        assert time.monotonic() - started < 1.5
        with pytest.raises((asyncio.TimeoutError, nats.errors.Error, OSError)):
            await dial([url], policy, closed_cb=on_closed, disconnected_cb=on_closed)
        await asyncio.sleep(0.1)
        assert closed == [], "no close callback for an attempt that failed"
    finally:
        silent.close()
        await silent.wait_closed()


@pytest.mark.timeout(180)
async def test_hundreds_of_edges_started_at_once_in_one_process_each_connect_at_the_first_try(
    operator_nats_url, bus_keys
):
    """A process that starts hundreds of edges at once (a fleet host; the fleet
    benchmark's load processes, 2,750 each). nats-server gives a client 2 s from its
    greeting to authenticate, then hangs up. With every attempt in flight at once,
    each one's CONNECT waited behind all the others' work on the one event loop,
    came too late, and was reset: 23 attempts per edge, 10 minutes for 2,200 edges
    on a loaded machine (docs/performance.md, "Fleet"). Here each CONNECT's signing
    costs 10 ms of the loop (standing for the rest of a busy process's work: 300
    of them are 3 s, over the server's 2 s); `at_once` at a time, every edge is
    connected by its first attempt."""
    options = _busy_signer(bus_keys, "herd")

    failed: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        failed.append(exc)

    policy = ReconnectPolicy(at_once=4)
    edges = await asyncio.gather(
        *(
            dial(
                [operator_nats_url],
                policy,
                name=f"herd-{i}",
                error_cb=on_error,
                **options,
            )
            for i in range(300)
        ),
        return_exceptions=True,
    )
    try:
        refused = [e for e in edges if not isinstance(e, NATS)]
        assert not refused and not failed, (
            f"{len(refused)} of 300 edges not connected by their first attempt; "
            f"{len(failed)} attempts failed: {sorted({repr(e)[:80] for e in failed})[:3]}"
        )
    finally:
        for nc in edges:
            if isinstance(nc, NATS):
                await nc.close()


def _busy_signer(bus_keys, name: str):
    """connect options of one user whose CONNECT signing costs 10 ms of the loop
    (standing for the rest of a busy process's work)."""
    seed = new_user_seed()
    token, _ = bus_keys.mint_user(
        _jwt.public_key(seed),
        name=name,
        pub_allow=["_INBOX.>"],
        sub_allow=["_INBOX.>"],
        ttl_seconds=600,
    )
    options = EdgeCredentials(token, seed).connect_options()
    sign = options["signature_cb"]

    def busy_sign(nonce: str) -> bytes:
        until = time.perf_counter() + 0.010
        while time.perf_counter() < until:
            pass
        return sign(nonce)

    return {"user_jwt_cb": options["user_jwt_cb"], "signature_cb": busy_sign}


async def test_hundreds_of_edges_in_one_process_come_back_after_a_restart_each_at_its_first_try(
    tmp_path, bus_keys
):
    """The same crowd after a nats-server restart (the fleet benchmark's: 2,750
    agents a process, not one back in 120 s). nats-py reconnects on its own, and
    every edge's first attempt after the drop falls in the same half second; with
    each CONNECT's signing costing 10 ms, 300 of them are 3 s of the loop, over the
    server's 2 s to authenticate, so they were reset and tried again, and again.
    The reconnects take the same turns as first connects: every edge is back, and no
    attempt made after the server was up again failed."""
    port = free_port()
    server = NatsServer(
        store_dir=tmp_path / "nats",
        port=port,
        extra_config=bus_keys.server_config(tmp_path / "resolver"),
    )
    await server.start()
    back: list[float] = []
    failed: list[tuple[float, Exception]] = []

    async def on_error(exc: Exception) -> None:
        failed.append((time.monotonic(), exc))

    async def reconnected() -> None:
        back.append(time.monotonic())

    policy = ReconnectPolicy(at_once=4)
    options = _busy_signer(bus_keys, "crowd")
    edges: list[NATS] = []
    try:
        edges = list(
            await asyncio.gather(
                *(
                    dial(
                        [server.url],
                        policy,
                        name=f"crowd-{i}",
                        error_cb=on_error,
                        reconnected_cb=reconnected,
                        **options,
                    )
                    for i in range(300)
                )
            )
        )
        assert not failed, f"first connects failed: {failed[:3]}"
        await server.stop()
        await server.start()
        up = time.monotonic()
        deadline = up + 40
        while len(back) < 300 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        late = [e for at, e in failed if at > up and not isinstance(e, ConnectionRefusedError)]
        print(
            f"\n300 edges (10 ms a CONNECT, 4 at a time): all back {max(back, default=up) - up:.1f} s"
            f" after the restart, {len(failed)} failed attempts ({len(late)} after it was up)"
        )
        assert len(back) == 300, f"{len(back)} of 300 edges back 40 s after the restart"
        assert not late, (
            f"{len(late)} attempts failed after the server was up: "
            f"{sorted({repr(e)[:80] for e in late})[:3]}"
        )
    finally:
        for nc in edges:
            await nc.close()
        await server.stop()


def test_the_schedule_spreads_grows_and_is_capped():
    policy = ReconnectPolicy(wait=0.5, max_wait=4.0, connect_timeout=5.0, max_connect_timeout=30)
    first = [policy.wait_before(0) for _ in range(200)]
    assert all(0.25 <= w <= 0.5 for w in first)
    assert max(first) - min(first) > 0.15, "the first wait is random, not one instant"
    later = [policy.wait_before(10) for _ in range(200)]
    assert all(0.25 <= w <= 4.0 for w in later) and max(later) > 2.0
    assert [policy.timeout_for(n) for n in range(5)] == [5.0, 10.0, 20.0, 30.0, 30.0]
    # A connection's own reconnect_time_wait (changed on a live one) is its first wait.
    assert all(1.0 <= policy.wait_before(0, 2.0) <= 2.0 for _ in range(50))


def test_settings_from_the_environment_and_their_errors():
    assert ReconnectPolicy.from_env({}) == ReconnectPolicy()
    policy = ReconnectPolicy.from_env(
        {
            "COWORK_EDGE_RECONNECT_WAIT": "1",
            "COWORK_EDGE_RECONNECT_MAX_WAIT": "60",
            "COWORK_EDGE_CONNECT_TIMEOUT": "8",
            "COWORK_EDGE_CONNECT_TIMEOUT_MAX": "40",
            "COWORK_EDGE_CONNECTS_AT_ONCE": "64",
        }
    )
    assert policy == ReconnectPolicy(1, 60, 8, 40, 64)
    for env, message in (
        ({"COWORK_EDGE_RECONNECT_WAIT": "soon"}, "must be a number of seconds, not 'soon'"),
        ({"COWORK_EDGE_CONNECT_TIMEOUT": "0"}, "COWORK_EDGE_CONNECT_TIMEOUT must be between"),
        ({"COWORK_EDGE_CONNECTS_AT_ONCE": "2.5"}, "must be a whole number, not '2.5'"),
        ({"COWORK_EDGE_CONNECTS_AT_ONCE": "0"}, "COWORK_EDGE_CONNECTS_AT_ONCE must be between"),
        (
            {"COWORK_EDGE_RECONNECT_WAIT": "5", "COWORK_EDGE_RECONNECT_MAX_WAIT": "1"},
            "COWORK_EDGE_RECONNECT_MAX_WAIT (1.0) is shorter than COWORK_EDGE_RECONNECT_WAIT",
        ),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ReconnectPolicy.from_env(env)
