"""A company endpoint for the outbox tests: a real aiohttp server on a free port that
records every POST, checks its signature, and answers as the test says (down, 500,
Retry-After, refusing some events, fine)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .ports import free_port


@dataclass
class Request:
    at: float
    status: int
    headers: dict[str, str]
    events: list[dict[str, Any]]
    signed: bool


class Receiver:
    """``answer(events) -> (status, headers)`` decides each reply (200 by default). While
    :meth:`stop`-ped, nothing listens on the port (connections are refused)."""

    def __init__(self, secret: str = "") -> None:
        self.secret = secret.encode()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/events"
        self.requests: list[Request] = []
        #: Seconds each answer takes (a slow endpoint).
        self.delay = 0.0
        self.answer: Callable[[list[dict[str, Any]]], tuple[int, dict[str, str]]] = lambda events: (200, {})
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/events", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def verify(self, headers: dict[str, str], body: bytes) -> bool:
        """The signature check a company endpoint makes (and the timestamp's freshness)."""
        ts = headers.get("X-Gateway-Timestamp", "")
        sig = headers.get("X-Gateway-Signature", "")
        if not ts.isdigit() or abs(int(ts) - time.time()) > 300:
            return False
        want = "sha256=" + hmac.new(self.secret, ts.encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(sig, want)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        events = orjson.loads(body)["events"]
        if self.delay:
            await asyncio.sleep(self.delay)
        status, headers = self.answer(events)
        self.requests.append(Request(time.monotonic(), status, dict(request.headers), events, self.verify(dict(request.headers), body)))
        return web.json_response({"ok": status < 300}, status=status, headers=headers)

    def delivered(self) -> list[dict[str, Any]]:
        """Events of every request answered 2xx, in the order received (repeats kept)."""
        return [e for r in self.requests if 200 <= r.status < 300 for e in r.events]

    def delivered_ids(self) -> set[str]:
        return {e["id"] for e in self.delivered()}
