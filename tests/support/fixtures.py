"""The pytest fixtures of every suite (registered by tests/conftest.py), built on
:class:`support.gateway.GatewayProcess`:

- ``gateway_factory`` (per test), ``module_gateway_factory`` (per module) and
  ``session_gateway_factory`` (per session): ``gateway_factory("limits.queue_bytes=65536",
  app=..., config=..., env=..., node_id=..., workers=..., allow_errors=...)`` starts one
  and returns it ready; at teardown each must stop cleanly (see ``GatewayProcess.finish``),
  and the logs of a failed test's gateways are printed;
- ``gw``: the session-wide default server (dev auth, API key ``API_KEY``): tests sharing it
  use their own user and room names (``uniq``); ``jwt_gw``: the same with JWT auth;
- ``clients``: ``await clients(gw, user=None, **kw)`` is ``gw.client(...)``, closed at
  teardown;
- ``postgres_server`` / ``postgres_dsn`` (per session): a private PostgreSQL cluster from
  Debian's binaries (:mod:`support.postgres`) and the DSN of its superuser (it may CREATE
  DATABASE); ``postgres_db`` (per test): a fresh empty database on it, dropped afterwards.
  Code that only has the DSN makes one with ``support.postgres.create_database(dsn)``;
- ``s3_server`` (per session): a private S3-compatible server (``s3s-fs``, built from
  crates.io into target/tools on first use, :mod:`support.s3`) with random keys; clients
  create their own buckets.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .gateway import JWT_SECRET, GatewayProcess
from .postgres import PostgresServer
from .redis import RedisServer
from .s3 import S3Server

if TYPE_CHECKING:
    from .browser import Browsers

GatewayFactory = Callable[..., GatewayProcess]

_ALL: list[GatewayProcess] = []


class _Factory:
    def __init__(self, base: Path, request: pytest.FixtureRequest | None = None) -> None:
        self.base = base
        self.request = request
        self.procs: list[GatewayProcess] = []

    def __call__(self, *sets: str, **kw: Any) -> GatewayProcess:
        p = GatewayProcess(self.base / f"gw{len(self.procs)}", sets, **kw)
        self.procs.append(p)
        _ALL.append(p)
        return p.start()

    def finish(self) -> None:
        problems: list[str] = []
        for p in self.procs:
            problems += p.finish()
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)
        rep = getattr(self.request.node, "rep_call", None) if self.request is not None else None
        if rep is not None and rep.failed:
            for p in self.procs:
                print(f"\n---- log of gateway {p.node_id} ({p.log_path}) ----\n{p.log_tail(120)}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember the outcome of the test itself (for the logs of a failed test's gateways)."""
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


@pytest.fixture(autouse=True)
def _servers_still_alive() -> Iterator[None]:
    """After each test: every server it may have used must still be running (a crash fails
    the test that caused it, not a later one)."""
    yield
    dead = [p for p in _ALL if p.proc is not None and not (p.stopped_by_test or p.finished) and p.proc.poll() is not None]
    for p in dead:
        p.finished = True  # reported once, here
    if dead:
        pytest.fail("\n".join(f"gateway {p.node_id} on port {p.port} crashed (exit {p.proc.returncode}):\n{p.log_tail(40)}"
                              for p in dead if p.proc), pytrace=False)


@pytest.fixture(autouse=True)
def _collect_garbage() -> Iterator[None]:
    """After each test: collect garbage, so that a socket or transport a test left open
    is reported (ResourceWarning, an error here) by that test, not by whichever later
    test the garbage collector happens to run in."""
    yield
    gc.collect()


@pytest.fixture(scope="session", autouse=True)
def _kill_leftovers() -> Iterator[None]:
    """Never leave a gateway behind, even when a test run is interrupted."""
    yield
    for p in _ALL:
        p.kill()


@pytest.fixture
def gateway_factory(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[GatewayFactory]:
    """Start gateways for one test: ``gateway_factory("limits.queue_bytes=65536", app=...)``."""
    f = _Factory(tmp_path, request)
    yield f
    f.finish()


@pytest.fixture(scope="module")
def module_gateway_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    """Like ``gateway_factory``, for servers shared by a module's tests."""
    f = _Factory(tmp_path_factory.mktemp("gw"))
    yield f
    f.finish()


@pytest.fixture(scope="session")
def session_gateway_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayFactory]:
    f = _Factory(tmp_path_factory.mktemp("gws"))
    yield f
    f.finish()


@pytest.fixture(scope="session")
def gw(session_gateway_factory: GatewayFactory) -> GatewayProcess:
    """The shared default server: dev auth (``?user=``), default routes, API key set."""
    return session_gateway_factory()


@pytest.fixture(scope="session")
def jwt_gw(session_gateway_factory: GatewayFactory) -> GatewayProcess:
    """A shared server with JWT auth (HS256, ``JWT_SECRET``), guests off."""
    return session_gateway_factory("auth.mode=jwt", f"auth.secret={JWT_SECRET}")


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Any]]:
    """``await clients(gw, user=None, **kw)``: a connected GatewayClient, closed at teardown."""
    opened: list[Any] = []

    async def open_(gw: GatewayProcess, user: str | None = None, **kw: Any) -> Any:
        c = await gw.client(user, **kw)
        opened.append(c)
        return c

    yield open_
    for c in opened:
        await c.close()


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """The ``redis-server`` binary, installed from Debian on first use (needs root)."""
    import shutil

    from .redis import install_redis

    path = shutil.which("redis-server") or install_redis()
    if not path:
        pytest.fail("redis-server is not installed and `apt-get install -y redis-server` failed (needs root)")
    return path


@pytest.fixture
def redis_server(redis_binary: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A private redis-server (no persistence) for one test; always continued (if paused)
    and killed at the end. Its log is printed when the test failed. Request it before the
    gateways that use it, so they stop first."""
    import contextlib

    srv = RedisServer(redis_binary, tmp_path / "redis")
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            with contextlib.suppress(Exception):
                srv.resume()
        srv.kill()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for log in sorted(srv.workdir.glob("*.log")):
                lines = log.read_text(errors="replace").splitlines()[-40:]
                print(f"\n---- {log.name} (last {len(lines)} lines)\n" + "\n".join(lines))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL cluster (initdb as an unprivileged user, a free port, a temp
    dir, fsync on), installed from Debian on first use (needs root); removed at the end."""
    from .postgres import install_postgres

    bindir, log = install_postgres()
    if not bindir:
        pytest.fail(f"PostgreSQL is not installed and `apt-get install -y postgresql` failed (needs root):\n{log}")
    srv = PostgresServer(bindir)
    try:
        srv.start()
        yield srv
    finally:
        srv.remove()


@pytest.fixture(scope="session")
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """DSN of the session cluster's superuser on its ``postgres`` database (may CREATE DATABASE)."""
    return postgres_server.dsn()


@pytest.fixture
def private_pg(postgres_server: PostgresServer) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of this test's own, to stop, kill, pause and start again."""
    srv = PostgresServer(postgres_server.bindir)
    try:
        srv.start()
        yield srv
    finally:
        srv.remove()


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[str]:
    """DSN of a fresh, empty UTF8 database for one test (dropped at teardown)."""
    from .postgres import database_of

    dsn = postgres_server.create_database()
    yield dsn
    postgres_server.drop_database(database_of(dsn))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The session's S3 server (``s3s-fs`` on a free port, a temp data dir, random keys:
    ``endpoint``, ``access_key``, ``secret_key``, ``region``); stopped at the end. The
    binary is built with cargo on first use when ``make tools`` has not built it."""
    from .s3 import s3s_fs_binary

    try:
        binary = s3s_fs_binary()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    srv = S3Server(binary, tmp_path_factory.mktemp("s3"))
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def browser_paths() -> tuple[str, str]:
    """Chromium and its driver (installed from Debian on first use), and selenium."""
    from .browser import ensure_browser, ensure_selenium

    paths = ensure_browser()
    ensure_selenium()
    return paths


@pytest.fixture
def browsers(browser_paths: tuple[str, str], tmp_path: Path) -> Iterator[Browsers]:
    """Headless browsers for one test (:class:`support.browser.Browsers`), quit after it."""
    from .browser import Browsers

    b = Browsers(browser_paths, tmp_path)
    yield b
    b.quit()
