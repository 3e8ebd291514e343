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
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import websockets
from gwproc import ROOT, GatewaySubprocess
from websockets.asyncio.client import ClientConnection, connect

if str(ROOT) not in sys.path:  # tests import the ``examples`` package
    sys.path.insert(0, str(ROOT))

SECRET = "example-tests-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


class GatewayProcess(GatewaySubprocess):
    """A ``gateway run --app ...`` subprocess on free ports (``gwproc.GatewaySubprocess``)."""

    ready_timeout = 20.0

    def __init__(self, app: str, sets: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        super().__init__(log_path, node_id=f"ex-{uuid.uuid4().hex[:8]}", env=env)
        self.app = app
        self.sets = list(sets)

    @property
    def node(self) -> str:
        return self.node_id

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    log = GatewaySubprocess.log_text

    def run_args(self) -> list[str]:
        args = [
            "--app", self.app,
            "--host", "127.0.0.1", "--port", str(self.port), "--api-port", str(self.api_port),
            "--io-threads", "2", "--log-level", "info", "--set", "auth.mode=dev",
            "--set", "server.demo=false", "--set", "drain.timeout=1", "--set", "log.json=false",
        ]
        for s in self.sets:
            args += ["--set", s]
        return args

    async def astop(self, timeout: float = 15.0) -> int | None:
        """:meth:`stop` without blocking the test's event loop (it may serve the process)."""
        return await asyncio.to_thread(self.stop, timeout=timeout)


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
