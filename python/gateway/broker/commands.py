"""Typed commands that run on every node (kick, mute, ban, ...), and their wire form."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["Ban", "Broadcast", "CloseRoom", "Command", "Kick", "Mute", "Unban", "Unmute", "decode", "encode"]


@dataclass(frozen=True, slots=True)
class Kick:
    user: str
    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Broadcast:
    frame: bytes
    prio: int


@dataclass(frozen=True, slots=True)
class Mute:
    room: str
    user: str | None
    until: float | None
    whitelist: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unmute:
    room: str
    user: str | None


@dataclass(frozen=True, slots=True)
class Ban:
    room: str
    user: str
    until: float | None


@dataclass(frozen=True, slots=True)
class Unban:
    room: str
    user: str


@dataclass(frozen=True, slots=True)
class CloseRoom:
    room: str
    reason: str


Command = Kick | Broadcast | Mute | Unmute | Ban | Unban | CloseRoom
_KINDS: dict[str, type[Any]] = {c.__name__.lower(): c for c in (Kick, Broadcast, Mute, Unmute, Ban, Unban, CloseRoom)}


def encode(cmd: Command) -> bytes:
    d: dict[str, Any] = {"v": 1, "kind": type(cmd).__name__.lower()}
    for name in cmd.__slots__:
        v = getattr(cmd, name)
        d[name] = v.decode() if isinstance(v, bytes) else v
    return orjson.dumps(d)


def decode(data: bytes) -> Command:
    """Raises ValueError for an unknown kind or a bad shape."""
    try:
        d = orjson.loads(data)
        cls = _KINDS[d.pop("kind")]
        d.pop("v", None)
        if cls is Broadcast:
            d["frame"] = d["frame"].encode()
        if cls is Mute:
            d["whitelist"] = tuple(d.get("whitelist") or ())
        cmd: Command = cls(**d)
        return cmd
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"bad command: {e}") from None
