"""Helpers for the example tests: a real gateway process running an example app
(``python -m gateway run --app examples.<module>:make_app``) and a small protocol-level
WebSocket client. The fixtures that use them are in ``conftest.py``.

(A uniquely named module rather than ``from conftest import ...``, which is ambiguous
once other test directories have their own ``conftest.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECRET = "example-tests-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class GatewayProcess:
    """A ``gateway run --app ...`` subprocess on free ports."""

    def __init__(self, app: str, sets: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.app = app
        self.sets = list(sets)
        self.env = dict(env)
        self.log_path = log_path
        self.node = f"ex-{uuid.uuid4().hex[:8]}"
        self.port = 0
        self.api_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 20.0) -> None:
        """Start on fresh free ports; retry when a port was taken in the meantime."""
        for _ in range(5):
            self.port, self.api_port = free_port(), free_port()
            if self._start_once(timeout):
                return
            if "already in use" not in self.log():
                break
        raise RuntimeError(f"gateway {self.app} did not start:\n{self.log()[-4000:]}")

    def _start_once(self, timeout: float) -> bool:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [
            sys.executable, "-m", "gateway", "run", "--app", self.app,
            "--host", "127.0.0.1", "--port", str(self.port), "--api-port", str(self.api_port),
            "--threads", "2", "--log-level", "info",
            "--set", f"node_id={self.node}", "--set", "server.demo=false", "--set", "drain.timeout=1",
            "--set", "log.json=false",
        ]
        for s in self.sets:
            cmd += ["--set", s]
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                status, _ = http_get(f"http://127.0.0.1:{self.port}/healthz", 0.5)
                if status == 200:
                    # Make sure both ports belong to this process, not to a neighbour.
                    status, body = http_get(f"{self.api_url}/v1/stats", 0.5)
                    if status == 200 and json.loads(body).get("node") == self.node:
                        return True
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        self.stop()
        return False

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful drain and plugin teardown), then SIGKILL if it hangs."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    async def astop(self, timeout: float = 15.0) -> int | None:
        """:meth:`stop` without blocking the test's event loop (it may serve the process)."""
        return await asyncio.to_thread(self.stop, timeout)

    def metrics(self) -> str:
        status, body = http_get(f"{self.api_url}/metrics")
        assert status == 200
        return body.decode()


class WsClient:
    """A protocol-level client: requests get their ``ack``/``error`` by ``id``; every
    other frame (``msg``, ``presence``, ``push`` ...) is queued for :meth:`next`."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.frames: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        subprotocols: Sequence[str] = ("gateway.v1",),
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> WsClient:
        ws = await connect(
            url,
            subprotocols=[websockets.Subprotocol(p) for p in subprotocols] or None,
            additional_headers=dict(headers or {}),
            open_timeout=timeout,
            max_size=None,
        )
        hello = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        assert hello["op"] == "connected", hello
        return cls(ws, hello)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                fut = self._pending.pop(frame.get("id"), None) if frame.get("op") in ("ack", "error") else None
                if fut is not None and not fut.done():
                    fut.set_result(frame)
                else:
                    self.frames.put_nowait(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))

    async def request(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await self.ws.send(json.dumps({"op": op, "id": rid, **fields}))
        return await asyncio.wait_for(fut, timeout)

    async def join(self, room: str, **fields: Any) -> dict[str, Any]:
        return await self.request("join", room=room, **fields)

    async def publish(self, room: str, data: Any, type: str = "chat") -> dict[str, Any]:
        return await self.request("publish", room=room, type=type, data=data)

    async def next(self, op: str = "msg", timeout: float = 5.0) -> dict[str, Any]:
        """The next queued frame with this ``op`` (others are skipped)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(f"no {op!r} frame within {timeout}s")
            frame = await asyncio.wait_for(self.frames.get(), left)
            if frame.get("op") == op:
                return frame

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str | None]:
        """Wait for the server to close; returns (code, reason)."""
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.ws.close_code, self.ws.close_reason

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 2)
