"""A gateway with the desk and its hooks, for tests/integration/test_desk*.py:
``context`` enriches for agents; ``on_unread_reply`` pushes a ``cs.remind`` frame to the
shopper (a real app would send a WeChat subscribe message)."""

from __future__ import annotations

from typing import Any

from gateway import Config, Gateway
from gateway.desk import Desk, SessionInfo


def make_app(config: Config) -> Gateway:
    gw: Gateway | None = None

    def context(s: SessionInfo) -> dict[str, Any]:
        return {"tier": "vip" if s.shopper.startswith("vip") else "normal", "orders": 3}

    async def remind(s: SessionInfo, unread: int, since_ms: int) -> None:
        assert gw is not None
        await gw.send_user(s.shopper, {"session": s.id, "unread": unread, "since_ms": since_ms}, type="cs.remind")

    gw = Gateway(config, plugins=[Desk(context=context, on_unread_reply=remind)])
    return gw
