"""The store contract (:mod:`gateway.store.base`), run against every implementation.

Every test talks to the :class:`~gateway.store.Store` interface only. The few things the
interface cannot do (reach the database from outside: stall its writer with a lock, change
``meta``, open a second store on the same database) go through a small :class:`Backend`
per kind. Each test gets a fresh database: SQLite a file in ``tmp_path``, PostgreSQL a new
database on the session's server (``postgres_dsn`` from ``support.fixtures``).

Run only the SQLite half with ``-k sqlite``.
"""

# ruff: noqa: RUF001 (Chinese text with its own punctuation)
from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from support.wait import eventually

from gateway.protocol import frames as P
from gateway.store import SCHEMA_VERSION, SchemaError, Store, StoredMessage, StoreUnavailable

KINDS = ["sqlite", "postgres"]
T0 = 1_700_000_000_000  # a timestamp (ms) the tests count from


# --------------------------------------------------------------------------- backends

class Backend:
    """How the tests reach one kind of database from outside the store."""

    kind = ""
    #: Only the embedded store creates its schema in a new database at start(); the
    #: others need ``gateway migrate`` (:meth:`Store.migrate`) first.
    creates_schema = True
    migrated = False

    def new_store(self, **options: Any) -> Store:
        """A store (not started) on this test's database; ``options``: constructor options
        the implementations share (``batch_ms``, ``max_batch``, ``max_backlog``), plus
        ``stall_timeout``: how long a write may wait on a lock before it fails, for the
        kinds that have such a setting."""
        raise NotImplementedError

    async def execute(self, sql: str) -> None:
        """Run ``sql`` on the database from a connection of its own."""
        raise NotImplementedError

    def stall(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold a lock that stops the store's writes (reads go on) while inside."""
        raise NotImplementedError

    async def cleanup(self) -> None:
        pass


class SqliteBackend(Backend):
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path

    def new_store(self, **options: Any) -> Store:
        from gateway.store.sqlite import SqliteStore

        options.setdefault("busy_timeout", options.pop("stall_timeout", 2.0))
        return SqliteStore(str(self.path), **options)

    async def execute(self, sql: str) -> None:
        def run() -> None:
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute(sql)
            finally:
                conn.close()

        await asyncio.to_thread(run)

    @contextlib.asynccontextmanager
    async def stall(self) -> AsyncIterator[None]:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            await asyncio.to_thread(conn.execute, "BEGIN IMMEDIATE")  # the write lock
            yield
        finally:
            await asyncio.to_thread(conn.execute, "ROLLBACK")
            conn.close()


class PostgresBackend(Backend):
    kind = "postgres"
    schema = "livegate"
    creates_schema = False

    def __init__(self, admin_dsn: str, dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.dsn = dsn

    def new_store(self, **options: Any) -> Store:
        from gateway.store.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]

        options.pop("stall_timeout", None)
        store: Store = PostgresStore(self.dsn, **options)
        return store

    async def _connect(self) -> Any:
        import asyncpg  # type: ignore[import-not-found,unused-ignore]

        conn = await asyncpg.connect(self.dsn)
        await conn.execute(f"SET search_path TO {self.schema}")
        return conn

    async def execute(self, sql: str) -> None:
        conn = await self._connect()
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def stall(self) -> AsyncIterator[None]:
        conn = await self._connect()
        try:
            tr = conn.transaction()
            await tr.start()
            await conn.execute("LOCK TABLE messages IN EXCLUSIVE MODE")  # blocks writes, not reads
            try:
                yield
            finally:
                await tr.rollback()
        finally:
            await conn.close()

    async def cleanup(self) -> None:
        from support.postgres import drop_database  # type: ignore[import-not-found,unused-ignore]

        await asyncio.to_thread(drop_database, self.dsn, self.admin_dsn)


@pytest.fixture(params=KINDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    b: Backend
    if request.param == "sqlite":
        b = SqliteBackend(tmp_path / "data" / "store.db")
    else:
        admin_dsn = request.getfixturevalue("postgres_dsn")
        from support.postgres import create_database  # type: ignore[import-not-found,unused-ignore]

        b = PostgresBackend(admin_dsn, await asyncio.to_thread(create_database, admin_dsn))
    try:
        yield b
    finally:
        await b.cleanup()


@pytest.fixture
async def opened(backend: Backend) -> AsyncIterator[list[Store]]:
    """Stores the test started (``await start(backend, **options)``), closed at teardown."""
    stores: list[Store] = []
    yield stores
    for s in reversed(stores):
        await s.close()


async def start(backend: Backend, opened: list[Store], *, outbox: bool = False, **options: Any) -> Store:
    """A started store on the test's database (migrated first, the first time, for the
    kinds that do not create their schema themselves); ``outbox``: with the outbox log."""
    s = backend.new_store(**options)
    s.outbox = outbox
    if not backend.creates_schema and not backend.migrated:
        await s.migrate()
    backend.migrated = True
    await s.start()
    opened.append(s)
    return s


@pytest.fixture
async def store(backend: Backend, opened: list[Store]) -> Store:
    return await start(backend, opened)


def msg(room: str, seq: int, *, sender: str | None = "u1", cid: str | None = None, ts: int | None = None,
        data: Any = None, route: str = "cs:*", type: str = "chat", prio: int = 1) -> StoredMessage:
    body = orjson.dumps(data if data is not None else {"text": f"hello {room} {seq}"})
    return StoredMessage(room, seq, ts if ts is not None else T0 + seq, type, prio, sender, body, cid, route)


async def collect(it: AsyncIterator[StoredMessage]) -> list[StoredMessage]:
    return [m async for m in it]


# --------------------------------------------------------------------------- lifecycle and schema

async def test_new_database_gets_the_schema_and_migrate_is_then_a_no_op(backend: Backend, opened: list[Store]) -> None:
    fresh = backend.new_store()
    assert await fresh.migrate() == (0, SCHEMA_VERSION)
    assert await fresh.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
    s = await start(backend, opened)
    assert s.epoch
    assert await s.last_seq("nowhere") == 0


@pytest.mark.parametrize("version", ["0", "99"])
async def test_another_schema_version_is_refused_at_start(backend: Backend, opened: list[Store], version: str) -> None:
    s = await start(backend, opened)
    await s.close()
    await backend.execute(f"UPDATE meta SET value = '{version}' WHERE key = 'schema_version'")
    with pytest.raises(SchemaError) as e:
        await backend.new_store().start()
    assert version in str(e.value)
    if version == "0":
        assert "gateway migrate" in str(e.value)


async def test_epoch_is_kept_across_a_clean_close_and_new_after_an_unclean_one(backend: Backend, opened: list[Store]) -> None:
    first = await start(backend, opened)
    await first.commit(msg("r", 1))
    epoch = first.epoch
    await first.close()
    second = await start(backend, opened)
    assert second.epoch == epoch
    # second is never closed (as if its process died): the next start sees no clean close.
    third = await start(backend, opened)
    assert third.epoch and third.epoch != epoch
    assert [m.seq for m in await third.messages("r")] == [1]


async def test_close_writes_the_archive_backlog(backend: Backend, opened: list[Store]) -> None:
    s = await start(backend, opened, stall_timeout=0.1)
    async with backend.stall():  # nothing can be written before close() is called
        assert all(s.archive(msg("r", i)) for i in range(1, 501))
        closing = asyncio.create_task(s.close(timeout=10))
        await asyncio.sleep(0.3)
        assert not closing.done()
    await closing
    assert s.stats.archive_dropped == 0 and s.stats.archived == 500
    again = await start(backend, opened)
    assert await again.last_seq("r") == 500
    assert len(await again.messages("r", limit=1000)) == 500


async def test_a_closed_store_refuses_work(backend: Backend, opened: list[Store]) -> None:
    s = await start(backend, opened)
    await s.close()
    await s.close()  # idempotent
    with pytest.raises(StoreUnavailable):
        await s.commit(msg("r", 1))
    assert s.archive(msg("r", 2)) is False
    assert s.stats.archive_dropped == 1


# --------------------------------------------------------------------------- commit

async def test_commit_returns_once_another_store_can_read_it(backend: Backend, opened: list[Store], store: Store) -> None:
    m = msg("room:a", 1, cid="c1", data={"text": "订单已发货", "n": 1.5})
    assert await store.commit(m) == m
    other = await start(backend, opened)  # a second store on the same database
    assert await other.messages("room:a") == [m]
    assert store.stats.committed == 1


async def test_same_cid_twice_is_stored_once_with_the_first_seq(store: Store) -> None:
    first = await store.commit(msg("cs:1", 7, sender="alice", cid="m-1", data={"text": "first"}))
    again = await store.commit(msg("cs:1", 8, sender="alice", cid="m-1", data={"text": "retry"}))
    assert again.seq == 7 and again == first
    assert store.stats.duplicates == 1 and store.stats.committed == 1
    assert [m.seq for m in await store.messages("cs:1")] == [7]
    assert await store.last_seq("cs:1") == 7
    # The same cid from another sender, or in another room, is another message.
    assert (await store.commit(msg("cs:1", 8, sender="bob", cid="m-1"))).seq == 8
    assert (await store.commit(msg("cs:2", 1, sender="alice", cid="m-1"))).seq == 1


async def test_server_messages_are_idempotent_by_key_too(store: Store) -> None:
    first = await store.commit(msg("cs:1", 1, sender=None, cid="idem-1"))
    again = await store.commit(msg("cs:1", 2, sender=None, cid="idem-1"))
    assert again.seq == 1 and again.sender is None and again == first
    assert len(await store.messages("cs:1")) == 1


async def test_same_room_and_seq_is_not_stored_twice(store: Store) -> None:
    first = await store.commit(msg("r", 5, data={"v": "original"}))
    again = await store.commit(msg("r", 5, data={"v": "other"}, sender="u2"))
    assert again == first
    assert store.stats.duplicates == 1
    assert [orjson.loads(m.data) for m in await store.messages("r")] == [{"v": "original"}]


async def test_duplicates_within_one_group_commit(store: Store) -> None:
    a, b, c = await asyncio.gather(
        store.commit(msg("r", 1, cid="x", data={"v": 1})),
        store.commit(msg("r", 2, cid="x", data={"v": 2})),
        store.commit(msg("r", 3, cid="y")),
    )
    assert a.seq == 1 and b == a and c.seq == 3
    assert [m.seq for m in await store.messages("r")] == [1, 3]
    assert store.stats.duplicates == 1 and store.stats.committed == 2


async def test_group_commit_of_a_thousand_concurrent_commits(store: Store) -> None:
    b0 = store.stats.batches
    msgs = [msg(f"room:{i % 10}", i // 10 + 1, cid=f"c{i}") for i in range(1000)]
    got = await asyncio.gather(*(store.commit(m) for m in msgs))
    assert got == msgs
    assert store.stats.committed == 1000
    batches = store.stats.batches - b0
    assert 1 <= batches < 1000, batches  # many commits per transaction
    assert store.stats.batched_messages >= 1000
    assert sum(store.stats.latency_buckets) == 1000 and store.stats.latency_sum > 0
    assert [await store.last_seq(f"room:{r}") for r in range(10)] == [100] * 10
    assert await store.commit_many([msg("x", 1), msg("x", 2)]) == [msg("x", 1), msg("x", 2)]
    assert store.backlog == 0


# --------------------------------------------------------------------------- archive

async def test_archive_writes_behind(store: Store) -> None:
    t = time.perf_counter()
    assert all(store.archive(msg("live:1", i, sender=f"u{i % 7}")) for i in range(1, 2001))
    assert time.perf_counter() - t < 0.5  # queued, not written: never waits for the database
    await eventually(lambda: store.stats.archived == 2000, what="2,000 archived")
    assert store.backlog == 0
    assert await store.last_seq("live:1") == 2000
    assert store.archive(msg("live:1", 5))  # written twice: harmless
    await eventually(lambda: store.stats.duplicates == 1)
    assert len(await store.messages("live:1", after_seq=0, limit=5000)) == 2000
    assert store.stats.archived == 2000 and store.stats.archive_dropped == 0


async def test_archive_backlog_is_bounded_while_the_writer_is_stalled(backend: Backend, opened: list[Store]) -> None:
    s = await start(backend, opened, max_backlog=100, stall_timeout=0.3)
    async with backend.stall():
        accepted = [s.archive(msg("live:1", i)) for i in range(1, 151)]
        assert accepted == [True] * 100 + [False] * 50
        assert s.stats.archive_dropped == 50
        assert s.backlog == 100
        assert await s.last_seq("live:1") == 0  # reads go on
        await asyncio.sleep(0.8)  # longer than a write may wait: a failed attempt at least
        assert s.backlog == 100
        assert s.archive(msg("live:1", 151)) is False
    await eventually(lambda: s.backlog == 0, what="the backlog written after the stall")
    assert s.stats.archived == 100
    assert [m.seq for m in await s.messages("live:1", limit=200)] == list(range(1, 101))


async def test_write_archive_returns_once_committed_stores_a_redelivery_once_and_drops_what_is_refused(
    backend: Backend, opened: list[Store], store: Store,
) -> None:
    """What the Redis archive log needs before it acknowledges its entries."""
    batch = [msg("live:a", i, sender=f"u{i % 3}") for i in range(1, 301)]
    assert await store.write_archive(batch) == 0
    other = await start(backend, opened)  # another node's store: committed when it returned
    assert await other.last_seq("live:a") == 300
    d0 = store.stats.duplicates
    assert await store.write_archive([*batch[:50], msg("live:a", 301)]) == 0  # a redelivered batch
    assert store.stats.duplicates - d0 == 50
    assert [m.seq for m in await other.messages("live:a", after_seq=0, limit=1000)] == list(range(1, 302))
    worse = StoredMessage("live:a", 302, T0, "chat", 1, "\ud800", b"{}", None, "")  # a lone surrogate: refused
    assert await store.write_archive([msg("live:a", 303), worse, msg("live:a", 304)]) == 1
    assert store.stats.archive_dropped == 1
    assert [m.seq for m in await store.messages("live:a", after_seq=300)] == [301, 303, 304]
    assert await store.write_archive([]) == 0
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.write_archive([msg("live:a", 305)])


async def test_a_commit_waits_for_a_stalled_writer_or_fails_clearly(backend: Backend, opened: list[Store]) -> None:
    s = await start(backend, opened, stall_timeout=0.3)
    async with backend.stall():
        task = asyncio.create_task(s.commit(msg("r", 1)))
        done, _ = await asyncio.wait({task}, timeout=1.0)
        # kinds with a lock timeout fail (StoreUnavailable), the others are still waiting
        assert not done or isinstance(task.exception(), StoreUnavailable)
    try:
        assert (await task).seq == 1
    except StoreUnavailable:
        assert (await s.commit(msg("r", 1))).seq == 1  # a retry is safe
    assert [m.seq for m in await s.messages("r")] == [1]


# --------------------------------------------------------------------------- reading

async def test_messages_page_back_and_forward(store: Store) -> None:
    await store.commit_many([msg("r", i) for i in range(1, 251)] + [msg("other", i) for i in range(1, 4)])
    def seqs(ms: list[StoredMessage]) -> list[int]:
        return [m.seq for m in ms]

    assert seqs(await store.messages("r", limit=100)) == list(range(151, 251))
    assert seqs(await store.messages("r", before_seq=151, limit=100)) == list(range(51, 151))
    assert seqs(await store.messages("r", before_seq=51, limit=100)) == list(range(1, 51))
    assert await store.messages("r", before_seq=1) == []
    assert seqs(await store.messages("r", after_seq=0, limit=100)) == list(range(1, 101))
    assert seqs(await store.messages("r", after_seq=240, limit=100)) == list(range(241, 251))
    assert await store.messages("r", after_seq=250) == []
    assert seqs(await store.messages("other")) == [1, 2, 3]
    assert await store.messages("empty") == []
    page = await store.messages("r", limit=1)
    assert page == [msg("r", 250)]  # every field as stored


async def test_last_seq(store: Store) -> None:
    assert await store.last_seq("r") == 0
    await store.commit(msg("r", 3))
    store.archive(msg("r", 9))
    await eventually(lambda: store.backlog == 0)
    assert await store.last_seq("r") == 9
    assert await store.last_seq("r2") == 0


async def test_export_by_room_sender_and_all_in_batches_and_time_range(store: Store) -> None:
    msgs = []
    for i in range(1, 301):  # three rooms, three senders, ts not in seq order across rooms
        room = f"room:{i % 3}"
        msgs.append(msg(room, i, sender=f"u{i % 5}", ts=T0 + (i * 7919) % 1000))
    await store.commit_many(msgs)
    since, until = T0 + 100, T0 + 900
    inside = [m for m in msgs if since <= m.ts < until]
    for batch in (7, 1000):
        by_room = await collect(store.export(since_ms=since, until_ms=until, room="room:1", batch=batch))
        assert by_room == sorted((m for m in inside if m.room == "room:1"), key=lambda m: m.seq)
        by_sender = await collect(store.export(since_ms=since, until_ms=until, sender="u2", batch=batch))
        assert [m.ts for m in by_sender] == sorted(m.ts for m in by_sender)
        assert sorted(by_sender, key=lambda m: (m.room, m.seq)) == sorted((m for m in inside if m.sender == "u2"), key=lambda m: (m.room, m.seq))
        everything = await collect(store.export(since_ms=since, until_ms=until, batch=batch))
        assert [m.ts for m in everything] == sorted(m.ts for m in inside)
        assert sorted(everything, key=lambda m: (m.room, m.seq)) == sorted(inside, key=lambda m: (m.room, m.seq))
    # the bounds: since is included, until is not
    # many messages with one timestamp across batch boundaries: none lost, none twice
    same = [msg(f"tie:{i % 4}", i, sender="tie", ts=T0 + 5000) for i in range(1, 51)]
    await store.commit_many(same)
    for kw in ({}, {"sender": "tie"}, {"room": "tie:1"}):
        got = await collect(store.export(since_ms=T0 + 5000, until_ms=T0 + 5001, batch=7, **kw))
        want = [m for m in same if m.room == kw.get("room", m.room)]
        assert sorted(got, key=lambda m: (m.room, m.seq)) == sorted(want, key=lambda m: (m.room, m.seq))
    ts = msgs[10].ts
    edge = [m for m in msgs if m.ts == ts]
    assert await collect(store.export(since_ms=ts, until_ms=ts + 1)) == edge
    assert await collect(store.export(since_ms=ts, until_ms=ts)) == []


async def test_search_finds_chinese_substrings_newest_first(store: Store) -> None:
    for i, m in enumerate([  # one after the other, each later than the one before
        msg("cs:1", 1, ts=T0 + 1, data={"text": "您好，请问我的订单什么时候发货？"}),
        msg("cs:1", 2, ts=T0 + 2, data={"text": "您的订单已发货，请注意查收"}),
        msg("cs:2", 1, ts=T0 + 3, data={"text": "订单已发货了吗"}),
        msg("cs:2", 2, ts=T0 + 4, data={"text": "no Chinese here"}),
    ]):
        assert (await store.commit(m)).ts == T0 + i + 1
    found = await store.search("已发货")
    assert [(m.room, m.seq) for m in found] == [("cs:2", 1), ("cs:1", 2)]
    assert [(m.room, m.seq) for m in await store.search("已发货", room="cs:1")] == [("cs:1", 2)]
    assert await store.search("未发货") == []
    assert [m.seq for m in await store.search("订单什么时候")] == [1]
    assert [(m.room, m.seq) for m in await store.search("已发货", limit=1)] == [("cs:2", 1)]


# --------------------------------------------------------------------------- the data's life

async def test_delete_user_removes_their_messages_everywhere(store: Store) -> None:
    await store.commit_many([msg("cs:1", i, sender="alice" if i % 2 else "bob", data={"text": f"订单号码 {i}"}) for i in range(1, 41)])
    assert await store.delete_user("alice") == 20
    assert {m.sender for m in await store.messages("cs:1", limit=100)} == {"bob"}
    assert all(m.sender == "bob" for m in await store.search("订单号码", limit=100))
    assert await collect(store.export(since_ms=0, until_ms=2 * T0, sender="alice")) == []
    assert len(await collect(store.export(since_ms=0, until_ms=2 * T0, sender="bob"))) == 20
    assert await store.delete_user("alice") == 0
    assert await store.delete_user("nobody") == 0


async def test_expire_by_route_and_time_in_batches(store: Store) -> None:
    old, new = T0, T0 + 86_400_000
    await store.commit_many(
        [msg("live:1", i, route="live:*", ts=old + i) for i in range(1, 26)]
        + [msg("live:1", i, route="live:*", ts=new + i) for i in range(26, 31)]
        + [msg("cs:1", i, route="cs:*", ts=old + i) for i in range(1, 11)]
    )
    counts = []
    while True:
        n = await store.expire("live:*", new, batch=10)
        counts.append(n)
        if n < 10:
            break
    assert counts == [10, 10, 5]
    assert [m.seq for m in await store.messages("live:1")] == list(range(26, 31))
    assert len(await store.messages("cs:1")) == 10
    assert await store.expire("cs:*", old + 6, batch=100) == 5
    assert [m.seq for m in await store.messages("cs:1")] == list(range(6, 11))


# --------------------------------------------------------------------------- the frame

async def test_stored_message_frame_is_the_published_frame(store: Store) -> None:
    data = {"text": "订单已发货 \"quoted\" \\ tab\t", "amount": 12.5, "items": [1, None, True]}
    head, tail = P.message_parts("cs:1", "chat", 2, "alice", data, T0)
    published = P.splice(head, 42, store.epoch, tail)
    await store.commit(StoredMessage("cs:1", 42, T0, "chat", 2, "alice", orjson.dumps(data), "c1", "cs:*"))
    (stored,) = await store.messages("cs:1")
    assert stored.frame(store.epoch) == published
    server = StoredMessage("cs:1", 43, T0, "notice", 0, None, b'{"a":1}')
    head, tail = P.message_parts("cs:1", "notice", 0, None, {"a": 1}, T0)
    assert server.frame("e") == P.splice(head, 43, "e", tail)


# --------------------------------------------------------------------------- seqs never go back

async def test_last_seq_never_goes_back_after_erasure_or_retention(store: Store) -> None:
    """A room whose newest messages were deleted keeps its last seq, so a broker that
    starts the room afresh never numbers a new message with a seq a deleted one had."""
    await store.commit_many([msg("r", i, sender="alice" if i > 3 else "bob", route="live:*") for i in range(1, 7)])
    assert await store.delete_user("alice") == 3
    assert await store.last_seq("r") == 6
    assert await store.expire("live:*", T0 + 100) == 3  # every message of the room is gone
    assert await store.messages("r") == []
    assert await store.last_seq("r") == 6
    await store.commit(msg("r", 7))
    assert await store.last_seq("r") == 7


# --------------------------------------------------------------------------- the outbox log

async def outbox_store(backend: Backend, opened: list[Store], **options: Any) -> Store:
    return await start(backend, opened, outbox=True, **options)


async def read_all(store: Store, after: str | None = None, limit: int = 1000) -> list[Any]:
    return await store.outbox_read(after, limit)


async def test_outbox_logs_each_new_message_once_and_room_events(backend: Backend, opened: list[Store]) -> None:
    store = await outbox_store(backend, opened)
    await store.commit_many([msg("cs:1", i) for i in (1, 2, 3)])
    assert (await store.commit(msg("cs:1", 2))).seq == 2  # a duplicate: no second entry
    assert store.event("cs:1", "join", orjson.dumps({"id": "e1", "event": "join", "user": "u9"}))
    await eventually(lambda: store.backlog == 0 and store.stats.events == 1, what="the event written")
    store.archive(msg("cs:2", 1, cid="x"))
    store.archive(msg("cs:2", 1, cid="x"))  # written twice (a redelivered archive): one entry
    await eventually(lambda: store.backlog == 0)
    entries = await read_all(store)
    assert [(e.room, e.kind, e.seq) for e in entries] == [
        ("cs:1", "message", 1), ("cs:1", "message", 2), ("cs:1", "message", 3), ("cs:1", "join", None), ("cs:2", "message", 1)]
    assert entries[0].message == msg("cs:1", 1) and entries[0].ts == msg("cs:1", 1).ts
    assert orjson.loads(entries[3].body or b"") == {"id": "e1", "event": "join", "user": "u9"} and entries[3].message is None
    assert all(e.endpoint is None for e in entries)
    # Reading on from a position gives what follows it; positions are stable.
    assert [e.position for e in await read_all(store, entries[1].position)] == [e.position for e in entries[2:]]
    assert await read_all(store, entries[-1].position) == []
    assert len(await store.outbox_read(None, 2)) == 2
    n, first_ts = await store.outbox_backlog(entries[1].position)
    assert n >= 3 and first_ts == msg("cs:1", 3).ts
    assert await store.outbox_backlog(entries[-1].position) == (0, 0)
    # A message erased before it was delivered: its entry stays, without the message.
    await store.delete_user("u1")
    assert [e.message for e in await read_all(store)] == [None] * 5


async def test_no_outbox_entries_when_the_outbox_is_off(store: Store) -> None:
    await store.commit(msg("cs:1", 1))
    assert store.event("cs:1", "join", b"{}") is False and store.stats.events_dropped == 1
    assert await read_all(store) == []


async def test_outbox_cursor_trim_dead_letters_and_replay(backend: Backend, opened: list[Store]) -> None:
    store = await outbox_store(backend, opened)
    await store.commit_many([msg("cs:1", i) for i in range(1, 11)])
    entries = await read_all(store)
    assert await store.outbox_cursor("crm") is None
    await store.outbox_save("crm", entries[3].position)
    await store.outbox_save("crm", entries[4].position)
    assert await store.outbox_cursor("crm") == entries[4].position
    assert await store.outbox_trim(entries[4].position) == 5
    assert [e.seq for e in await read_all(store)] == [6, 7, 8, 9, 10]
    await store.outbox_bury("crm", [("m1", "cs:1", b'{"id":"m1","n":1}'), ("m2", "cs:1", b'{"id":"m2","n":2}')], "HTTP 400: bad")
    await store.outbox_bury("erp", [("m3", "cs:9", b'{"id":"m3"}')], "timeout")
    dead = await store.dead_letters("crm")
    assert [(d.event_id, d.room, orjson.loads(d.event), d.error) for d in dead] == [
        ("m1", "cs:1", {"id": "m1", "n": 1}, "HTTP 400: bad"), ("m2", "cs:1", {"id": "m2", "n": 2}, "HTTP 400: bad")]
    assert [d.event_id for d in await store.dead_letters("crm", after_id=dead[0].id)] == ["m2"]
    assert abs(dead[0].failed_at - time.time() * 1000) < 60_000
    assert await store.replay_dead("crm", [dead[1].id]) == 1
    assert await store.replay_dead("crm", []) == 0
    assert [d.event_id for d in await store.dead_letters("crm")] == ["m1"]
    replayed = (await read_all(store))[-1]
    assert (replayed.kind, replayed.endpoint, replayed.room, orjson.loads(replayed.body or b"")) == ("replay", "crm", "cs:1", {"id": "m2", "n": 2})
    assert await store.replay_dead("crm") == 1
    assert await store.dead_letters("crm") == [] and len(await store.dead_letters("erp")) == 1


async def test_one_leader_at_a_time(backend: Backend, opened: list[Store]) -> None:
    a = await start(backend, opened)
    b = await start(backend, opened)
    lease = await a.lead("outbox")
    assert lease is not None and await lease.alive()
    assert await b.lead("outbox") is None
    assert await a.lead("outbox") is None  # not re-entrant: one holder, even in one process
    other = await b.lead("something-else")
    assert other is not None
    await lease.release()
    await lease.release()
    assert not await lease.alive()
    again = await b.lead("outbox")
    assert again is not None
    await again.release()
    await other.release()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
async def test_outbox_never_skips_an_entry_that_commits_late(backend: Backend, opened: list[Store]) -> None:
    """Two transactions write the log at once; the one that began first commits last. A
    reader that went past the second one's entry must still get the first one's: entries
    are held back while an older transaction is running."""
    import asyncpg  # type: ignore[import-not-found,unused-ignore]

    store = await outbox_store(backend, opened)
    assert isinstance(backend, PostgresBackend)
    slow = await asyncpg.connect(backend.dsn)
    try:
        tr = slow.transaction()
        await tr.start()
        await slow.execute("INSERT INTO livegate.outbox (room, kind, ts, body) VALUES ('cs:1', 'join', 1, '{}')")
        await store.commit(msg("cs:1", 1))
        assert await read_all(store) == []  # the message's entry waits for the older transaction
        await tr.commit()
    finally:
        await slow.close()
    entries = await read_all(store)
    assert [(e.kind, e.seq) for e in entries] == [("join", None), ("message", 1)]


# --------------------------------------------------------------------------- conversations

async def test_create_a_conversation_once_with_its_members(store: Store) -> None:
    from gateway.store import TooManyMembers

    conv, created = await store.create_conversation("group:1", "group", "alice", b'{"name":"Study"}', [("alice", "owner"), ("bob", "member")], 3)
    assert created and (conv.room, conv.kind, conv.creator, orjson.loads(conv.meta)) == ("group:1", "group", "alice", {"name": "Study"})
    again, created = await store.create_conversation("group:1", "group", "zed", b"{}", [("alice", "owner"), ("carol", "member")], 3)
    assert not created and again.creator == "alice" and orjson.loads(again.meta) == {"name": "Study"}
    assert [(m.user, m.role) for m in await store.members("group:1")] == [("alice", "owner"), ("bob", "member"), ("carol", "member")]
    assert await store.member_count("group:1") == 3
    with pytest.raises(TooManyMembers):
        await store.add_members("group:1", [("dave", "member")], 3)
    assert await store.member_count("group:1") == 3
    with pytest.raises(KeyError):
        await store.add_members("group:none", [("dave", "member")], 3)
    assert await store.conversation("group:none") is None
    assert (await store.conversation("group:1")) == again


async def test_a_conversation_created_by_many_at_once_is_created_once(store: Store) -> None:
    """Both users of a dm (and retries) create it together: one creation, the same
    conversation for all, as read back."""
    results = await asyncio.gather(*(
        store.create_conversation("dm:ann:bob", "dm", who, b"{}", [("ann", "member"), ("bob", "member")], 2) for who in ["ann", "bob"] * 10
    ))
    assert sum(created for _, created in results) == 1
    made = next(conv for conv, created in results if created)
    assert await store.conversation("dm:ann:bob") == made
    assert [(m.user, m.role, m.active) for m in await store.members("dm:ann:bob")] == [("ann", "member", True), ("bob", "member", True)]


async def test_user_rooms_all_of_them_or_the_most_active(store: Store) -> None:
    for i in range(4):
        await store.create_conversation(f"group:ur{i}", "group", None, b"{}", [("amy", "member")], 10)
    # Activity by last message: ur1 newest, then ur3; ur0 and ur2 have none.
    later = int(time.time() * 1000) + 60_000
    await store.commit_many([msg("group:ur3", 1, sender="x", ts=later + 10), msg("group:ur1", 1, sender="x", ts=later + 20)])
    assert sorted(await store.user_rooms("amy", 4)) == ["group:ur0", "group:ur1", "group:ur2", "group:ur3"], "all when they fit"
    assert await store.user_rooms("amy", 2) == ["group:ur1", "group:ur3"], "else the most active"
    await store.remove_member("group:ur1", "amy")
    assert sorted(await store.user_rooms("amy", 10)) == ["group:ur0", "group:ur2", "group:ur3"], "active memberships only"


async def test_new_members_start_with_what_was_said_read_and_unread_is_arithmetic(store: Store) -> None:
    await store.create_conversation("group:2", "group", None, b"{}", [("alice", "owner")], 10)
    await store.commit_many([msg("group:2", i, sender="alice") for i in (1, 2, 3)])
    assert await store.add_members("group:2", [("bob", "member"), ("alice", "member")], 10) == ["bob"]
    bob = await store.member("group:2", "bob")
    assert bob is not None and bob.read_seq == 3 and bob.active and bob.role == "member"
    await store.commit_many([msg("group:2", i, sender="alice") for i in (4, 5)])
    (state,) = await store.user_conversations("bob")
    assert (state.last_seq, state.member.read_seq, state.last_seq - state.member.read_seq) == (5, 3, 2)
    assert state.last == msg("group:2", 5, sender="alice")
    m = await store.mark_read("group:2", "bob", 4)
    assert m is not None and m.read_seq == 4
    m = await store.mark_read("group:2", "bob", 2)  # never back
    assert m is not None and m.read_seq == 4
    m = await store.mark_read("group:2", "bob", 99)  # never past the last seq
    assert m is not None and m.read_seq == 5
    await store.mark_read_many([("group:2", "alice", 5), ("group:2", "nobody", 5)])
    alice = await store.member("group:2", "alice")
    assert alice is not None and alice.read_seq == 5
    assert await store.mark_read("group:2", "nobody", 1) is None


async def test_removed_members_keep_what_they_could_read_and_come_back(store: Store) -> None:
    await store.create_conversation("group:3", "group", None, b"{}", [("alice", "owner"), ("bob", "member")], 10)
    await store.commit_many([msg("group:3", i) for i in (1, 2)])
    gone = await store.remove_member("group:3", "bob")
    assert gone is not None and gone.left_seq == 2 and not gone.active
    assert await store.remove_member("group:3", "bob") is None
    await store.commit_many([msg("group:3", i) for i in (3, 4)])
    (state,) = await store.user_conversations("bob")
    assert state.member.left_seq == 2 and state.last_seq == 2, "nothing after the removal"
    assert await store.user_conversations("bob", include_left=False) == []
    assert await store.user_rooms("bob", 10) == [] and await store.user_rooms("alice", 10) == ["group:3"]
    assert await store.update_member("group:3", "bob", role="admin") is None
    assert await store.add_members("group:3", [("bob", "member")], 10) == ["bob"]
    back = await store.member("group:3", "bob")
    assert back is not None and back.active and back.read_seq == 4
    muted = await store.update_member("group:3", "bob", muted_until=0)
    assert muted is not None and muted.muted(T0) and muted.muted_until == 0
    unmuted = await store.update_member("group:3", "bob", muted_until=None, role="admin")
    assert unmuted is not None and not unmuted.muted(T0) and unmuted.role == "admin"


async def test_a_users_list_changes_since_a_cursor_paged_by_activity(store: Store) -> None:
    # Activity from the messages (a second apart, after the rows' creation times: creations
    # one after the other may fall in the same ms).
    later = int(time.time() * 1000) + 60_000
    for i in range(5):
        await store.create_conversation(f"dm:u{i}:zoe", "dm", None, b"{}", [(f"u{i}", "member"), ("zoe", "member")], 2)
        await store.commit(msg(f"dm:u{i}:zoe", 1, ts=later + 1000 * i))
    states = await store.user_conversations("zoe", since_ms=0, limit=3)
    assert [s.conv.room for s in states] == ["dm:u4:zoe", "dm:u3:zoe", "dm:u2:zoe"]
    nxt = await store.user_conversations("zoe", since_ms=0, limit=3, before=(states[-1].activity, states[-1].conv.room))
    assert [s.conv.room for s in nxt] == ["dm:u1:zoe", "dm:u0:zoe"]
    # A cursor past the newest activity sees only what changes later.
    cursor = max(s.activity for s in states)
    assert await store.user_conversations("zoe", since_ms=cursor) == []
    await store.commit(msg("dm:u1:zoe", 2, ts=cursor + 10))
    assert [s.conv.room for s in await store.user_conversations("zoe", since_ms=cursor)] == ["dm:u1:zoe"]


async def test_recall_leaves_a_tombstone_everywhere(store: Store) -> None:
    from gateway.store import RECALLED

    await store.create_conversation("group:4", "group", None, b"{}", [("alice", "owner")], 10)
    await store.commit_many([msg("group:4", 1, data={"text": "秘密的订单号码 123"}), msg("group:4", 2)])
    before = await store.conversation("group:4")
    old = await store.recall("group:4", 1, "alice", T0 + 5)
    assert old is not None and orjson.loads(old.data) == {"text": "秘密的订单号码 123"}
    assert await store.recall("group:4", 1, "alice", T0 + 6) is None, "once"
    assert await store.recall("group:4", 9, "alice", T0 + 6) is None
    (m1, m2) = await store.messages("group:4")
    assert (m1.type, orjson.loads(m1.data), m1.seq, m1.sender) == (RECALLED, {"by": "alice", "at": T0 + 5}, 1, "u1")
    assert m2.type == "chat"
    assert await store.search("订单号码", limit=10) == []
    assert await store.recalled_since(["group:4", "group:x"], T0) == {"group:4": [1]}
    assert await store.recalled_since(["group:4"], T0 + 5) == {}
    after = await store.conversation("group:4")
    assert before is not None and after is not None and after.updated_at >= before.updated_at
