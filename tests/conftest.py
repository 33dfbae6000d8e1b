"""Session-wide servers for the test-suite: real NATS and PostgreSQL, no Docker needed.

The servers come from edges.local, the same code `cowork up` runs. Where a
Docker engine answers, PostgreSQL comes from testcontainers instead, and
COWORK_TEST_DATABASE_URL points the suite at an existing server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
import pytest

from edges.local import EmbeddedPostgres, NatsServer

DATABASE_URL_ENV = "COWORK_TEST_DATABASE_URL"

# Child processes (`cowork hub serve` replicas, the `cowork` CLI, bench load
# generators) import the tree under test, not whichever checkout the virtualenv's
# editable install points at (a git worktree shares the main checkout's .venv).
_TREE = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_TREE, os.environ.get("PYTHONPATH")) if p)


# --------------------------------------------------------------------------
# NATS
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def nats_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[NatsServer]:
    """A JetStream-enabled nats-server on a free port, for the whole session."""
    server = NatsServer(store_dir=tmp_path_factory.mktemp("nats"), port=0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------


def _docker_answers() -> bool:
    """True when a Docker engine answers a ping within 2 s."""
    try:
        import docker

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no package, no socket, no engine: all mean "no Docker"
        return False


@pytest.fixture(scope="session")
async def postgres_server() -> AsyncIterator[EmbeddedPostgres | object | None]:
    """The session's PostgreSQL server.

    None when COWORK_TEST_DATABASE_URL names an existing server, a
    testcontainers PostgresContainer when Docker answers, else an
    EmbeddedPostgres. Tests should use `postgres_admin_dsn` / `database_url`.
    """
    if os.environ.get(DATABASE_URL_ENV):
        yield None
    elif await asyncio.to_thread(_docker_answers):
        async for container in _postgres_container():
            yield container
    else:
        async for server in _embedded_postgres():
            yield server


async def _postgres_container() -> AsyncIterator[object]:
    from testcontainers.postgres import PostgresContainer

    container = PostgresContainer("postgres:16")
    await asyncio.to_thread(container.start)
    try:
        yield container
    finally:
        await asyncio.to_thread(container.stop)


async def _embedded_postgres() -> AsyncIterator[EmbeddedPostgres]:
    # Not under pytest's tmp_path: the unprivileged OS user postgres runs as
    # (we are root) must traverse the parents of its data dir, and every new
    # pytest session resets /tmp/pytest-of-<user> to 0700, which would lock
    # it out while another engineer's pytest runs alongside ours.
    data_dir = Path(tempfile.mkdtemp(prefix="cowork-test-pg-"))
    server = EmbeddedPostgres(data_dir=data_dir, port=0, database="postgres")
    try:
        await server.start()
        yield server
    finally:
        await server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_admin_dsn(request: pytest.FixtureRequest) -> str:
    """A DSN to a database of the session's server where CREATE DATABASE works."""
    url = os.environ.get(DATABASE_URL_ENV)
    if url:
        return url
    server = request.getfixturevalue("postgres_server")
    if isinstance(server, EmbeddedPostgres):
        return server.admin_dsn
    return server.get_connection_url(driver=None)  # testcontainers PostgresContainer


def _dsn_with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{database}"))


async def _fresh_database(admin_dsn: str) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _dsn_with_database(admin_dsn, name)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            # FORCE: a test that leaked a connection must not block the drop.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def database_url(postgres_admin_dsn: str) -> AsyncIterator[str]:
    """A fresh, empty database for this test only (dropped afterwards)."""
    async for dsn in _fresh_database(postgres_admin_dsn):
        yield dsn


@pytest.fixture(scope="module")
async def database_url_module(postgres_admin_dsn: str) -> AsyncIterator[str]:
    """A fresh database shared by the tests of one module."""
    async for dsn in _fresh_database(postgres_admin_dsn):
        yield dsn


# --------------------------------------------------------------------------
# Operator mode: the bus key hierarchy and a NATS server that trusts it
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bus_keys(tmp_path_factory: pytest.TempPathFactory):
    from hub.auth._keys import BusKeys

    return BusKeys.load_or_create(tmp_path_factory.mktemp("bus-keys"))


@pytest.fixture(scope="session")
async def operator_nats_server(
    tmp_path_factory: pytest.TempPathFactory, bus_keys
) -> AsyncIterator[NatsServer]:
    """A JetStream nats-server in operator (JWT) mode: every connection authenticated."""
    from hubkit import operator_nats

    async with operator_nats(tmp_path_factory.mktemp("nats-operator"), bus_keys) as server:
        yield server


@pytest.fixture(scope="session")
def operator_nats_url(operator_nats_server: NatsServer) -> str:
    return operator_nats_server.url


@pytest.fixture(scope="module")
def hub_options() -> dict:
    """HubSettings overrides for the module's `hub` (override in a module)."""
    return {}


@pytest.fixture(scope="module")
async def hub(operator_nats_url, database_url_module, bus_keys, hub_options):
    """A hub in operator mode on the session's NATS, one per test module."""
    from hubkit import running_hub

    async with running_hub(
        operator_nats_url, database_url_module, keys=bus_keys, **hub_options
    ) as running:
        yield running


@pytest.fixture
async def http(hub):
    """An httpx client for `hub` with the admin token."""
    from hubkit import client

    async with client(hub, admin=True) as http:
        yield http


@pytest.fixture(scope="module")
async def opencode():
    """A real `opencode serve` with the tests' fake model, one per test module."""
    from opencode_env import OpenCodeServer

    async with OpenCodeServer() as server:
        yield server


# --------------------------------------------------------------------------
# Leak check: every server a test started must be gone at the end
# --------------------------------------------------------------------------


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """`make bench` runs the in-process hub on the loop `cowork hub serve` runs on
    (uvloop, hub/cli/_loop.py); the suite keeps the standard loop unless
    COWORK_TEST_EVENT_LOOP names another (`auto`, `uvloop`, `asyncio`)."""
    choice = os.environ.get("COWORK_TEST_EVENT_LOOP")
    if choice:
        from hub.cli._loop import use_event_loop

        use_event_loop(choice)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session if child processes of this pytest are still alive.

    Session fixtures are torn down before this hook runs. Leaks are reported,
    then killed (they are ours) so they do not outlive the run. Under pytest-xdist
    (`make test`) every worker checks its own children; the controller's children
    are the workers themselves.
    """
    if _is_xdist_controller(session.config):
        return
    children = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=2.0)  # grace for exits in flight
    alive = [proc for proc in alive if _is_alive(proc)]
    if not alive:
        return
    lines = [f"  pid {proc.pid}: {_describe(proc)}" for proc in alive]
    print("\nLEAKED CHILD PROCESSES after the test session:\n" + "\n".join(lines))
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _is_xdist_controller(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "?"
