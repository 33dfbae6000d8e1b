"""The HTTP application: middleware (admin bearer, errors, metrics), health,
readiness, metrics and audit, and the helpers rooms use to add their routes.
"""

from __future__ import annotations

from ._app import (
    HUB_KEY,
    add_route_table,
    after_query,
    bool_query,
    build_app,
    client_address,
    cursor_query,
    int_query,
    invalid,
    iso,
    json_body,
    json_error,
    next_page,
    page_cursor,
    path_token,
    refusal_response,
    serve_app,
    tenant_param,
)
from ._server import HttpServer

__all__ = [
    "HUB_KEY",
    "HttpServer",
    "add_route_table",
    "after_query",
    "bool_query",
    "build_app",
    "client_address",
    "cursor_query",
    "int_query",
    "invalid",
    "iso",
    "json_body",
    "json_error",
    "next_page",
    "page_cursor",
    "path_token",
    "refusal_response",
    "serve_app",
    "tenant_param",
]
