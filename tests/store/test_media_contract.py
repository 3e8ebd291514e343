"""The media part of the store contract (``media_*`` methods of :class:`gateway.store.Store`,
schema version 5), against SQLite and a real PostgreSQL (the fixtures of test_contract.py),
and the migration of a version 4 database to version 5 on both."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import pytest

from gateway.store import MEDIA_PUBLISH_GRACE_MS, SCHEMA_VERSION, CsSession, MediaFile, SchemaError, Store, StoredMessage

from test_contract import T0, Backend, backend, opened, start, store  # noqa: F401  (fixtures)


def mf(id: str, owner: str = "alice", *, kind: str = "image", size: int = 100, at: int = T0, name: str | None = None, **kw: Any) -> MediaFile:
    return MediaFile(id, owner, kind, "image/jpeg", size, "ab" * 32, f"{id}.jpg" if name is None else name, b'{"w":800,"h":600,"thumb":true}',
                     f"o/{id}", at, **kw)


def msg(room: str, seq: int, *, sender: str = "alice", ts: int | None = None, route: str = "dm:*") -> StoredMessage:
    return StoredMessage(room, seq, T0 + seq if ts is None else ts, "image", 1, sender, b'{"file_id":"x"}', None, route)


def now_ms() -> int:
    return int(time.time() * 1000)


async def test_add_and_get(store: Store) -> None:
    f = mf("m_1", name="照片.jpg")
    await store.media_add(f)
    await store.media_add(mf("m_0", name=""))
    g = await store.media_get("m_0")
    assert g is not None and g.name == ""
    await store.media_add(mf("m_2", "bob", kind="voice", size=7))
    got = await store.media_get("m_1")
    assert got == f and got.state == "uploaded" and got.room is None and got.verdict is None
    assert got.meta == b'{"w":800,"h":600,"thumb":true}' and got.thumb_key == "o/m_1.t"
    assert await store.media_get("m_nope") is None
    with pytest.raises(ValueError):
        await store.media_add(mf("m_1", "eve"))
    got2 = await store.media_get("m_1")
    assert got2 is not None and got2.owner == "alice"
    many = await store.media_get_many(["m_2", "m_1", "m_nope", "m_1"])
    assert set(many) == {"m_1", "m_2"} and many["m_2"].kind == "voice" and many["m_2"].size == 7
    assert await store.media_get_many([]) == {}
    # More ids than one statement takes at once.
    ids = [f"m_b{i}" for i in range(1200)]
    for i in ids[:3]:
        await store.media_add(mf(i))
    assert set(await store.media_get_many(ids)) == set(ids[:3])


async def test_attach_rules_and_reasons(store: Store) -> None:
    await store.media_add(mf("m_1"))
    assert await store.media_attach("m_nope", "alice", "dm:a:b", T0 + 1, exclusive=True) == (None, "missing")
    assert await store.media_attach("m_1", "bob", "dm:a:b", T0 + 1, exclusive=True) == (None, "owner")
    f, why = await store.media_attach("m_1", "alice", "dm:a:b", T0 + 1, exclusive=True)
    assert why == "ok" and f is not None and f.room == "dm:a:b" and f.attached_at == T0 + 1 and f.state == "attached"
    # A retry in the same room is fine; another room is not, when exclusive.
    f, why = await store.media_attach("m_1", "alice", "dm:a:b", T0 + 2, exclusive=True)
    assert why == "ok" and f is not None and f.attached_at == T0 + 2
    assert await store.media_attach("m_1", "alice", "grp:x", T0 + 3, exclusive=True) == (None, "used")
    got = await store.media_get("m_1")
    assert got is not None and got.room == "dm:a:b" and got.attached_at == T0 + 2
    # Not exclusive: it goes anywhere, and room stays the first one.
    f, why = await store.media_attach("m_1", "alice", "grp:x", T0 + 4, exclusive=False)
    assert why == "ok" and f is not None and f.room == "dm:a:b" and f.attached_at == T0 + 4
    # Owner is checked before state; removed before used.
    await store.media_remove(["m_1"])
    assert await store.media_attach("m_1", "bob", "grp:x", T0 + 5, exclusive=False) == (None, "owner")
    assert await store.media_attach("m_1", "alice", "grp:x", T0 + 5, exclusive=False) == (None, "removed")
    assert await store.media_attach("m_1", "alice", "dm:a:b", T0 + 5, exclusive=True) == (None, "removed")


async def test_concurrent_exclusive_attaches_one_wins(store: Store) -> None:
    """Many files, each attached to several rooms at once: exactly one attach of each
    succeeds, and the file's room is the winner's."""
    files = [f"m_r{i}" for i in range(20)]
    for fid in files:
        await store.media_add(mf(fid))
    rooms = [f"dm:alice:u{j}" for j in range(4)]
    results = await asyncio.gather(*(store.media_attach(fid, "alice", room, T0 + 1, exclusive=True) for fid in files for room in rooms))
    for i, fid in enumerate(files):
        mine = results[i * len(rooms):(i + 1) * len(rooms)]
        oks = [(f, room) for (f, why), room in zip(mine, rooms, strict=True) if why == "ok"]
        assert len(oks) == 1, (fid, mine)
        assert sorted(why for _, why in mine) == ["ok", "used", "used", "used"]
        got = await store.media_get(fid)
        assert got is not None and oks[0][0] is not None and got.room == oks[0][1] == oks[0][0].room
    # Two rooms, one file, many rounds: the plain race of the brief.
    for k in range(10):
        await store.media_add(mf(f"m_p{k}"))
        a, b = await asyncio.gather(store.media_attach(f"m_p{k}", "alice", "r:a", T0, exclusive=True),
                                    store.media_attach(f"m_p{k}", "alice", "r:b", T0, exclusive=True))
        assert sorted([a[1], b[1]]) == ["ok", "used"]


async def test_refs(store: Store) -> None:
    for fid in ("m_1", "m_2", "m_3"):
        await store.media_add(mf(fid))
    await store.media_ref("m_1", "r", 5, T0)
    await store.media_ref("m_1", "r", 5, T0 + 9)  # idempotent
    await store.media_ref("m_1", "q", 2, T0)
    await store.media_ref("m_2", "r", 5, T0)
    await store.media_ref("m_3", "r", 7, T0)
    assert await store.media_refs("m_1") == [("q", 2), ("r", 5)]
    assert await store.media_refs("m_nope") == []
    assert await store.media_refs("m_2") == [("r", 5)] and await store.media_refs("m_3") == [("r", 7)]


async def test_verdict_and_usage(store: Store) -> None:
    await store.media_add(mf("m_1", size=1000, at=T0))
    await store.media_add(mf("m_2", size=300, at=T0 + 10))
    await store.media_add(mf("m_3", size=5, at=T0 + 20))
    await store.media_add(mf("m_4", "bob", size=10_000, at=T0 + 20))
    f = await store.media_set_verdict("m_1", "risky")
    assert f is not None and f.verdict == "risky"
    got = await store.media_get("m_1")
    assert got is not None and got.verdict == "risky"
    assert await store.media_set_verdict("m_nope", "pass") is None
    assert await store.media_usage("alice", T0) == 1305
    assert await store.media_usage("alice", T0 + 10) == 305  # since is inclusive
    assert await store.media_usage("alice", T0 + 21) == 0
    assert await store.media_usage("nobody", 0) == 0
    await store.media_remove(["m_2"])  # removed files still count for the day
    assert await store.media_usage("alice", T0 + 10) == 305


async def test_remove_leaves_a_tombstone_and_purge_deletes(store: Store) -> None:
    for fid in ("m_1", "m_2", "m_3"):
        await store.media_add(mf(fid))
        await store.media_attach(fid, "alice", "r", T0, exclusive=False)
    await store.media_ref("m_1", "r", 1, T0)
    await store.media_ref("m_2", "r", 1, T0)
    assert await store.media_remove(["m_1", "m_nope", "m_1"]) == 1
    assert await store.media_remove(["m_1"]) == 0  # already removed
    got = await store.media_get("m_1")
    assert got is not None and got.state == "removed" and got.room == "r"
    assert await store.media_refs("m_1") == []
    assert await store.media_refs("m_2") == [("r", 1)]
    assert await store.media_remove([]) == 0
    assert await store.media_purge_rows(["m_1", "m_2", "m_nope"]) == 2
    assert await store.media_get("m_1") is None and await store.media_get("m_2") is None
    assert await store.media_refs("m_2") == []
    assert await store.media_purge_rows([]) == 0
    assert (await store.media_get("m_3")) is not None


async def test_unsent_and_of_user(store: Store) -> None:
    await store.media_add(mf("m_old", at=T0))
    await store.media_add(mf("m_older", "bob", at=T0 - 5))
    await store.media_add(mf("m_sent", at=T0 + 1))
    await store.media_add(mf("m_gone", at=T0 + 2))
    await store.media_add(mf("m_new", at=T0 + 100))
    await store.media_attach("m_sent", "alice", "r", T0 + 3, exclusive=True)
    await store.media_remove(["m_gone"])
    assert [f.id for f in await store.media_unsent(T0 + 50, 10)] == ["m_older", "m_old"]
    assert [f.id for f in await store.media_unsent(T0 + 50, 1)] == ["m_older"]
    assert [f.id for f in await store.media_unsent(T0, 10)] == ["m_older"]  # strictly before
    assert [f.id for f in await store.media_of_user("alice", 10)] == ["m_old", "m_sent", "m_new"]
    assert [f.id for f in await store.media_of_user("alice", 2)] == ["m_old", "m_sent"]
    assert await store.media_of_user("nobody", 10) == []


async def test_orphans(store: Store) -> None:
    """Attached files whose messages are all gone (retention, erasure) or recalled, or that
    have no message long after their attach, are orphans; a live ref or a recent attach
    or ref keeps a file."""
    old = T0  # far older than the grace period
    recent = now_ms() - MEDIA_PUBLISH_GRACE_MS // 2

    async def sent(fid: str, room: str, seq: int, *, sender: str = "alice", route: str = "dm:*", ref_at: int = old, ts: int | None = None) -> None:
        await store.media_add(mf(fid, sender, at=old + seq))
        _, why = await store.media_attach(fid, sender, room, old, exclusive=True)
        assert why == "ok", (fid, why)
        await store.commit(msg(room, seq, sender=sender, route=route, ts=ts))
        await store.media_ref(fid, room, seq, ref_at)

    await sent("m_live", "dm:a:b", 1)
    await sent("m_recalled", "dm:a:b", 2)
    await sent("m_expired", "grp:x", 3, route="grp:*", ts=T0 - 10_000)
    await sent("m_erased", "dm:b:c", 4, sender="bob")
    await sent("m_recent_ref", "dm:a:b", 5, ref_at=recent)
    # Sent twice: one message recalled, the other alive.
    await sent("m_twice", "dm:a:b", 6)
    await store.media_attach("m_twice", "alice", "dm:a:b", old, exclusive=True)
    await store.commit(msg("dm:a:b", 7))
    await store.media_ref("m_twice", "dm:a:b", 7, old)
    # Attached, never published: long ago, and just now.
    await store.media_add(mf("m_lost", at=old + 8))
    await store.media_attach("m_lost", "alice", "dm:a:b", old, exclusive=True)
    await store.media_add(mf("m_inflight", at=old + 9))
    await store.media_attach("m_inflight", "alice", "dm:a:b", now_ms(), exclusive=True)
    # Never attached, and removed: not the sweep's business.
    await store.media_add(mf("m_unsent", at=old))
    await sent("m_removed", "dm:a:b", 10)
    await store.recall("dm:a:b", 10, "alice", old + 1)
    await store.media_remove(["m_removed"])

    assert [f.id for f in await store.media_orphans(100)] == ["m_lost"]

    assert await store.recall("dm:a:b", 2, "alice", old + 1) is not None
    assert await store.recall("dm:a:b", 6, "alice", old + 1) is not None
    assert await store.recall("dm:a:b", 5, "alice", old + 1) is not None  # recalled, but its ref is recent
    assert await store.expire("grp:*", T0) == 1
    assert await store.delete_user("bob") == 1
    # delete_user leaves media alone.
    erased = await store.media_get("m_erased")
    assert erased is not None and erased.state == "attached" and await store.media_refs("m_erased") == [("dm:b:c", 4)]

    orphans = await store.media_orphans(100)
    assert [f.id for f in orphans] == ["m_recalled", "m_expired", "m_erased", "m_lost"]  # oldest upload first
    assert all(f.state == "attached" for f in orphans)
    assert [f.id for f in await store.media_orphans(2)] == ["m_recalled", "m_expired"]
    # The sweep's caller removes them: they are orphans no more.
    assert await store.media_remove([f.id for f in orphans]) == 4
    assert await store.media_orphans(100) == []
    live = await store.media_get("m_live")
    assert live is not None and live.state == "attached"


async def test_a_version_4_database_is_migrated_to_5(backend: Backend, opened: list[Store], monkeypatch: pytest.MonkeyPatch) -> None:
    """What an existing deployment does after the upgrade: `gateway migrate` adds the media
    tables beside the messages and desk sessions, which stay."""
    if backend.kind == "sqlite":
        from gateway.store.sqlite import MIGRATIONS

        path = backend.path  # type: ignore[attr-defined]
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None)
        for version, statements in MIGRATIONS[:4]:
            assert version <= 4
            for sql in statements:
                conn.execute(sql)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '4')")
        conn.close()
    else:
        import gateway.store.postgres as pg

        with monkeypatch.context() as m:
            m.setattr(pg, "MIGRATIONS", pg.MIGRATIONS[:4])
            m.setattr(pg, "SCHEMA_VERSION", 4)
            assert await backend.new_store().migrate() == (0, 4)
    await backend.execute("INSERT INTO messages (room, seq, ts, type, prio, sender, data) VALUES ('r', 4, 1, 'chat', 1, 'u', '{}')")
    await backend.execute("INSERT INTO cs_sessions (id, shopper, department, state, opened_at) VALUES ('s1', 'bob', 'presales', 'bot', 1)")
    with pytest.raises(SchemaError, match=rf"schema version 4, this gateway needs {SCHEMA_VERSION}"):
        await backend.new_store().start()
    with pytest.raises(Exception, match="media"):  # no media table yet
        await backend.execute("SELECT count(*) FROM media")
    assert await backend.new_store().migrate() == (4, SCHEMA_VERSION) == (4, 5)
    backend.migrated = True
    s = await start(backend, opened)
    assert [m.seq for m in await s.messages("r")] == [4]
    sess = await s.cs_open_session("bob")
    assert isinstance(sess, CsSession) and sess.id == "s1"
    await s.media_add(mf("m_1"))
    assert (await s.media_attach("m_1", "alice", "r", T0, exclusive=True))[1] == "ok"
    await s.media_ref("m_1", "r", 4, T0)
    assert await s.media_refs("m_1") == [("r", 4)]
    assert await backend.new_store().migrate() == (5, 5)
