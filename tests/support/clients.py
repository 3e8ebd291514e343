"""Helpers over ``gateway.client.GatewayClient`` (the public client, used by every test
that does not need raw frames: see :mod:`support.ws` for those)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .wait import eventually

if TYPE_CHECKING:
    from gateway.client import GatewayClient


async def recv_until(c: GatewayClient, pred: Callable[[dict[str, Any]], bool], seen: list[dict[str, Any]] | None = None,
                     timeout: float = 20.0, data: bool = True) -> dict[str, Any]:
    """Receive room messages until one satisfies ``pred`` and return it. Each message (its
    ``data`` when ``data``) is appended to ``seen``, and those already in ``seen`` are
    tested first. ``TimeoutError`` after ``timeout`` seconds overall."""
    seen = [] if seen is None else seen
    for item in seen:
        if pred(item):
            return item
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no matching message within {timeout}s; seen: {seen[-10:]!r}")
        m = await c.recv(left)
        item = m["data"] if data else m
        seen.append(item)
        if pred(item):
            return item


async def next_event(c: GatewayClient, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
    """The first non-message frame (push, presence, drain ...) satisfying ``pred``, whether
    it already arrived (``c.events``) or arrives within ``timeout`` seconds."""
    return await eventually(lambda: next((e for e in c.events if pred(e)), None), timeout, what="a matching event")  # type: ignore[no-any-return]


def drain(c: GatewayClient) -> list[dict[str, Any]]:
    """The room messages queued on ``c`` right now (removed from its queue)."""
    out = []
    while (m := c.recv_nowait()) is not None:
        out.append(m)
    return out
