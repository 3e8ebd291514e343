"""TEMPORARY: the new broker contract (presence, debounce, typed commands, idempotency)
over the old brokers, until the broker package lands."""

from __future__ import annotations

import dataclasses
from typing import Any

from .commands import Broadcast, Command, decode, encode


class Presence:
    def __init__(self, broker: Any) -> None:
        self.b = broker

    @property
    def shared(self) -> bool:
        return type(self.b).__name__ != "MemoryBroker"

    async def report(self, counts: dict[str, tuple[int, int]]) -> None:
        await self.b.report_presence(counts)

    async def counts(self, room: str) -> tuple[int, int]:
        if not self.shared:
            return self.b._handler.local_counts(room)  # type: ignore[no-any-return]
        return await self.b.presence_counts(room)  # type: ignore[no-any-return]

    async def report_members(self, members: dict[str, list[dict[str, Any]]]) -> None:
        await self.b.report_members(members)

    async def members(self, room: str) -> list[dict[str, Any]] | None:
        return await self.b.members(room)  # type: ignore[no-any-return]


class Debounce:
    def __init__(self, broker: Any) -> None:
        self.b = broker

    @property
    def grace(self) -> float:
        cfg = getattr(self.b, "cfg", None)
        return float(getattr(cfg, "leave_grace", getattr(self.b, "grace", 0.0))) if hasattr(self.b, "member_leave") else 0.0

    async def join(self, room: str | None, user: str) -> bool:
        fn = getattr(self.b, "member_join", None)
        return True if fn is None else bool(await fn(room, user))

    async def leave(self, room: str | None, user: str) -> bool:
        fn = getattr(self.b, "member_leave", None)
        return True if fn is None else bool(await fn(room, user))


class HandlerShim:
    """Old brokers call ``handler.control(kind, data)``."""

    def __init__(self, handler: Any) -> None:
        self.h = handler

    def __getattr__(self, name: str) -> Any:
        return getattr(self.h, name)

    def control(self, kind: str, data: dict[str, Any]) -> None:
        self.h.apply(decode(encode_kind(kind, data)))


def encode_kind(kind: str, data: dict[str, Any]) -> bytes:
    import orjson

    return orjson.dumps({"kind": kind, **data})


def as_control(cmd: Command) -> tuple[str, dict[str, Any]]:
    d = orjson_loads(encode(cmd))
    kind = d.pop("kind")
    d.pop("v", None)
    if isinstance(cmd, Broadcast):
        d["frame"] = cmd.frame.decode()
    return kind, d


def orjson_loads(b: bytes) -> dict[str, Any]:
    import orjson

    r: dict[str, Any] = orjson.loads(b)
    return r


_ = dataclasses
