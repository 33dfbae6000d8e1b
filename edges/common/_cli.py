"""What `cowork desktop` and `cowork gateway` parse and print the same way.

Argument types that turn a bad value into one line of argparse usage error,
the shared options (state directory, OpenCode), the one-line failure on
stderr, and running an agent until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

DEFAULT_OPENCODE_URL = "http://127.0.0.1:4096"


def documented_command(
    sub: Any, name: str, *, help: str, description: str, epilog: str
) -> argparse.ArgumentParser:
    """A sub-command whose epilog (the environment variables) keeps its line breaks."""
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def hub_urls(text: str) -> list[str]:
    """Comma-separated NATS URLs."""
    urls = [u.strip() for u in text.split(",") if u.strip()]
    for url in urls:
        parsed = urlparse(url)
        if parsed.scheme not in ("nats", "tls", "ws", "wss") or not parsed.hostname:
            raise argparse.ArgumentTypeError(f"{url!r} is not a NATS URL like nats://HOST:4222")
    if not urls:
        raise argparse.ArgumentTypeError("no NATS URL given")
    return urls


def http_url(text: str) -> str:
    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL")
    return text


def number_between(
    parse: Callable[[str], float], low: float, high: float, unit: str = ""
) -> Callable[[str], Any]:
    """An argument type: a number (`int` or `float`) from `low` to `high`."""
    kind = "whole number" if parse is int else "number"

    def parse_bounded(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}{unit}")
        return value

    return parse_bounded


# Seconds between heartbeats or syncs.
interval_seconds = number_between(float, 0.2, 3600, " seconds")


def add_state_dir(p: argparse.ArgumentParser, default: Path, env_var: str) -> None:
    p.add_argument(
        "--state-dir",
        type=Path,
        default=default,
        help=f"state directory (default: %(default)s; env {env_var})",
    )


def add_opencode_server(p: argparse.ArgumentParser) -> None:
    """--opencode and --opencode-password, for the commands that run an agent."""
    p.add_argument(
        "--opencode",
        default=os.environ.get("COWORK_OPENCODE_URL", DEFAULT_OPENCODE_URL),
        type=http_url,
        help="OpenCode server URL (default: %(default)s)",
    )
    p.add_argument(
        "--opencode-password",
        default=os.environ.get("COWORK_OPENCODE_PASSWORD")
        or os.environ.get("OPENCODE_SERVER_PASSWORD"),
        help="OpenCode server password (prefer the environment variable)",
    )


def add_status_command(sub: Any, help: str) -> argparse.ArgumentParser:
    """`status`: what the state directory holds, offline; `--json` for scripts."""
    status = sub.add_parser("status", help=help)
    status.add_argument("--json", action="store_true", help="print JSON")
    return status


def fail(message: str, code: int = 1) -> int:
    """One line on stderr, never a traceback; returns the exit code."""
    print(f"cowork: error: {message}", file=sys.stderr)
    return code


class Store(Protocol):
    def close(self) -> None: ...


S = TypeVar("S", bound=Store)


def run_subcommand(
    args: argparse.Namespace,
    command: str,
    store: S,
    handlers: dict[str, Callable[[argparse.Namespace, S], int]],
    store_error: type[Exception],
) -> int:
    """Run `handlers[command]` on the state directory; a problem with the directory
    (`store_error`) is one line and exit 1, and the store is closed either way."""
    try:
        handler = handlers.get(command)
        if handler is not None:
            return handler(args, store)
    except store_error as exc:
        return fail(str(exc))
    finally:
        store.close()
    return 2


class Agent(Protocol):
    def stop(self) -> None: ...

    async def run(self) -> None: ...


async def serve(agent: Agent) -> None:
    """Run `agent` until it stops; SIGINT and SIGTERM stop it cleanly."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    await agent.run()


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 meaning any free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 65535")
    return value
