"""Gateway apps for integration tests, loaded with ``gateway run --app tests.apps:make_app``.

:class:`HookTestPlugin` reacts to message types and user names so one server covers
every hook behaviour; hook events are published into the room ``audit:hooks`` so tests
can observe them over a WebSocket.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.app import DROP, Client, Gateway, Message, Plugin, Reject
from gateway.auth import ConnectRequest, Identity
from gateway.broker import PublishResult
from gateway.config import Config

AUDIT = "audit:hooks"


class HookTestPlugin(Plugin):
    """Hooks driven by the test: see each branch."""

    name = "hook-test"

    def __init__(self) -> None:
        self.gw: Gateway | None = None

    def setup(self, gateway: Gateway) -> None:
        self.gw = gateway

    async def _audit(self, **event: Any) -> None:
        assert self.gw is not None
        await self.gw.publish(AUDIT, event, type="audit")

    # ---- connect ----

    async def on_connect(self, req: ConnectRequest, identity: Identity) -> Identity | None:
        user = identity.user
        if user.startswith("blocked"):
            raise Reject(status=403, message="blocked by the test hook")
        if user.startswith("whoami"):
            # What the hooks see as the client's address (PROXY protocol, X-Forwarded-For).
            raise Reject(status=403, message=f"peer={req.peer}")
        if user.startswith("slowconnect"):
            await asyncio.sleep(30)
        if user.startswith("vip"):
            return Identity(user, {**identity.meta, "role": "vip"}, identity.rooms)
        return None

    # ---- join ----

    async def on_join(self, client: Client, room: str) -> bool:
        if room.startswith("live:forbidden"):
            return False
        if room.startswith("live:rejectjoin"):
            raise Reject(4003, "join rejected by the test hook")
        if room.startswith("live:slowjoin"):
            await asyncio.sleep(30)
        return True

    # ---- messages ----

    async def on_message(self, client: Client, msg: Message) -> Any:
        t = msg.type
        data = msg.data if isinstance(msg.data, dict) else {}
        if t == "slow":
            await asyncio.sleep(float(data.get("sleep", 30)))
            return None
        if t == "stubborn":
            # Ignores cancellation: the hook timeout must still answer on time.
            end = asyncio.get_running_loop().time() + float(data.get("sleep", 30))
            while asyncio.get_running_loop().time() < end:
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    pass
            return None
        if t == "drop":
            return DROP
        if t == "reject":
            raise Reject(4050, "rejected by the test hook")
        if t == "shout":
            msg.data = {"text": str(data.get("text", "")).upper(), "by": client.user}
            return msg
        if t == "fanout":
            msg.rooms = list(data["rooms"])
            return msg
        if t == "boom":
            raise RuntimeError("hook failure on purpose")
        if t == "http":
            # An HTTP call (aiohttp, with a timeout) as the hook's very first await.
            import aiohttp

            assert self.gw is not None
            url = f"http://127.0.0.1:{self.gw.config.api.port}/healthz"
            async with aiohttp.ClientSession() as s:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    status = r.status
            async with asyncio.timeout(5):
                await asyncio.sleep(0)
            msg.data = {"status": status}
            return msg
        return None

    async def after_publish(self, msg: Message, result: PublishResult) -> None:
        if msg.room == AUDIT:
            return
        await self._audit(event="after_publish", room=msg.room, seq=result.seq, type=msg.type)

    async def on_leave(self, client: Client, room: str) -> None:
        if room != AUDIT:
            await self._audit(event="leave", room=room, user=client.user)

    async def on_disconnect(self, client: Client, code: int, reason: str) -> None:
        await self._audit(event="disconnect", user=client.user, code=code)

    async def after_join(self, client: Client, room: str) -> None:
        if room != AUDIT:
            await self._audit(event="joined", room=room, user=client.user)


def make_app(config: Config) -> Gateway:
    """The factory ``--app`` calls with the loaded configuration."""
    return Gateway(config, plugins=[HookTestPlugin()])


class TrivialHook(Plugin):
    """A trivial async ``on_message`` hook (the routing benchmark's reference hook)."""

    name = "trivial"

    async def on_message(self, client: Client, msg: Message) -> None:
        return None


def make_trivial_app(config: Config) -> Gateway:
    return Gateway(config, plugins=[TrivialHook()])
