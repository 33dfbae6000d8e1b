"""A real OpenCode server for tests, offline, driven by a scripted fake model.

OpenCode is a 185 MB binary from npm (`opencode-ai`); it is installed once into
`<repo>/.cache/opencode` (`make test` does it up front, `opencode_binary()` does it
lazily for a bare `pytest`). The model behind it is `FakeModelServer`, a tiny
OpenAI-compatible chat-completions server whose answers are chosen by keywords in
the last user message, so tests can drive text, tool permissions, questions and
aborts deterministically. `OpenCodeServer` runs `opencode serve` with its own
HOME and XDG dirs and every network-reaching feature switched off.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

OPENCODE_VERSION = "1.18.33"
REPO_ROOT = Path(__file__).resolve().parents[2]
OPENCODE_DIR = REPO_ROOT / ".cache" / "opencode"
# Recorded OpenCode event streams, vendored (tests/fixtures/README.md says how).
FIXTURES_DIR = REPO_ROOT / "tests" / "fixtures"
CAPTURES_DIR = FIXTURES_DIR / "opencode-events"

OFFLINE_ENV = {
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_CLAUDE_CODE": "1",
    "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1",
}

# The fake model's script: keywords looked for in the last user message.
RUN_BASH = "RUN_BASH"
ASK_QUESTION = "ASK_QUESTION"
SLOW = "SLOW"
BASH_COMMAND = "echo cowork-tool-ran"
BASH_OUTPUT = "cowork-tool-ran"
QUESTION = {
    "question": "Pick a colour?",
    "header": "Colour",
    "options": [{"label": "Blue", "description": "cool"}, {"label": "Red", "description": "warm"}],
}
TITLE = "Fake title"
# How long a test waits for what OpenCode produces (a reply, a permission, a tool's
# output) before failing. A fresh `opencode serve` loads its plugins, catalog and the
# model provider on its first prompt, and the bash tool on its first use: at load 13-18
# on the 2-core machine its first permission.asked came 28.9 s after the session was
# made, the same ask in a second session 4.3 s after (one OpenCodeServer, same run).
# A test that is the first of its OpenCode (a single test run, a module's first) pays
# that; the waits return as soon as the thing comes.
OPENCODE_OUTPUT_TIMEOUT = 60.0


# --------------------------------------------------------------------------
# The binary
# --------------------------------------------------------------------------


def _platform_packages() -> list[str]:
    system = {"Linux": "linux", "Darwin": "darwin", "Windows": "windows"}.get(
        platform.system(), platform.system().lower()
    )
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    base = f"opencode-{system}-{arch}"
    return [base, f"{base}-baseline", f"{base}-musl", f"{base}-baseline-musl"]


def _installed_binary(prefix: Path) -> Path | None:
    """The platform binary under `prefix`, if the pinned version is installed there."""
    try:
        meta = json.loads((prefix / "node_modules/opencode-ai/package.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != OPENCODE_VERSION:
        return None
    for package in _platform_packages():
        binary = prefix / "node_modules" / package / "bin" / "opencode"
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    return None


def opencode_binary(prefix: Path = OPENCODE_DIR) -> Path:
    """Path to the pinned `opencode` binary, installing it with npm on first use.

    A file lock keeps parallel callers (other pytest runs) from installing at once.
    """
    found = _installed_binary(prefix)
    if found:
        return found
    prefix.mkdir(parents=True, exist_ok=True)
    with open(prefix / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _installed_binary(prefix)
        if found is None:
            subprocess.run(
                [
                    "npm",
                    "install",
                    "--prefix",
                    str(prefix),
                    "--no-audit",
                    "--no-fund",
                    f"opencode-ai@{OPENCODE_VERSION}",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            found = _installed_binary(prefix)
        if found is None:
            raise RuntimeError(
                f"npm installed opencode-ai@{OPENCODE_VERSION} into {prefix} "
                f"but no binary for this platform ({_platform_packages()})"
            )
        (prefix / ".installed").touch()
        return found


# --------------------------------------------------------------------------
# The fake model
# --------------------------------------------------------------------------


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _split(text: str, pieces: int) -> list[str]:
    size = max(1, -(-len(text) // pieces))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class FakeModelServer:
    """OpenAI-compatible chat completions on 127.0.0.1, scripted by prompt keywords.

    Keywords in the last user message: `RUN_BASH` -> a `bash` tool call running
    BASH_COMMAND; `ASK_QUESTION` -> a `question` tool call asking QUESTION; `SLOW`
    -> 40 text deltas 50 ms apart; anything else -> `reply_for(prompt)` in about 5
    deltas. Once the conversation holds the tool's result, the answer is
    `after_tool_text`. Every request body is kept in `.requests`.
    """

    def __init__(
        self,
        *,
        reply_template: str = "reply to: {prompt}",
        after_tool_text: str = "tool finished",
        slow_chunks: int = 40,
        slow_delay: float = 0.05,
    ) -> None:
        self.reply_template = reply_template
        self.after_tool_text = after_tool_text
        self.slow_chunks = slow_chunks
        self.slow_delay = slow_delay
        # When set to an Event, a SLOW reply stops after its first `slow_gate_after`
        # deltas until the Event is set: a test can act while the reply is surely
        # still streaming, however loaded the machine.
        self.slow_gate: asyncio.Event | None = None
        self.slow_gate_after = 5
        self.requests: list[dict[str, Any]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reply_for(self, prompt: str) -> str:
        return self.reply_template.format(prompt=prompt)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeModelServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}],
            }
        )

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        chunks, tool_call, delay = self._script(body)
        if not body.get("stream"):
            return web.json_response(_completion("".join(chunks), tool_call))
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        try:
            for i, piece in enumerate(chunks):
                if delay and i == self.slow_gate_after and self.slow_gate is not None:
                    await self.slow_gate.wait()
                await _send(response, _chunk({"content": piece}))
                if delay:
                    await asyncio.sleep(delay)
            if tool_call:
                await _send(response, _chunk({"tool_calls": [tool_call]}))
            await _send(response, _chunk({}, "tool_calls" if tool_call else "stop"))
            await _send(response, _usage_chunk())
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            return response  # the client hung up (abort): nothing more to say
        return response

    def _script(self, body: dict[str, Any]) -> tuple[list[str], dict | None, float]:
        """(text deltas, tool call or None, delay between deltas) for one request."""
        messages = body.get("messages") or []
        system = " ".join(_text_of(m) for m in messages if m.get("role") == "system")
        if system.lstrip().startswith("You are a title generator"):
            return [TITLE], None, 0.0
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        prompt = _text_of(messages[last_user]) if last_user >= 0 else ""
        if any(m.get("role") == "tool" for m in messages[last_user + 1 :]):
            return _split(self.after_tool_text, 2), None, 0.0
        if RUN_BASH in prompt:
            return (
                [],
                _tool_call("bash", {"command": BASH_COMMAND, "description": "Print a marker"}),
                0.0,
            )
        if ASK_QUESTION in prompt:
            return [], _tool_call("question", {"questions": [QUESTION]}), 0.0
        if SLOW in prompt:
            return (
                _split(self.reply_for(prompt).ljust(self.slow_chunks, "."), self.slow_chunks),
                None,
                self.slow_delay,
            )
        return _split(self.reply_for(prompt), 5), None, 0.0


def _tool_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": 0,
        "id": "call_fake_1",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "fake-model",
        "choices": [{"index": 0, "delta": {"role": "assistant", **delta}, "finish_reason": finish}],
    }


def _usage_chunk() -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "fake-model",
        "choices": [],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def _completion(text: str, tool_call: dict | None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if tool_call:
        message["tool_calls"] = [{k: v for k, v in tool_call.items() if k != "index"}]
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "fake-model",
        "choices": [
            {"index": 0, "message": message, "finish_reason": "tool_calls" if tool_call else "stop"}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


async def _send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")


# --------------------------------------------------------------------------
# The OpenCode server
# --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def opencode_config(model_url: str) -> dict[str, Any]:
    return {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "fake": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Fake",
                "options": {"baseURL": model_url, "apiKey": "sk-fake"},
                "models": {
                    "fake-model": {
                        "name": "Fake",
                        "tool_call": True,
                        "limit": {"context": 32000, "output": 4096},
                    }
                },
            }
        },
        "enabled_providers": ["fake"],
        "model": "fake/fake-model",
        "small_model": "fake/fake-model",
        "autoupdate": False,
        "share": "disabled",
        "permission": {"bash": "ask"},
    }


class OpenCodeServer:
    """`opencode serve` on 127.0.0.1 in a throwaway project dir, isolated and offline.

    Starts (and owns) a FakeModelServer unless one is given. `restart()` stops the
    process and starts a new one on the same port, for reconnect tests.
    """

    def __init__(
        self,
        model: FakeModelServer | None = None,
        *,
        password: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.model = model or FakeModelServer()
        self._own_model = model is None
        self.password = password
        self.startup_timeout = startup_timeout
        self.port = 0
        self.root: Path | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def directory(self) -> str:
        assert self.root is not None, "server not started"
        return str(self.root / "project")

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "server not started"
        return self.root / "opencode.log"

    async def __aenter__(self) -> OpenCodeServer:
        binary = await asyncio.to_thread(opencode_binary)
        if self._own_model:
            await self.model.start()
        self.root = Path(tempfile.mkdtemp(prefix="cowork-opencode-"))
        (self.root / "project").mkdir()
        self.port = _free_port()
        try:
            await self._start(binary)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()
        if self._own_model:
            await self.model.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    async def restart(self) -> None:
        await self._stop()
        await self._start(await asyncio.to_thread(opencode_binary))

    def _env(self) -> dict[str, str]:
        assert self.root is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCODE_", "XDG_"))}
        home = self.root / "home"
        env.update(
            OFFLINE_ENV,
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / ".config"),
            XDG_DATA_HOME=str(home / ".local/share"),
            XDG_CACHE_HOME=str(home / ".cache"),
            XDG_STATE_HOME=str(home / ".local/state"),
            OPENCODE_CONFIG_CONTENT=json.dumps(opencode_config(self.model.url)),
        )
        if self.password:
            env["OPENCODE_SERVER_PASSWORD"] = self.password
        return env

    async def _start(self, binary: Path) -> None:
        self._log = open(self.log_path, "ab")
        self._process = await asyncio.create_subprocess_exec(
            str(binary),
            "serve",
            "--port",
            str(self.port),
            "--hostname",
            "127.0.0.1",
            cwd=self.directory,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        await self._wait_healthy()

    async def _wait_healthy(self) -> None:
        auth = ("opencode", self.password) if self.password else None
        deadline = time.monotonic() + self.startup_timeout
        # Short per-try timeout: a request that lands while OpenCode is still
        # starting is accepted and never answered.
        async with httpx.AsyncClient(auth=auth, timeout=1.0) as http:
            while True:
                assert self._process is not None
                if self._process.returncode is not None:
                    raise RuntimeError(
                        f"opencode exited with {self._process.returncode}; "
                        f"log: {self.log_path.read_text()[-2000:]}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.url}/global/health")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"opencode not healthy after {self.startup_timeout}s")
                await asyncio.sleep(0.05)

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 2.0)
            except TimeoutError:
                _signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        if process is not None:
            _signal_group(process.pid, signal.SIGKILL)  # tool subprocesses left behind
        if self._log is not None:
            self._log.close()
            self._log = None


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group `pid` leads (started with start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class EventStreamGate:
    """A proxy in front of OpenCode that can keep its event stream (`GET /event`)
    closed: while held, a new `/event` request waits unanswered and open ones are
    cut; everything else passes at once. So a test can run a command while the
    Desktop's relay has no stream, as a late stream (under load) or a dropped one
    would leave it, whatever the machine's speed."""

    _HOP_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})

    def __init__(self, upstream: str, *, held: bool = False) -> None:
        self.upstream = upstream
        self._open = asyncio.Event()
        if not held:
            self._open.set()
        self._streams: list[tuple[web.Request, httpx.Response]] = []
        self._client = httpx.AsyncClient(base_url=upstream, timeout=None)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> EventStreamGate:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.hold()
        self._open.set()  # no request left waiting
        if self._runner is not None:
            await self._runner.cleanup()
        await self._client.aclose()

    async def hold(self) -> None:
        """Cut the open event streams and keep new ones waiting until `release()`."""
        self._open.clear()
        streams, self._streams = self._streams, []
        for request, upstream in streams:
            if request.transport is not None:
                request.transport.close()
            await upstream.aclose()

    def release(self) -> None:
        self._open.set()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        is_stream = request.path == "/event"
        if is_stream:
            await self._open.wait()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self._HOP_HEADERS}
        sent = self._client.build_request(
            request.method, request.path_qs, headers=headers, content=await request.read()
        )
        upstream = await self._client.send(sent, stream=True)
        if is_stream:
            self._streams.append((request, upstream))
        response = web.StreamResponse(
            status=upstream.status_code,
            headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in self._HOP_HEADERS
            },
        )
        try:
            await response.prepare(request)
            async for chunk in upstream.aiter_raw():
                await response.write(chunk)
        except (ConnectionResetError, httpx.HTTPError):
            pass  # cut by hold(), or the client went away
        finally:
            await upstream.aclose()
        return response
