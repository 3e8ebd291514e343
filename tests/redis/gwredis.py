"""Helpers of the Redis scale-out tests (fixtures are in conftest.py): a private
``redis-server``, gateway processes with the redis broker, a protocol-v1 WebSocket client.

A module with its own name (not ``conftest``): tests/conftest.py is also a ``conftest``
module, and ``from conftest import ...`` would depend on import order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parents[2]
for _p in (ROOT / "python", ROOT / "tests"):  # gateway, gwproc (also when run as a script)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from gwproc import GatewaySubprocess, free_port, port_is_free

# ---- HTTP and polling ---------------------------------------------------------------------


def http(method: str, url: str, body: Any = None, timeout: float = 3.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


async def ahttp(method: str, url: str, body: Any = None, timeout: float = 3.0) -> tuple[int, Any]:
    return await asyncio.to_thread(http, method, url, body, timeout)


def wait_until(pred: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def await_until(pred: Any, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# ---- redis-server ---------------------------------------------------------------------------


def _install_redis() -> str | None:
    """``apt-get install -y redis-server`` (with ``apt-get update`` when the first try
    fails). Needs root, or password-less sudo."""
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
        log = open(self.workdir / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "no", "--daemonize", "no", *self.extra],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_until(self.ping, timeout, what=f"redis-server on port {self.port}")

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
        """One command through a raw socket (RESP), returning the reply as text."""
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


# ---- gateway processes ----------------------------------------------------------------------

_node_ids = itertools.count(1)


class GatewayNode(GatewaySubprocess):
    """``python -m gateway run --config <toml>`` with the redis broker, dev auth, no rate
    limits and a fast presence tick (the process itself: ``gwproc.GatewaySubprocess``)."""

    ready_timeout = 20.0

    def __init__(self, tmp: Path, redis_url: str, name: str | None = None, extra_toml: str = "", args: list[str] | None = None,
                 presence_interval: float = 0.2) -> None:
        self.name = name or f"n{next(_node_ids)}"
        super().__init__(tmp / f"gateway-{self.name}.log", node_id=self.name)
        self.presence_interval = presence_interval
        self.tmp = tmp
        self.redis_url = redis_url
        self.extra_toml = extra_toml
        self.args = args or []

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def api(self) -> str:
        return self.api_url

    alive = GatewaySubprocess.running
    log = GatewaySubprocess.log_text

    def run_args(self) -> list[str]:
        cfg = self.tmp / f"gateway-{self.name}.toml"
        cfg.write_text(self.config_text())
        return ["--config", str(cfg), *self.args]

    def config_text(self) -> str:
        return f"""
node_id = "{self.name}"
[server]
host = "127.0.0.1"
port = {self.port}
demo = false
io_threads = 2
[api]
port = {self.api_port}
[auth]
mode = "dev"
[broker]
kind = "redis"
url = "{self.redis_url}"
presence_ttl = 2.0
leave_grace = 0.5
node_timeout = 2.0
[presence]
interval = {self.presence_interval}
[drain]
timeout = 1.0
[log]
level = "info"
json = false
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
{self.extra_toml}
"""


# ---- WebSocket clients ----------------------------------------------------------------------


class Client:
    """A protocol-v1 client: requests with ids, other frames queued."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.ids = itertools.count(1)
        self.closed: asyncio.Future[tuple[int | None, str]] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, node: GatewayNode, user: str) -> Client:
        ws = await connect(f"{node.ws_url}?user={user}", subprotocols=["gateway.v1"], max_size=1 << 22, open_timeout=5)  # type: ignore[list-item]
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello["op"] == "connected", hello
        return cls(ws, hello)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                f = json.loads(raw)
                rid = f.get("id") if f.get("op") in ("ack", "error") else None
                fut = self.pending.pop(rid, None) if rid is not None else None
                if fut is not None and not fut.done():
                    fut.set_result(f)
                else:
                    self.frames.put_nowait(f)
        except Exception:
            pass
        finally:
            if not self.closed.done():
                self.closed.set_result((self.ws.close_code, self.ws.close_reason or ""))

    async def request(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        rid = next(self.ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        await self.ws.send(json.dumps({"op": op, "id": rid, **fields}))
        return await asyncio.wait_for(fut, timeout)

    async def send(self, op: str, **fields: Any) -> int:
        rid = next(self.ids)
        await self.ws.send(json.dumps({"op": op, "id": rid, **fields}))
        return rid

    async def join(self, room: str, **fields: Any) -> dict[str, Any]:
        r = await self.request("join", room=room, **fields)
        assert r["op"] == "ack", r
        return r

    async def next(self, op: str | None = "msg", timeout: float = 5.0, room: str | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {op} frame within {timeout}s")
            f = await asyncio.wait_for(self.frames.get(), left)
            if (op is None or f.get("op") == op) and (room is None or f.get("room") == room):
                return f

    async def msgs(self, n: int, timeout: float = 5.0, room: str | None = None) -> list[dict[str, Any]]:
        return [await self.next("msg", timeout, room) for _ in range(n)]

    def drain_msgs(self, room: str | None = None) -> list[dict[str, Any]]:
        out = []
        keep = []
        while not self.frames.empty():
            f = self.frames.get_nowait()
            if f.get("op") == "msg" and (room is None or f.get("room") == room):
                out.append(f)
            else:
                keep.append(f)
        for f in keep:
            self.frames.put_nowait(f)
        return out

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.reader.cancel()
