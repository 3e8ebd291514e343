"""Shared test helpers and fixtures: real gateway processes (registered by conftest.py).

``gateway_factory`` (per test), ``module_gateway_factory`` (per module) and
``session_gateway_factory`` (per session) start ``python -m gateway run`` in a subprocess
on free ports and wait until it is ready (``gwproc.GatewaySubprocess``: ``/readyz`` on the
API port, answered by this process). The returned :class:`GatewayProcess` knows its URLs
and calls the HTTP API.

At teardown the process gets SIGTERM and must exit 0 (a graceful drain); a process that
died earlier, exited non-zero, or logged a Python traceback fails the test (pass
``allow_errors=True`` for tests that make hooks fail on purpose).

``gw`` is a session-wide default server (dev auth, API key ``API_KEY``): tests sharing it
use their own user and room names (see ``uniq``).
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from gwproc import ROOT, GatewaySubprocess  # noqa: F401  (ROOT: imported by tests from here)

API_KEY = "test-api-key-0123456789"
JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789abcdef"

#: Settings every test server gets (readable logs, quick drains).
BASE_SETTINGS = ("auth.mode=dev", "log.json=false", "log.level=info", "drain.timeout=5", "drain.retry_ms=1500")

_uniq = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    # Marks used by tests other teams own; registered so -W error stays usable.
    config.addinivalue_line("markers", "autobahn: runs the Autobahn|Testsuite (needs its tools)")


def uniq(prefix: str = "t") -> str:
    """A name unique in this test session (for users and rooms on shared servers)."""
    return f"{prefix}{os.getpid()}x{next(_uniq)}"


class GatewayProcess(GatewaySubprocess):
    """One ``python -m gateway run`` subprocess (see :mod:`gwproc`).

    ``sets`` are ``--set key=value`` strings, ``app`` a ``module:attr`` for ``--app``,
    ``config`` a TOML text written to a file and passed with ``--config``.
    """

    def __init__(
        self,
        log_dir: Path,
        sets: tuple[str, ...] = (),
        app: str | None = None,
        config: str | None = None,
        env: dict[str, str] | None = None,
        api_key: str | None = API_KEY,
        allow_errors: bool = False,
    ) -> None:
        super().__init__(log_dir / "gateway.log", env=env, api_key=api_key)
        self.log_dir = log_dir
        self.sets = tuple(sets)
        self.app = app
        self.config_text = config
        self.allow_errors = allow_errors
        self.stopped_by_test = False
        self.finished = False
        self.exit_code: int | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def ws_url(self, path: str = "/ws", **query: Any) -> str:
        """``ws://127.0.0.1:<port>/ws?<query>`` (e.g. ``ws_url(user="u1")``)."""
        q = urlencode({k: v for k, v in query.items() if v is not None})
        return f"ws://127.0.0.1:{self.port}{path}" + (f"?{q}" if q else "")

    def run_args(self) -> list[str]:
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--api-port", str(self.api_port)]
        if self.config_text is not None:
            path = self.log_dir / "gateway.toml"
            path.write_text(self.config_text)
            args += ["--config", str(path)]
        if self.app:
            args += ["--app", self.app]
        sets = list(BASE_SETTINGS)
        if self.api_key:
            sets.append(f"api.api_key={self.api_key}")
        sets += self.sets
        for s in sets:
            args += ["--set", s]
        return args

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` (the test takes over the process's end: see :meth:`wait`)."""
        assert self.proc is not None
        self.stopped_by_test = True
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the exit code (``subprocess.TimeoutExpired`` after ``timeout``)."""
        assert self.proc is not None
        self.exit_code = self.proc.wait(timeout)
        return self.exit_code

    def finish(self) -> list[str]:
        """Stop (SIGTERM, then SIGKILL after 20 s) and return the problems found."""
        problems: list[str] = []
        if self.proc is None:
            return problems
        self.finished = True
        if self.proc.poll() is not None and not self.stopped_by_test:
            problems.append(f"gateway (port {self.port}) died during the test with exit code {self.proc.returncode}")
        elif self.proc.poll() is None:
            code = self.stop(timeout=20)
            if self.hung:
                problems.append(f"gateway (port {self.port}) did not exit within 20 s of SIGTERM")
            elif code != 0:
                problems.append(f"gateway (port {self.port}) exited with {code} after SIGTERM")
        text = self.log_text()
        if not self.allow_errors and "Traceback" in text:
            problems.append(f"gateway (port {self.port}) logged a traceback")
        if problems:
            problems.append(f"---- log of the gateway on port {self.port} ({self.log_path}):\n{self.log_tail(80)}")
        return problems

    # ---- the HTTP API ----

    async def api(self, method: str, path: str, json: Any = None, *, key: str | None | bool = True, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """Call the internal API; returns ``(status, decoded JSON body or text)``.
        ``key=True`` sends the server's API key, a string sends that key, False none."""
        import aiohttp

        h = dict(headers or {})
        if key is True and self.api_key:
            h["X-API-Key"] = self.api_key
        elif isinstance(key, str):
            h["X-API-Key"] = key
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            async with s.request(method, self.api_url + path, json=json, data=data, headers=h) as r:
                body = await r.read()
                try:
                    import orjson

                    return r.status, orjson.loads(body)
                except ValueError:
                    return r.status, body.decode(errors="replace")

    async def stats(self) -> dict[str, Any]:
        status, body = await self.api("GET", "/v1/stats")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    async def publish(self, room: str, data: Any, type: str = "chat", **extra: Any) -> dict[str, Any]:
        """Publish through the API (no rate limits); returns ``{"room","seq","epoch"}``."""
        status, body = await self.api("POST", "/v1/publish", {"room": room, "data": data, "type": type, **extra})
        assert status == 200, body
        return body  # type: ignore[no-any-return]


_ALL: list[GatewayProcess] = []


class _Factory:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: list[GatewayProcess] = []

    def __call__(self, *sets: str, app: str | None = None, config: str | None = None, env: dict[str, str] | None = None, api_key: str | None = API_KEY, allow_errors: bool = False) -> GatewayProcess:
        d = self.base / f"gw{len(self.procs)}"
        d.mkdir(parents=True, exist_ok=True)
        p = GatewayProcess(d, sets, app, config, env, api_key, allow_errors)
        self.procs.append(p)
        _ALL.append(p)
        return p.start()

    def finish(self) -> None:
        problems: list[str] = []
        for p in self.procs:
            problems += p.finish()
        if problems:
            pytest.fail("\n".join(problems), pytrace=False)


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture(autouse=True)
def _servers_still_alive() -> Iterator[None]:
    """After each test: every shared server it may have used must still be running (a
    crash fails the test that caused it, not a later one)."""
    yield
    dead = [p for p in _ALL if p.proc is not None and not (p.stopped_by_test or p.finished) and p.proc.poll() is not None]
    for p in dead:
        p.finished = True  # reported once; finish() reports it again with the log
    if dead:
        pytest.fail("\n".join(f"gateway on port {p.port} crashed (exit {p.proc.returncode}):\n{p.log_tail(40)}" for p in dead if p.proc), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _kill_leftovers() -> Iterator[None]:
    """Never leave a gateway behind, even when a test run is interrupted."""
    yield
    for p in _ALL:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start gateways for one test: ``gateway_factory("limits.queue_bytes=65536", app=...)``."""
    f = _Factory(tmp_path)
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
