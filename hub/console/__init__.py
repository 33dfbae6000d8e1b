"""The operator console: web pages on the hub for what an operator does (sign in,
the health center, pairing Desktops, Gateways, chat channels, work, dead letters,
the audit log, live workspace events). Pages are rendered here; what they show
and change goes through the documented admin API, from the page's own script,
under the console session (`hub.http` checks it, and its CSRF token)."""

from __future__ import annotations

from ._routes import add_routes

__all__ = ["add_routes"]
