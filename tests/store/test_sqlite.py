"""SqliteStore beyond the contract: the file (WAL, kill -9, crashes, a removed file, a full
disk, another process holding the lock), the writer's chunked deletions, deferred
full-text indexing, batched export reads, and an event loop that never waits.

Processes that must die mid-flight are real subprocesses (``python -c`` on a script), killed
with SIGKILL."""

# ruff: noqa: RUF001 (Chinese text with its own punctuation)
from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from support.wait import eventually

import gateway
from gateway.store import SchemaError, StoredMessage, StoreUnavailable
from gateway.store.base import SCHEMA_VERSION
from gateway.store.sqlite import MAINTENANCE_INTERVAL, MIGRATIONS, SqliteStore

T0 = 1_700_000_000_000
PYTHONPATH = str(Path(gateway.__file__).resolve().parents[1])


def msg(room: str, seq: int, *, sender: str | None = "u1", cid: str | None = None, ts: int | None = None, data: object = None,
        route: str = "cs:*") -> StoredMessage:
    body = orjson.dumps(data if data is not None else {"text": f"hello {room} {seq}"})
    return StoredMessage(room, seq, ts if ts is not None else T0 + seq, "chat", 1, sender, body, cid, route)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dirs" / "store.db"


@pytest.fixture
async def opened() -> AsyncIterator[list[SqliteStore]]:
    stores: list[SqliteStore] = []
    yield stores
    for s in reversed(stores):
        await s.close()


async def start(path: Path, opened: list[SqliteStore], **options: object) -> SqliteStore:
    s = SqliteStore(str(path), **options)  # type: ignore[arg-type]
    await s.start()
    opened.append(s)
    return s


def query(path: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def fts_caught_up(path: Path) -> bool:
    (hi,), (mark,) = query(path, "SELECT seq FROM sqlite_sequence WHERE name = 'messages'")[0], query(path, "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'fts_indexed'")[0]
    return hi == mark


def run_script(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


# --------------------------------------------------------------------------- the file

async def test_one_file_in_wal_mode_with_its_parent_directories(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened, synchronous="full")
    assert path.exists()
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    assert s.synchronous == "FULL"
    tables = {r[0] for r in query(path, "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
    assert {"meta", "messages", "messages_fts", "rooms", "room_members"} <= tables
    meta: dict[str, str] = {str(k): str(v) for k, v in query(path, "SELECT key, value FROM meta")}
    assert meta["schema_version"] == str(SCHEMA_VERSION) and meta["epoch"] == s.epoch and meta["clean_close"] == "0"
    assert abs(int(meta["created_at"]) - time.time() * 1000) < 60_000
    with pytest.raises(ValueError):
        SqliteStore(str(path), synchronous="sometimes")


async def test_a_file_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    query(other, "CREATE TABLE t (x)")
    with pytest.raises(SchemaError, match="not a livegate store"):
        await SqliteStore(str(other)).start()
    with pytest.raises(SchemaError, match="not a livegate store"):
        await SqliteStore(str(other)).migrate()


async def test_a_version_1_file_is_refused_until_migrated_and_keeps_its_messages(tmp_path: Path, opened: list[SqliteStore]) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for sql in MIGRATIONS[0][1]:
        conn.execute(sql)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO messages (room, seq, ts, type, prio, sender, data) VALUES ('r', 1, 1, 'chat', 1, 'u', '{}')")
    conn.close()
    with pytest.raises(SchemaError, match=rf"schema version 1, this gateway needs {SCHEMA_VERSION}: run `gateway migrate`"):
        await SqliteStore(str(path)).start()
    assert await SqliteStore(str(path)).migrate() == (1, SCHEMA_VERSION)
    s = await start(path, opened)
    assert [m.seq for m in await s.messages("r")] == [1]
    assert await s.delete_user("u") == 1 and await s.last_seq("r") == 1


COMMITTER = """
    import asyncio, sys
    from gateway.store import StoredMessage
    from gateway.store.sqlite import SqliteStore

    async def main():
        s = SqliteStore(sys.argv[1])
        await s.start()
        print("epoch", s.epoch, flush=True)
        if sys.argv[2] == "close":
            await s.close()
            return

        async def committer(room):
            seq = 0
            while True:
                seq += 1
                await s.commit(StoredMessage(room, seq, 1, "chat", 1, "u", b'{"text":"durable"}', None, "cs:*"))
                print(room, seq, flush=True)

        await asyncio.gather(*(committer(f"cs:{k}") for k in range(32)))

    asyncio.run(main())
"""


def committed_then_killed(path: Path, lines: int) -> tuple[str, list[tuple[str, int]]]:
    """Run COMMITTER, SIGKILL it after ``lines`` acknowledged commits; returns its epoch
    and every (room, seq) it had acknowledged."""
    p = run_script(COMMITTER, str(path), "commit")
    assert p.stdout is not None
    acked: list[tuple[str, int]] = []
    try:
        epoch = p.stdout.readline().split()[1]
        while len(acked) < lines:
            line = p.stdout.readline()
            assert line, p.stderr.read() if p.stderr else ""
            room, seq = line.split()
            acked.append((room, int(seq)))
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        p.stdout.close()
        if p.stderr:
            p.stderr.close()
    return epoch, acked


async def test_kill_9_right_after_commits_returned_loses_none_of_them(path: Path, opened: list[SqliteStore]) -> None:
    _, acked = await asyncio.to_thread(committed_then_killed, path, 3000)
    s = await start(path, opened)
    stored = {(m.room, m.seq) for k in range(32) for m in await s.messages(f"cs:{k}", limit=100_000)}
    assert set(acked) <= stored, sorted(set(acked) - stored)[:10]


async def test_epoch_after_a_clean_exit_and_after_kill_9(path: Path, opened: list[SqliteStore]) -> None:
    p = run_script(COMMITTER, str(path), "close")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    first = out.split()[1]
    p = run_script(COMMITTER, str(path), "close")
    assert p.communicate(timeout=60)[0].split()[1] == first  # closed cleanly: same epoch
    killed, _ = await asyncio.to_thread(committed_then_killed, path, 10)
    assert killed == first
    s = await start(path, opened)
    assert s.epoch != first  # after the crash: a new one
    assert query(path, "SELECT value FROM meta WHERE key = 'epoch'") == [(s.epoch,)]


async def test_close_that_times_out_leaves_the_next_start_a_new_epoch(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened, busy_timeout=0.2)
    epoch = s.epoch
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        assert all(s.archive(msg("r", i)) for i in range(1, 11))
        await s.close(timeout=0.3)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert s.stats.archive_dropped == 10 and s.stats.errors >= 1
    again = await start(path, opened)
    assert again.epoch != epoch
    assert await again.last_seq("r") == 0


# --------------------------------------------------------------------------- failures

async def test_another_process_holding_the_lock_fails_commits_then_they_work_again(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened, busy_timeout=0.3)
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        t = time.perf_counter()
        with pytest.raises(StoreUnavailable, match="locked"):
            await s.commit(msg("r", 1, cid="a"))
        assert 0.25 < time.perf_counter() - t < 2.0
        assert s.stats.errors == 1
        assert await s.last_seq("r") == 0  # reads go on
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert (await s.commit(msg("r", 1, cid="a"))).seq == 1


async def test_archive_batches_that_fail_are_retried_and_kept(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened, busy_timeout=0.1)
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        assert all(s.archive(msg("r", i)) for i in range(1, 51))
        await eventually(lambda: s.stats.errors >= 3, what="three failed attempts (with backoff)")
        assert s.backlog == 50 and s.stats.archived == 0
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await eventually(lambda: s.stats.archived == 50, what="the retry")
    assert s.backlog == 0 and s.stats.archive_dropped == 0
    assert [m.seq for m in await s.messages("r", after_seq=0)] == list(range(1, 51))


async def test_a_removed_file_makes_commits_fail(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened)
    await s.commit(msg("r", 1))
    os.remove(path)

    async def refused() -> bool:
        try:
            await s.commit(msg("r", 2, cid=str(time.monotonic())))
        except StoreUnavailable as e:
            return "removed" in str(e)
        return False

    await eventually(refused, timeout=10 * MAINTENANCE_INTERVAL + 2, what="a commit refused")
    assert s.archive(msg("r", 3))  # queued; never written to the removed file
    await asyncio.sleep(0.2)
    assert s.backlog == 1


DISK_FULL = """
    import asyncio, resource, signal, sys
    from gateway.store import StoredMessage, StoreUnavailable
    from gateway.store.sqlite import SqliteStore

    async def main():
        s = SqliteStore(sys.argv[1])
        await s.start()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
        seq = 0
        try:
            while True:
                seq += 1
                await s.commit(StoredMessage("r", seq, 1, "chat", 1, "u", b'{"text":"' + b"x" * 2000 + b'"}', None, "cs:*"))
        except StoreUnavailable as e:
            print("unavailable", seq, e, flush=True)
        await s.close(timeout=0.5)

    asyncio.run(main())
"""


def test_a_full_disk_fails_commits_with_store_unavailable(path: Path) -> None:
    p = run_script(DISK_FULL, str(path))
    out, err = p.communicate(timeout=100)
    assert p.returncode == 0, err
    word, seq, *_ = out.split()
    assert word == "unavailable" and int(seq) > 10, out
    assert "full" in out or "disk" in out or "I/O" in out, out


async def test_malformed_messages(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened)
    bad = StoredMessage("r", 1, T0, "chat", 1, "u", b"\xff\xfe", None, "")
    assert s.archive(bad) is False and s.stats.archive_dropped == 1
    with pytest.raises(ValueError):
        await s.commit(bad)
    # a message the database refuses in a batch does not take the batch down with it
    worse = StoredMessage("r", 2, T0, "chat", 1, "\ud800", b"{}", None, "")  # a lone surrogate: cannot be encoded
    assert s.archive(msg("r", 3)) and s.archive(worse) and s.archive(msg("r", 4))
    await eventually(lambda: s.backlog == 0)
    assert [m.seq for m in await s.messages("r")] == [3, 4]
    await eventually(lambda: s.stats.archive_dropped == 2)
    results = await asyncio.gather(s.commit(msg("r", 5)), s.commit(worse), s.commit(msg("r", 6)), return_exceptions=True)
    assert results[0] == msg("r", 5) and results[2] == msg("r", 6)
    assert isinstance(results[1], ValueError) and "refused" in str(results[1])


async def test_a_commit_that_collides_with_an_archived_message_gets_the_stored_one(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened)
    archived = msg("r", 1, data={"v": "archived first"})
    assert s.archive(archived)  # queued before the commit: written first (same batch or an earlier one)
    assert await s.commit(msg("r", 1, data={"v": "committed"}, cid="k")) == archived
    assert s.stats.archived == 1 and s.stats.committed == 0 and s.stats.duplicates == 1


# --------------------------------------------------------------------------- threads and chunks

async def test_the_event_loop_never_waits_for_the_database(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened, busy_timeout=1.0)
    await s.commit_many([msg("r", i) for i in range(1, 101)])
    gaps: list[float] = []
    stop = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")  # the writer now waits up to 1 s for every write
        pending = [asyncio.create_task(s.commit(msg("r", i))) for i in range(101, 301)]
        for i in range(301, 1301):
            s.archive(msg("r", i))
        assert len(await s.messages("r", limit=100)) == 100
        await asyncio.wait(pending, timeout=1.5)
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    await asyncio.gather(*pending, return_exceptions=True)
    stop = True
    await tick
    assert max(gaps) < 0.1, f"the loop stalled for {max(gaps) * 1000:.0f} ms"


async def test_delete_user_runs_in_chunks_while_commits_go_on(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened)
    for i in range(1, 20_001):
        assert s.archive(msg(f"cs:{i % 50}", i, sender="leaver", data={"text": f"个人信息 {i}"}))
    await eventually(lambda: s.backlog == 0, timeout=60)
    await eventually(lambda: fts_caught_up(path), timeout=60, what="the full-text index")  # deletes then reach the index too
    deleting = asyncio.create_task(s.delete_user("leaver"))
    await asyncio.sleep(0.01)
    t = time.perf_counter()
    assert (await s.commit(msg("other", 1, sender="stays"))).seq == 1
    commit_took = time.perf_counter() - t
    assert not deleting.done(), "20,000 deletions took less than a commit: no interleaving to see"
    assert await deleting == 20_000
    assert commit_took < 0.2
    assert query(path, "SELECT count(*) FROM messages") == [(1,)]
    assert await s.search("个人信息") == []
    assert query(path, "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH '个人信'") == [(0,)]  # gone from the index too
    query(path, "INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")  # raises if the index is off


async def test_expire_takes_the_oldest_first(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened)
    await s.commit_many([msg("live:1", i, route="live:*", ts=T0 + 1000 - i) for i in range(1, 11)])
    assert await s.expire("live:*", T0 + 2000, batch=3) == 3
    assert [m.seq for m in await s.messages("live:1")] == list(range(1, 8))  # the three oldest (highest seqs) went


async def test_export_reads_in_batches(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened)
    await s.commit_many([msg("r", i) for i in range(1, 11)])
    seen = []
    async for m in s.export(since_ms=0, until_ms=2 * T0, room="r", batch=4):
        seen.append(m.seq)
        if m.seq == 1:  # written after the first batch was read: the next batches see it
            await s.commit(msg("r", 11))
    assert seen == list(range(1, 12))


# --------------------------------------------------------------------------- search

def insert_behind_the_store(path: Path, msgs: list[StoredMessage]) -> None:
    """Rows written by another connection: the store's writer has not seen them, so it
    does not index them until it writes rows of its own."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.executemany("INSERT INTO messages (room, seq, ts, type, prio, sender, data, cid, route) VALUES (?,?,?,?,?,?,?,?,?)",
                         [(m.room, m.seq, m.ts, m.type, m.prio, m.sender, m.data.decode(), m.cid, m.route) for m in msgs])
    finally:
        conn.close()


async def test_search_before_and_after_indexing(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened)
    texts = ["您的订单已发货", "订单已取消", 'He said "Order SHIPPED" \\o/', "物流信息：已发货，预计明天到"]
    insert_behind_the_store(path, [msg("cs:1", i + 1, data={"text": t}) for i, t in enumerate(texts)])

    async def check() -> None:
        assert [m.seq for m in await s.search("已发货")] == [4, 1]
        assert [m.seq for m in await s.search("订单已")] == [2, 1]
        assert [m.seq for m in await s.search("order shipped")] == [3]  # ASCII case folded
        assert [m.seq for m in await s.search('"Order SHIPPED"')] == [3]  # quotes as they are in the JSON
        assert [m.seq for m in await s.search("\\o/")] == [3]
        assert await s.search("已发货了") == []
        assert [m.seq for m in await s.search("发货", room="cs:1")] == [4, 1]  # short: a scan of the room
        with pytest.raises(ValueError, match="3 characters"):
            await s.search("发货")
        assert await s.search("已发货", room="cs:2") == []

    assert query(path, "SELECT value FROM meta WHERE key = 'fts_indexed'") == [("0",)]
    await check()  # nothing indexed: found by the scan above the watermark
    await s.commit(msg("cs:9", 1))  # the writer now knows of the rows and indexes them
    await eventually(lambda: fts_caught_up(path), what="the full-text index")
    assert query(path, "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH '已发货'") == [(2,)]
    await check()  # through the index
    await s.delete_user("u1")
    assert await s.search("已发货") == []
    assert query(path, "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH '已发货'") == [(0,)]
    query(path, "INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")


async def test_search_uses_the_index_and_the_unindexed_tail_together(path: Path, opened: list[SqliteStore]) -> None:
    s = await start(path, opened)
    await s.commit_many([msg("cs:1", i, data={"text": f"第{i}单已发货"}) for i in range(1, 51)])
    await eventually(lambda: fts_caught_up(path), what="the full-text index")
    insert_behind_the_store(path, [msg("cs:1", i, data={"text": f"第{i}单已发货"}) for i in range(51, 61)])
    assert not fts_caught_up(path)
    found = await s.search("单已发货", limit=100)
    assert [m.seq for m in found] == list(range(60, 0, -1))
    assert [m.seq for m in await s.search("单已发货", limit=15)] == list(range(60, 45, -1))
    assert [m.seq for m in await s.search("单已发货", limit=5)] == list(range(60, 55, -1))


async def test_processes_opening_one_new_file_at_once_all_start(tmp_path: Path) -> None:
    """The workers of server.workers open the same new file together: one creates the
    schema (every version in one transaction), the others wait and find it done; none
    sees a version in between nor fails on the lock."""
    path = tmp_path / "shared.db"
    code = """
        import asyncio, sys
        from gateway.store.sqlite import SqliteStore
        async def main():
            s = SqliteStore(sys.argv[1])
            await s.start()
            await s.close()
            print("ok", flush=True)
        asyncio.run(main())
    """
    # The file exists, empty, and another connection holds its write lock while they
    # start: SQLite answers "locked" at once to a switch to WAL; they must wait it out.
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    procs = [run_script(code, str(path)) for _ in range(4)]
    await asyncio.sleep(0.8)  # they are up and blocked (nothing to observe from here)
    assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
    holder.execute("ROLLBACK")
    holder.close()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert all(o.strip() == "ok" for o, _ in outs), outs
    assert query(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
