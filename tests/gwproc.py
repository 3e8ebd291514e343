"""One ``python -m gateway run`` subprocess for tests: free ports, start-up, readiness,
stop, log. Shared by ``gwtest.py`` (integration tests), ``redis/gwredis.py`` (scale-out
tests) and ``examples/examples_support.py`` (example apps), which subclass
:class:`GatewaySubprocess` with their own command line and conveniences.

No pytest in here: ``tests/redis/bench_redis_cpu.py`` runs as a plain script.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parent.parent


# ---- ports and HTTP -----------------------------------------------------------------------


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def port_is_free(port: int) -> bool:
    """Whether a server could bind ``port`` on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(max_port: int = 65535) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server.

    Taken at random OUTSIDE the ephemeral range (/proc/sys/net/ipv4/ip_local_port_range):
    there the outgoing connections of this machine's other tests cannot grab it between the
    check and the server's bind, and a client reconnecting to a server that was killed (to
    be restarted on the same port) cannot connect to itself (TCP simultaneous open) and
    hold the port. ``max_port`` caps it (a Redis cluster node also uses port + 10000)."""
    lo, hi = _ephemeral_range()
    ranges = [(a, b) for a, b in ((10000, lo - 1), (hi + 1, max_port)) if b - a > 100]
    if ranges:
        rnd = random.Random()
        for _ in range(200):
            a, b = rnd.choices(ranges, weights=[b - a for a, b in ranges])[0]
            port = rnd.randint(a, b)
            if port_is_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """``(status, body)``; ``(0, b"")`` when nothing answers."""
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()
    except (OSError, ValueError):
        return 0, b""


# ---- the process ----------------------------------------------------------------------------

_STARTED: list[GatewaySubprocess] = []


@atexit.register
def _kill_leftovers() -> None:
    """Processes run in their own session (a Ctrl-C of the test run does not reach them):
    never leave one behind."""
    for g in _STARTED:
        if g.proc is not None and g.proc.poll() is None:
            g.proc.kill()


class GatewaySubprocess:
    """``python -m gateway run <run_args()> --set node_id=<node_id>`` on fresh free ports,
    output appended to ``log_path``.

    Subclasses implement :meth:`run_args` (called once per start attempt, after ``port``
    and ``api_port`` are chosen). ``env`` is added to this process's environment (minus
    its ``GATEWAY_*`` variables); ``api_key`` is sent to ``/v1/stats`` during start-up.
    """

    #: Seconds :meth:`start` waits for readiness by default.
    ready_timeout = 40.0

    def __init__(self, log_path: Path, *, node_id: str | None = None, env: Mapping[str, str] | None = None,
                 api_key: str | None = None) -> None:
        self.log_path = log_path
        self.node_id = node_id or f"gw-{uuid.uuid4().hex[:8]}"
        self.env = dict(env or {})
        self.api_key = api_key
        self.port = 0
        self.api_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        #: Set by :meth:`stop` when the process ignored its signal and was killed.
        self.hung = False

    def run_args(self) -> list[str]:
        """The arguments after ``gateway run`` for ``self.port`` and ``self.api_port``."""
        raise NotImplementedError

    # ---- addresses ----

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # ---- lifecycle ----

    def start(self, timeout: float | None = None) -> Self:
        """Start on fresh ports (again on new ones when a port was taken meanwhile: the
        log says "address already in use") and wait until :meth:`ready`."""
        if self.running():
            raise RuntimeError(f"gateway {self.node_id} is already running (pid {self.pid})")
        timeout = self.ready_timeout if timeout is None else timeout
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "python"), env.get("PYTHONPATH", "")]))
        env.update(self.env)
        attempts = 6
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            self.api_port = free_port()
            while self.api_port == self.port:
                self.api_port = free_port()
            cmd = [sys.executable, "-m", "gateway", "run", *self.run_args(), "--set", f"node_id={self.node_id}"]
            with open(self.log_path, "ab") as log:
                start_of_attempt = log.tell()
                log.write(f"---- start attempt {attempt}: {' '.join(cmd)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            if self not in _STARTED:
                _STARTED.append(self)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self.ready():
                    return self
                time.sleep(0.05)
            if self.proc.poll() is None:
                self.kill()
                raise RuntimeError(f"gateway {self.node_id} did not become ready within {timeout}s\n{self.log_tail()}")
            said = self.log_path.read_bytes()[start_of_attempt:].decode(errors="replace")
            if "address already in use" in said.lower() and attempt < attempts:
                continue
            raise RuntimeError(f"gateway {self.node_id} exited with {self.proc.returncode} during start-up\n{self.log_tail()}")
        raise AssertionError("unreachable")

    def ready(self) -> bool:
        """``/readyz`` answers 200 on the API port, and the port is this process's: a
        neighbour could hold it while this process is still about to fail its bind."""
        if http_get(self.api_url + "/readyz", 1.0)[0] != 200:
            return False
        status, body = http_get(self.api_url + "/v1/stats", 2.0, {"X-API-Key": self.api_key} if self.api_key else None)
        try:
            return status == 200 and json.loads(body).get("node") == self.node_id
        except (ValueError, AttributeError):
            return False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Send ``sig`` (SIGTERM: graceful drain), SIGKILL after ``timeout`` (``hung`` is
        then True). Returns the exit code, None if never started."""
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
        return p.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # ---- output ----

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def metrics(self) -> str:
        """The Prometheus text of ``/metrics`` on the API port."""
        status, body = http_get(self.api_url + "/metrics", 5.0)
        assert status == 200, f"/metrics of {self.node_id} answered {status}"
        return body.decode()

    def metric(self, name: str) -> float | None:
        """The first sample of ``name`` (any labels), None when there is none."""
        for line in self.metrics().splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
        return None
