"""The Redis broker's per-room re-ordering by seq, without Redis or an event loop: a fake
clock runs the gap timers."""

from __future__ import annotations

from collections.abc import Callable

import orjson
from gateway.broker.redis.reorder import Reorder


class FakeTimer:
    def __init__(self, clock: FakeClock, at: float, cb: Callable[[], None]) -> None:
        self.clock, self.at, self.cb, self.cancelled = clock, at, cb, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []

    def schedule(self, delay: float, cb: Callable[[], None]) -> FakeTimer:
        t = FakeTimer(self, self.now + delay, cb)
        self.timers.append(t)
        return t

    def advance(self, dt: float) -> None:
        self.now += dt
        for t in sorted(self.timers, key=lambda t: t.at):
            if t.at <= self.now and not t.cancelled:
                t.cancelled = True
                t.cb()

    def pending(self) -> int:
        return sum(1 for t in self.timers if not t.cancelled)


class Sink:
    def __init__(self) -> None:
        self.room: list[tuple[str, bytes, int]] = []

    def deliver(self, room: str, payload: bytes, prio: int) -> None:
        self.room.append((room, payload, prio))

    def seqs(self, room: str) -> list[int]:
        return [orjson.loads(p)["seq"] for r, p, _ in self.room if r == room]


def frame(room: str, seq: int) -> bytes:
    return b'{"op":"msg","room":"%s","seq":%d}' % (room.encode(), seq)


def make(wait: float = 0.05) -> tuple[Reorder, Sink, FakeClock, dict[str, float]]:
    sink, clock = Sink(), FakeClock()
    counters: dict[str, float] = {}
    return Reorder(sink.deliver, clock.schedule, wait, counters), sink, clock, counters


def test_reorder_by_seq() -> None:
    r, s, clock, counters = make()
    ep = b"e1"
    r.set_base("live:o", 0, None)
    for seq in (1, 3, 2, 4):
        r.sequenced("live:o", seq, ep, frame("live:o", seq), 1)
    assert s.seqs("live:o") == [1, 2, 3, 4]
    r.sequenced("live:o", 6, ep, frame("live:o", 6), 1)
    assert s.seqs("live:o") == [1, 2, 3, 4], "held while 5 is missing"
    clock.advance(r.wait * 2)
    assert s.seqs("live:o") == [1, 2, 3, 4, 6], "released after reorder_wait"
    r.sequenced("live:o", 1, b"e2", frame("live:o", 1), 1)
    assert s.seqs("live:o")[-1] == 1, "a new epoch restarts the order"
    assert counters == {"reorder_holds": 2, "reorder_timeouts": 1}


def test_held_until_the_position_is_known() -> None:
    """Messages that arrive before the room's position was read are held, then those
    after the position go out in order (earlier ones were in the joiner's history)."""
    r, s, clock, _ = make()
    r.sequenced("r", 12, b"e", frame("r", 12), 1)
    r.sequenced("r", 11, b"e", frame("r", 11), 1)
    assert s.seqs("r") == [] and r.held("r") == [11, 12]
    r.set_base("r", 10, b"e")
    assert s.seqs("r") == [11, 12] and r.position("r") == (b"e", 12)
    assert clock.pending() == 0, "the gap timer is cancelled once nothing is held"


def test_late_message_after_a_gap_timeout_is_still_delivered_once() -> None:
    r, s, clock, _ = make()
    r.set_base("r", 0, b"e")
    r.sequenced("r", 1, b"e", frame("r", 1), 1)
    r.sequenced("r", 3, b"e", frame("r", 3), 1)
    clock.advance(1)
    r.sequenced("r", 2, b"e", frame("r", 2), 1)
    r.sequenced("r", 4, b"e", frame("r", 4), 1)
    assert s.seqs("r") == [1, 3, 2, 4]


def test_seq_zero_is_not_ordered() -> None:
    r, s, _, _ = make()
    r.sequenced("r", 0, b"", frame("r", 0), 0)  # not even subscribed yet: goes out
    r.sequenced("r", 5, b"e", frame("r", 5), 1)
    r.sequenced("r", 0, b"", frame("r", 0), 0)
    assert s.seqs("r") == [0, 0] and r.held("r") == [5]


def test_base_in_a_new_epoch_delivers_older_epoch_messages_first() -> None:
    r, s, _, _ = make()
    r.set_base("r", 3, b"old")
    r.sequenced("r", 5, b"old", frame("r", 5), 1)  # held: 4 missing
    r.set_base("r", 0, b"new")  # the room's state was lost meanwhile
    r.sequenced("r", 1, b"new", frame("r", 1), 1)
    assert s.seqs("r") == [5, 1] and r.position("r") == (b"new", 1)


def test_room_without_state_adopts_the_epoch_of_what_arrived() -> None:
    r, s, _, _ = make()
    r.sequenced("r", 1, b"e", frame("r", 1), 1)
    r.set_base("r", 0, None)
    assert s.seqs("r") == [1] and r.position("r") == (b"e", 1)


def test_release_unbased_and_forget() -> None:
    r, s, clock, _ = make()
    r.sequenced("r", 7, b"e", frame("r", 7), 1)
    r.sequenced("r", 9, b"e", frame("r", 9), 1)
    r.release_unbased("r")  # reading the position failed: deliver what is held
    assert s.seqs("r") == [7, 9] and r.position("r") == (b"e", 9)
    r.release_unbased("r")  # no-op once based
    r.sequenced("r", 11, b"e", frame("r", 11), 1)
    r.forget("r")
    assert "r" not in r and clock.pending() == 0
    clock.advance(1)
    assert s.seqs("r") == [7, 9], "a forgotten room's held messages are dropped"


def test_close_cancels_every_timer() -> None:
    r, _, clock, _ = make()
    for room in ("a", "b"):
        r.set_base(room, 0, b"e")
        r.sequenced(room, 2, b"e", frame(room, 2), 1)
    assert clock.pending() == 2
    r.close()
    assert clock.pending() == 0
