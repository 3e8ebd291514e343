"""Which commands are moderation state (kept by the broker for nodes that start later)."""

from __future__ import annotations

from .commands import Ban, Command, Mute, Unban, Unmute

#: (kind, room, user): one entry per user mute, room mute (user None) and ban.
StateKey = tuple[str, str, str | None]


def state_key(cmd: Command) -> StateKey | None:
    """The entry ``cmd`` sets (:class:`Mute`, :class:`Ban`) or lifts (:class:`Unmute`,
    :class:`Unban`); None for commands that are not state (kick, broadcast, close_room).
    A mute or ban replaces the entry of the same key; an unmute of a room (user None)
    lifts the room mute only, as :class:`gateway.routing.Moderation` does."""
    if isinstance(cmd, (Mute, Unmute)):
        return ("mute", cmd.room, cmd.user)
    if isinstance(cmd, (Ban, Unban)):
        return ("ban", cmd.room, cmd.user)
    return None


def sets_state(cmd: Command) -> bool:
    """True for a mute or ban (recorded), False for an unmute or unban (removed)."""
    return isinstance(cmd, (Mute, Ban))


def in_force(cmd: Command, now: float) -> bool:
    """A recorded mute or ban whose ``until`` (wall-clock Unix time) has not passed."""
    if isinstance(cmd, (Mute, Ban)):
        return cmd.until is None or cmd.until > now
    return False
