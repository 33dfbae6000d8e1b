"""The docs name only paths and modules that exist: a drift test.

Scans README.md, docs/*.md and deploy/README.md for
- repository paths that start with a top-level folder (`hub/core/_db.py`,
  `tests/hub/core/`, `docs/schemas/*.json`; a `*` must match something),
- dotted names that start with a package (`hub.core`, `edges.local._servers`,
  `schemas.Envelope`): every module part must be a file or package, and the
  first part after the last module must be a name that module defines,
- relative Markdown link targets (`[x](pairing.md)`), resolved from the doc.

A path that git ignores (`tests/artifacts/`, `.venv/`) is flagged even when it is
there: it exists only after a run, not in a fresh clone.
"""

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md"]
PACKAGES = ("schemas", "hub", "edges", "channels")
FOLDERS = (*PACKAGES, "tests", "deploy", "docs")

# Not preceded by a path, URL or name character, so `/etc/cowork/hub.env`,
# `https://hub.example.com/...` and `$JS.hub.API` are not taken for ours.
PATH = re.compile(rf"(?<![\w./$~-])(?:{'|'.join(FOLDERS)})/[\w./*-]*")
DOTTED = re.compile(rf"(?<![\w./$~-])(?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+")
LINK = re.compile(r"\]\(([^)\s]+)\)")

# `hub.creds`, `channels.md`: file names, not modules.
FILE_SUFFIXES = {"md", "py", "json", "creds", "env", "conf", "service", "example", "toml", "sql"}
# Dotted names that belong to someone else.
NOT_OURS = {"hub.verify_token"}  # WhatsApp's webhook verification query parameter


def defined_names(module: Path) -> set[str]:
    """The names a module's top level binds (definitions, assignments, imports)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update(a.asname or a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)

    visit(ast.parse(module.read_text(encoding="utf-8")).body)
    return names


def _ignore_patterns() -> list[str]:
    lines = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "!"))]


IGNORED = _ignore_patterns()


def ignored(ref: str) -> bool:
    """Whether git ignores `ref` or a folder above it (.gitignore's patterns: one
    with a slash inside is anchored at the root, one without matches any part)."""
    parts = ref.strip("/").split("/")
    for pattern in IGNORED:
        bare = pattern.strip("/")
        if "/" in bare:
            depth = bare.count("/") + 1
            if fnmatch.fnmatch("/".join(parts[:depth]), bare):
                return True
        elif any(fnmatch.fnmatch(part, bare) for part in parts):
            return True
    return False


def path_problem(ref: str) -> str | None:
    if ignored(ref):
        return "git-ignored: it exists only after a run, not in a fresh clone"
    if "*" in ref:
        return None if any(ROOT.glob(ref)) else "matches no file"
    return None if (ROOT / ref).exists() else "no such file or folder"


def dotted_problem(ref: str) -> str | None:
    parts = ref.split(".")
    if ref in NOT_OURS or parts[-1] in FILE_SUFFIXES:
        return None
    package: Path | None = ROOT / parts[0]
    module = ROOT / parts[0] / "__init__.py"
    for i, part in enumerate(parts[1:], start=1):
        if package is not None and (package / part / "__init__.py").is_file():
            package, module = package / part, package / part / "__init__.py"
        elif package is not None and (package / f"{part}.py").is_file():
            package, module = None, package / f"{part}.py"
        elif part in defined_names(module):
            return None  # an attribute of the module; deeper parts are not checked
        else:
            return f"{'.'.join(parts[:i])} has no module or name {part!r}"
    return None


def link_problem(doc: Path, target: str) -> str | None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
        return None  # a URL, mailto: or an anchor in the same page
    target = target.split("#", 1)[0]
    return None if (doc.parent / target).exists() else "link target does not exist"


def problems(doc: Path, text: str) -> list[str]:
    found = []
    name = doc.relative_to(ROOT)
    for number, line in enumerate(text.splitlines(), start=1):
        for match in PATH.finditer(line):
            ref = match.group().rstrip(".")
            if problem := path_problem(ref):
                found.append(f"{name}:{number}: {ref}: {problem}")
        for match in DOTTED.finditer(line):
            ref = match.group()
            if problem := dotted_problem(ref):
                found.append(f"{name}:{number}: {ref}: {problem}")
        for match in LINK.finditer(line):
            if problem := link_problem(doc, match.group(1)):
                found.append(f"{name}:{number}: {match.group(1)}: {problem}")
    return found


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_names_only_existing_paths_and_modules(doc):
    missing = problems(doc, doc.read_text(encoding="utf-8"))
    assert not missing, "the doc names what does not exist:\n" + "\n".join(missing)


def test_the_scanner_flags_missing_names_and_ignores_lookalikes():
    doc = ROOT / "docs" / "example.md"
    text = "\n".join(
        [
            "`hub/_http.py` and edges/_gateway.py, then `hub._embedded` and schemas.Nope.",
            "tests/test_nothing_*.py; see [there](nowhere.md).",
            "Fine: hub/core/_db.py. `hub.core`, edges.local._servers.NatsServer, schemas.Envelope,",
            "docs/schemas/*.json, tests/hub/, [pairing](pairing.md), [x](https://example.com).",
            "Not ours: /etc/cowork/hub.env, hub.creds, channels.md, `hub.verify_token`,",
            "https://hub.example.com/webhooks, `$JS.hub.API`, ../hub/whatever.",
            "Made by a run: tests/artifacts/console/ and hub/core/__pycache__/.",
        ]
    )
    refs = [p.split(": ")[1] for p in problems(doc, text)]
    assert refs == [
        "hub/_http.py",
        "edges/_gateway.py",
        "hub._embedded",
        "schemas.Nope",
        "tests/test_nothing_*.py",
        "nowhere.md",
        "tests/artifacts/console/",
        "hub/core/__pycache__/",
    ]
