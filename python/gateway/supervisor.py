"""``gateway run --workers N``: N worker processes sharing the client port.

Each worker is a plain ``python -m gateway run`` process with the same settings plus:
``--workers 1``, ``server.reuse_port = true`` (the kernel spreads new connections over the
workers with SO_REUSEPORT), its own node id (``<node_id>-w<i>``), its own API port
(``api.port + i``) and a share of the engine threads (``server.io_threads`` or CPU count / N).
Workers share rooms, users and presence through the Redis broker, exactly like nodes on
different machines (config validation requires ``broker.kind = "redis"``).

The supervisor restarts a worker that dies (backoff 0.5 s doubling to 30 s, reset after
a minute of uptime), forwards SIGTERM/SIGINT to every worker for a graceful drain (a
second signal kills them), and exits once all workers have exited. Workers get SIGTERM
if the supervisor itself dies (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from .config import Config

log = logging.getLogger("gateway.supervisor")

#: Restart backoff (seconds): first delay, cap, and the uptime that resets it.
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
BACKOFF_RESET = 60.0
#: A worker exiting with code 2 (configuration error) this soon is not restarted.
FATAL_WINDOW = 10.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def worker_argv(cfg: Config, args: argparse.Namespace, index: int) -> list[str]:
    """The command line of worker ``index``: the user's settings, then the per-worker ones
    (named flags win over ``--set``, later ``--set`` over earlier ones)."""
    n = cfg.server.workers
    argv = [sys.executable, "-m", "gateway", "run"]
    if getattr(args, "config", None):
        argv += ["--config", args.config]
    if getattr(args, "app", None):
        argv += ["--app", args.app]
    for s in getattr(args, "set", None) or []:
        argv += ["--set", s]
    for flag, attr in (("--host", "host"), ("--port", "port"), ("--api-host", "api_host"), ("--broker", "broker"),
                       ("--redis-url", "redis_url"), ("--log-level", "log_level")):
        v = getattr(args, attr, None)
        if v is not None:
            argv += [flag, str(v)]
    if getattr(args, "dev", False):
        argv += ["--dev"]
    threads = cfg.server.io_threads or max(1, (os.cpu_count() or 1) // n)
    api_port = cfg.api.port + index if cfg.api.port else 0
    argv += ["--workers", "1", "--io-threads", str(threads), "--api-port", str(api_port)]
    argv += ["--set", f"node_id={json.dumps(worker_node_id(cfg.node_id, index))}", "--set", "server.reuse_port=true"]
    return argv


def worker_node_id(base: str, index: int) -> str:
    return f"{base}-w{index}"


class Worker:
    def __init__(self, index: int, argv: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.failures = 0
        self.restart_at = 0.0
        self.restarts = 0

    def start(self) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, env=self.env, start_new_session=True, preexec_fn=_die_with_parent)
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass


def supervise(cfg: Config, args: argparse.Namespace) -> int:
    """Run ``cfg.server.workers`` workers until SIGTERM/SIGINT; returns the exit code."""
    n = cfg.server.workers
    if cfg.server.port == 0:
        log.warning("server.port = 0 with several workers: each worker gets its own random port")
    env = dict(os.environ)
    env.pop("GATEWAY_SERVER__WORKERS", None)
    workers = [Worker(i, worker_argv(cfg, args, i), env) for i in range(n)]
    signals: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        signals.append(signum)

    def on_hup(_signum: int, _frame: Any) -> None:
        # Reload the TLS certificate: every worker serves it.
        for w in workers:
            w.signal(signal.SIGHUP)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    log.info("supervising %d workers on port %d (node %s-w0..w%d)", n, cfg.server.port, cfg.node_id, n - 1)
    code = 0
    forwarded = 0
    deadline = 0.0
    try:
        for w in workers:
            w.start()
        while True:
            now = time.monotonic()
            if len(signals) > forwarded:
                sig = signals[forwarded]
                forwarded = len(signals)
                if forwarded == 1:
                    log.info("signal %d: draining %d workers", sig, sum(w.proc is not None for w in workers))
                    deadline = now + cfg.drain.timeout + 15.0
                    for w in workers:
                        w.signal(sig)
                else:
                    log.warning("second signal: killing workers")
                    for w in workers:
                        w.signal(signal.SIGKILL)
            stopping = forwarded > 0
            for w in workers:
                p = w.proc
                if p is not None and p.poll() is not None:
                    rc = p.returncode
                    w.proc = None
                    uptime = now - w.started
                    if stopping:
                        if rc not in (0, -signal.SIGTERM, -signal.SIGINT):
                            code = 1
                        log.info("worker %d exited (%s)", w.index, rc)
                        continue
                    if rc == 2 and uptime < FATAL_WINDOW:
                        log.error("worker %d exited with a configuration error: stopping", w.index)
                        signals.append(signal.SIGTERM)
                        code = 2
                        continue
                    w.failures = 0 if uptime > BACKOFF_RESET else w.failures + 1
                    delay = min(BACKOFF_MIN * 2 ** max(0, w.failures - 1), BACKOFF_MAX)
                    w.restart_at = now + delay
                    log.error("worker %d (pid %d) died (%s) after %.1fs: restarting in %.1fs", w.index, p.pid, rc, uptime, delay)
                if w.proc is None and not stopping and now >= w.restart_at:
                    w.restarts += 1
                    try:
                        w.start()
                    except OSError as e:
                        log.error("cannot start worker %d: %s", w.index, e)
                        w.restart_at = now + BACKOFF_MAX
            if stopping and all(w.proc is None for w in workers):
                return code
            if stopping and now > deadline:
                log.error("workers still running after the drain deadline: killing them")
                for w in workers:
                    w.signal(signal.SIGKILL)
                deadline = now + 5.0
                code = 1
            time.sleep(0.05)
    finally:
        for w in workers:
            w.signal(signal.SIGKILL)
        for s, h in old.items():
            signal.signal(s, h)
