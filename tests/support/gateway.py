"""The one way the tests start a gateway: ``python -m gateway run`` in a subprocess on free
ports, ready once ``/readyz`` answers 200 on the API port AND ``/v1/stats`` names this
process's node id (a neighbour could hold the port while this process is still about to
fail its bind; "address already in use" is retried on new ports).

:class:`GatewayProcess` knows its URLs, calls the HTTP API (``api``, ``stats``,
``publish``, ``metrics``), opens connected ``gateway.client.GatewayClient``\\ s
(``client``), and at :meth:`GatewayProcess.finish` gets SIGTERM and must exit 0 (a graceful
drain) without a Python traceback in its log (``allow_errors=True`` for tests that make
hooks fail on purpose).

No pytest in here (the fixtures are in :mod:`support.fixtures`):
``tests/redis/bench_redis_cpu.py`` runs as a plain script.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import os
from signal import SIGKILL, SIGTERM
import subprocess
import sys
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import urlencode

from . import ROOT
from .http import Reply, arequest, request
from .ports import free_port, port_is_free
from .wait import eventually_sync

if TYPE_CHECKING:
    from gateway.client import GatewayClient

API_KEY = "test-api-key-0123456789"
JWT_SECRET = "test-jwt-secret-0123456789abcdef0123456789abcdef"

#: Settings every test gateway gets (readable logs, quick drains); ``sets`` come after
#: them, so a test overrides any of them.
BASE_SETTINGS = ("auth.mode=dev", "log.json=false", "log.level=info", "drain.timeout=5", "drain.retry_ms=1500")

_uniq = itertools.count(1)


def uniq(prefix: str = "t") -> str:
    """A name unique in this test session (for users and rooms on shared servers)."""
    return f"{prefix}{os.getpid()}x{next(_uniq)}"


_STARTED: list[GatewayProcess] = []


@atexit.register
def kill_leftovers() -> None:
    """Processes run in their own session (a Ctrl-C of the test run does not reach them):
    never leave one behind."""
    for g in _STARTED:
        g.kill()


class GatewayProcess:
    """One ``python -m gateway run`` subprocess.

    :param log_dir: where its log (``gateway.log``) and config file go.
    :param sets: ``--set key=value`` strings, after :data:`BASE_SETTINGS`.
    :param app: ``module:attr`` for ``--app``.
    :param config: a TOML text, written to a file and passed with ``--config``.
    :param args: more ``gateway run`` arguments (e.g. ``--broker redis``).
    :param env: added to the environment (minus this process's ``GATEWAY_*`` variables);
        a ``PYTHONPATH`` is put in front of the one the gateway gets anyway.
    :param api_key: the API key (``api.api_key``), None for none.
    :param node_id: ``node_id`` (a fresh one by default).
    :param workers: ``--workers N``: worker i has node id ``<node_id>-w<i>`` and API port
        ``api_port + i``; ready when every worker is.
    :param allow_errors: a traceback in the log does not fail :meth:`finish`.
    :param tls: (certificate chain, key) PEM files: a ``wss://`` listener on its own free
        port (:attr:`tls_port`, :meth:`wss_url`) besides the plain one.
    """

    #: Seconds :meth:`start` waits for readiness.
    ready_timeout = 40.0

    def __init__(
        self,
        log_dir: Path,
        sets: Iterable[str] = (),
        *,
        app: str | None = None,
        config: str | None = None,
        args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        api_key: str | None = API_KEY,
        node_id: str | None = None,
        workers: int = 1,
        allow_errors: bool = False,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        self.log_path = log_dir / "gateway.log"
        self.sets = tuple(sets)
        self.app = app
        self.config_text = config
        self.args = tuple(args)
        self.env = dict(env or {})
        self.api_key = api_key
        self.node_id = node_id or f"gw-{uuid.uuid4().hex[:8]}"
        self.workers = workers
        self.allow_errors = allow_errors
        self.tls = tls
        self.tls_port = 0
        self.port = 0
        self.api_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        #: The test ended the process itself (:meth:`signal`, :meth:`stop`): its exit is
        #: the test's business, not a crash.
        self.stopped_by_test = False
        #: :meth:`finish` ran.
        self.finished = False
        #: Set when the process ignored SIGTERM and was killed.
        self.hung = False

    # ---- addresses ----

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def ws_url(self, path: str = "/ws", **query: Any) -> str:
        """``ws://127.0.0.1:<port>/ws?<query>`` (e.g. ``ws_url(user="u1")``)."""
        q = urlencode({k: v for k, v in query.items() if v is not None})
        return f"ws://127.0.0.1:{self.port}{path}" + (f"?{q}" if q else "")

    def wss_url(self, path: str = "/ws", host: str = "localhost", **query: Any) -> str:
        """``wss://localhost:<tls_port>/ws?<query>`` (needs ``tls``)."""
        assert self.tls is not None, "started without tls"
        q = urlencode({k: v for k, v in query.items() if v is not None})
        return f"wss://{host}:{self.tls_port}{path}" + (f"?{q}" if q else "")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # ---- the command line ----

    def run_args(self) -> list[str]:
        args = ["--host", "127.0.0.1", "--port", str(self.port), "--api-port", str(self.api_port)]
        if self.config_text is not None:
            path = self.log_dir / "gateway.toml"
            path.write_text(self.config_text)
            args += ["--config", str(path)]
        if self.app:
            args += ["--app", self.app]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        if self.tls is not None:
            args += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1]), "--tls-port", str(self.tls_port)]
        args += self.args
        # Each gateway keeps its messages (routes with store = "durable") in its own file.
        store = f"store.path={self.log_dir / 'store.db'}"
        sets = [*BASE_SETTINGS, store, *([f"api.api_key={self.api_key}"] if self.api_key else []), *self.sets, f"node_id={self.node_id}"]
        for s in sets:
            args += ["--set", s]
        return args

    def _environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["PYTHONUNBUFFERED"] = "1"
        extra = dict(self.env)
        path = [extra.pop("PYTHONPATH", ""), str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
        env.update(extra)
        return env

    def _choose_ports(self) -> None:
        self.port = free_port()
        if self.tls is not None:
            self.tls_port = free_port()
            while self.tls_port == self.port:
                self.tls_port = free_port()
        while True:
            self.api_port = free_port(65535 - self.workers)
            block = range(self.api_port, self.api_port + self.workers)
            if self.port not in block and self.tls_port not in block and all(port_is_free(p) for p in block[1:]):
                return

    # ---- lifecycle ----

    def start(self, timeout: float | None = None) -> Self:
        """Start on fresh ports (again on new ones when a port was taken meanwhile: the
        log says "address already in use") and wait until :meth:`ready`."""
        if self.running():
            raise RuntimeError(f"gateway {self.node_id} is already running (pid {self.pid})")
        timeout = self.ready_timeout if timeout is None else timeout
        env = self._environment()
        attempts = 6
        for attempt in range(1, attempts + 1):
            self._choose_ports()
            cmd = [sys.executable, "-m", "gateway", "run", *self.run_args()]
            with open(self.log_path, "ab") as log:
                start_of_attempt = log.tell()
                log.write(f"---- start attempt {attempt}: {' '.join(cmd)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if self not in _STARTED:
                _STARTED.append(self)
            proc = self.proc
            try:
                eventually_sync(lambda: proc.poll() is not None or self.ready(), timeout, what=f"gateway {self.node_id} ready")
            except AssertionError:
                self.kill()
                raise RuntimeError(f"gateway {self.node_id} did not become ready within {timeout}s\n{self.log_tail()}") from None
            if proc.poll() is None:
                return self
            said = self.log_path.read_bytes()[start_of_attempt:].decode(errors="replace")
            if "address already in use" in said.lower() and attempt < attempts:
                continue
            raise RuntimeError(f"gateway {self.node_id} exited with {proc.returncode} during start-up\n{self.log_tail()}")
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        """Every worker answers ``/readyz`` with 200, and ``/v1/stats`` with its node id."""
        key = {"X-API-Key": self.api_key} if self.api_key else None
        for i in range(self.workers):
            node = self.node_id if self.workers == 1 else f"{self.node_id}-w{i}"
            url = f"http://127.0.0.1:{self.api_port + i}"
            if request("GET", url + "/readyz", timeout=1.0).status != 200:
                return False
            stats = request("GET", url + "/v1/stats", headers=key, timeout=2.0)
            try:
                if stats.status != 200 or stats.json().get("node") != node:
                    return False
            except (ValueError, AttributeError):
                return False
        return True

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int = SIGTERM) -> None:
        """Send ``sig``; the test takes over the process's end (see :meth:`wait`)."""
        assert self.proc is not None
        self.stopped_by_test = True
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """Wait for the exit code (``subprocess.TimeoutExpired`` after ``timeout``)."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = SIGTERM, timeout: float = 15.0) -> int | None:
        """Send ``sig`` (SIGTERM: graceful drain; SIGKILL: a crash) and wait, SIGKILL after
        ``timeout`` (``hung`` is then True). Returns the exit code, None if never started."""
        self.stopped_by_test = True
        return self._terminate(sig, timeout)

    async def astop(self, sig: int = SIGTERM, timeout: float = 15.0) -> int | None:
        """:meth:`stop` without blocking the event loop (the process may be serving it)."""
        return await asyncio.to_thread(self.stop, sig, timeout)

    def _terminate(self, sig: int, timeout: float) -> int | None:
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.hung = True
                self.kill()
        self._kill_group()
        return p.returncode

    def kill(self) -> None:
        """SIGKILL the process and what it started (workers share its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            self._kill_group()
            self.proc.kill()
            self.proc.wait(10)
        self._kill_group()

    def _kill_group(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, SIGKILL)

    def finish(self) -> list[str]:
        """Stop (SIGTERM, SIGKILL after 20 s) and return the problems found: a crash
        during the test, a hang or a non-zero exit on SIGTERM, a traceback in the log."""
        problems: list[str] = []
        if self.proc is None or self.finished:
            return problems
        self.finished = True
        if self.proc.poll() is not None and not self.stopped_by_test:
            problems.append(f"gateway {self.node_id} (port {self.port}) died during the test with exit code {self.proc.returncode}")
        elif self.proc.poll() is None:
            code = self._terminate(SIGTERM, 20)
            if self.hung:
                problems.append(f"gateway {self.node_id} (port {self.port}) did not exit within 20 s of SIGTERM")
            elif code != 0:
                problems.append(f"gateway {self.node_id} (port {self.port}) exited with {code} after SIGTERM")
        self._kill_group()
        if not self.allow_errors and "Traceback" in self.log_text():
            problems.append(f"gateway {self.node_id} (port {self.port}) logged a traceback")
        if problems:
            problems.append(f"---- log of gateway {self.node_id} ({self.log_path}):\n{self.log_tail(80)}")
        return problems

    # ---- output ----

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- the HTTP API ----

    def _key_headers(self, key: str | None | bool, headers: Mapping[str, str] | None) -> dict[str, str]:
        h = dict(headers or {})
        if key is True and self.api_key:
            h["X-API-Key"] = self.api_key
        elif isinstance(key, str):
            h["X-API-Key"] = key
        return h

    def api_sync(self, method: str, path: str, json: Any = None, *, key: str | None | bool = True, data: bytes | None = None,
                 headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> Reply:
        """Call the internal API without an event loop (see :meth:`api`)."""
        return request(method, self.api_url + path, json, data=data, headers=self._key_headers(key, headers), timeout=timeout)

    async def api(self, method: str, path: str, json: Any = None, *, key: str | None | bool = True, data: bytes | None = None,
                  headers: Mapping[str, str] | None = None, timeout: float = 30.0) -> tuple[int, Any]:
        """Call the internal API; returns ``(status, decoded JSON body or text)``.
        ``key=True`` sends the server's API key, a string sends that key, False none."""
        r = await arequest(method, self.api_url + path, json, data=data, headers=self._key_headers(key, headers), timeout=timeout)
        return r.status, r.decoded()

    async def stats(self) -> dict[str, Any]:
        status, body = await self.api("GET", "/v1/stats")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    async def publish(self, room: str, data: Any, type: str = "chat", **extra: Any) -> dict[str, Any]:
        """Publish through the API (no rate limits); returns ``{"room","seq","epoch"}``."""
        status, body = await self.api("POST", "/v1/publish", {"room": room, "data": data, "type": type, **extra})
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    def ready_status(self, worker: int = 0) -> int:
        """The status of ``/readyz`` (0 when nothing answers)."""
        return request("GET", f"http://127.0.0.1:{self.api_port + worker}/readyz", timeout=1.0).status

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics`` on the API port."""
        r = request("GET", self.api_url + "/metrics", timeout=5.0)
        assert r.status == 200, f"/metrics of {self.node_id} answered {r.status}"
        return r.text

    def metric(self, name: str) -> float | None:
        """The first sample of ``name`` (any labels), None when there is none."""
        for line in self.metrics().splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
        return None

    # ---- clients ----

    async def client(self, user: str | None = None, **kw: Any) -> GatewayClient:
        """A connected ``gateway.client.GatewayClient``: ``?user=`` is ``user`` (a fresh
        name when neither a user nor a token is given); ``kw`` go to the client (with
        ``ssl=<context>`` it connects to the ``wss://`` listener)."""
        from gateway.client import GatewayClient

        if user is None and kw.get("token") is None:
            user = uniq("u")
        url = self.wss_url() if kw.get("ssl") is not None else self.ws_url()
        c = GatewayClient(url, user=user, **kw)
        await c.connect()
        return c
