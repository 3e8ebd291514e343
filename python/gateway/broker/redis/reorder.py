"""Per-room re-ordering of recoverable messages by seq (pure: no Redis, no event loop).

Messages of a room reach a node on one pub/sub connection in the order Redis published
them, but the publishing node delivers its own messages from the script's reply, and two
nodes publishing at once can have their messages arrive in either order relative to the
local ones. :class:`Reorder` delivers each room's recoverable messages (``seq`` > 0) in
seq order: a message whose predecessor has not arrived waits at most ``wait`` seconds,
then goes out anyway (with everything held behind it). Messages with ``seq`` 0 are not
ordered.

The order of a room starts from its position read right after subscribing
(:meth:`Reorder.set_base`); until then its messages are held. A new epoch (the room's
history was lost) restarts the order at 1.

Time is injected: ``schedule(delay, callback)`` returns a :class:`Timer` (on the event
loop, ``loop.call_later``; in tests, a fake clock).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


#: ``deliver(room, frame, prio)``: hand a frame to the local members.
Deliver = Callable[[str, bytes, int], object]
#: ``schedule(delay, callback)``: call ``callback`` once after ``delay`` seconds.
Schedule = Callable[[float, Callable[[], None]], Timer]


class _Order:
    """One room's state. ``last`` is None until the room's position was read."""

    __slots__ = ("epoch", "held", "last", "timer")

    def __init__(self) -> None:
        self.epoch: bytes | None = None
        self.last: int | None = None
        self.held: dict[int, tuple[bytes, bytes, int]] = {}
        self.timer: Timer | None = None


class Reorder:
    """Re-ordering state of every subscribed room.

    ``counters`` (e.g. ``BrokerStats.extra``) gets ``reorder_holds`` (messages held) and
    ``reorder_timeouts`` (gaps given up on) incremented.
    """

    def __init__(self, deliver: Deliver, schedule: Schedule, wait: float = 0.05, counters: dict[str, float] | None = None) -> None:
        self.deliver = deliver
        self.schedule = schedule
        #: Longest wait (seconds) of a message for an earlier seq of its room.
        self.wait = wait
        self.counters: dict[str, float] = counters if counters is not None else {}
        self.counters.setdefault("reorder_holds", 0)
        self.counters.setdefault("reorder_timeouts", 0)
        self._rooms: dict[str, _Order] = {}

    def __contains__(self, room: str) -> bool:
        return room in self._rooms

    def position(self, room: str) -> tuple[bytes | None, int | None] | None:
        """(epoch, last delivered seq) of ``room``, None when it has no state."""
        o = self._rooms.get(room)
        return None if o is None else (o.epoch, o.last)

    def held(self, room: str) -> list[int]:
        """Seqs held for ``room``, ascending."""
        o = self._rooms.get(room)
        return sorted(o.held) if o is not None else []

    def _get(self, room: str) -> _Order:
        o = self._rooms.get(room)
        if o is None:
            o = self._rooms[room] = _Order()
        return o

    def sequenced(self, room: str, seq: int, epoch: bytes, frame: bytes, prio: int) -> None:
        """Deliver a message now, or hold it until its predecessors arrived (at most
        :attr:`wait`)."""
        if seq == 0:
            self.deliver(room, frame, prio)
            return
        o = self._get(room)
        if o.last is None:
            self._hold(room, o, seq, epoch, frame, prio)
            return
        if o.epoch != epoch:
            if o.epoch is not None:
                # History was lost (new epoch): the new epoch counts from 1.
                self._release(room, o)
                o.last = 0
            o.epoch = epoch
        last = o.last
        if seq == last + 1:
            o.last = seq
            self.deliver(room, frame, prio)
            if o.held:
                self._drain(room, o)
            return
        if seq <= last:
            self.deliver(room, frame, prio)  # late (after a gap timeout): still delivered once
            return
        self._hold(room, o, seq, epoch, frame, prio)

    def set_base(self, room: str, seq: int, epoch: bytes | None) -> None:
        """The room's position read after subscribing (``epoch`` None: the room had no
        state). Messages held meanwhile that are due go out."""
        o = self._get(room)
        if o.last is None or epoch is None or o.epoch != epoch or seq > o.last:
            if epoch is not None and o.epoch is not None and epoch != o.epoch:
                # Messages held from an older epoch go first.
                for s in sorted(o.held):
                    if o.held[s][0] != epoch:
                        _, f, p = o.held.pop(s)
                        self.deliver(room, f, p)
            o.epoch, o.last = epoch, seq
        if o.held:
            if o.epoch is None:
                # The room had no state when read: adopt the epoch of what arrived.
                o.epoch = o.held[min(o.held)][0]
            self._drain(room, o)

    def release_unbased(self, room: str) -> None:
        """Reading the room's position failed: deliver what is held, whatever the gaps."""
        o = self._rooms.get(room)
        if o is not None and o.last is None:
            self._release(room, o)

    def forget(self, room: str) -> None:
        """No local members any more: drop the room's state (held messages included)."""
        o = self._rooms.pop(room, None)
        if o is not None and o.timer is not None:
            o.timer.cancel()

    def close(self) -> None:
        """Cancel every timer (held messages stay undelivered)."""
        for o in self._rooms.values():
            if o.timer is not None:
                o.timer.cancel()
                o.timer = None

    def _hold(self, room: str, o: _Order, seq: int, epoch: bytes, frame: bytes, prio: int) -> None:
        o.held[seq] = (epoch, frame, prio)
        self.counters["reorder_holds"] += 1
        if o.timer is None:
            o.timer = self.schedule(self.wait, lambda: self._gap_timeout(room))

    def _drain(self, room: str, o: _Order) -> None:
        """Deliver held messages that are due: late ones, then consecutive ones."""
        held = o.held
        assert o.last is not None
        for s in sorted(held):
            ep, f, p = held[s]
            if ep != o.epoch:
                continue
            if s <= o.last:
                del held[s]
                self.deliver(room, f, p)
            elif s == o.last + 1:
                del held[s]
                o.last = s
                self.deliver(room, f, p)
            else:
                break
        if not held and o.timer is not None:
            o.timer.cancel()
            o.timer = None

    def _release(self, room: str, o: _Order) -> None:
        """Deliver everything held, in seq order, whatever the gaps."""
        if o.timer is not None:
            o.timer.cancel()
            o.timer = None
        held, o.held = o.held, {}
        for s in sorted(held):
            ep, f, p = held[s]
            self.deliver(room, f, p)
            if ep == o.epoch or o.epoch is None:
                o.epoch = ep
                o.last = s if o.last is None else max(o.last, s)

    def _gap_timeout(self, room: str) -> None:
        o = self._rooms.get(room)
        if o is None:
            return
        o.timer = None
        if o.held:
            self.counters["reorder_timeouts"] += 1
            self._release(room, o)
