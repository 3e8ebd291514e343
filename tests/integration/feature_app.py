"""A plugin app for tests/integration/test_plugin_api.py, loaded with
``--app tests.integration.feature_app:make_app``: plugin settings from
``[plugins.feature]``, a counter made with ``Gateway.counter``, ``after_publish`` per
re-routed target and the rooms seen by ``on_disconnect``, reported into ``audit:feature``;
``on_member`` rules for conversations."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.app import Client, Gateway, MemberChange, Message, Plugin
from gateway.errors import Reject
from gateway.broker import PublishResult
from gateway.config import Config

AUDIT = "audit:feature"


class FeaturePlugin(Plugin):
    name = "feature"
    ops = ("feature.echo", "feature.whoami", "feature.refuse", "feature.slow", "feature.broken")

    def setup(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.settings: dict[str, Any] = gateway.config.plugins.get(self.name, {})
        self.published = gateway.counter("feature_published", "Messages seen by after_publish", ["kind"])
        # The same name gives the same counter (plugins may ask again, e.g. per hook).
        assert gateway.counter("feature_published", "Messages seen by after_publish", ["kind"]) is self.published

    def on_message(self, client: Client, msg: Message) -> Message | None:
        if msg.type == "fanout" and isinstance(msg.data, dict):
            msg.rooms = list(msg.data["rooms"])
            return msg
        return None

    async def after_publish(self, msg: Message, result: PublishResult) -> None:
        if msg.room == AUDIT:
            return
        self.published.labels(msg.room.split(":", 1)[0]).inc()
        event = {"event": "after_publish", "room": msg.room, "rooms": msg.rooms, "seq": result.seq, "tag": self.settings.get("tag")}
        await self.gw.publish(AUDIT, event, type="audit")

    def on_member(self, client: Client, change: MemberChange) -> bool:
        """Conversations: nobody may add a user named ``blocked*``; ``vip:`` groups are
        made only by users whose token has the vip role."""
        if change.action in ("create", "invite") and any(u.startswith("blocked") for u in change.users):
            raise Reject(4050, "that user cannot be added")
        return not (change.action == "create" and b'"vip"' in change.meta and client.identity.meta.get("role") != "vip")

    async def on_request(self, client: Client, op: str, msg: dict[str, Any]) -> dict[str, Any] | None:
        """Plugin ops (``Plugin.ops``): each shows one way to answer."""
        if op == "feature.echo":
            return {"echo": msg.get("data"), "op": "not-overridable", "id": "nor-this"}
        if op == "feature.whoami":
            return None
        if op == "feature.refuse":
            raise Reject(4050, "refused by the plugin")
        if op == "feature.slow":
            await asyncio.sleep(30)
        return "not a dict"  # type: ignore[return-value]

    async def on_disconnect(self, client: Client, code: int, reason: str) -> None:
        await self.gw.publish(AUDIT, {"event": "disconnect", "user": client.user, "rooms": sorted(client.rooms), "code": code}, type="audit")


def make_app(config: Config) -> Gateway:
    return Gateway(config, plugins=[FeaturePlugin()])
