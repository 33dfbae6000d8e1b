"""The hub's HTTP face (aiohttp): health, readiness, metrics and the admin API.

Every error is a JSON body `{"error": {"code", "message"}}`; `/api/` routes need
the admin bearer token, compared in constant time.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from schemas import (
    AuditPage,
    InvalidTokenError,
    WireModel,
    check_tenant,
    check_token,
    unstorable,
    unstorable_json,
)

from ..core import LogBudget, Refusal, is_transient, kv
from ._openapi import documented
from ._server import HttpServer
from ._session import ApiAuth, Caller, Denied, SessionStore, api_caller

if TYPE_CHECKING:
    from .._service import Hub

log = logging.getLogger("cowork.hub.http")
HUB_KEY: web.AppKey[Hub] = web.AppKey("hub")
AUTH_KEY: web.AppKey[ApiAuth] = web.AppKey("api_auth", ApiAuth)
# The request's Caller, set by the middleware on /api/ routes.
CALLER_KEY: web.RequestKey[Caller] = web.RequestKey("cowork_caller", Caller)
LOG_BUDGET_KEY: web.AppKey[LogBudget] = web.AppKey("log_budget", LogBudget)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=WireModel)


def json_error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers or None
    )


def refusal_response(exc: Refusal) -> web.Response:
    """A refusal as the JSON error, with `Retry-After` when waiting may help. The
    middleware answers every Refusal a route lets through this way."""
    status = exc.status if exc.status >= 400 else 409
    if exc.retry_after is None:
        return json_error(status, exc.code, str(exc))
    return json_error(
        status, exc.code, str(exc), **{"Retry-After": str(math.ceil(exc.retry_after))}
    )


def invalid(message: str) -> web.HTTPUnprocessableEntity:
    """A 422 whose body is the usual JSON error."""
    return web.HTTPUnprocessableEntity(
        text=json.dumps({"error": {"code": "invalid_request", "message": message}}),
        content_type="application/json",
    )


async def json_body(request: web.Request, model: type[M], *, optional: bool = False) -> M:
    """The request body validated as `model`; a 422 naming the first bad field.
    With `optional`, no body (or an empty one) means the model's defaults."""
    raw = await request.read() if request.can_read_body else b""
    if optional and not raw.strip():
        return model()
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise invalid(f"{where}: {first['msg']}") from None
    problem = unstorable_json(raw)  # valid, but PostgreSQL could not store it
    if problem is not None:
        raise invalid(problem)
    return body


def client_address(request: web.Request, trusted: list) -> str:
    """Who sent `request`: the socket address, or, when that is a trusted proxy, the
    nearest X-Forwarded-For address (from the right) that is not a trusted proxy.
    Forwarded headers from anyone else are ignored (they are the client's to forge)."""
    remote = request.remote or "unknown"
    if not trusted or not _in(remote, trusted):
        return remote
    hops = [
        h.strip()
        for v in request.headers.getall("X-Forwarded-For", [])
        for h in v.split(",")
        if h.strip()
    ]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop if _in(hop, None) else remote
    return remote


def _in(address: str, networks: list | None) -> bool:
    """Whether `address` is in one of `networks` (None: whether it is an address at all)."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return networks is None or any(ip in net for net in networks)


def public_base(request: web.Request) -> str:
    """The hub's public HTTP base: COWORK_PUBLIC_HTTP_URL, else where this request
    reached it (its scheme and Host, behind a trusted proxy as forwarded)."""
    configured = request.app[HUB_KEY].settings.public_http_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"


def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def add_route_table(
    app: web.Application, base: str, routes: list[tuple[str, str, Handler]]
) -> None:
    """Add (method, path under `base`, handler) routes; through `add_get` and friends,
    so a GET route answers HEAD too."""
    for method, path, handler in routes:
        getattr(app.router, f"add_{method.lower()}")(base + path, handler)


def _unexpected(request: web.Request, exc: Exception, budget: LogBudget) -> web.Response:
    """A 503 the client may retry when the database or the bus is away (a restart,
    a failover), logged at most once a second; anything else is a bug: 500."""
    if is_transient(exc):
        suppressed = budget.allow("http.backend_unavailable")
        if suppressed is not None:
            log.warning(
                "http.backend_unavailable",
                **kv(path=request.path, error=type(exc).__name__, suppressed=suppressed),
            )
        response = json_error(
            503,
            "backend_unavailable",
            "the hub cannot reach its database or bus right now; retry shortly",
        )
        response.headers["Retry-After"] = "1"
        return response
    log.exception("http.unhandled_error", **kv(path=request.path, method=request.method))
    return json_error(500, "internal_error", "the hub failed to handle this request; see its logs")


def _route_name(request: web.Request) -> str:
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def _cut_slow_body(request: web.Request, budget: LogBudget, cut: list[bool]) -> None:
    """The body timer: a body still not fully received closes the connection (the
    handler's pending read then fails as for a client that left); `cut` records it."""
    transport = request.transport
    if request.content.is_eof() or transport is None or transport.is_closing():
        return
    cut.append(True)
    suppressed = budget.allow("http.body_timeout")
    if suppressed is not None:
        log.info(
            "http.body_timeout",
            **kv(path=request.path, method=request.method, suppressed=suppressed),
        )
    transport.close()


def hub_middleware(
    auth: ApiAuth,
    *,
    metrics_need_token: bool = False,
    body_timeout: float | None = None,
    budget: LogBudget | None = None,
) -> Callable:
    """The one middleware of the hub's app (one layer per request, not two: every
    webhook request pays for each layer): `/api/` routes need the admin bearer, the
    viewer's (to read) or a console session (`_session`; and `/metrics` with
    COWORK_METRICS_REQUIRE_TOKEN: its labels name channel instances); a body must
    arrive within `body_timeout` of the head, else the connection is closed; every
    error becomes the JSON body; every answer is counted and timed."""
    budget = budget or LogBudget()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        body_timer: asyncio.TimerHandle | None = None
        cut: list[bool] = []  # _cut_slow_body appends when it closes the connection
        if body_timeout and request.body_exists and not request.content.is_eof():
            body_timer = asyncio.get_running_loop().call_later(
                body_timeout, _cut_slow_body, request, budget, cut
            )
        try:
            refusal = (
                await _api_refusal(request, auth)
                if request.path.startswith("/api/")
                or (metrics_need_token and request.path == "/metrics")
                else None
            ) or _unstorable_params(request)
            response = refusal or await handler(request)
        except web.HTTPException as exc:
            response = _http_exception_json(exc)
        except Refusal as exc:
            response = refusal_response(exc)
        except ConnectionResetError:  # the client went away mid-request: nobody to answer
            suppressed = None if cut else budget.allow("http.client_disconnected")
            if suppressed is not None:  # (a body timeout logged already)
                log.info(
                    "http.client_disconnected",
                    **kv(path=request.path, method=request.method, suppressed=suppressed),
                )
            response = json_error(
                400,
                "client_disconnected",
                "the client closed the connection before the request ended",
            )
        except Exception as exc:
            response = _unexpected(request, exc, budget)
        finally:
            if body_timer is not None:
                body_timer.cancel()
        request.app[HUB_KEY].metrics.http_served(
            request.method, _route_name(request), response.status, time.perf_counter() - started
        )
        return response

    return middleware


def _unstorable_params(request: web.Request) -> web.Response | None:
    """A 400 for a NUL character or a lone surrogate in the path or the query:
    PostgreSQL text cannot hold either, so it would otherwise fail deep in a route
    as a 500."""
    if unstorable(request.path) is not None:
        return json_error(400, "bad_request", "the path " + _CANNOT_HOLD)
    for name, value in request.query.items():
        if unstorable(name) is not None or unstorable(value) is not None:
            return json_error(400, "bad_request", f"query parameter {name!r} {_CANNOT_HOLD}")
    return None


_CANNOT_HOLD = "holds a NUL character or a lone surrogate"


def _http_exception_json(exc: web.HTTPException) -> web.Response:
    if exc.content_type == "application/json":  # already a JSON error body
        return web.Response(status=exc.status, text=exc.text, content_type="application/json")
    code = exc.reason.lower().replace(" ", "_")
    return json_error(
        exc.status,
        code,
        exc.text or exc.reason,
        **{
            k: v
            for k, v in exc.headers.items()
            if k in ("Allow", "Retry-After", "WWW-Authenticate")
        },
    )


async def _api_refusal(request: web.Request, auth: ApiAuth) -> web.Response | None:
    """None (and the caller noted on the request) if the request may go on; else the
    401/403/503 answer."""
    caller = await api_caller(request, auth)
    if isinstance(caller, Denied):
        headers = {"WWW-Authenticate": 'Bearer realm="cowork-hub"'} if caller.challenge else {}
        return json_error(caller.status, caller.code, caller.message, **headers)
    request[CALLER_KEY] = caller
    return None


def request_caller(request: web.Request) -> Caller:
    """Who made this admin API request (the middleware checked it)."""
    return request[CALLER_KEY]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    ready, checks = await hub.readiness()
    body: dict = {"status": "ready" if ready else "not_ready", "checks": checks}
    if not ready:
        body["reason"] = "; ".join(
            f"{name}: {c['detail']}" for name, c in checks.items() if not c["ok"]
        )
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    hub.refresh_gauges()
    return web.Response(
        body=generate_latest(hub.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def tenant_param(request: web.Request) -> str:
    try:
        return check_tenant(request.match_info["tenant"])
    except InvalidTokenError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None


def path_token(request: web.Request, name: str) -> str:
    """A path parameter that must be a token id (400 otherwise)."""
    try:
        return check_token(request.match_info[name], name)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None


def int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"query parameter {name!r} must be an integer") from None
    if not lo <= value <= hi:
        raise web.HTTPBadRequest(text=f"query parameter {name!r} must be between {lo} and {hi}")
    return value


def choice_query(request: web.Request, name: str, allowed: Iterable[str]) -> str | None:
    """A query parameter that must be one of `allowed` (400 otherwise), or None."""
    value = request.query.get(name)
    choices = sorted(allowed)
    if value is not None and value not in choices:
        raise web.HTTPBadRequest(
            text=f"query parameter {name!r} must be one of {', '.join(choices)}"
        )
    return value


def page_cursor(*values: str) -> str:
    """An opaque cursor for the next page of a list (keyset: the last row's sort key)."""
    raw = json.dumps(list(values), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor_query(request: web.Request, parts: int) -> list[str] | None:
    """The `cursor` query parameter as the values `page_cursor` packed (400 if it is
    not one of ours)."""
    raw = request.query.get("cursor")
    if raw is None:
        return None
    try:
        values = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, TypeError):
        values = None
    ours = isinstance(values, list) and len(values) == parts
    if not ours or not all(isinstance(v, str) and unstorable(v) is None for v in values):
        raise web.HTTPBadRequest(text="query parameter 'cursor' is not a cursor this API gave")
    return values


def after_query(request: web.Request) -> tuple[datetime, str] | None:
    """Where the page asked for starts: the (created_at, id) of the last row of the
    page before, from the `cursor` that `next_page` gave (400 if it is not one)."""
    found = after_keys(request, 1)
    return None if found is None else (found[0], found[1][0])


def after_keys(request: web.Request, ids: int) -> tuple[datetime, list[str]] | None:
    """`after_query` for a list ordered by a time and `ids` ids: (time, [id, ...])."""
    values = cursor_query(request, 1 + ids)
    if values is None:
        return None
    try:
        return datetime.fromisoformat(values[0]), values[1:]
    except ValueError:
        raise web.HTTPBadRequest(
            text="query parameter 'cursor' is not a cursor this API gave"
        ) from None


def next_page(
    rows: list[dict], limit: int, *id_keys: str, time_key: str | None = "created_at"
) -> tuple[list[dict], str | None]:
    """The page out of `limit + 1` rows fetched in the list's order, and the cursor of
    the next page (None when this one is the last): the last row's time (none for a
    list ordered by ids alone) and ids."""
    page = rows[:limit]
    if len(rows) <= limit:
        return page, None
    last = page[-1]
    time = [] if time_key is None else [last[time_key].isoformat()]
    return page, page_cursor(*time, *(last[k] for k in id_keys))


def bool_query(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise web.HTTPBadRequest(text=f"query parameter {name!r} must be true or false")


AUDIT_FILTERS = {
    "action": "action",
    "actorKind": "actor_kind",
    "actorId": "actor_id",
    "targetKind": "target_kind",
    "targetId": "target_id",
    "workspaceId": "workspace_id",
}


@documented(
    "The tenant's audit log, newest first, filtered by equal values",
    response=AuditPage,
    query={
        "limit": "1..1000, default 100",
        "before": "only rows older than this id (the last id of the page before)",
        **{name: f"only rows with this {name}" for name in AUDIT_FILTERS},
    },
)
async def list_audit(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    tenant = tenant_param(request)
    limit = int_query(request, "limit", 100, 1, 1000)
    before = int_query(request, "before", 0, 0, 2**62) or None
    equal = {}
    for name, column in AUDIT_FILTERS.items():
        value = request.query.get(name)
        if value is not None:
            if not 0 < len(value) <= 512:
                raise web.HTTPBadRequest(text=f"query parameter {name!r} must be 1-512 characters")
            equal[column] = value
    rows = await hub.audit.recent(tenant, limit, before=before, **equal)
    return web.json_response({"items": [_audit_json(r) for r in rows]})


def _audit_json(row: dict) -> dict:
    out = {_camel(k): v for k, v in row.items() if v is not None}
    out["occurredAt"] = row["occurred_at"].isoformat()
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def build_app(
    hub: Hub,
    admin_token: str | None,
    route_tables: Iterable[Callable[[web.Application], None]] = (),
) -> web.Application:
    """The HTTP application: health, readiness, metrics and audit here; each room adds
    its own routes through the `add_routes` of its public face."""
    settings = hub.settings
    viewer = settings.viewer_token.get_secret_value() if settings.viewer_token else None
    auth = ApiAuth(
        admin_token,
        viewer,
        settings.console_session_minutes * 60,
        SessionStore(lambda: hub.started_pool()),  # asked when a session is
    )
    budget = LogBudget()  # shared with the server's accept-error log (serve_app)
    app = web.Application(
        middlewares=[
            hub_middleware(
                auth,
                metrics_need_token=hub.settings.metrics_require_token,
                body_timeout=hub.settings.http_body_timeout_seconds,
                budget=budget,
            )
        ],
        client_max_size=1024 * 1024,
    )
    app[HUB_KEY] = hub
    app[AUTH_KEY] = auth
    app[LOG_BUDGET_KEY] = budget
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/tenants/{tenant}/audit", list_audit)
    for add_routes in route_tables:
        add_routes(app)
    return app


async def serve_app(
    app: web.Application, host: str, port: int, header_timeout: float
) -> HttpServer:
    """Listen with `app` (from build_app) under the header timeout; OSError when the
    address is taken."""
    budget = app.get(LOG_BUDGET_KEY) or LogBudget()
    server = HttpServer(app, host, port, header_timeout=header_timeout, budget=budget)
    await server.start()
    return server
