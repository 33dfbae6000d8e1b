"""The websocket client of the transports that hold one open (Discord's Gateway,
Slack's Socket Mode): aiohttp's, with the platform's refusals mapped as the
HTTP calls map them (429 with its Retry-After, 5xx retryable, 4xx permanent)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

from .._provider import DeliveryFailed
from ._platform_http import failure_for_status

MAX_MESSAGE_BYTES = 4 << 20


@asynccontextmanager
async def websocket(url: str, operation: str) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A connected websocket (closed on exit); DeliveryFailed when it cannot be had.
    Messages name the operation, never the URL (it may carry a ticket)."""
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(url, heartbeat=None, max_msg_size=MAX_MESSAGE_BYTES)
        except aiohttp.WSServerHandshakeError as exc:
            raise failure_for_status(operation, exc.status, exc.headers or {}, None) from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise DeliveryFailed(
                f"{operation}: cannot connect ({type(exc).__name__})", code="transport.error"
            ) from None
        async with ws:
            yield ws


async def receive_json(ws: Any, timeout: float | None = None) -> dict[str, Any] | None:
    """The next JSON object ({} for a text frame that is not one), or None once the
    socket closed (or nothing came within `timeout`)."""
    try:
        msg = await ws.receive(timeout=timeout)
    except TimeoutError:
        return None
    if msg.type != aiohttp.WSMsgType.TEXT:
        return None
    try:
        value = json.loads(msg.data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
