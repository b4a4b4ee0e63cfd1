"""chatd's own PostgreSQL server, for when no database URL is configured.

The server runs from the system's binaries (initdb, pg_ctl) in a data directory under
``CHATD_HOME``, listens on a unix socket in that directory (or, when the path is too long for a
socket, on a free loopback port), and is reused on the next start. When chatd runs as root the
server runs as the ``postgres`` system user, since PostgreSQL refuses to run as root.

Access is by a password generated at initdb and kept in ``CHATD_HOME/pg-password`` (mode 0600),
so other local users cannot connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import asyncpg

DATABASE_NAME = "chatd"
SUPERUSER = "chatd"
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin
_UNIX_SOCKET_PORT = 5432  # only names the socket file when no TCP port is used
_INSTALL_HINT = (
    "install Debian's `postgresql` package (apt-get install postgresql), "
    "or set CHATD_PG_BIN to the directory holding initdb and pg_ctl, "
    "or set CHATD_DATABASE_URL to use an external server"
)


class EmbeddedPostgresError(RuntimeError):
    """The embedded server cannot be set up or started; the message says what to do."""


@dataclass(frozen=True, slots=True)
class PgBinaries:
    bindir: Path
    major_version: int

    def path(self, name: str) -> str:
        return str(self.bindir / name)


def find_binaries(explicit: str | None = None) -> PgBinaries:
    """Find initdb and pg_ctl: in ``explicit`` (CHATD_PG_BIN) only, or Debian's newest, or PATH."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    else:
        candidates.extend(_discovered_bindirs())
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return PgBinaries(bindir, _major_version(bindir))
    where = f" in {explicit}" if explicit else ""
    raise EmbeddedPostgresError(f"PostgreSQL server binaries not found{where}: {_INSTALL_HINT}")


def _discovered_bindirs() -> list[Path]:
    candidates: list[Path] = []
    debian_root = Path("/usr/lib/postgresql")
    if debian_root.is_dir():
        versions = sorted(
            (p for p in debian_root.iterdir() if p.name.isdigit()),
            key=lambda p: int(p.name),
            reverse=True,
        )
        candidates.extend(p / "bin" for p in versions)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    return candidates


def _major_version(bindir: Path) -> int:
    out = subprocess.run(
        [str(bindir / "pg_ctl"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"(\d+)", out)
    if match is None:
        raise EmbeddedPostgresError(f"cannot read the PostgreSQL version from {out!r}")
    return int(match.group(1))


class EmbeddedPostgres:
    """Start (or reuse) a PostgreSQL server under ``home``; stop it on exit if we started it.

    ``durable=False`` turns off fsync for throwaway servers (tests); data survives a process
    crash but not a machine crash.
    """

    def __init__(
        self,
        home: Path,
        *,
        bindir: str | None = None,
        durable: bool = True,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 30.0,
        max_connections: int = 200,
    ) -> None:
        self.home = home.absolute()
        self.data_dir = self.home / "pgdata"
        self.run_dir = self.home / "run"
        self.password_file = self.home / "pg-password"
        self._bindir = bindir
        self._durable = durable
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._max_connections = max_connections
        self._binaries: PgBinaries | None = None
        self._lock: _HomeLock | None = None
        self._port: int | None = None
        self._run_as: pwd.struct_passwd | None = None

    # -- public ----------------------------------------------------------------------------

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The DSN of the ``chatd`` database."""
        return self.url_for(DATABASE_NAME)

    def url_for(self, database: str) -> str:
        password = quote(self._password(), safe="")
        if self._uses_unix_socket():
            host = quote(str(self.run_dir), safe="")
            return (
                f"postgresql://{SUPERUSER}:{password}@/{database}"
                f"?host={host}&port={_UNIX_SOCKET_PORT}"
            )
        return f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self._port}/{database}"

    def start(self) -> str:
        """Make sure the server runs and the ``chatd`` database exists; return its DSN.

        Several chatd processes may share one home: the last one to stop stops the server. A
        server left running by a crashed chatd is adopted like one started here.
        """
        self._binaries = find_binaries(self._bindir)
        self._run_as = _server_user()
        self._prepare_home()
        self._lock = _HomeLock(self.home)
        self._lock.begin_setup()
        try:
            if not (self.data_dir / "PG_VERSION").is_file():
                self._initdb()
            else:
                self._check_data_dir()
            if self._server_running():
                self._port = self._read_port()
            else:
                self._start_server()
            asyncio.run(self._ensure_database())
        except BaseException:
            self._lock.release()
            self._lock = None
            raise
        self._lock.end_setup()
        return self.url

    def stop(self) -> None:
        """Stop the server if no other chatd process uses it (fast shutdown: sessions are cut)."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            if lock.last_user_begins_teardown():
                self._pg_ctl(
                    [
                        "stop",
                        "-D",
                        str(self.data_dir),
                        "-m",
                        "fast",
                        "-t",
                        str(int(self._stop_timeout_s)),
                    ],
                    check=False,
                )
        finally:
            lock.release()

    # -- set-up ----------------------------------------------------------------------------

    def _prepare_home(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(exist_ok=True)
        if self._run_as is not None:
            _ensure_reachable(self.home, self._run_as)
            uid, gid = self._run_as.pw_uid, self._run_as.pw_gid
            os.chown(self.run_dir, uid, gid)
            if self.data_dir.exists():
                _chown_tree(self.data_dir, uid, gid)
        self.run_dir.chmod(0o700)

    def _check_data_dir(self) -> None:
        owner = self.data_dir.stat().st_uid
        expected = self._run_as.pw_uid if self._run_as is not None else os.getuid()
        if owner != expected:
            raise EmbeddedPostgresError(
                f"the data directory {self.data_dir} belongs to uid {owner}, not to the user "
                f"running chatd (uid {expected}): run chatd as that user, or set CHATD_HOME "
                "to another directory"
            )
        if not self.password_file.is_file():
            raise EmbeddedPostgresError(
                f"{self.password_file} is missing, so the server in {self.data_dir} cannot be "
                f"reached: remove {self.data_dir} to start afresh, or restore the file"
            )
        binaries = self._require_binaries()
        version = int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        if version != binaries.major_version:
            raise EmbeddedPostgresError(
                f"{self.data_dir} was made by PostgreSQL {version} but the binaries in "
                f"{binaries.bindir} are version {binaries.major_version}: set CHATD_PG_BIN to "
                f"PostgreSQL {version}'s binaries, or remove {self.data_dir} to start afresh"
            )

    def _initdb(self) -> None:
        if self.data_dir.exists():
            # A half-made directory from an interrupted initdb: it holds no data yet.
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(mode=0o700)
        if self._run_as is not None:
            os.chown(self.data_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        password = secrets.token_urlsafe(24)
        self.password_file.write_text(password)
        self.password_file.chmod(0o600)
        pwfile = self.home / "initdb-password.tmp"
        pwfile.write_text(password)
        pwfile.chmod(0o600)
        try:
            if self._run_as is not None:
                os.chown(pwfile, self._run_as.pw_uid, self._run_as.pw_gid)
            self._run(
                [
                    self._require_binaries().path("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
                what="initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _server_running(self) -> bool:
        result = self._pg_ctl(["status", "-D", str(self.data_dir)], check=False)
        return result.returncode == 0

    def _start_server(self) -> None:
        options = self._server_options()
        log_file = self.home / "postgres.log"
        if self._run_as is not None and not log_file.exists():
            log_file.touch()
            os.chown(log_file, self._run_as.pw_uid, self._run_as.pw_gid)
        result = self._pg_ctl(
            [
                "start",
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(int(self._start_timeout_s)),
                "-l",
                str(log_file),
                "-o",
                " ".join(options),
            ],
            check=False,
        )
        if result.returncode != 0:
            tail = _tail(log_file)
            raise EmbeddedPostgresError(
                f"PostgreSQL did not start from {self.data_dir} (see {log_file}): {tail}"
            )

    def _server_options(self) -> list[str]:
        opts = [f"-c max_connections={self._max_connections}"]
        if self._uses_unix_socket():
            self._port = None
            opts += [
                "-c listen_addresses=''",
                f"-c unix_socket_directories='{self.run_dir}'",
                f"-c port={_UNIX_SOCKET_PORT}",
            ]
        else:
            self._port = _free_port()
            opts += [
                "-c listen_addresses='127.0.0.1'",
                "-c unix_socket_directories=''",
                f"-c port={self._port}",
            ]
        if not self._durable:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        return opts

    def _read_port(self) -> int | None:
        """The TCP port of a server someone else started (line 4 of postmaster.pid)."""
        if self._uses_unix_socket():
            return None
        lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        return int(lines[3])

    async def _ensure_database(self) -> None:
        conn = await asyncpg.connect(self.url_for("postgres"))
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", DATABASE_NAME
            )
            if not exists:
                await conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
        finally:
            await conn.close()

    # -- helpers ---------------------------------------------------------------------------

    def _uses_unix_socket(self) -> bool:
        return len(str(self.run_dir / f".s.PGSQL.{_UNIX_SOCKET_PORT}")) <= _SOCKET_PATH_MAX

    def _password(self) -> str:
        return self.password_file.read_text().strip()

    def _require_binaries(self) -> PgBinaries:
        if self._binaries is None:
            self._binaries = find_binaries(self._bindir)
        return self._binaries

    def _pg_ctl(self, args: Sequence[str], *, check: bool) -> subprocess.CompletedProcess[str]:
        return self._run(
            [self._require_binaries().path("pg_ctl"), *args], what="pg_ctl", check=check
        )

    def _run(
        self, argv: Sequence[str], *, what: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        user = self._run_as.pw_name if self._run_as is not None else None
        env = {**os.environ, "LC_ALL": "C.UTF-8"}
        if self._run_as is not None:
            env["HOME"] = self._run_as.pw_dir
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            user=user,
            group=self._run_as.pw_gid if self._run_as is not None else None,
            extra_groups=[] if self._run_as is not None else None,
            env=env,
            cwd=str(self.home),
            check=False,
        )
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise EmbeddedPostgresError(
                f"{what} failed in {self.home}: {detail[-1] if detail else result.returncode}"
            )
        return result


class _HomeLock:
    """Who uses the server in CHATD_HOME, with two flocks (dropped by the kernel on a crash).

    ``users``: held shared by every process using the server. ``setup``: held exclusively
    while one process starts or stops the server, so that never happens twice at once.
    """

    def __init__(self, home: Path) -> None:
        self._setup = os.open(home / "setup.lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._users = os.open(home / "users.lock", os.O_RDWR | os.O_CREAT, 0o600)

    def begin_setup(self) -> None:
        fcntl.flock(self._setup, fcntl.LOCK_EX)
        fcntl.flock(self._users, fcntl.LOCK_SH)

    def end_setup(self) -> None:
        fcntl.flock(self._setup, fcntl.LOCK_UN)

    def last_user_begins_teardown(self) -> bool:
        """Take the setup lock; true when no other process uses the server."""
        fcntl.flock(self._setup, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        os.close(self._users)
        os.close(self._setup)  # closing drops the locks


def _server_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: as root, run it as the ``postgres`` system user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise EmbeddedPostgresError(
            "running as root, but there is no `postgres` system user to run PostgreSQL as: "
            + _INSTALL_HINT
        ) from None


def _ensure_reachable(home: Path, user: pwd.struct_passwd) -> None:
    """The server user must be able to walk down to ``home``; say which directory blocks it."""
    home.chmod(home.stat().st_mode | 0o011)
    for parent in home.parents:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            continue
        if not st.st_mode & 0o001:
            raise EmbeddedPostgresError(
                f"the `{user.pw_name}` user cannot reach {home} because {parent} is not "
                f"traversable: run `chmod o+x {parent}` or set CHATD_HOME to another directory"
            )


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            with contextlib.suppress(FileNotFoundError):
                os.chown(Path(dirpath) / name, uid, gid, follow_symlinks=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(text[-lines:]) or "empty log"
