"""MemoryBroker: sequence numbers, epochs, history and resume edge cases, idempotency keys,
moderation kept for nodes (re)started in the process, presence and debounce."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from gateway import protocol as P
from gateway.broker import Ban, CloseRoom, Command, HistoryPolicy, Kick, MemoryBroker, Mute, Unban, Unmute
from gateway.broker import memory as memory_mod


class Sink:
    def __init__(self) -> None:
        self.frames: list[tuple[str, bytes, int]] = []
        self.users: list[tuple[str, bytes, int]] = []
        self.commands: list[Command] = []
        self.counts: dict[str, tuple[int, int]] = {}

    def deliver_room(self, room: str, payload: bytes, prio: int) -> int:
        self.frames.append((room, payload, prio))
        return 1

    def deliver_user(self, user: str, payload: bytes, prio: int) -> int:
        self.users.append((user, payload, prio))
        return 1

    def apply(self, cmd: Command) -> None:
        self.commands.append(cmd)

    def local_counts(self, room: str) -> tuple[int, int]:
        return self.counts.get(room, (0, 0))


async def _broker(**kw: Any) -> tuple[MemoryBroker, Sink]:
    b, s = MemoryBroker(**kw), Sink()
    await b.start(s, "n1")
    return b, s


async def _pub(b: MemoryBroker, room: str, i: int, *, recoverable: bool = True, size: int = 5, ttl: float = 300.0, idem: str | None = None) -> Any:
    head, tail = P.message_parts(room, "chat", 1, "u", {"i": i}, 1)
    return await b.publish(room, head, tail, 1, recoverable, HistoryPolicy(size, ttl), idem)


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


async def test_frames_users_and_commands_go_to_the_handler() -> None:
    b, sink = await _broker()
    await b.publish_frame("live:1", b'{"op":"presence"}', 0)
    assert await b.send_user("u1", b'{"op":"push"}', 2) is True
    await b.command(Kick("u1"))
    assert sink.frames == [("live:1", b'{"op":"presence"}', 0)]
    assert sink.users == [("u1", b'{"op":"push"}', 2)]
    assert sink.commands == [Kick("u1", 4003, "kicked")]
    # Presence: the handler's local counts (nothing is shared on one node).
    sink.counts["live:1"] = (3, 2)
    await b.presence.report({"live:1": (3, 2)})
    assert await b.presence.counts("live:1") == (3, 2) and await b.presence.counts("live:x") == (0, 0)
    assert b.presence.shared is False and await b.presence.members("live:1") is None
    await b.close()
    await b.close()  # idempotent
    await _pub(b, "live:1", 0)  # after close: kept, not delivered
    assert len(sink.frames) == 1


def test_no_event_loop_needed_for_construction() -> None:
    assert asyncio.iscoroutinefunction(MemoryBroker().history)


async def test_presence_without_a_handler_answers_the_reported_counts() -> None:
    b = MemoryBroker()
    await b.presence.report({"live:1": (3, 2)})
    assert await b.presence.counts("live:1") == (3, 2) and await b.presence.counts("live:x") == (0, 0)
    await b.presence.report_members({"live:1": [{"user": "u", "meta": {}}]})  # not shared: no-op


async def test_debounce_reports_every_join_and_leave() -> None:
    """One node, no debounce: a second connection is a join, a quick reconnect a leave."""
    b, _ = await _broker()
    d = b.debounce
    assert d.grace == 0.0
    assert [await d.join("live:1", "u1"), await d.join("live:1", "u1"), await d.join(None, "u1")] == [True, True, True]
    assert [await d.leave("live:1", "u1"), await d.leave("live:1", "u1"), await d.leave(None, "u1")] == [True, True, True]


async def test_publish_with_an_idempotency_key_publishes_once() -> None:
    b, sink = await _broker()
    r1 = await _pub(b, "live:1", 0, idem="u1:m1")
    r2 = await _pub(b, "live:1", 0, idem="u1:m1")
    assert (r1.seq, r1.duplicate) == (1, False)
    assert (r2.seq, r2.epoch, r2.duplicate) == (1, r1.epoch, True), "the first result, marked duplicate"
    assert len(sink.frames) == 1 and _seqs((await b.history("live:1", limit=10)).messages) == [1]
    # Another key, another room with the same key: published.
    assert (await _pub(b, "live:1", 1, idem="u1:m2")).seq == 2
    assert (await _pub(b, "live:2", 0, idem="u1:m1")).duplicate is False
    # Not recoverable: seq 0, deduplicated all the same.
    r3 = await _pub(b, "live:1", 2, recoverable=False, idem="u1:like")
    r4 = await _pub(b, "live:1", 2, recoverable=False, idem="u1:like")
    assert (r3.seq, r3.duplicate, r4.seq, r4.duplicate) == (0, False, 0, True)
    assert len(sink.frames) == 4
    # Without a key every publish counts.
    await _pub(b, "live:1", 3)
    await _pub(b, "live:1", 3)
    assert len(sink.frames) == 6


async def test_idempotency_keys_expire_and_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(memory_mod, "_monotonic", lambda: now[0])
    b, sink = await _broker(idempotency_ttl=10.0, max_idempotency_keys=3)
    await _pub(b, "live:1", 0, idem="k1")
    now[0] += 9
    assert (await _pub(b, "live:1", 0, idem="k1")).duplicate is True
    now[0] += 2  # 11 s after the first: expired
    assert (await _pub(b, "live:1", 0, idem="k1")).duplicate is False
    for k in ("k2", "k3", "k4"):  # the cap is 3: k1 (the oldest) is evicted
        await _pub(b, "live:1", 0, idem=k)
    assert (await _pub(b, "live:1", 0, idem="k1")).duplicate is False
    assert (await _pub(b, "live:1", 0, idem="k4")).duplicate is True
    assert len(b._idem) <= 3


async def test_send_user_with_an_idempotency_key_delivers_once() -> None:
    b, sink = await _broker()
    assert await b.send_user("u1", b"{}", 2, idem="api:1") is True
    assert await b.send_user("u1", b"{}", 2, idem="api:1") is False
    assert await b.send_user("u2", b"{}", 2, idem="api:1") is True, "keys are per target user"
    assert await b.send_user("u1", b"{}", 2) is True
    assert [u for u, _, _ in sink.users] == ["u1", "u2", "u1"]


async def test_moderation_is_kept_for_the_life_of_the_broker_only() -> None:
    b, sink = await _broker()
    now = time.time()
    await b.command(Mute("live:1", "u1", now + 60))
    await b.command(Mute("live:1", None, None, ("mod",)))
    await b.command(Ban("*", "u2"))
    await b.command(Ban("live:1", "u3", now - 1))  # already expired
    await b.command(Kick("u4"))
    await b.command(CloseRoom("live:2"))
    assert len(sink.commands) == 6, "every command is applied"
    assert await b.moderation() == [Mute("live:1", "u1", now + 60), Mute("live:1", None, None, ("mod",)), Ban("*", "u2")]
    await b.command(Unmute("live:1", None))
    await b.command(Unban("*", "u2"))
    assert await b.moderation() == [Mute("live:1", "u1", now + 60)]
    # A node (re)started on the same broker object gets them; a new process does not.
    await b.close()
    s2 = Sink()
    await b.start(s2, "n1")
    assert await b.moderation() == [Mute("live:1", "u1", now + 60)]
    assert await MemoryBroker().moderation() == []
