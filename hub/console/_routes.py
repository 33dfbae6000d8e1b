"""The console's HTTP routes: sign-in and sign-out, the pages, their assets.

    GET  /console/login, POST /console/login   a token for a session cookie
    POST /console/logout                       (with the session's CSRF token)
    GET  /console/ and /console/<page>         the pages (a session is needed)
    GET  /console/pair                         where a pairing link lands (no session)
    GET  /console/static/<asset>               the script and style sheet

Every answer carries a strict Content-Security-Policy (scripts and styles only
from here, no inline code, nothing framed), and no page is cached.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web

from schemas import InvalidTokenError, check_tenant

from ..core import RateLimiter
from ..desktop import PAIRING_STATUSES
from ..gateways import REGISTRATION_STATUSES
from ..http import AUTH_KEY, COOKIE, HUB_KEY, ApiAuth, Caller, client_address

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}


class SignInGuard:
    """Failed sign-ins per source address: 10 at once, then one every 5 s; an address
    over its share is refused before its token is even looked at."""

    def __init__(self) -> None:
        self._failures = RateLimiter(rate=0.2, burst=10)
        self._locked: dict[str, float] = {}

    def wait(self, address: str) -> float:
        """Seconds until `address` may try again (0: now)."""
        return max(0.0, self._locked.get(address, 0.0) - time.monotonic())

    def failed(self, address: str) -> None:
        wait = self._failures.take(address)
        if wait:
            if len(self._locked) > 10_000:  # forget lockouts that are over
                now = time.monotonic()
                self._locked = {a: t for a, t in self._locked.items() if t > now}
            self._locked[address] = time.monotonic() + wait


GUARD_KEY: web.AppKey[SignInGuard] = web.AppKey("console_sign_in", SignInGuard)


@dataclass(frozen=True)
class Page:
    path: str
    title: str
    template: str


PAGES = (
    Page("", "Start", "home.html"),
    Page("health", "Health", "health.html"),
    Page("desktops", "Desktops", "desktops.html"),
    Page("gateways", "Gateways", "gateways.html"),
    Page("channels", "Channels", "channels.html"),
    Page("work", "Edge work", "work.html"),
    Page("dead-letters", "Dead letters", "deadletters.html"),
    Page("audit", "Audit log", "audit.html"),
    Page("events", "Live events", "events.html"),
)


def _assets() -> dict[str, tuple[bytes, str]]:
    """Each asset's bytes and a version (its content hash) for cache-busting URLs."""
    folder = resources.files(__package__) / "static"
    out = {}
    for name in ASSETS:
        data = (folder / name).read_bytes()
        out[name] = (data, hashlib.sha256(data).hexdigest()[:12])
    return out


ASSET_DATA = _assets()
TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader(__package__, "templates"),
    autoescape=True,  # every value is escaped: names and labels are untrusted
    undefined=jinja2.StrictUndefined,
)
# The fleet lists' status filters offer the API's own choices (`fleet_filters`).
TEMPLATES.globals.update(
    pairing_statuses=PAIRING_STATUSES, registration_statuses=REGISTRATION_STATUSES
)


def _asset_url(name: str) -> str:
    return f"/console/static/{name}?v={ASSET_DATA[name][1]}"


def _render(template: str, status: int = 200, **values: Any) -> web.Response:
    text = TEMPLATES.get_template(template).render(asset_url=_asset_url, pages=PAGES, **values)
    return web.Response(
        text=text, status=status, content_type="text/html", headers=SECURITY_HEADERS
    )


def _redirect(location: str) -> web.Response:
    """A 303 (returned, not raised: the hub's middleware turns raised HTTP errors into
    JSON bodies, which would lose the cookie)."""
    return web.Response(status=303, headers=dict(SECURITY_HEADERS, Location=location))


def _secure(request: web.Request) -> bool:
    public = request.app[HUB_KEY].settings.public_http_url or ""
    return request.secure or public.startswith("https://")


def _tenant(request: web.Request) -> str:
    try:
        return check_tenant(request.query.get("tenant", "default"))
    except InvalidTokenError:
        return "default"


async def _session(request: web.Request) -> Caller | None:
    return await request.app[AUTH_KEY].session(request.cookies.get(COOKIE))


async def login_page(request: web.Request) -> web.Response:
    return _render("login.html", error=None)


async def login(request: web.Request) -> web.Response:
    auth: ApiAuth = request.app[AUTH_KEY]
    if not auth.enabled:
        return _render("login.html", 503, error="No admin token is configured on this hub.")
    hub, guard = request.app[HUB_KEY], request.app[GUARD_KEY]
    address = client_address(request, hub.settings.trusted_proxy_networks)
    wait = guard.wait(address)
    if wait:
        return _render(
            "login.html", 429, error=f"Too many attempts; try again in {math.ceil(wait)} s."
        )
    form = await request.post()
    token = form.get("token")
    role = auth.token_role(token) if isinstance(token, str) and token else None
    if role is None:
        guard.failed(address)
        return _render("login.html", 401, error="That token is not valid.")
    cookie, caller = await auth.sign_in(role)
    response = _redirect("/console/")
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(caller.expires - time.time()),
        path="/",
        httponly=True,
        secure=_secure(request),
        samesite="Strict",
    )
    return response


async def logout(request: web.Request) -> web.Response:
    auth: ApiAuth = request.app[AUTH_KEY]
    caller = await _session(request)
    form = await request.post()
    token = form.get("csrf")
    if caller is not None:
        if not auth.csrf_ok(caller, token if isinstance(token, str) else None):
            return _render("login.html", 403, error="Sign-out needs the page's CSRF token.")
        await auth.sign_out(caller)  # on every replica: the shared store forgets it
    response = _redirect("/console/login")
    response.del_cookie(COOKIE, path="/")
    return response


def _page_handler(page: Page):
    async def handler(request: web.Request) -> web.Response:
        caller = await _session(request)
        if caller is None:
            return _redirect("/console/login")
        auth: ApiAuth = request.app[AUTH_KEY]
        return _render(
            page.template,
            page=page,
            role=caller.role,
            csrf=auth.csrf_token(caller),
            tenant=_tenant(request),
            nats_url=",".join(request.app[HUB_KEY].settings.edge_nats_urls),
        )

    handler.__name__ = f"console_{page.template.split('.')[0]}"
    return handler


async def pair_landing(request: web.Request) -> web.Response:
    return _render("pair.html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSET_DATA:
        raise web.HTTPNotFound(text="no such asset")
    headers = dict(SECURITY_HEADERS, **{"Cache-Control": "public, max-age=31536000, immutable"})
    return web.Response(body=ASSET_DATA[name][0], content_type=ASSETS[name], headers=headers)


async def to_console(request: web.Request) -> web.Response:
    return _redirect("/console/")


def add_routes(app: web.Application) -> None:
    app[GUARD_KEY] = SignInGuard()
    app.router.add_get("/console", to_console)
    app.router.add_get("/console/login", login_page)
    app.router.add_post("/console/login", login)
    app.router.add_post("/console/logout", logout)
    app.router.add_get("/console/pair", pair_landing)
    app.router.add_get("/console/static/{name}", asset)
    for page in PAGES:
        app.router.add_get(f"/console/{page.path}", _page_handler(page))
