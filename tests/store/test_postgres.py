"""What is particular to the PostgreSQL store (gateway.store.postgres), against a real
PostgreSQL from Debian: migrations (also two processes at once), the schema check at
start-up, group commit and its durability through a kill -9 of both the writer and the
database, duplicates, Chinese search through pg_trgm, batched deletes, the database
stopped or hanging and back, and ``gateway migrate`` end to end.

The behaviour every store shares is the contract suite's (tests/store/test_contract.py).
Tests that stop, kill or pause the database get a private cluster (``private_pg``); the
others a fresh database on the session's (``postgres_db``).
"""

# ruff: noqa: RUF001  (Chinese text with its full-width punctuation, on purpose)

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from support.postgres import PostgresServer
from support.wait import eventually

from gateway.store.base import SCHEMA_VERSION, SchemaError, StoredMessage, StoreUnavailable
from gateway.store.postgres import PostgresStore, migration_lock_key

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT / "tests")])}
T0 = 1_760_000_000_000


def msg(room: str, seq: int, text: str = "hello", *, sender: str | None = "u1", cid: str | None = None, ts: int | None = None,
        route: str = "live:*", type: str = "chat") -> StoredMessage:
    return StoredMessage(room, seq, T0 + seq if ts is None else ts, type, 1, sender, json.dumps({"text": text}, ensure_ascii=False).encode(),
                         cid, route)


async def migrated(dsn: str, **kw: Any) -> PostgresStore:
    store = PostgresStore(dsn, **kw)
    await store.migrate()
    await store.start()
    return store


@pytest.fixture
async def store(postgres_db: str) -> AsyncIterator[PostgresStore]:
    s = await migrated(postgres_db)
    yield s
    await s.close()



async def count(dsn: str, where: str = "TRUE", *args: Any) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM livegate.messages WHERE {where}", *args))
    finally:
        await conn.close()


def gateway(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env or ENV, timeout=timeout,
                          check=False)


# ---- migrations and the schema check -------------------------------------------------------


async def test_migrate_creates_the_schema_once(postgres_db: str) -> None:
    store = PostgresStore(postgres_db)
    assert await store.migrate() == (0, SCHEMA_VERSION)
    assert await store.migrate() == (SCHEMA_VERSION, SCHEMA_VERSION)
    conn = await asyncpg.connect(postgres_db)
    try:
        tables = {r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'livegate'")}
        assert tables == {"meta", "messages", "rooms", "room_members", "outbox", "outbox_cursors", "outbox_dead", "room_floors", "recalls", "cs_sessions", "cs_tickets", "media", "media_refs"}
        meta = dict(await conn.fetch("SELECT key, value FROM livegate.meta"))
        assert meta["schema_version"] == str(SCHEMA_VERSION) and meta["epoch"] and meta["created_at"].isdigit()
        indexes = {r[0]: r[1] for r in await conn.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'messages'")}
        assert "gin_trgm_ops" in indexes["messages_data_trgm"]
        assert "UNIQUE" in indexes["messages_cid"] and "WHERE (cid IS NOT NULL)" in indexes["messages_cid"]
        assert {"messages_pkey", "messages_ts", "messages_sender_ts", "messages_route_ts"} <= set(indexes)
        assert await conn.fetchval("SELECT extname FROM pg_extension WHERE extname = 'pg_trgm'") == "pg_trgm"
    finally:
        await conn.close()


async def test_start_never_migrates_and_says_what_to_do(postgres_db: str) -> None:
    with pytest.raises(SchemaError, match=rf"schema version 0, this gateway needs {SCHEMA_VERSION}: run `gateway migrate`"):
        await PostgresStore(postgres_db).start()
    conn = await asyncpg.connect(postgres_db)
    try:
        assert await conn.fetchval("SELECT to_regclass('livegate.meta')") is None, "start() created tables"
        await PostgresStore(postgres_db).migrate()
        # A database at an older version (what a later gateway would see) and at a newer one.
        await conn.execute("UPDATE livegate.meta SET value = '0' WHERE key = 'schema_version'")
        with pytest.raises(SchemaError, match="run `gateway migrate`"):
            await PostgresStore(postgres_db).start()
        await conn.execute(f"UPDATE livegate.meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")
        with pytest.raises(SchemaError, match="newer than this gateway's"):
            await PostgresStore(postgres_db).start()
        with pytest.raises(SchemaError, match="newer than this gateway's"):
            await PostgresStore(postgres_db).migrate()
    finally:
        await conn.close()


async def test_a_version_1_database_is_upgraded_in_place(postgres_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an existing deployment does after an upgrade: `gateway migrate` adds the new
    tables beside the old messages, which stay readable."""
    import gateway.store.postgres as pg

    with monkeypatch.context() as m:
        m.setattr(pg, "MIGRATIONS", pg.MIGRATIONS[:1])
        m.setattr(pg, "SCHEMA_VERSION", 1)
        assert await PostgresStore(postgres_db).migrate() == (0, 1)
    conn = await asyncpg.connect(postgres_db)
    try:
        await conn.execute("INSERT INTO livegate.messages (room, seq, ts, type, prio, sender, data) VALUES ('r', 4, 1, 'chat', 1, 'u', '{}')")
    finally:
        await conn.close()
    with pytest.raises(SchemaError, match=rf"schema version 1, this gateway needs {SCHEMA_VERSION}"):
        await PostgresStore(postgres_db).start()
    assert await PostgresStore(postgres_db).migrate() == (1, SCHEMA_VERSION)
    store = PostgresStore(postgres_db)
    await store.start()
    try:
        assert [m.seq for m in await store.messages("r")] == [4]
        assert await store.delete_user("u") == 1 and await store.last_seq("r") == 4
    finally:
        await store.close()


async def test_two_processes_migrating_at_once_apply_each_step_once(postgres_db: str) -> None:
    """Both `gateway migrate` processes are made to wait on the migration lock (held here),
    then released together: one applies every version, the other finds them done."""
    blocker = await asyncpg.connect(postgres_db)
    try:
        await blocker.execute("SELECT pg_advisory_lock($1)", migration_lock_key("livegate"))
        procs = [subprocess.Popen([sys.executable, "-m", "gateway", "migrate", "--dsn", postgres_db], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]

        async def both_waiting() -> bool:
            return bool(await blocker.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted") == 2)

        await eventually(both_waiting, timeout=30, what="both migrate processes waiting on the lock")
        await blocker.execute("SELECT pg_advisory_unlock($1)", migration_lock_key("livegate"))
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        await blocker.close()
    assert [p.returncode for p in procs] == [0, 0], outs
    v = SCHEMA_VERSION
    assert sorted(o.strip() for o, _ in outs) == [f"schema at version {v} (was 0)", f"schema at version {v} (was {v})"], outs


# ---- writing ---------------------------------------------------------------------------------


async def test_group_commit_shares_transactions(store: PostgresStore, postgres_db: str) -> None:
    msgs = [msg(f"room{i % 7}", i // 7 + 1, f"m{i}", cid=f"c{i}") for i in range(700)]
    stored = await asyncio.gather(*(store.commit(m) for m in msgs))
    assert [s is m for s, m in zip(stored, msgs, strict=True)] == [True] * 700
    assert store.stats.committed == 700 and store.stats.duplicates == 0
    assert store.stats.batches <= 70, f"{store.stats.batches} transactions for 700 concurrent commits"
    assert sum(store.stats.latency_buckets) == 700
    assert await count(postgres_db) == 700
    assert [await store.last_seq(f"room{r}") for r in range(7)] == [100] * 7


async def test_duplicates_return_the_stored_row(store: PostgresStore, postgres_db: str) -> None:
    first = msg("dup", 1, "first", cid="c-1", ts=T0)
    assert await store.commit(first) is first
    # A client's retry after a reconnect: new seq, new server time, same cid -> the original.
    assert await store.commit(msg("dup", 7, "retry", cid="c-1", ts=T0 + 60_000)) == first
    # Same seq, another message (a seq reused after a crash) -> the stored one.
    assert await store.commit(msg("dup", 1, "other", cid="c-2")) == first
    # The same cid from another sender, or in another room, is another message.
    other_sender = msg("dup", 2, "x", sender="u2", cid="c-1")
    assert await store.commit(other_sender) is other_sender
    other_room = msg("dup2", 1, "x", cid="c-1")
    assert await store.commit(other_room) is other_room
    # Server-published messages (no sender) with the same Idempotency-Key.
    api = msg("dup", 3, "api", sender=None, cid="idem-9")
    assert await store.commit(api) is api
    assert await store.commit(msg("dup", 4, "api again", sender=None, cid="idem-9")) == api
    # Twice in one batch: one row, both told the first.
    a, b = msg("dup", 5, "a", cid="c-5"), msg("dup", 6, "b", cid="c-5")
    ra, rb = await asyncio.gather(store.commit(a), store.commit(b))
    assert ra == rb == a
    # Archived, then committed (the same message twice): harmless.
    c = msg("dup", 8, "c")
    assert store.archive(c)
    await eventually(lambda: store.backlog == 0)
    assert await store.commit(c) == c
    assert await count(postgres_db, "room = 'dup'") == 5
    assert [m.seq for m in await store.messages("dup")] == [1, 2, 3, 5, 8]
    assert store.stats.duplicates >= 5


async def test_two_nodes_writing_the_same_messages_keep_one_row_each(postgres_db: str) -> None:
    """Two stores (two nodes) writing overlapping batches in opposite orders: no deadlock,
    no duplicate rows, both told the same stored rows."""
    a, b = await migrated(postgres_db), await migrated(postgres_db)
    try:
        msgs = [msg(f"r{i % 20}", i // 20 + 1, f"m{i}", cid=f"c{i}") for i in range(2000)]
        ra, rb = await asyncio.gather(asyncio.gather(*(a.commit(m) for m in msgs)), asyncio.gather(*(b.commit(m) for m in reversed(msgs))))
        assert list(ra) == msgs and list(rb) == list(reversed(msgs))
        assert await count(postgres_db) == 2000
    finally:
        await a.close()
        await b.close()


async def test_a_message_the_database_refuses_fails_alone(store: PostgresStore, postgres_db: str) -> None:
    good = [msg("bad", i, f"ok {i}") for i in range(1, 40)]
    bad = msg("bad", 40, "nul", sender="a\x00b")  # PostgreSQL text cannot hold NUL
    results = await asyncio.gather(*(store.commit(m) for m in [*good, bad]), return_exceptions=True)
    assert results[:-1] == good
    assert isinstance(results[-1], StoreUnavailable) and "refused message bad#40" in str(results[-1])
    assert await count(postgres_db, "room = 'bad'") == 39


async def test_archive_waits_at_most_batch_ms_and_writes_in_batches(postgres_db: str) -> None:
    store = await migrated(postgres_db, batch_ms=50, max_batch=100)
    try:
        for i in range(1, 251):
            assert store.archive(msg("arch", i))
        await eventually(lambda: store.backlog == 0, timeout=5)
        assert store.stats.archived == 250 and store.stats.batches == 3  # 100 + 100 + 50 (after batch_ms)
        assert store.archive(msg("arch", 251))
        t = time.monotonic()
        await eventually(lambda: store.backlog == 0, timeout=5, interval=0.005)
        assert 0.03 < time.monotonic() - t < 1.0
        assert await count(postgres_db, "room = 'arch'") == 251
    finally:
        await store.close()


async def test_epoch_survives_a_clean_close_not_a_crash(postgres_db: str) -> None:
    a = await migrated(postgres_db)
    await a.close()
    b = PostgresStore(postgres_db)
    await b.start()
    assert b.epoch == a.epoch  # closed cleanly
    c = PostgresStore(postgres_db)  # b never closes: it "crashed"
    await c.start()
    assert c.epoch != b.epoch and len(c.epoch) == 8
    await c.close()
    await b.close()


async def test_search_index_pending_list_is_merged_in_the_background(store: PostgresStore, postgres_db: str) -> None:
    """The trigram index's pending list is merged by the store's cleaner (about every
    second), not by a commit that finds it full (nor by autovacuum, a minute away)."""
    conn = await asyncpg.connect(postgres_db)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pgstattuple")
        pending = "SELECT pending_tuples FROM pgstatginindex('livegate.messages_data_trgm')"
        await store.commit_many([msg("gin", i, f"消息内容 number {i}") for i in range(1, 501)])
        assert await conn.fetchval(pending) > 0  # the rows went into the pending list
        await eventually(lambda: _zero(conn, pending), timeout=5, what="an empty pending list")
    finally:
        await conn.close()


async def _zero(conn: Any, sql: str) -> bool:
    return bool(await conn.fetchval(sql) == 0)


# ---- durability --------------------------------------------------------------------------------

CHILD = r"""
import asyncio, json, sys
from gateway.store.base import StoredMessage
from gateway.store.postgres import PostgresStore

async def main(dsn):
    store = PostgresStore(dsn)
    await store.start()
    async def one(task):
        seq = 0
        while True:
            seq += 1
            m = StoredMessage(f"kill{task}", seq, 1, "gift", 2, "u", b'{"n":1}', f"c{seq}", "live:*")
            await store.commit(m)
            sys.stdout.write(f"{task} {seq}\n")
            sys.stdout.flush()
    await asyncio.gather(*(one(t) for t in range(20)))

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
async def test_acked_commits_survive_kill9_of_the_writer_and_the_database(private_pg: PostgresServer, tmp_path: Path) -> None:
    """A child commits from 20 tasks and prints each ack; both it and PostgreSQL are killed
    (SIGKILL) right after an ack. Every acked message is there after the restart. The
    server runs with synchronous_commit=off and a 10 s WAL writer delay, so this also
    checks that the store's connections insist on synchronous commits."""
    private_pg.stop()
    private_pg.settings = {"synchronous_commit": "off", "wal_writer_delay": "10000ms"}
    private_pg.start()
    dsn = private_pg.dsn()
    await PostgresStore(dsn).migrate()
    acked: dict[int, int] = {}
    with subprocess.Popen([sys.executable, "-c", CHILD, dsn], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, text=True) as child:
        try:
            assert child.stdout is not None and child.stderr is not None
            for line in child.stdout:
                task, seq = map(int, line.split())
                acked[task] = max(acked.get(task, 0), seq)
                if sum(acked.values()) >= 3000:
                    break
            child.kill()
            private_pg.kill()
        finally:
            child.kill()
            errors = child.stderr.read() if child.stderr else ""
    assert sum(acked.values()) >= 3000, errors
    private_pg.start()
    conn = await asyncpg.connect(dsn)
    try:
        stored = dict(await conn.fetch("SELECT room, max(seq) FROM livegate.messages GROUP BY room"))
        for task, seq in acked.items():
            assert stored.get(f"kill{task}", 0) >= seq, f"room kill{task}: acked up to {seq}, stored up to {stored.get(f'kill{task}')}"
            # and the room's rows are a prefix: no gap below the last stored seq
            assert await conn.fetchval("SELECT count(*) FROM livegate.messages WHERE room = $1", f"kill{task}") == stored[f"kill{task}"]
    finally:
        await conn.close()


# ---- the database down, hanging, back ------------------------------------------------------------


async def test_database_stopped_then_back(private_pg: PostgresServer) -> None:
    dsn = private_pg.dsn()
    store = await migrated(dsn, timeout=3.0, connect_timeout=1.0)
    try:
        assert await store.commit(msg("down", 1)) == msg("down", 1)
        private_pg.stop()
        t = time.monotonic()
        with pytest.raises(StoreUnavailable, match=rf"PostgreSQL at 127\.0\.0\.1:{private_pg.port}/postgres is unavailable"):
            await store.commit(msg("down", 2))
        assert time.monotonic() - t < 3
        with pytest.raises(StoreUnavailable):  # at once now
            await store.commit(msg("down", 3))
        with pytest.raises(StoreUnavailable):
            await store.last_seq("down")
        for seq in range(10, 20):  # archive keeps them meanwhile
            assert store.archive(msg("down", seq))
        assert store.backlog == 10
        await asyncio.sleep(0.3)
        private_pg.start()

        async def commits() -> bool:
            try:
                return await store.commit(msg("down", 4)) == msg("down", 4)
            except StoreUnavailable:
                return False

        await eventually(commits, timeout=10, interval=0.1, what="commits after the restart")
        await eventually(lambda: store.backlog == 0, timeout=10)
        assert await store.last_seq("down") == 19
        assert [m.seq for m in await store.messages("down")] == [1, 4, *range(10, 20)]
        assert store.stats.errors > 0
    finally:
        await store.close()


async def test_database_hanging_is_a_timeout_then_recovers(private_pg: PostgresServer) -> None:
    store = await migrated(private_pg.dsn(), timeout=1.0, connect_timeout=1.0)
    try:
        await store.commit(msg("hang", 1))
        private_pg.pause()
        t = time.monotonic()
        with pytest.raises(StoreUnavailable, match="no answer within 1s"):
            await store.commit(msg("hang", 2))
        assert time.monotonic() - t < 3
        with pytest.raises(StoreUnavailable):
            await store.messages("hang")
        private_pg.resume()

        async def commits() -> bool:
            try:
                await store.commit(msg("hang", 3))
                return True
            except StoreUnavailable:
                return False

        await eventually(commits, timeout=10, interval=0.1)
        assert (await store.messages("hang"))[0].seq == 1
    finally:
        private_pg.resume()
        await store.close()


async def test_archive_backlog_is_bounded_while_down(private_pg: PostgresServer) -> None:
    store = await migrated(private_pg.dsn(), max_backlog=100, connect_timeout=1.0)
    try:
        private_pg.stop()
        accepted = [store.archive(msg("bl", i)) for i in range(1, 151)]
        assert accepted == [True] * 100 + [False] * 50
        assert store.stats.archive_dropped == 50
        await asyncio.sleep(0.5)  # the writer fails and keeps the batch
        assert store.backlog == 100
        private_pg.start()
        await eventually(lambda: store.backlog == 0, timeout=10)
        assert await store.last_seq("bl") == 100
    finally:
        await store.close()


async def test_start_when_the_database_is_down(private_pg: PostgresServer) -> None:
    dsn = private_pg.dsn()
    await PostgresStore(dsn).migrate()
    private_pg.stop()
    with pytest.raises(StoreUnavailable, match=rf"127\.0\.0\.1:{private_pg.port}/postgres is unavailable \((connecting|starting)\)"):
        await PostgresStore(dsn, connect_timeout=1.0).start()


# ---- reading -------------------------------------------------------------------------------------


async def test_chinese_search_uses_the_trigram_index(store: PostgresStore, postgres_db: str) -> None:
    noise = ["今天的直播太精彩了", "主播加油，送你一个火箭", "客服您好，我想问一下", "hello everyone"]
    msgs = [msg("cs", i, noise[i % 4] + str(i)) for i in range(1, 3001)]
    hits = [msg("cs", 3001, "请问我的订单什么时候发货？"), msg("cs2", 1, "订单发货了吗", ts=T0 + 5000), msg("cs", 3002, "ORDER 订单发货 shipped")]
    await store.commit_many(msgs + hits)
    found = await store.search("订单发货")
    assert [(m.room, m.seq) for m in found] == [("cs2", 1), ("cs", 3002)]  # newest first
    assert [m.seq for m in await store.search("订单什么时候")] == [3001]
    assert [m.seq for m in await store.search("订单发货", room="cs")] == [3002]
    assert [m.seq for m in await store.search("order 订单", limit=5)] == [3002]  # ILIKE: any case
    conn = await asyncpg.connect(postgres_db)
    try:
        await conn.execute("ANALYZE livegate.messages")
        await conn.execute("SET enable_seqscan = off")  # a 3,000-row table would be scanned: look at what the index does
        plan = json.loads(await conn.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM livegate.messages WHERE data ILIKE '%订单发货%'"))[0]["Plan"]
    finally:
        await conn.close()
    assert plan["Node Type"] == "Bitmap Heap Scan", plan
    assert plan["Plans"][0]["Index Name"] == "messages_data_trgm"
    # The index itself told the matches apart: with no trigrams of the Chinese pattern the
    # GIN scan would return every row for the recheck to throw away.
    assert plan.get("Rows Removed by Index Recheck", 0) < 10 and plan["Actual Rows"] == 2, plan


async def test_search_escapes_like_wildcards(store: PostgresStore) -> None:
    await store.commit_many([msg("w", 1, "100% 好评"), msg("w", 2, "1000 好评"), msg("w", 3, "a_b"), msg("w", 4, "axb")])
    assert [m.seq for m in await store.search("100%")] == [1]
    assert [m.seq for m in await store.search("a_b")] == [3]
    with pytest.raises(ValueError, match="at least 3"):
        await store.search("好评")


async def test_paging_and_export(store: PostgresStore) -> None:
    await store.commit_many([msg("pg", i, ts=T0 + i // 3) for i in range(1, 101)]
                            + [msg(f"other{i % 3}", i, sender=f"s{i % 2}", ts=T0 + 10) for i in range(1, 31)])
    assert [m.seq for m in await store.messages("pg", limit=3)] == [98, 99, 100]
    assert [m.seq for m in await store.messages("pg", before_seq=10, limit=3)] == [7, 8, 9]
    assert [m.seq for m in await store.messages("pg", after_seq=10, limit=3)] == [11, 12, 13]
    assert await store.messages("pg", limit=0) == []
    room = [m.seq async for m in store.export(since_ms=T0 + 10, until_ms=T0 + 20, room="pg", batch=4)]
    assert room == list(range(30, 60))  # ts // 3 in [10, 20)
    every = [(m.ts, m.room, m.seq) async for m in store.export(since_ms=T0 + 10, until_ms=T0 + 11, batch=7)]
    assert every == sorted(every) and len(every) == len(set(every)) == 3 + 30  # pg 30..32 and all of other*
    by_sender = [m async for m in store.export(since_ms=0, until_ms=T0 * 2, sender="s1", batch=4)]
    assert len(by_sender) == 15 and {m.sender for m in by_sender} == {"s1"}


# ---- the data's life -------------------------------------------------------------------------


async def test_delete_user_works_in_batches_others_keep_writing(store: PostgresStore, postgres_db: str) -> None:
    await store.commit_many([msg(f"du{i % 10}", i, sender="leaver" if i % 2 else "stayer") for i in range(1, 4001)])
    seen: list[int] = []
    task = asyncio.create_task(store.delete_user("leaver", batch=100))
    while not task.done():
        seen.append(await count(postgres_db, "sender = 'leaver'"))
        await store.commit(msg("du-other", len(seen)))  # writes go on meanwhile
    assert await task == 2000
    assert any(0 < n < 2000 for n in seen), f"no batch was visible on its own: {seen[:20]}"
    assert await count(postgres_db, "sender = 'leaver'") == 0
    assert await count(postgres_db, "sender = 'stayer'") == 2000
    assert await store.delete_user("leaver") == 0


async def test_expire_deletes_one_route_older_than_a_time_in_batches(store: PostgresStore, postgres_db: str) -> None:
    await store.commit_many([msg("ex", i, route="live:*" if i % 2 else "cs:*", ts=T0 + i) for i in range(1, 1001)])
    assert await store.expire("live:*", T0 + 501, batch=100) == 100
    total = 100
    while (n := await store.expire("live:*", T0 + 501, batch=100)) == 100:
        total += n
    assert total + n == 250
    assert await count(postgres_db, "route = 'live:*' AND ts < $1", T0 + 501) == 0
    assert await count(postgres_db, "route = 'live:*'") == 250
    assert await count(postgres_db, "route = 'cs:*'") == 500


# ---- gateway migrate -------------------------------------------------------------------------------


def test_gateway_migrate_cli(postgres_db: str, tmp_path: Path) -> None:
    p = gateway("migrate", "--dsn", postgres_db)
    assert (p.returncode, p.stdout.strip()) == (0, f"schema at version {SCHEMA_VERSION} (was 0)"), p.stderr
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[store]\nkind = "postgres"\ndsn = "{postgres_db}"\n')
    p = gateway("migrate", "-c", str(cfg))
    assert (p.returncode, p.stdout.strip()) == (0, f"schema at version {SCHEMA_VERSION} (was {SCHEMA_VERSION})"), p.stderr
    p = gateway("migrate", env={**ENV, "GATEWAY_STORE__DSN": postgres_db})
    assert (p.returncode, p.stdout.strip()) == (0, f"schema at version {SCHEMA_VERSION} (was {SCHEMA_VERSION})"), p.stderr
    p = gateway("migrate", "--set", f"store.dsn={postgres_db}")
    assert (p.returncode, p.stdout.strip()) == (0, f"schema at version {SCHEMA_VERSION} (was {SCHEMA_VERSION})"), p.stderr


def test_gateway_migrate_cli_unreachable_database(private_pg: PostgresServer) -> None:
    private_pg.stop()
    p = gateway("migrate", "--dsn", private_pg.dsn())
    assert p.returncode == 2 and p.stdout == ""
    assert f"cannot migrate: PostgreSQL at 127.0.0.1:{private_pg.port}/postgres is unavailable (connecting)" in p.stderr
    assert "Traceback" not in p.stderr
    p = gateway("migrate", "--set", "store.kind=postgres")
    assert p.returncode == 2 and "store.dsn" in p.stderr and "Traceback" not in p.stderr
