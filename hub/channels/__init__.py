"""Hosting the channel providers: instances and their credentials, the inbound
router (identity, claims, chat commands, sessions), the renderer, action tokens,
receipts, and their HTTP routes.
"""

from __future__ import annotations

from aiohttp import web

from ._actions import ActionTokens
from ._hosting import ChannelService
from ._outbox import ChannelOutbox, set_delivery_id_key
from ._receipts import ReceiptIngest
from ._renderer import ChannelRenderer
from ._router import ChannelRouter
from ._routes import add_routes as _add_instance_routes
from ._routes_deliveries import add_routes as _add_delivery_routes
from ._routes_users import add_routes as _add_user_routes

__all__ = [
    "ActionTokens",
    "ChannelOutbox",
    "ChannelRenderer",
    "ChannelRouter",
    "ChannelService",
    "ReceiptIngest",
    "add_routes",
    "set_delivery_id_key",
]


def add_routes(app: web.Application) -> None:
    """Instances, credentials, webhooks, claim codes and chat users."""
    _add_instance_routes(app)
    _add_user_routes(app)
    _add_delivery_routes(app)
