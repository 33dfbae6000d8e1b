"""The HTTP application: middleware (admin and viewer bearer, console sessions,
errors, metrics), health, readiness, metrics, audit, the health center and dead
letters, the OpenAPI document, and the helpers rooms use to add their routes.
"""

from __future__ import annotations

from ._admin import add_admin_routes as add_routes
from ._app import (
    AUTH_KEY,
    HUB_KEY,
    add_route_table,
    after_keys,
    after_query,
    bool_query,
    build_app,
    choice_query,
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
    public_base,
    refusal_response,
    request_caller,
    serve_app,
    tenant_param,
)
from ._openapi import documented, openapi_document
from ._server import HttpServer
from ._session import COOKIE, CSRF_HEADER, ApiAuth, Caller

__all__ = [
    "AUTH_KEY",
    "COOKIE",
    "CSRF_HEADER",
    "ApiAuth",
    "Caller",
    "HUB_KEY",
    "add_routes",
    "documented",
    "openapi_document",
    "request_caller",
    "HttpServer",
    "add_route_table",
    "after_keys",
    "after_query",
    "choice_query",
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
    "public_base",
    "refusal_response",
    "serve_app",
    "tenant_param",
]
