"""`cowork up` and `cowork hub serve` as a user runs them: real subprocesses."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import nats
import psutil
import pytest

from edges.local import free_port
from schemas import AuditRecord, Envelope, Source, subjects

COWORK = [sys.executable, "-m", "hub.cli"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("COWORK_")}
    env.update(extra)
    return env


class Up:
    def __init__(self, data_dir: Path, **env):
        self.http_port, self.nats_port, self.leaf_port = free_port(), free_port(), free_port()
        self.proc = subprocess.Popen(
            COWORK
            + [
                "up",
                "--data-dir",
                str(data_dir),
                "--http-port",
                str(self.http_port),
                "--nats-port",
                str(self.nats_port),
                "--leaf-port",
                str(self.leaf_port),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=_env(**env),
        )
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.descendants: set[int] = set()

    def wait_ready(self, timeout=30.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            assert self.proc.poll() is None, self.output()
            self._note_descendants()
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    self._note_descendants()
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"not ready in {timeout}s")

    def _note_descendants(self):
        try:
            self.descendants |= {p.pid for p in psutil.Process(self.proc.pid).children(True)}
        except psutil.NoSuchProcess:
            pass

    def interrupt(self, timeout=10.0) -> float:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=timeout)
        return time.monotonic() - started

    def output(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.stdout.read()

    def leftovers(self) -> list[int]:
        return [
            pid
            for pid in self.descendants
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]


async def _publish_audit(data_dir: Path, nats_port: int, tenant: str) -> None:
    """Publish as a credentialed desktop: `cowork up` runs NATS in operator mode."""
    from hubkit import connect_with

    from hub.auth import _jwt
    from hub.auth._keys import BusKeys
    from hub.auth._permissions import Principal, permissions_for
    from schemas import PrincipalKind

    url = f"nats://127.0.0.1:{nats_port}"
    with pytest.raises(Exception, match="Authorization"):
        await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)
    keys = BusKeys.load_or_create(data_dir / "keys")
    seed = _jwt.new_seed("user")
    perms = permissions_for(Principal(PrincipalKind.DESKTOP, tenant, "d1"))
    user_jwt, _ = keys.mint_user(
        _jwt.public_key(seed),
        name="test-desktop",
        pub_allow=perms.pub_allow,
        sub_allow=perms.sub_allow,
        ttl_seconds=300,
    )
    edge = await connect_with(url, user_jwt, seed, subjects.inbox_prefix(tenant, "desktop", "d1"))
    env = Envelope.wrap(
        AuditRecord(action="pairing.created", actor_kind="desktop", actor_id="d1"),
        source=Source(principal_kind="desktop", principal_id="d1"),
        tenant=tenant,
    )
    await edge.nc.jetstream().publish(
        subjects.AUDIT.build(tenant=tenant, principal_kind="desktop", principal_id="d1"),
        env.encode(),
    )
    await edge.close()


def _leaf_listener_greets(port: int) -> bool:
    """A NATS leaf-node listener greets with INFO, like the client port."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        return sock.recv(4096).startswith(b"INFO ")


def _audit_rows(up: Up, token: str) -> list:
    r = httpx.get(
        f"{up.url}/api/v1/tenants/acme/audit", headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 200, r.text
    return r.json()["items"]


@pytest.fixture
def up_dir():
    """A data dir outside pytest's tmp tree: pytest resets that tree to 0700, which the
    unprivileged PostgreSQL user cannot traverse when tests run as root."""
    path = Path(tempfile.mkdtemp(prefix="cowork-up-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
async def test_up_ready_interrupt_and_restart_keep_data(up_dir):
    data = up_dir / "data"
    up = Up(data)
    try:
        assert up.wait_ready() < 30
        token = (data / "admin-token").read_text().strip()
        assert oct((data / "admin-token").stat().st_mode & 0o777) == "0o600"
        await _publish_audit(data, up.nats_port, "acme")
        for _ in range(50):
            if _audit_rows(up, token):
                break
            time.sleep(0.1)
        assert len(_audit_rows(up, token)) == 1
        assert len(up.descendants) >= 2  # nats-server and postgres at least
        assert _leaf_listener_greets(up.leaf_port)  # Team Gateway appliances dial here
        _pair_from_the_console(up, token)
        # A second `cowork up` on the same data dir (other ports) stops before any server.
        second = _run(
            [
                "up",
                "--data-dir",
                str(data),
                "--http-port",
                str(free_port()),
                "--nats-port",
                str(free_port()),
                "--leaf-port",
                str(free_port()),
            ]
        )
        _one_line_error(second, f"is in use by PID {up.proc.pid}")
        assert "NATS with JetStream" not in second.stdout, second.stdout
        assert up.interrupt() < 10
        out = up.output()
        assert up.proc.returncode == 0, out
        for expected in (
            "cowork is up",
            up.url,
            f"nats://127.0.0.1:{up.nats_port}",
            str(data / "admin-token"),
            f"{up.url}/readyz",
            f"{up.url}/console",
            "cowork gateway register",
            "Stopped.",
            f"cowork gateway up --cloud-leaf-port {up.leaf_port}",
        ):
            assert expected in out
        assert token not in out  # where the token is, never the token
        assert data.stat().st_mode & 0o077 in (0, 0o011)  # owner-only (traverse as root)
        for log in (data / "nats" / "nats.log", data / "postgres" / "postgres.log"):
            assert oct(log.stat().st_mode & 0o777) == "0o600", log
        assert "Traceback" not in out
        assert up.leftovers() == []
    finally:
        up.output()

    again = Up(data)
    try:
        again.wait_ready()
        assert (data / "admin-token").read_text().strip() == token
        assert [r["action"] for r in _audit_rows(again, token)] == ["pairing.created"]
        again.interrupt()
        assert again.leftovers() == []
    finally:
        again.output()


def _pair_from_the_console(up: Up, token: str) -> None:
    """The first thing a new operator does: sign in to the console with the token
    `cowork up` wrote, and create a pairing from its page (its session, its CSRF)."""
    with httpx.Client(base_url=up.url, timeout=10) as browser:
        assert browser.post("/console/login", data={"token": token}).status_code == 303
        page = browser.get("/console/desktops?tenant=firstrun")
        assert page.status_code == 200 and 'id="pair-form"' in page.text
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert csrf is not None
        made = browser.post(
            "/api/v1/tenants/firstrun/pairings",
            json={"label": "first Desktop"},
            headers={"X-CSRF-Token": csrf[1]},
        )
        assert made.status_code == 201, made.text
        assert made.json()["command"].startswith(f"cowork desktop pair {made.json()['code']}")


def _run(args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        COWORK + args, capture_output=True, text=True, timeout=60, env=_env(**env)
    )


def _one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode != 0
    err = result.stderr.strip()
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert err.startswith("cowork: error:") and fragment in err, err
    assert len(err.splitlines()) == 1, err


def test_taken_port_is_a_one_line_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run(
            [
                "up",
                "--data-dir",
                str(tmp_path / "d"),
                "--nats-port",
                str(port),
                "--http-port",
                str(free_port()),
                "--leaf-port",
                str(free_port()),
            ]
        )
        _one_line_error(result, f"port {port}")
        assert "--nats-port" in result.stderr
        result = _run(
            [
                "up",
                "--data-dir",
                str(tmp_path / "d"),
                "--http-port",
                str(port),
                "--nats-port",
                str(free_port()),
                "--leaf-port",
                str(free_port()),
            ]
        )
        _one_line_error(result, "--http-port")


def test_unwritable_data_dir_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    result = _run(["up", "--data-dir", str(blocker / "data")])
    _one_line_error(result, "--data-dir")


def test_hub_serve_reports_bad_configuration_clearly():
    result = _run(["hub", "serve"], COWORK_NATS_URL="http://wrong", COWORK_DATABASE_URL="x")
    _one_line_error(result, "COWORK_NATS_URL")
    result = _run(["hub", "serve", "--http-port", "99999"])
    assert result.returncode == 2 and "99999" in result.stderr


def test_hub_serve_without_database_is_a_clear_error():
    result = _run(["hub", "serve"], COWORK_NATS_URL=f"nats://127.0.0.1:{free_port()}")
    _one_line_error(result, "COWORK_DATABASE_URL")


def test_hub_serve_without_admin_token_refuses_to_start(database_url):
    result = _run(
        ["hub", "serve"],
        COWORK_NATS_URL=f"nats://127.0.0.1:{free_port()}",
        COWORK_DATABASE_URL=database_url,
    )
    _one_line_error(result, "COWORK_ADMIN_TOKEN")


async def test_hub_serve_runs_against_external_servers(nats_url, database_url):
    started = _serve_until_ready(nats_url, database_url, {})
    assert started["loop"] == "uvloop"  # the default wherever uvloop is installed


async def test_hub_serve_in_operator_mode_takes_keys_from_env(
    operator_nats_url, database_url, bus_keys
):
    started = _serve_until_ready(
        operator_nats_url,
        database_url,
        {"COWORK_KEYS_DIR": str(bus_keys.directory), "COWORK_EVENT_LOOP": "asyncio"},
    )
    assert started["loop"] == "asyncio"  # the opt-out


def test_an_unknown_event_loop_is_a_one_line_error():
    result = _run(["hub", "serve"], COWORK_EVENT_LOOP="twisted")
    _one_line_error(result, "COWORK_EVENT_LOOP='twisted': choose one of auto, uvloop, asyncio")


def test_a_started_hub_s_heap_leaves_the_collector_s_full_passes():
    """`settle_heap` (called by `cowork hub serve` and `cowork up` once the hub has
    started): what exists then is frozen, so a full collection no longer walks it;
    garbage made before it is collected first, not frozen."""
    import gc
    import weakref

    from hub.cli._loop import settle_heap

    class Cycle:
        pass

    garbage = Cycle()
    garbage.me = garbage  # type: ignore[attr-defined]
    gone = weakref.ref(garbage)
    del garbage
    before = gc.get_freeze_count()
    try:
        settle_heap()
        assert gone() is None, "garbage from before was frozen, not collected"
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def _serve_until_ready(nats_url: str, database_url: str, extra: dict) -> dict:
    """The production shape: `cowork hub serve` against external servers, then SIGTERM."""
    port = free_port()
    proc = subprocess.Popen(
        COWORK + ["hub", "serve", "--http-port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(
            COWORK_NATS_URL=nats_url,
            COWORK_DATABASE_URL=database_url,
            COWORK_ADMIN_TOKEN="t" * 32,
            COWORK_LOG_LEVEL="INFO",
            **extra,
        ),
    )
    try:
        for _ in range(100):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError("hub serve never became ready")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        logs = proc.stderr.read()
        import json

        lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
        events = {line["event"]: line for line in lines}
        assert "hub.started" in events and "hub.stopped" in events
        assert "t" * 32 not in logs and database_url not in logs
        return events["hub.started"]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_help_reads_well():
    result = _run(["--help"])
    assert result.returncode == 0
    for word in ("up", "hub", "schema", "COWORK_NATS_URL", "COWORK_DATABASE_URL"):
        assert word in result.stdout
    up = _run(["up", "--help"])
    for flag in ("--data-dir", "--http-port", "--nats-port", "--host"):
        assert flag in up.stdout
