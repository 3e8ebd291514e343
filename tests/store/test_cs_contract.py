"""The desk's part of the store contract (``cs_*`` methods of :class:`gateway.store.Store`),
against SQLite and a real PostgreSQL (the fixtures of test_contract.py)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.store import CsSession, CsTicket, Store, StoredMessage

from test_contract import T0, backend, opened, start, store  # noqa: F401  (fixtures)


def sess(id: str, shopper: str = "bob", *, state: str = "bot", dept: str = "presales", at: int = T0, **kw: object) -> CsSession:
    return CsSession(id, shopper, dept, state, at, **kw)  # type: ignore[arg-type]


async def test_open_one_per_shopper(store: Store) -> None:
    s, created = await store.cs_open(sess("s1", card=b'{"kind":"product","title":"T"}'))
    assert created and s.room == "cs:s1" and s.note_room == "csi:s1"
    again, created = await store.cs_open(sess("s2"))
    assert not created and again.id == "s1" and again.card == b'{"kind":"product","title":"T"}'
    assert await store.cs_session("s2") is None
    # Concurrent opens of one shopper: exactly one session.
    results = await asyncio.gather(*(store.cs_open(sess(f"c{i}", "carol")) for i in range(8)))
    assert sum(1 for _, c in results if c) == 1 and len({r.id for r, _ in results}) == 1
    # Offline sessions do not count as open.
    off, created = await store.cs_open(sess("o1", "bob", state="offline"))
    assert created and off.state == "offline"
    got = await store.cs_open_session("bob")
    assert got is not None and got.id == "s1"
    # Once closed, a new one opens.
    assert await store.cs_update("s1", {"state": "closed", "closed_at": T0 + 5, "closed_by": "bob"}) is not None
    assert await store.cs_open_session("bob") is None
    s3, created = await store.cs_open(sess("s3", at=T0 + 10))
    assert created and s3.id == "s3"


async def test_update_is_conditional(store: Store) -> None:
    await store.cs_open(sess("s1", state="queued", queued_at=T0))
    a = await store.cs_update("s1", {"state": "assigned", "agent": "alice", "assigned_at": T0 + 1}, states=("queued",), agent=None)
    assert a is not None and a.agent == "alice" and a.state == "assigned" and a.updated_at > 0
    # The loser of a race changes nothing.
    assert await store.cs_update("s1", {"state": "assigned", "agent": "zed"}, states=("queued",), agent=None) is None
    assert await store.cs_update("s1", {"transfers": 1, "agent": "carl"}, agent="zed") is None
    t = await store.cs_update("s1", {"transfers": a.transfers + 1, "agent": "carl", "last_agent": "alice"}, agent="alice")
    assert t is not None and t.agent == "carl" and t.transfers == 1
    assert await store.cs_update("nope", {"state": "closed"}) is None
    with pytest.raises(ValueError):
        await store.cs_update("s1", {"shopper": "eve"})
    with pytest.raises(ValueError):
        await store.cs_update("s1", {"nonsense; DROP TABLE x": 1})
    assert await store.cs_first_response("s1", T0 + 7)
    assert not await store.cs_first_response("s1", T0 + 9)
    got = await store.cs_session("s1")
    assert got is not None and got.first_response_at == T0 + 7
    r = await store.cs_update("s1", {"card": b'{"a":1}', "rating": 5, "rating_comment": "好", "rated_at": T0 + 20})
    assert r is not None and r.card == b'{"a":1}' and r.rating == 5 and r.rating_comment == "好"


async def test_lists_and_ranges(store: Store) -> None:
    for i in range(5):
        await store.cs_open(sess(f"q{i}", f"u{i}", state="queued", dept="presales" if i % 2 == 0 else "aftersales", at=T0 + i, queued_at=T0 + 100 - i))
    await store.cs_open(sess("a1", "w1", state="assigned", agent="alice", at=T0 + 50))
    queued = await store.cs_sessions(states=("queued",))
    assert [s.id for s in queued] == ["q4", "q3", "q2", "q1", "q0"]  # oldest queued first
    pre = await store.cs_sessions(states=("queued",), department="presales")
    assert [s.id for s in pre] == ["q4", "q2", "q0"]
    mine = await store.cs_sessions(agent="alice")
    assert [s.id for s in mine] == ["a1"]
    allof = await store.cs_sessions(limit=2, offset=1)
    assert [s.id for s in allof] == ["q4", "q3"]  # newest opened first
    got = [s.id async for s in store.cs_between(T0 + 1, T0 + 4, batch=2)]
    assert got == ["q1", "q2", "q3"]
    await store.cs_update("q1", {"rating": 4, "rated_at": T0 + 500})
    await store.cs_update("q3", {"rating": 2, "rated_at": T0 + 400})
    rated = [s.id async for s in store.cs_between(T0, T0 + 1000, by="rated_at", batch=1)]
    assert rated == ["q3", "q1"]
    with pytest.raises(ValueError):
        [s async for s in store.cs_between(0, 1, by="shopper")]
    assert await store.cs_last_agent("w1") == "alice"
    assert await store.cs_last_agent("u1") is None


async def test_tickets(store: Store) -> None:
    t = CsTicket("t1", "bob", "presales", b'{"phone":"123","text":"\xe4\xbd\xa0\xe5\xa5\xbd"}', T0 + 3, "s1")
    await store.cs_add_ticket(t)
    await store.cs_add_ticket(dataclasses.replace(t, fields=b"{}"))  # same id: kept as it was
    await store.cs_add_ticket(CsTicket("t2", "eve", "aftersales", b"{}", T0 + 9))
    got = await store.cs_tickets(T0, T0 + 5)
    assert got == [t]
    assert [x.id for x in await store.cs_tickets(T0, T0 + 100)] == ["t1", "t2"]


async def test_unread_replies_in_one_query(store: Store) -> None:
    def m(room: str, seq: int, sender: str | None, ts: int) -> StoredMessage:
        return StoredMessage(room, seq, ts, "chat" if sender else "cs.state", 2, sender, b'{"text":"x"}', None, "cs:*")

    # a1: the shopper read up to 2; agent replies at 3 and 5, the shopper wrote 4, a system line 6.
    # a2: all read.  a3: one unread reply, but too recent.  q1: not assigned.  a4: the shopper is no member.
    for sid, shopper, state in [("a1", "w1", "assigned"), ("a2", "w2", "assigned"), ("a3", "w3", "assigned"), ("q1", "w4", "queued"),
                                ("a4", "w5", "assigned")]:
        await store.cs_open(sess(sid, shopper, state=state, agent="alice" if state == "assigned" else None))
        room = f"cs:{sid}"
        await store.create_conversation(room, "group", None, b"{}", [(shopper, "shopper"), ("alice", "agent")] if sid != "a4" else [("alice", "agent")], 20)
    for msg in [m("cs:a1", 1, "w1", T0 + 1), m("cs:a1", 2, "alice", T0 + 2), m("cs:a1", 3, "alice", T0 + 3), m("cs:a1", 4, "w1", T0 + 4),
                m("cs:a1", 5, "bob", T0 + 5), m("cs:a1", 6, None, T0 + 6),
                m("cs:a2", 1, "alice", T0 + 1), m("cs:a3", 1, "alice", T0 + 500), m("cs:q1", 1, "alice", T0 + 1), m("cs:a4", 1, "alice", T0 + 1)]:
        await store.commit(msg)
    await store.mark_read("cs:a1", "w1", 2)
    await store.mark_read("cs:a2", "w2", 1)
    got = await store.cs_unread_replies(first_before_ms=T0 + 100)
    assert [(u.session.id, u.unread, u.first_seq, u.first_ts) for u in got] == [("a1", 2, 3, T0 + 3)]
    assert got[0].session.shopper == "w1" and got[0].session.agent == "alice" and got[0].session.state == "assigned"
    # The cut-off is strict, and the limit applies (by session id).
    assert [u.session.id for u in await store.cs_unread_replies(first_before_ms=T0 + 3)] == []
    later = await store.cs_unread_replies(first_before_ms=T0 + 501)
    assert [(u.session.id, u.unread, u.first_seq) for u in later] == [("a1", 2, 3), ("a3", 1, 1)]
    assert [u.session.id for u in await store.cs_unread_replies(first_before_ms=T0 + 501, limit=1)] == ["a1"]
    # Reading clears it; a closed session is left out.
    await store.mark_read("cs:a1", "w1", 6)
    await store.cs_update("a3", {"state": "closed", "closed_at": T0 + 600})
    assert await store.cs_unread_replies(first_before_ms=T0 + 10_000) == []
