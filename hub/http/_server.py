"""Serving the hub's app: bounded read times and bounded error logs.

- Headers: a connection must send a whole request head within
  `header_timeout` of connecting (or of its previous answer), else aiohttp
  closes it. This is aiohttp's keep-alive timer, which is armed from the
  connection's start and fires while the parser still waits for a request, so
  it cuts both idle and half-sent heads (a byte every few seconds does not
  extend it).
- Bodies: the hub middleware closes a connection whose body has not fully
  arrived within `body_timeout` of its head (`_app.hub_middleware`).
- Logs: when the process runs out of file descriptors, asyncio reports every
  failed accept (up to 100 per wake-up, each with a traceback). Those go
  through a `LogBudget`: a few lines, then at most one a second, each saying how
  many were suppressed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

from aiohttp import web

from ..core import LogBudget, kv

log = logging.getLogger("cowork.hub.http")

# What asyncio's accept loop reports as "out of system resource".
RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class HttpServer:
    """One aiohttp site for `app`, with the header timeout and accept-error budget."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        header_timeout: float,
        budget: LogBudget,
    ) -> None:
        self._app, self._host, self._port = app, host, port
        self._header_timeout = header_timeout
        self._budget = budget
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous_handler: Any = None
        self.port: int | None = None

    async def start(self) -> int:
        """Listen; returns the bound port. OSError when the address is taken."""
        self._runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=self._header_timeout,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        self._loop = asyncio.get_running_loop()
        self._previous_handler = self._loop.get_exception_handler()
        self._loop.set_exception_handler(self._on_loop_error)
        addresses = self._runner.addresses  # the bound (host, port, ...) of our one site
        self.port = addresses[0][1] if addresses else self._port
        return self.port

    async def stop(self) -> None:
        if self._loop is not None and self._loop.get_exception_handler() == self._on_loop_error:
            self._loop.set_exception_handler(self._previous_handler)
        self._loop = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRORS:
            suppressed = self._budget.allow("http.accept_failed")
            if suppressed is not None:
                log.error(
                    "http.accept_failed",
                    **kv(error=exc.strerror or str(exc), errno=exc.errno, suppressed=suppressed),
                )
            return
        if self._previous_handler is not None:
            self._previous_handler(loop, context)
        else:
            loop.default_exception_handler(context)
