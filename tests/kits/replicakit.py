"""Hub replicas as real processes: `cowork hub serve`, one process each, sharing
one NATS and one PostgreSQL, so a test can kill -9 one mid-flight."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from desktopkit import COWORK

_HELD = re.compile(r'^cowork_partition_lease_held\{consumer="([^"]+)"\} 1\.0$', re.M)
# The checkout these tests belong to: replicas import the code under test from it
# (the venv's editable install may point at another worktree).
_SOURCE = str(Path(__file__).resolve().parents[2])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class HubReplica:
    """One `cowork hub serve` process; `kill()` is kill -9, `stop()` a SIGTERM."""

    def __init__(self, name: str, env: dict[str, str], workdir: Path) -> None:
        self.name, self.workdir = name, workdir
        self.port = free_port()
        self.env = {**os.environ, **env, "COWORK_HTTP_PORT": str(self.port)}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_SOURCE, os.environ.get("PYTHONPATH")) if p
        )
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.AsyncClient:
        token = self.env["COWORK_ADMIN_TOKEN"]
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    async def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [COWORK, "hub", "serve"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=2) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} not ready in {timeout} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """kill -9: no goodbye, no lease handed back, nothing flushed."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    async def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.proc.poll() is None:
            self.kill()
            raise AssertionError(f"{self.name} did not stop on SIGTERM:\n{self.log_tail()}")

    async def held(self) -> set[str]:
        """The partitions (consumer names) this replica works now, from /metrics."""
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as http:
            return set(_HELD.findall((await http.get("/metrics")).text))

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@contextlib.asynccontextmanager
async def operator_bus(tmp_path_factory) -> AsyncIterator[tuple[str, Path]]:
    """An operator-mode NATS of its own, and the key directory replicas share."""
    from hubkit import operator_nats

    from hub.auth import BusKeys

    keys_dir = tmp_path_factory.mktemp("replica-keys")
    keys = BusKeys.load_or_create(keys_dir)
    async with operator_nats(tmp_path_factory.mktemp("replica-nats"), keys) as server:
        yield server.url, keys_dir


@contextlib.asynccontextmanager
async def replicas(
    count: int,
    workdir: Path,
    *,
    nats_url: str,
    database_url: str,
    keys_dir: Path,
    together: bool = False,
    **settings: str,
) -> AsyncIterator[list[HubReplica]]:
    """`count` started replicas; every one still running is stopped on exit.

    One after another by default (the first creates the schema and the streams);
    `together` starts them at once, as an operator's orchestrator would (the
    migrations take an advisory lock, and a stream another hub created first is
    updated, not refused), which saves a replica's start-up time."""
    env = {
        "COWORK_NATS_URL": nats_url,
        "COWORK_DATABASE_URL": database_url,
        "COWORK_KEYS_DIR": str(keys_dir),
        "COWORK_ADMIN_TOKEN": "replica-test-admin-token-0123456789",
        "COWORK_HTTP_HOST": "127.0.0.1",
        "COWORK_LOG_FORMAT": "json",
        **{f"COWORK_{k.upper()}": v for k, v in settings.items()},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    started = [HubReplica(f"replica-{i}", env, workdir) for i in range(count)]
    try:
        if together:
            await asyncio.gather(*(replica.start() for replica in started))
        else:
            for replica in started:
                await replica.start()
        yield started
    finally:
        for replica in started:
            with contextlib.suppress(Exception):
                await replica.stop()
            replica.kill()
