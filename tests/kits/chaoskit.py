"""The parts the chaos suite kills: a 3-node operator-mode NATS cluster from the
committed deploy/ configs whose nodes can be killed -9 and restarted on the same
ports and store, and a PostgreSQL of its own to restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from test_deploy import CLUSTER_DIR, _free_ports, _nats_server_bin


class NatsNode:
    """One cluster node: `kill()` is kill -9, `start()` brings it back as it was."""

    def __init__(self, name: str, conf: Path, env: dict[str, str], workdir: Path) -> None:
        self.name, self.conf, self.env, self.workdir = name, conf, env, workdir
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"{name}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.env['NATS_CLIENT_PORT']}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.env['NATS_HTTP_PORT']}"

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [_nats_server_bin(), "-c", str(self.conf)],
                cwd=self.workdir,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def start(self, timeout: float = 20.0) -> None:
        self.spawn()
        await self.wait_healthy(timeout)

    async def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                assert self.proc and self.proc.poll() is None, f"{self.name} exited"
                with contextlib.suppress(httpx.HTTPError):
                    r = await http.get(f"{self.http}/healthz", params={"js-enabled-only": "true"})
                    if r.status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} not healthy in {timeout} s")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


class NatsCluster:
    def __init__(self, nodes: list[NatsNode]) -> None:
        self.nodes = nodes

    @property
    def urls(self) -> str:
        """COWORK_NATS_URL for a hub replica: every node, comma separated."""
        return ",".join(node.url for node in self.nodes)

    def node(self, server_name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == server_name)

    async def stream_leader(self, stream: str, timeout: float = 15.0) -> NatsNode:
        """The node leading `stream` now, from the monitoring port of any live node."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                for node in self.nodes:
                    leader = await _leader_seen_by(http, node, stream)
                    if leader:
                        return self.node(leader)
                await asyncio.sleep(0.2)
        raise AssertionError(f"no leader for {stream} in {timeout} s")

    async def wait_current(self, stream: str, timeout: float = 30.0) -> None:
        """Until `stream` has a leader and both followers have caught up."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as http:
            while time.monotonic() < deadline:
                for node in self.nodes:
                    cluster = await _stream_cluster(http, node, stream)
                    replicas = (cluster or {}).get("replicas") or []
                    if cluster and cluster.get("leader") and len(replicas) == 2:
                        if all(r.get("current") for r in replicas):
                            return
                await asyncio.sleep(0.2)
        raise AssertionError(f"{stream}'s replicas not current in {timeout} s")


async def _stream_cluster(http: httpx.AsyncClient, node: NatsNode, stream: str) -> dict | None:
    if not node.proc or node.proc.poll() is not None:
        return None
    try:
        params = {"accounts": "true", "streams": "true"}
        jsz = (await http.get(f"{node.http}/jsz", params=params)).json()
    except (httpx.HTTPError, ValueError):
        return None
    for account in jsz.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail["name"] == stream:
                return detail.get("cluster")
    return None


async def _leader_seen_by(http: httpx.AsyncClient, node: NatsNode, stream: str) -> str | None:
    cluster = await _stream_cluster(http, node, stream)
    return (cluster or {}).get("leader") or None


@contextlib.asynccontextmanager
async def nats_cluster(workdir: Path, keys) -> AsyncIterator[NatsCluster]:
    """The committed node configs, each included by a file that adds the operator
    block `cowork keys server-config` prints (as an operator would)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for conf in CLUSTER_DIR.glob("*.conf"):
        shutil.copy(conf, workdir / conf.name)
    ports = _free_ports(12)
    envs = [
        {
            "NATS_HOST": "127.0.0.1",
            "NATS_CLIENT_PORT": str(ports[i * 4]),
            "NATS_CLUSTER_PORT": str(ports[i * 4 + 1]),
            "NATS_LEAFNODE_PORT": str(ports[i * 4 + 2]),
            "NATS_HTTP_PORT": str(ports[i * 4 + 3]),
            "NATS_STORE_DIR": str(workdir / f"store-{i + 1}"),
        }
        for i in range(3)
    ]
    routes = {
        f"NATS_ROUTE_{i + 1}": f"nats://127.0.0.1:{e['NATS_CLUSTER_PORT']}"
        for i, e in enumerate(envs)
    }
    nodes = []
    for i, env in enumerate(envs):
        wrapper = workdir / f"operator-node-{i + 1}.conf"
        resolver = keys.server_config(workdir / f"resolver-{i + 1}")
        wrapper.write_text(f"include ./node-{i + 1}.conf\n{resolver}\n")
        nodes.append(NatsNode(f"hub-{i + 1}", wrapper, {**env, **routes}, workdir))
    try:
        for node in nodes:  # together: JetStream waits for its peers to form the group
            node.spawn()
        for node in nodes:
            await node.wait_healthy(30.0)
        yield NatsCluster(nodes)
    finally:
        for node in nodes:
            node.stop()
