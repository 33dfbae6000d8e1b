"""Structured logs: one JSON object (or key=value line) per record, on stderr.

Call `log.info("event.name", extra={"fields": {...}})`, or use `kv()` for brevity.
Values under secret-looking keys are replaced before a record is written, so a
careless caller cannot put a token into the logs.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from schemas import SECRET_REDACTED, is_secret_key, scrub_text

from ._rate_limit import RateLimiter

# httpx logs every request URL at info, httpcore each connection step at debug.
HTTP_CLIENT_LOGGERS = ("httpx", "httpcore")

_BASE = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "fields"}


def kv(**fields: Any) -> dict[str, Any]:
    """`log.info("x", **kv(a=1))` attaches structured fields to a record."""
    return {"extra": {"fields": fields}}


def _clean(fields: dict[str, Any]) -> dict[str, Any]:
    # Same rules as audit rows and Desktop redaction: secret keys and token shapes.
    return {
        k: (
            SECRET_REDACTED
            if is_secret_key(k) or k == "dsn"
            else scrub_text(v)
            if isinstance(v, str)
            else v
        )
        for k, v in fields.items()
    }


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(getattr(record, "fields", {}) or {})
    fields.update({k: v for k, v in record.__dict__.items() if k not in _BASE})
    return _clean(fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": scrub_text(record.getMessage()),
            **_fields(record),
        }
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        pairs = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname.lower():7} {record.name}: {record.getMessage()} {pairs}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line.rstrip()


def configure_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter stays at warning unless debugging.
    for noisy in ("aiohttp.access", "asyncio", "nats"):
        logging.getLogger(noisy).setLevel("DEBUG" if level == "debug" else "WARNING")
    # The HTTP client's request lines carry full URLs, and Telegram puts the bot
    # token in the URL path: never logged, not even when debugging.
    for client in HTTP_CLIENT_LOGGERS:
        logging.getLogger(client).setLevel("WARNING")


class LogBudget:
    """Bounds how many lines of one kind a flood can write: `burst` at once, then
    `rate` a second (the hub's one RateLimiter, keyed by the line's event name)."""

    def __init__(self, rate: float = 1.0, burst: float = 5.0) -> None:
        self._limiter = RateLimiter(rate, burst, max_keys=1000)
        self._suppressed: dict[str, int] = {}

    def allow(self, event: str) -> int | None:
        """None: drop this line. Else how many lines of `event` were dropped since
        the last one written (to log with it)."""
        if self._limiter.take(event) > 0:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return None
        return self._suppressed.pop(event, 0)
