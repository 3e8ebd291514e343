"""Mutes and bans with wall-clock expiry, per room or everywhere (room ``"*"``).

The state is per node; the app applies the broker's ``Mute``/``Ban`` commands to it on
every node, and loads the ones still in force from the broker at start
(``Broker.moderation()``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

__all__ = ["Moderation"]

class Moderation:
    """Mutes and bans, per room or everywhere (room ``"*"``).

    ``until`` values are wall-clock Unix timestamps (``time.time()``; they travel over
    the HTTP API and Redis), ``None`` = until lifted. Expired entries are ignored and
    pruned when seen. A muted user may still join and read; a banned user may do neither.
    """

    __slots__ = ("_bans", "_mutes", "_room_mutes")

    def __init__(self) -> None:
        """Start with no mutes and no bans."""
        self._mutes: dict[str, dict[str, float | None]] = {}
        self._room_mutes: dict[str, tuple[float | None, frozenset[str]]] = {}
        self._bans: dict[str, dict[str, float | None]] = {}

    @property
    def active(self) -> bool:
        """Whether any mute or ban is set (expired ones included until pruned): lets the
        publish path skip the clock read when there is nothing to check."""
        return bool(self._bans or self._mutes or self._room_mutes)

    def mute_user(self, room: str, user: str, until: float | None = None) -> None:
        """Mute ``user`` in ``room`` (``"*"`` = everywhere) until ``until``."""
        self._mutes.setdefault(room, {})[user] = until

    def unmute_user(self, room: str, user: str) -> None:
        """Lift a user mute set with the same ``room`` (no-op if none)."""
        _discard(self._mutes, room, user)

    def mute_room(self, room: str, until: float | None = None, whitelist: Iterable[str] = ()) -> None:
        """Mute everybody in ``room`` (``"*"`` = everywhere) except the ``whitelist`` users."""
        self._room_mutes[room] = (until, frozenset(whitelist))

    def unmute_room(self, room: str) -> None:
        """Lift a room mute (no-op if none)."""
        self._room_mutes.pop(room, None)

    def ban(self, room: str, user: str, until: float | None = None) -> None:
        """Ban ``user`` from ``room`` (``"*"`` = everywhere) until ``until``."""
        self._bans.setdefault(room, {})[user] = until

    def unban(self, room: str, user: str) -> None:
        """Lift a ban set with the same ``room`` (no-op if none)."""
        _discard(self._bans, room, user)

    def is_muted(self, room: str, user: str, now: float) -> bool:
        """Whether ``user`` may not publish in ``room`` at wall-clock time ``now``
        (user mute in the room or everywhere, or a room mute without whitelisting)."""
        mutes = self._mutes
        if mutes and (_active(mutes, room, user, now) or _active(mutes, "*", user, now)):
            return True
        rm = self._room_mutes
        if rm:
            for r in (room, "*"):
                e = rm.get(r)
                if e is not None:
                    until, wl = e
                    if until is not None and until <= now:
                        del rm[r]
                    elif user not in wl:
                        return True
        return False

    def is_banned(self, room: str, user: str, now: float) -> bool:
        """Whether ``user`` is banned from ``room`` (or everywhere) at wall-clock time ``now``."""
        bans = self._bans
        return bool(bans) and (_active(bans, room, user, now) or _active(bans, "*", user, now))

    def snapshot(self, now: float | None = None) -> dict[str, list[dict[str, Any]]]:
        """The active entries as JSON-ready lists (expired entries are pruned first)::

        {"mutes": [{"room", "user", "until"}], "bans": [{"room", "user", "until"}],
         "room_mutes": [{"room", "until", "whitelist": [...]}]}
        """
        if now is None:
            now = time.time()
        out: dict[str, list[dict[str, Any]]] = {}
        for name, table in (("mutes", self._mutes), ("bans", self._bans)):
            rows: list[dict[str, Any]] = []
            for room in list(table):
                users = table[room]
                for user, until in list(users.items()):
                    if until is not None and until <= now:
                        del users[user]
                    else:
                        rows.append({"room": room, "user": user, "until": until})
                if not users:
                    del table[room]
            out[name] = rows
        room_rows: list[dict[str, Any]] = []
        for room, (until, wl) in list(self._room_mutes.items()):
            if until is not None and until <= now:
                del self._room_mutes[room]
            else:
                room_rows.append({"room": room, "until": until, "whitelist": sorted(wl)})
        out["room_mutes"] = room_rows
        return out


def _active(table: dict[str, dict[str, float | None]], room: str, user: str, now: float) -> bool:
    users = table.get(room)
    if users is None or user not in users:
        return False
    until = users[user]
    if until is None or until > now:
        return True
    del users[user]
    if not users:
        del table[room]
    return False


def _discard(table: dict[str, dict[str, float | None]], room: str, user: str) -> None:
    users = table.get(room)
    if users is not None:
        users.pop(user, None)
        if not users:
            del table[room]
