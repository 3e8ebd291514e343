"""Typed commands that every node applies (kick, broadcast, mute, ban, close_room, ...).

:meth:`Broker.command <gateway.broker.base.Broker.command>` runs one on every node, this
one included; :meth:`BrokerHandler.apply <gateway.broker.base.BrokerHandler.apply>`
applies one locally. Between nodes (the Redis control channel) a command travels as
:func:`encode` bytes, read back with :func:`decode`.

Wire format (JSON, orjson)::

    {"v": 1, "k": "<kind>", "d": {...fields...}}

The ``k``/``d`` shape is the one of the untyped control messages that came before, with
the same kinds and field names, so nodes of both versions understand each other during
a rolling upgrade; a message without ``v`` is read as version 1. A message of another
version, an unknown kind or a bad shape raises :class:`ValueError` (the receiver logs and
ignores it).

``send_user`` frames travel on the same channel as ``{"k": "__user__", ...}``
(:class:`UserFrame`, :func:`encode_user`); they are no :data:`Command`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

import orjson

__all__ = [
    "VERSION",
    "BadCommand",
    "Ban",
    "Broadcast",
    "CloseRoom",
    "Command",
    "ConvMember",
    "Kick",
    "Mute",
    "Unban",
    "Unmute",
    "UserFrame",
    "decode",
    "decode_message",
    "encode",
    "encode_user",
]

#: Version written by :func:`encode`; :func:`decode` accepts it and messages without one.
VERSION = 1

#: Close code of a kick (``protocol.CLOSE_KICKED``; not imported to keep this module
#: free of the gateway's other modules).
_CLOSE_KICKED = 4003


@dataclass(frozen=True, slots=True)
class Kick:
    """Close every connection of ``user`` with ``code`` and ``reason``."""

    user: str
    code: int = _CLOSE_KICKED
    reason: str = "kicked"


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Queue ``frame`` (a complete server frame, UTF-8 JSON) to every connection."""

    frame: bytes
    prio: int = 1


@dataclass(frozen=True, slots=True)
class Mute:
    """Mute ``user`` in ``room`` (``"*"``: everywhere), or the whole room except the
    ``whitelist`` users when ``user`` is None, until ``until`` (Unix time; None: until
    lifted)."""

    room: str
    user: str | None = None
    until: float | None = None
    whitelist: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unmute:
    """Lift the user mute (``user``) or the room mute (None) set with the same ``room``."""

    room: str
    user: str | None = None


@dataclass(frozen=True, slots=True)
class Ban:
    """Ban ``user`` from ``room`` (``"*"``: everywhere) until ``until`` and remove them."""

    room: str
    user: str
    until: float | None = None


@dataclass(frozen=True, slots=True)
class Unban:
    """Lift the ban set with the same ``room``."""

    room: str
    user: str


@dataclass(frozen=True, slots=True)
class CloseRoom:
    """Remove every member from ``room`` (they get a presence notice with ``reason``)."""

    room: str
    reason: str = "room closed"


@dataclass(frozen=True, slots=True)
class ConvMember:
    """``user``'s membership of conversation ``room`` changed: ``event`` is ``"added"``
    (attach the user's connections that follow conversations), ``"removed"`` (detach
    them) or ``"updated"`` (role or mute: forget what is cached). ``role``: the new one."""

    room: str
    user: str
    event: str
    role: str = ""


Command: TypeAlias = Kick | Broadcast | Mute | Unmute | Ban | Unban | CloseRoom | ConvMember


@dataclass(frozen=True, slots=True)
class UserFrame:
    """Transport of ``send_user``: ``frame`` for every connection of ``user``."""

    user: str
    frame: bytes
    prio: int


_USER_KIND = "__user__"


def _fields(cmd: Command) -> tuple[str, dict[str, Any]]:
    match cmd:
        case Kick(user, code, reason):
            return "kick", {"user": user, "code": code, "reason": reason}
        case Broadcast(frame, prio):
            return "broadcast", {"frame": frame.decode(), "prio": prio}
        case Mute(room, user, until, whitelist):
            return "mute", {"room": room, "user": user, "until": until, "whitelist": list(whitelist)}
        case Unmute(room, user):
            return "unmute", {"room": room, "user": user}
        case Ban(room, user, until):
            return "ban", {"room": room, "user": user, "until": until}
        case Unban(room, user):
            return "unban", {"room": room, "user": user}
        case CloseRoom(room, reason):
            return "close_room", {"room": room, "reason": reason}
        case ConvMember(room, user, event, role):
            return "conv_member", {"room": room, "user": user, "event": event, "role": role}
    raise TypeError(f"not a command: {cmd!r}")


def encode(cmd: Command) -> bytes:
    """The wire form of ``cmd`` (see the module docstring). Raises TypeError for other
    objects."""
    kind, d = _fields(cmd)
    return orjson.dumps({"v": VERSION, "k": kind, "d": d})


def encode_user(user: str, frame: bytes, prio: int) -> bytes:
    """The wire form of a ``send_user`` frame (:class:`UserFrame`)."""
    return orjson.dumps({"v": VERSION, "k": _USER_KIND, "d": {"user": user, "prio": prio, "frame": frame.decode()}})


# ---- decoding: strict types, so a bad message fails here and not inside the app ----------


class BadCommand(ValueError):
    """A control message that cannot be decoded (a :class:`ValueError`)."""


def _str(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise BadCommand(f"field {key!r} must be a string")
    return v


def _opt_str(d: dict[str, Any], key: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise BadCommand(f"field {key!r} must be a string or null")
    return v or None  # "" meant "no user" in the untyped messages


def _int(d: dict[str, Any], key: str, default: int) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadCommand(f"field {key!r} must be an integer")
    return v


def _until(d: dict[str, Any]) -> float | None:
    v = d.get("until")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadCommand("field 'until' must be a number or null")
    return float(v)


def _command(kind: str, d: dict[str, Any]) -> Command:
    if kind == "kick":
        reason = d.get("reason", "")
        if not isinstance(reason, str):
            raise BadCommand("field 'reason' must be a string")
        return Kick(_str(d, "user"), _int(d, "code", _CLOSE_KICKED), reason)
    if kind == "broadcast":
        return Broadcast(_str(d, "frame").encode(), _int(d, "prio", 1))
    if kind == "mute":
        wl = d.get("whitelist") or ()
        if not isinstance(wl, (list, tuple)) or not all(isinstance(u, str) for u in wl):
            raise BadCommand("field 'whitelist' must be a list of strings")
        return Mute(_str(d, "room"), _opt_str(d, "user"), _until(d), tuple(wl))
    if kind == "unmute":
        return Unmute(_str(d, "room"), _opt_str(d, "user"))
    if kind == "ban":
        return Ban(_str(d, "room"), _str(d, "user"), _until(d))
    if kind == "unban":
        return Unban(_str(d, "room"), _str(d, "user"))
    if kind == "close_room":
        reason = d.get("reason", "room closed")
        if not isinstance(reason, str):
            raise BadCommand("field 'reason' must be a string")
        return CloseRoom(_str(d, "room"), reason)
    if kind == "conv_member":
        event = _str(d, "event")
        if event not in ("added", "removed", "updated"):
            raise BadCommand(f"unknown membership event {event!r}")
        role = d.get("role", "")
        if not isinstance(role, str):
            raise BadCommand("field 'role' must be a string")
        return ConvMember(_str(d, "room"), _str(d, "user"), event, role)
    raise BadCommand(f"unknown command kind {kind!r}")


def decode_message(data: bytes) -> Command | UserFrame:
    """A command or a ``send_user`` frame from its wire form. Raises ValueError."""
    try:
        m = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise BadCommand(f"not JSON: {e}") from None
    if not isinstance(m, dict):
        raise BadCommand("not an object")
    v = m.get("v", VERSION)
    if v != VERSION:
        raise BadCommand(f"unsupported version {v!r}")
    kind, d = m.get("k"), m.get("d")
    if not isinstance(kind, str) or not isinstance(d, dict):
        raise BadCommand("missing 'k' or 'd'")
    if kind == _USER_KIND:
        return UserFrame(_str(d, "user"), _str(d, "frame").encode(), _int(d, "prio", 1))
    return _command(kind, d)


def decode(data: bytes) -> Command:
    """A command from its wire form (:func:`encode`). Raises ValueError for anything
    else: bad JSON, another version, an unknown kind, missing or mistyped fields."""
    msg = decode_message(data)
    if isinstance(msg, UserFrame):
        raise BadCommand("a send_user frame is not a command")
    return msg
