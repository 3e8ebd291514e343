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

    def route(shopper: str, card: Any) -> str | None:
        """The company's rule: returns ("ret*" shoppers) go to after-sales."""
        return "aftersales" if shopper.startswith("ret") else None

    gw = Gateway(config, plugins=[Desk(context=context, on_unread_reply=remind, route=route)])
    return gw


def make_counting_app(config: Config) -> Gateway:
    """:func:`make_app` whose store counts ``cs_session`` reads; the op ``test.reads``
    answers ``{"cs_session": n}`` (the per-message cost of the desk)."""
    gw = make_app(config)
    desk = next(p for p in gw.plugins if isinstance(p, Desk))
    reads = {"cs_session": 0}
    started = desk.started

    async def counting_started() -> None:
        store = desk.store
        orig = store.cs_session

        async def cs_session(id: str) -> SessionInfo | None:
            reads["cs_session"] += 1
            return await orig(id)

        store.cs_session = cs_session  # type: ignore[method-assign]
        await started()

    desk.started = counting_started  # type: ignore[method-assign]

    @gw.op("test.reads")
    async def _reads(client: Any, op: str, msg: Any) -> dict[str, int]:
        return dict(reads)

    return gw
