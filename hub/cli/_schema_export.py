"""Writing the generated contract documents (the I/O half of `schemas.docs`)."""

from __future__ import annotations

import json
from pathlib import Path

from schemas import subjects
from schemas.docs import asyncapi, json_schemas


def render(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def documents() -> dict[str, str]:
    """Relative path -> file text, for every generated document."""
    from channels import capability_table_markdown

    from ..auth import permission_table_markdown

    docs = {
        "asyncapi.json": render(asyncapi()),
        "openapi.json": render(admin_openapi()),
        "subjects.md": subject_table(),
        "permissions.md": permission_table_markdown(),
        "channel-capabilities.md": capability_table_markdown(),
    }
    for name, schema in json_schemas().items():
        docs[f"schemas/{name}.json"] = render(schema)
    return docs


def admin_openapi() -> dict:
    """The admin API's OpenAPI 3.1 document, from the routes every room adds (an app
    built without a running hub: only its router is read)."""
    from importlib.metadata import PackageNotFoundError, version
    from types import SimpleNamespace
    from typing import Any, cast

    from .._service import ROUTE_TABLES
    from ..core import HubSettings
    from ..http import build_app, openapi_document

    try:
        release = version("cowork-hub")
    except PackageNotFoundError:  # a source tree that was never installed
        release = "0.0.0"
    hub = SimpleNamespace(settings=HubSettings())
    return openapi_document(build_app(cast(Any, hub), "export", ROUTE_TABLES), release)


def subject_table() -> str:
    """The subject taxonomy as a Markdown page (generated; the drift test keeps it true)."""
    lines = [
        "# Subject taxonomy",
        "",
        "Generated from `schemas/subjects.py` by `cowork schema export`; do not edit.",
        "Every `{param}` is a validated token (`A-Z a-z 0-9 _ -`, 1-128 characters;",
        "tenants lower-case and never `bootstrap`, `system`, `all` or `hub`).",
        "",
        "| family | subject | message (reply) | publisher -> consumer | delivery | stream |",
        "|---|---|---|---|---|---|",
    ]
    for f in subjects.FAMILIES:
        message = f"`{f.message}`" + (f" (`{f.reply}`)" if f.reply else "")
        lines.append(
            f"| {f.name} | `{f.template}` | {message} | {f.publisher} -> {f.consumer} "
            f"| {f.delivery.value} | {f.stream or '-'} |"
        )
    lines += ["", "## What each family is for", ""]
    lines += [f"- **{f.name}**: {f.summary}" for f in subjects.FAMILIES]
    return "\n".join(lines) + "\n"


def export(out: Path, *, check: bool = False) -> list[Path]:
    """Write (or, with check, compare) the documents; returns the paths that differ.

    Stale files in `schemas/` that no message generates any more count as differing
    (and are removed when writing).
    """
    wanted = documents()
    differing = [
        out / rel
        for rel, text in sorted(wanted.items())
        if not (out / rel).exists() or (out / rel).read_text() != text
    ]
    schema_dir = out / "schemas"
    stale = (
        sorted(p for p in schema_dir.glob("*.json") if f"schemas/{p.name}" not in wanted)
        if schema_dir.exists()
        else []
    )
    differing += stale
    if not check:
        schema_dir.mkdir(parents=True, exist_ok=True)
        for rel, text in wanted.items():
            (out / rel).write_text(text)
        for path in stale:
            path.unlink()
    return differing
