"""Package boundaries, enforced by reading every import statement."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"schemas", "hub", "edges", "channels"}
IO_LIBRARIES = {
    "nats",
    "asyncpg",
    "aiohttp",
    "httpx",
    "socket",
    "subprocess",
    "faststream",
    "psycopg",
    "requests",
    "urllib",
    "http",
}


def imports_of(package: str) -> list[tuple[str, str]]:
    """(module file, imported top-level name) for every import in a package."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(rel, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: stays inside its own package
                    found.append((rel, f"{package}.{node.module or ''}"))
                else:
                    found.append((rel, node.module or ""))
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def test_schemas_imports_nothing_of_ours_and_does_no_io():
    bad = [
        (f, m)
        for f, m in imports_of("schemas")
        if (top(m) in OURS and top(m) != "schemas") or top(m) in IO_LIBRARIES
    ]
    assert bad == []


def test_the_shared_kv_lease_imports_nothing_of_ours_nor_the_database():
    """The lease the hub's partitions and the channel transports share (channels'
    lowest module, so both may import it) knows neither of them."""
    found = [(f, m) for f, m in imports_of("channels") if f.endswith("channels/_kv_lease.py")]
    assert any(top(m) == "nats" for _, m in found), "the scanner must see the KV import"
    bad = [(f, m) for f, m in found if top(m) in OURS or top(m) in {"asyncpg", "psycopg"}]
    assert bad == []


@pytest.mark.parametrize("package", ["edges", "channels"])
def test_edges_and_channels_never_import_hub_or_the_database(package):
    """edges/local supervises a local PostgreSQL *server* (for `cowork up` and the
    appliance) and connects only to see it ready; no agent or channel code
    touches a database."""
    bad = [
        (f, m)
        for f, m in imports_of(package)
        if top(m) == "hub"
        or (top(m) in {"asyncpg", "psycopg"} and not f.startswith("edges/local/"))
    ]
    assert bad == []


def test_channels_never_import_edges():
    """The OpenCode client lives in edges; channel code talks to the hub over the bus only."""
    assert [(f, m) for f, m in imports_of("channels") if top(m) == "edges"] == []


def test_hub_imports_edges_only_in_the_cli():
    """The `cowork` command (hub/cli) composes the edge commands; the Cloud service never
    imports edge code."""
    bad = [
        (f, m) for f, m in imports_of("hub") if top(m) == "edges" and not f.startswith("hub/cli/")
    ]
    assert bad == []


def test_hub_hosts_channels_only_through_their_public_face():
    """The hub hosts the channel runtime (it owns the database and the secrets);
    it may use only the names `channels/__init__.py` exports, from its channels room.
    The one exception is the KV lease the hub's partition leases are built on."""
    uses = [(f, m) for f, m in imports_of("hub") if top(m) == "channels"]
    assert uses, "the scanner must see the channels room's imports"
    assert all(m == "channels" for _, m in uses), uses
    hosts = ("hub/channels/", "hub/cli/", "hub/core/_leases.py")
    assert all(f.startswith(hosts) for f, _ in uses), uses
    lease_names = _names_imported("hub/core/_leases.py", "channels")
    assert lease_names == {"KvLease", "LeaseLost"}, lease_names


def _names_imported(path: str, module: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == module
        for alias in node.names
    }


def test_the_boundary_scanner_sees_imports():
    """Guard against a scanner that finds nothing and so always passes."""
    found = {top(m) for _, m in imports_of("hub")}
    assert {"schemas", "asyncpg", "nats", "aiohttp"} <= found


OPENCODE_ROUTES = ("/session", "/event", "/permission", "/question", "/global/health")


def test_only_one_module_talks_to_opencode():
    """edges/common/_opencode.py is the one OpenCode client: no other module of ours imports
    an HTTP client or spells an OpenCode route."""
    clients = ("httpx", "aiohttp", "requests", "urllib.request", "http.client")
    # Channel providers call chat platforms' APIs over HTTP, never OpenCode: they
    # may not import edges (above) nor spell an OpenCode route (below).
    http_users = {
        f for f, m in imports_of("edges") if any(m == c or m.startswith(c + ".") for c in clients)
    }
    # The leaf node module asks its own nats-server's monitoring port (/leafz); the
    # controller client (edges/remote) speaks the hub's HTTP API, never OpenCode.
    assert http_users <= {
        "edges/common/_opencode.py",
        "edges/gateway/_leaf.py",
        "edges/remote/_client.py",
        "edges/remote/_cli.py",
        "edges/remote/_channel.py",
    }
    assert "edges/common/_opencode.py" in http_users, "the scanner must see the client's own import"
    spelled = set()
    for package in ("edges", "channels", "hub", "schemas"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and node.value.startswith(OPENCODE_ROUTES)
                ):
                    spelled.add(rel)
    assert spelled == {"edges/common/_opencode.py"}
