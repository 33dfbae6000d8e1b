"""Package boundaries, enforced by reading every import statement."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"schemas", "hub", "edges", "channels"}
IO_LIBRARIES = {"nats", "asyncpg", "aiohttp", "httpx", "socket", "subprocess", "faststream",
                "psycopg", "requests", "urllib", "http"}


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
    bad = [(f, m) for f, m in imports_of("schemas")
           if (top(m) in OURS and top(m) != "schemas") or top(m) in IO_LIBRARIES]
    assert bad == []


@pytest.mark.parametrize("package", ["edges", "channels"])
def test_edges_and_channels_never_import_hub_or_the_database(package):
    bad = [(f, m) for f, m in imports_of(package) if top(m) in {"hub", "asyncpg", "psycopg"}]
    assert bad == []


def test_channels_never_import_edges():
    """The OpenCode client lives in edges; channel code talks to the hub over the bus only."""
    assert [(f, m) for f, m in imports_of("channels") if top(m) == "edges"] == []


# The command layer composes edges with embedded servers; nothing else in hub may.
COMMAND_MODULES = ("_cli.py", "_gateway_up.py")


def test_hub_does_not_import_edges_outside_the_cli():
    bad = [(f, m) for f, m in imports_of("hub")
           if top(m) == "edges" and not f.endswith(COMMAND_MODULES)]
    assert bad == []


def test_hub_hosts_channels_only_through_their_public_face():
    """The hub hosts the channel runtime (it owns the database and the secrets);
    it may use only the names `channels/__init__.py` exports, from its channel modules."""
    uses = [(f, m) for f, m in imports_of("hub") if top(m) == "channels"]
    assert all(m == "channels" for _, m in uses), uses
    assert all(Path(f).name.startswith(("_channel", "_http_channel", "_cli", "_schema_export"))
               for f, _ in uses)


def test_the_boundary_scanner_sees_imports():
    """Guard against a scanner that finds nothing and so always passes."""
    found = {top(m) for _, m in imports_of("hub")}
    assert {"schemas", "asyncpg", "nats", "aiohttp"} <= found


OPENCODE_ROUTES = ("/session", "/event", "/permission", "/question", "/global/health")


def test_only_one_module_talks_to_opencode():
    """edges/_opencode.py is the one OpenCode client: no other module of ours imports
    an HTTP client or spells an OpenCode route."""
    clients = ("httpx", "aiohttp", "requests", "urllib.request", "http.client")
    # Channel providers call chat platforms' APIs over HTTP, never OpenCode: they
    # may not import edges (above) nor spell an OpenCode route (below).
    http_users = {f for f, m in imports_of("edges")
                  if any(m == c or m.startswith(c + ".") for c in clients)}
    assert http_users <= {"edges/_opencode.py"}
    assert "edges/_opencode.py" in http_users, "the scanner must see the client's own import"
    spelled = set()
    for package in ("edges", "channels", "hub", "schemas"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                        and node.value.startswith(OPENCODE_ROUTES)):
                    spelled.add(rel)
    assert spelled == {"edges/_opencode.py"}
