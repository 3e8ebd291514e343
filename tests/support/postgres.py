"""A private PostgreSQL cluster for the store tests and the store benchmark, from Debian's
binaries (``initdb`` and ``postgres`` of the ``postgresql`` package, installed on demand
like :func:`support.debian.apt_install` does for nginx).

PostgreSQL refuses to run as root, and the tests run as root: the cluster is then owned by
an unprivileged system user (``livegate-test``, created with ``useradd -r`` on first use)
and its programs are started with that user's uid (``subprocess.Popen(user=...)``, what
``runuser``/``setpriv`` would do). Run as anyone else, it runs as that user.

The cluster lives in a fresh directory under the system temp dir (not under pytest's
``/tmp/pytest-of-root``, which the unprivileged user cannot enter), listens on 127.0.0.1
on a free port and on a unix socket in that directory, keeps ``fsync`` and
``synchronous_commit`` on (the tests check durability), and is removed by :meth:`remove`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from .debian import apt_install
from .ports import free_port
from .wait import eventually_sync

#: The unprivileged owner of test clusters when the tests run as root.
TEST_USER = "livegate-test"
#: The cluster's superuser role (the DSNs of :class:`PostgresServer` connect as it).
SUPERUSER = "postgres"


def find_bindir() -> str | None:
    """The directory holding ``initdb`` and ``postgres``: Debian's newest
    ``/usr/lib/postgresql/<major>/bin``, else wherever ``initdb`` is on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return str(Path(found[-1]).parent)
    initdb = shutil.which("initdb")
    return str(Path(os.path.realpath(initdb)).parent) if initdb else None


def install_postgres() -> tuple[str | None, str]:
    """The bin directory of PostgreSQL, running ``apt-get install -y postgresql`` first
    when it is missing (Debian's ``postgresql`` brings ``postgresql-contrib``'s pg_trgm
    along). Returns (bindir or None, what apt-get said)."""
    bindir = find_bindir()
    if bindir:
        return bindir, ""
    _, log = apt_install("pg_ctlcluster", "postgresql")
    return find_bindir(), log


def _test_user() -> tuple[int, int] | None:
    """(uid, gid) to run the cluster as: None when not root (run as ourselves), else
    :data:`TEST_USER`'s, creating that system user on first use."""
    if os.geteuid() != 0:
        return None
    try:
        pw = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", TEST_USER],
            check=True, capture_output=True, timeout=60,
        )
        pw = pwd.getpwnam(TEST_USER)
    return pw.pw_uid, pw.pw_gid


class PostgresServer:
    """One private cluster: :meth:`start` (initdb on first start), :meth:`stop` (clean),
    :meth:`kill` (SIGKILL: a crash; the next start recovers from the WAL), :meth:`pause`
    and :meth:`resume` (SIGSTOP/SIGCONT: a database that hangs), :meth:`remove`.

    ``settings`` are extra ``-c name=value`` server settings."""

    def __init__(self, bindir: str, port: int | None = None, settings: dict[str, str] | None = None) -> None:
        self.bindir = bindir
        self.port = port or free_port()
        self.settings = settings or {}
        self.owner = _test_user()
        self.root = Path(tempfile.mkdtemp(prefix="livegate-pg-"))
        self.data = self.root / "data"
        self.socket_dir = self.root
        self.log_path = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if self.owner is not None:
            os.chown(self.root, *self.owner)
        os.chmod(self.root, 0o700)

    # ---- addresses -----------------------------------------------------------------

    def dsn(self, database: str = "postgres", *, user: str = SUPERUSER) -> str:
        """A TCP DSN (asyncpg and libpq both read it)."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def socket_dsn(self, database: str = "postgres") -> str:
        """The same over the unix socket in the cluster's directory."""
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    # ---- processes -----------------------------------------------------------------

    def _popen_kw(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"env": {**{k: v for k, v in os.environ.items() if not k.startswith("PG")}, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}}
        if self.owner is not None:
            uid, gid = self.owner
            kw |= {"user": uid, "group": gid, "extra_groups": [], "cwd": str(self.root)}
        return kw

    def _run(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **self._popen_kw())
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
        return p

    def initdb(self) -> None:
        # C.UTF-8: UTF8 encoding and a character classification that knows CJK letters,
        # which pg_trgm needs to make trigrams of Chinese text (with LC_CTYPE=C it makes none).
        self._run(f"{self.bindir}/initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                  "--locale=C.UTF-8", "--no-instructions")

    def start(self, timeout: float = 60.0) -> PostgresServer:
        if not (self.data / "PG_VERSION").exists():
            self.initdb()
        settings = {
            "listen_addresses": "127.0.0.1", "port": str(self.port), "unix_socket_directories": str(self.socket_dir),
            "fsync": "on", "synchronous_commit": "on", "full_page_writes": "on",
            "max_connections": "200", "shared_buffers": "128MB", "logging_collector": "off",
            **self.settings,
        }
        args = [a for k, v in settings.items() for a in ("-c", f"{k}={v}")]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self.proc = subprocess.Popen([f"{self.bindir}/postgres", "-D", str(self.data), *args],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._popen_kw())
        finally:
            log.close()
        eventually_sync(self.ready, timeout, interval=0.1, what=f"postgres on port {self.port} (log: {self.log_path})")
        return self

    def ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"postgres exited with {self.proc.returncode}:\n{self.log_tail()}")
        p = subprocess.run([f"{self.bindir}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER],
                           capture_output=True, timeout=10, check=False)
        return p.returncode == 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """A clean shutdown ("fast": open sessions are ended, the cluster checkpoints)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def _processes(self) -> list[int]:
        """The postmaster and its children (each child is its own process group leader,
        so a signal to the postmaster's group would not reach them)."""
        if self.proc is None:
            return []
        pids = [self.proc.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[1] == str(self.proc.pid):
                pids.append(int(stat.parent.name))
        return pids

    def _signal(self, sig: int) -> None:
        for pid in self._processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL the postmaster and its children (a crash: the next start replays the WAL)."""
        if self.running:
            assert self.proc is not None
            self._signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP every process of the cluster: a database that hangs."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def remove(self) -> None:
        """Stop (kill if need be) and delete the cluster's directory."""
        if self.running:
            with contextlib.suppress(Exception):
                self.resume()
        try:
            self.stop(10)
        finally:
            self.kill()
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ---- databases -----------------------------------------------------------------

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with psql over the unix socket; its output (unaligned, no headers)."""
        p = subprocess.run([f"{self.bindir}/psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
                            "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-c", sql],
                           capture_output=True, text=True, timeout=120, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"psql failed: {p.stderr.strip()}")
        return p.stdout.strip()

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (UTF8, from template0); its DSN."""
        name = name or f"t_{secrets.token_hex(6)}"
        self.psql(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\'')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_of(dsn: str) -> str:
    """The database name of a DSN made by :meth:`PostgresServer.dsn`."""
    return dsn.rsplit("/", 1)[1].split("?", 1)[0]


def _psql(dsn: str, sql: str) -> None:
    bindir = find_bindir()
    assert bindir, "PostgreSQL's binaries are missing"
    p = subprocess.run([f"{bindir}/psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-c", sql],
                       capture_output=True, text=True, timeout=120, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"psql failed: {p.stderr.strip()}")


def create_database(dsn: str) -> str:
    """A fresh empty UTF8 database on the server of ``dsn`` (a role that may CREATE
    DATABASE, e.g. the ``postgres_dsn`` fixture's); returns its DSN. For code that has
    only the DSN (the store contract suite); tests can use the ``postgres_db`` fixture."""
    name = f"t_{secrets.token_hex(6)}"
    _psql(dsn, f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")
    base, _, query = dsn.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


def drop_database(dsn: str, admin_dsn: str) -> None:
    """Drop the database of ``dsn`` (made by :func:`create_database`), connected through
    ``admin_dsn``; open sessions are ended."""
    _psql(admin_dsn, f'DROP DATABASE IF EXISTS "{database_of(dsn)}" WITH (FORCE)')


__all__ = ["SUPERUSER", "TEST_USER", "PostgresServer", "create_database", "database_of", "drop_database", "find_bindir", "install_postgres"]


def migrate(dsn: str) -> None:
    """``gateway migrate --dsn``: this checkout's schema on the database (fails the test
    with migrate's own message otherwise)."""
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root / "python"), os.environ.get("PYTHONPATH", "")]))}
    p = subprocess.run([sys.executable, "-m", "gateway", "migrate", "--dsn", dsn], cwd=root, capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
