"""A private ``redis-server`` for the scale-out tests and the Redis benchmark, and the
configuration of a gateway with the redis broker (started like any other gateway, with
:class:`support.gateway.GatewayProcess`)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .ports import free_port
from .wait import eventually_sync


def install_redis() -> str | None:
    """``apt-get install -y redis-server`` (with ``apt-get update`` when the first try
    fails); the path of redis-server, None when it could not be installed. Needs root,
    or password-less sudo."""
    prefix: list[str] = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        if not shutil.which("sudo"):
            return None
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*prefix, "apt-get", "install", "-y", "-q", "redis-server"]
    run = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    if subprocess.run(install, **run).returncode != 0:  # type: ignore[call-overload]
        subprocess.run([*prefix, "apt-get", "update", "-q"], **run)  # type: ignore[call-overload]
        subprocess.run(install, **run)  # type: ignore[call-overload]
    return shutil.which("redis-server") or (str(p) if (p := Path("/usr/bin/redis-server")).exists() else None)


class RedisServer:
    """A private ``redis-server`` (no persistence) on a free port; ``kill`` and ``start``
    again on the same port simulate a crash and a restart with an empty dataset."""

    def __init__(self, binary: str, workdir: Path, port: int | None = None, extra: list[str] | None = None) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        with open(self.workdir / f"redis-{self.port}.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir), "--protected-mode", "no", "--daemonize", "no", *self.extra],
                stdout=log, stderr=subprocess.STDOUT,
            )
        eventually_sync(self.ping, timeout, what=f"redis-server on port {self.port}")

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def cli(self, *args: str) -> str:
        """One command, returning the reply as text (see :func:`command`)."""
        return command(self.port, *args)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def command(port: int, *args: str) -> str:
    """Send one command with redis-cli when available (raw RESP otherwise)."""
    cli = shutil.which("redis-cli")
    if cli:
        return subprocess.run([cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10).stdout
    payload = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(payload.encode())
        time.sleep(0.05)
        return s.recv(1 << 20).decode(errors="replace")


def commandstats(port: int) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls}."""
    out: dict[str, int] = {}
    for line in command(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            fields = dict(kv.split("=", 1) for kv in rest.split(","))
            out[name[8:]] = int(fields["calls"])
    return out


#: ``--set`` settings of a redis-broker test node (after the BASE_SETTINGS of every gateway).
REDIS_NODE_SETTINGS = ("server.demo=false", "server.io_threads=2", "drain.timeout=1.0")


def redis_node_config(redis_url: str, presence_interval: float = 0.2, extra_toml: str = "") -> str:
    """The TOML of a gateway node with the redis broker, dev auth, no rate limits and a fast
    presence tick (ports, node id and the rest come from :class:`GatewayProcess`)."""
    return f"""
[broker]
kind = "redis"
url = "{redis_url}"
presence_ttl = 2.0
leave_grace = 0.5
node_timeout = 2.0
[presence]
interval = {presence_interval}
[[routes]]
pattern = "live:{{room_id}}"
room_rate = 0.0
user_rate = 0.0
history_size = 50
[[routes]]
pattern = "small:{{room_id}}"
room_rate = 0.0
user_rate = 0.0
history_size = 5
[[routes]]
pattern = "*"
room_rate = 0.0
user_rate = 0.0
{extra_toml}
"""
