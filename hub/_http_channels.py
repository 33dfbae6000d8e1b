"""SKELETON: channel admin API and webhook routes. Replaced by H5."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    return None
