"""The admin API described as OpenAPI 3.1, from the routes themselves: each `/api/`
handler is `documented` with its summary and its request and response models
(pydantic, from `schemas`: the contract), and `openapi_document` walks the app's
router. An `/api/` route that is not documented, or that answers a body without a
response model, is an error here (no route is described as a bare object).
`cowork schema export` writes it to docs/openapi.json; a test fails on drift.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from schemas import ErrorBody

H = TypeVar("H", bound=Callable[..., Any])
ATTRIBUTE = "__cowork_openapi__"


@dataclass(frozen=True)
class Operation:
    summary: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    status: int = 200
    query: dict[str, str] = field(default_factory=dict)  # name -> description
    viewer: bool = False  # readable with the viewer token (every GET is)
    also: tuple[int, ...] = ()  # other success statuses with the same body
    events: type[BaseModel] | None = None  # with Accept: text/event-stream, SSE of these


def documented(
    summary: str,
    *,
    body: type[BaseModel] | None = None,
    response: type[BaseModel] | None = None,
    status: int = 200,
    query: dict[str, str] | None = None,
    also: tuple[int, ...] = (),
    events: type[BaseModel] | None = None,
) -> Callable[[H], H]:
    """Mark an admin API handler with what the OpenAPI document says of it: every
    answer but a 204 names its `response` model."""
    if response is None and status != 204:
        raise TypeError(f"{summary!r}: a {status} answer needs its response model")

    def mark(handler: H) -> H:
        op = Operation(summary, body, response, status, query or {}, also=also, events=events)
        setattr(handler, ATTRIBUTE, op)
        return handler

    return mark


def _operation(handler: Any, method: str, path: str) -> Operation:
    op = getattr(handler, ATTRIBUTE, None)
    if op is None:
        raise TypeError(f"{method} {path} is not documented (hub.http.documented)")
    return op


class _Schemas:
    """Components collected from the models the operations name (each model once,
    its nested models as components of their own)."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}
        self.ref(ErrorBody)

    def ref(self, model: type[BaseModel], *, request: bool = False) -> dict[str, Any]:
        if model.__name__ not in self.components:
            schema = model.model_json_schema(
                by_alias=True,
                ref_template="#/components/schemas/{model}",
                mode="validation" if request else "serialization",
            )
            for name, sub in schema.pop("$defs", {}).items():
                self.components.setdefault(name, sub)
            self.components[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
    }


def openapi_document(app: web.Application, version: str) -> dict[str, Any]:
    """OpenAPI 3.1 for every `/api/` route of `app`."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in app.router.routes():
        info = route.resource.canonical if route.resource is not None else ""
        if not info.startswith("/api/") or route.method in ("HEAD", "*"):
            continue
        op = _operation(route.handler, route.method, info)
        paths.setdefault(info, {})[route.method.lower()] = _describe(
            info, route.method, op, schemas
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "cowork hub admin API",
            "version": version,
            "description": "The hub's admin API. Every error is {error: {code, message}}. "
            "Authenticate with the admin token (Authorization: Bearer), the viewer "
            "token (reads only), or a console session cookie (changes need the "
            "session's X-CSRF-Token header).",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {"consoleSession": []}],
        "paths": {path: paths[path] for path in sorted(paths)},
        "components": {
            "schemas": {name: schemas.components[name] for name in sorted(schemas.components)},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "consoleSession": {"type": "apiKey", "in": "cookie", "name": "cw_console"},
            },
        },
    }


def _describe(path: str, method: str, op: Operation, schemas: _Schemas) -> dict[str, Any]:
    out: dict[str, Any] = {
        "summary": op.summary,
        "operationId": _operation_id(method, path),
        "tags": [_tag(path)],
    }
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in re.findall(r"{(\w+)}", path)
    ]
    params += [
        {"name": name, "in": "query", "required": False, "description": text, "schema": {}}
        for name, text in sorted(op.query.items())
    ]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas.ref(op.body, request=True)}},
        }
    ok: dict[str, Any] = {"description": "OK"}
    if op.response is not None:
        ok["content"] = {"application/json": {"schema": schemas.ref(op.response)}}
    if op.events is not None:
        ok.setdefault("content", {})["text/event-stream"] = {
            "schema": {
                "type": "string",
                "description": "Server-Sent Events: each `data:` line one of "
                f"#/components/schemas/{op.events.__name__} as JSON, its `id:` the sequence",
            },
            "x-item-schema": schemas.ref(op.events),
        }
    out["responses"] = {
        **{str(status): ok for status in sorted((op.status, *op.also))},
        "400": _error("A bad path or query parameter"),
        "401": _error("No valid token or session"),
        "403": _error("A viewer's change, or a session's change without its CSRF token"),
        "422": _error("A body that does not validate"),
    }
    return out


def _tag(path: str) -> str:
    parts = [p for p in path.split("/") if p and not p.startswith("{")]
    return parts[3] if len(parts) > 3 else parts[-1]


def _operation_id(method: str, path: str) -> str:
    words = [p.strip("{}").replace("-", "_") for p in path.split("/")[3:] if p]
    return method.lower() + "_" + "_".join(words)
