"""A moderation plugin for tests/integration/test_media.py (``--app
tests.integration.media_app:make_app``): ``on_media`` judges an upload named ``bad*`` risky
at once; one named ``late*`` gets its verdict a moment later through
``gateway.media.verdict`` (the way a WeChat mediaCheckAsync callback lands), after the
message carrying it was sent; others pass. (``on_message`` drops media messages captioned
"drop me".) It fetches each file through the URL it is
given, as a moderation service would."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from gateway.app import DROP, Gateway, Message, Plugin
from gateway.config import Config
from gateway.media import MediaInfo


class Moderator(Plugin):
    name = "moderator"

    def setup(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.checked = gateway.counter("moderator_checked", "Files fetched and checked", ["verdict"])
        self.tasks: set[asyncio.Task[Any]] = set()

    async def on_media(self, info: MediaInfo) -> str | None:
        base = f"http://127.0.0.1:{self.gw.config.server.port}" if info.url.startswith("/") else ""
        async with aiohttp.ClientSession() as s, s.get(base + info.url) as r:
            body = await r.read()
        assert r.status == 200 and len(body) == info.size, (r.status, len(body), info.size)
        if info.name.startswith("bad"):
            self.checked.labels("risky").inc()
            return "risky"
        if info.name.startswith("late"):
            t = asyncio.ensure_future(self._later(info.file_id))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
            return None
        self.checked.labels("pass").inc()
        return "pass"

    def on_message(self, client: Any, msg: Message) -> Any:
        # A message a hook drops does not claim its file: it can be sent elsewhere.
        if isinstance(msg.data, dict) and msg.data.get("caption") == "drop me":
            return DROP
        return None

    async def _later(self, file_id: str) -> None:
        await asyncio.sleep(1.0)
        self.checked.labels("risky").inc()
        await self.gw.media.verdict(file_id, "risky")


def make_app(config: Config) -> Gateway:
    return Gateway(config, plugins=[Moderator()])
