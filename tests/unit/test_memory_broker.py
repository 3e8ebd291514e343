"""MemoryBroker: sequence numbers, epochs, history and resume edge cases."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from gateway import protocol as P
from gateway.broker import HistoryPolicy, MemoryBroker
from gateway.broker import memory as memory_mod


class Sink:
    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes, int]] = []
        self.users: list[tuple[str, bytes, int]] = []
        self.controls: list[tuple[str, dict[str, Any]]] = []

    def deliver_room(self, room: str, payload: bytes, prio: int) -> int:
        self.frames.append((room, payload, prio))
        return 1

    def deliver_user(self, user: str, payload: bytes, prio: int) -> int:
        self.users.append((user, payload, prio))
        return 1

    def control(self, kind: str, data: dict[str, Any]) -> None:
        self.controls.append((kind, data))


async def _broker() -> tuple[MemoryBroker, Sink]:
    b, s = MemoryBroker(), Sink()
    await b.start(s, "n1")
    return b, s


async def _pub(b: MemoryBroker, room: str, i: int, *, recoverable: bool = True, size: int = 5, ttl: float = 300.0) -> Any:
    head, tail = P.message_parts(room, "chat", 1, "u", {"i": i}, 1)
    return await b.publish(room, head, tail, 1, recoverable, HistoryPolicy(size, ttl))


def _seqs(frames: list[bytes]) -> list[int]:
    return [orjson.loads(f)["seq"] for f in frames]


async def test_publish_assigns_seq_and_delivers_the_spliced_frame() -> None:
    b, sink = await _broker()
    r1 = await _pub(b, "live:1", 0)
    r2 = await _pub(b, "live:1", 1)
    other = await _pub(b, "live:2", 0)
    assert (r1.seq, r2.seq, other.seq) == (1, 2, 1)
    assert r1.epoch == r2.epoch and r1.epoch != other.epoch
    frame = orjson.loads(sink.frames[1][1])
    assert (frame["seq"], frame["epoch"], frame["data"]) == (2, r2.epoch, {"i": 1})
    # Not recoverable: seq 0, same epoch, not kept.
    r3 = await _pub(b, "live:1", 2, recoverable=False)
    assert (r3.seq, r3.epoch) == (0, r1.epoch)
    h = await b.history("live:1", limit=10)
    assert _seqs(h.messages) == [1, 2] and h.seq == 2


async def test_history_last_k() -> None:
    b, _ = await _broker()
    for i in range(8):
        await _pub(b, "live:1", i)
    h = await b.history("live:1", limit=3)
    assert _seqs(h.messages) == [6, 7, 8] and h.recovered is None
    assert _seqs((await b.history("live:1", limit=100)).messages) == [4, 5, 6, 7, 8], "the ring keeps 5"
    assert (await b.history("live:1", limit=0)).messages == []


async def test_join_before_any_message_fixes_the_epoch() -> None:
    b, _ = await _broker()
    h = await b.history("live:new", limit=0)
    assert (h.seq, h.messages) == (0, []) and h.epoch
    r = await _pub(b, "live:new", 0)
    assert r.epoch == h.epoch
    resumed = await b.history("live:new", limit=50, since=0, epoch=h.epoch)
    assert resumed.recovered is True and _seqs(resumed.messages) == [1]


async def test_resume_edge_cases() -> None:
    b, _ = await _broker()
    for i in range(8):  # ring of 5 keeps 4..8
        await _pub(b, "live:1", i)
    epoch = (await b.history("live:1", limit=0)).epoch

    async def resume(since: int, ep: str = epoch, limit: int = 50) -> Any:
        return await b.history("live:1", limit=limit, since=since, epoch=ep)

    r = await resume(8)
    assert (r.recovered, r.messages) == (True, []), "up to date"
    r = await resume(5)
    assert r.recovered is True and _seqs(r.messages) == [6, 7, 8]
    r = await resume(3)
    assert r.recovered is True and _seqs(r.messages) == [4, 5, 6, 7, 8], "exactly the oldest kept"
    r = await resume(2)
    assert r.recovered is False, "seq 3 was trimmed"
    r = await resume(9)
    assert r.recovered is False and r.messages == [], "ahead of the room"
    r = await resume(-1)
    assert r.recovered is False
    r = await resume(5, "other-epoch")
    assert (r.recovered, r.messages, r.epoch, r.seq) == (False, [], epoch, 8)
    r = await resume(3, limit=2)
    assert r.recovered is False and _seqs(r.messages) == [7, 8], "more missed than the limit"


async def test_history_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(memory_mod, "_monotonic", lambda: now[0])
    b, _ = await _broker()
    await _pub(b, "live:1", 0, ttl=10)
    now[0] += 5
    await _pub(b, "live:1", 1, ttl=10)
    epoch = (await b.history("live:1", limit=0)).epoch
    now[0] += 6  # the first expired, the second not
    assert _seqs((await b.history("live:1", limit=10)).messages) == [2]
    r = await b.history("live:1", limit=10, since=0, epoch=epoch)
    assert r.recovered is False
    r = await b.history("live:1", limit=10, since=1, epoch=epoch)
    assert r.recovered is True and _seqs(r.messages) == [2]


async def test_ring_resizes_with_the_route() -> None:
    b, _ = await _broker()
    for i in range(5):
        await _pub(b, "live:1", i, size=5)
    await _pub(b, "live:1", 5, size=2)
    assert _seqs((await b.history("live:1", limit=10)).messages) == [5, 6]


async def test_idle_rooms_are_forgotten_and_get_a_new_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(memory_mod, "_monotonic", lambda: now[0])
    b, _ = await _broker()
    b._next_sweep = now[0] + 60
    await b.subscribe("live:kept")
    old_kept = (await _pub(b, "live:kept", 0, ttl=10)).epoch
    old_gone = (await _pub(b, "live:gone", 0, ttl=10)).epoch
    now[0] += 3600
    await _pub(b, "live:other", 0)  # triggers the sweep
    assert "live:gone" not in b._rings and "live:kept" in b._rings
    r = await b.history("live:gone", limit=10, since=1, epoch=old_gone)
    assert r.recovered is False and r.epoch != old_gone
    assert (await b.history("live:kept", limit=0)).epoch == old_kept


async def test_frames_users_and_control_go_to_the_handler() -> None:
    b, sink = await _broker()
    await b.publish_frame("live:1", b'{"op":"presence"}', 0)
    await b.send_user("u1", b'{"op":"push"}', 2)
    await b.control("kick", {"user": "u1"})
    assert sink.frames == [("live:1", b'{"op":"presence"}', 0)]
    assert sink.users == [("u1", b'{"op":"push"}', 2)]
    assert sink.controls == [("kick", {"user": "u1"})]
    await b.report_presence({"live:1": (3, 2)})
    assert await b.presence("live:1") == (3, 2) and await b.presence("live:x") == (0, 0)
    await b.close()
    await b.close()  # idempotent
    await _pub(b, "live:1", 0)  # after close: kept, not delivered
    assert len(sink.frames) == 1


def test_no_event_loop_needed_for_construction() -> None:
    assert asyncio.iscoroutinefunction(MemoryBroker().history)
