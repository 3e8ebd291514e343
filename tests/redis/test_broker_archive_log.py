"""The archive log of the Redis broker (:mod:`gateway.broker.redis.archive`) in process,
against a real redis-server, with a fake store: what the publish script logs, that the
consumer writes before it acknowledges, keeps entries while the store fails, takes over
another consumer's entries, and counts what ``MAXLEN`` trimmed unread. (Real gateways,
PostgreSQL and ``kill -9``: tests/integration/test_archive_log.py.)"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from support.redis import RedisServer, command
from support.wait import eventually

from gateway.app.storage import Storage
from gateway.broker import Broker, HistoryPolicy, MemoryBroker
from gateway.broker.redis import RedisBroker
from gateway.broker.redis.archive import ArchiveLog, parse_entry
from gateway.config import BrokerConfig, Config
from gateway.protocol import message_parts
from gateway.routing import RouteConfig, Router
from gateway.store import StoredMessage, StoreUnavailable

pytestmark = pytest.mark.redis

POLICY = HistoryPolicy(size=50, ttl=300.0)


class Sink:
    def deliver_room(self, room: str, payload: bytes, prio: int) -> int:
        return 1

    def deliver_user(self, user: str, payload: bytes, prio: int) -> int:
        return 1

    def apply(self, cmd: Any) -> None:
        pass

    def local_counts(self, room: str) -> tuple[int, int]:
        return (0, 0)


class FakeStore:
    """``write_archive`` of a store: keeps (room, seq) -> message, skips duplicates;
    ``down`` makes it raise StoreUnavailable, ``hang`` makes it never return."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, int], StoredMessage] = {}
        self.calls = 0
        self.duplicates = 0
        self.down = False
        self.hang = False

    async def write_archive(self, msgs: Sequence[StoredMessage]) -> int:
        self.calls += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.down:
            raise StoreUnavailable("the database is down")
        for m in msgs:
            if (m.room, m.seq) in self.rows:
                self.duplicates += 1
            else:
                self.rows[(m.room, m.seq)] = m
        return 0

    def seqs(self, room: str) -> list[int]:
        return sorted(s for r, s in self.rows if r == room)


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ArchiveLog, "check_interval", 0.1)
    monkeypatch.setattr(ArchiveLog, "block", 0.2)
    monkeypatch.setattr(ArchiveLog, "backoff", (0.02, 0.1))
    monkeypatch.setattr(ArchiveLog, "stop_timeout", 1.0)


async def make(url: str, node: str, store: FakeStore | None = None, **cfg: Any) -> RedisBroker:
    b = RedisBroker(BrokerConfig(kind="redis", url=url, **cfg))
    if store is not None:
        b.consume_archive(store.write_archive)
    await b.start(Sink(), node)
    assert b.ready
    return b


async def pub(b: RedisBroker, room: str, i: int, *, cid: str | None = None, idem: str | None = None, recoverable: bool = True,
              archive: bool = True) -> Any:
    head, tail = message_parts(room, "chat", 1, "u1", {"i": i}, 1_700_000_000_000 + i)
    return await b.publish(room, head, tail, 1, recoverable, POLICY, idem, ("live:{id}", cid) if archive else None)


def xlen(srv: RedisServer, key: str) -> int:
    return int(command(srv.port, "XLEN", key).strip() or 0)


def backlog(srv: RedisServer, keys: list[str]) -> int:
    """Entries of the group not acknowledged yet: pending (read) + lag (not read)."""
    total = 0
    for key in keys:
        info = command(srv.port, "XINFO", "GROUPS", key).split()
        total += int(info[info.index("pending") + 1]) + int(info[info.index("lag") + 1])
    return total


def test_which_brokers_take_archive_messages_into_a_log(tmp_path: Any) -> None:
    def storage(broker: Broker, routes: list[RouteConfig]) -> Storage:
        cfg = Config()
        cfg.routes = routes
        cfg.store.path = str(tmp_path / "store.db")
        return Storage(cfg, Router(routes), broker)

    archive = [RouteConfig(pattern="arch:{id}", store="archive")]
    assert storage(RedisBroker(BrokerConfig(kind="redis")), archive).log_archive
    assert not storage(MemoryBroker(), archive).log_archive  # today's write-behind from memory
    assert not storage(RedisBroker(BrokerConfig(kind="redis", archive_streams=0)), archive).log_archive
    assert not storage(RedisBroker(BrokerConfig(kind="redis", cluster=True)), archive).log_archive
    assert not storage(RedisBroker(BrokerConfig(kind="redis")), [RouteConfig(pattern="live:{id}")]).log_archive  # no store


def test_entries_that_publish_lua_did_not_write_are_malformed() -> None:
    head, tail = message_parts("r", "gift", 2, None, {"t": "多谢", "n": 1.25, "l": [1, None]}, 5)
    frame = head + b'7,"epoch":"e"' + tail
    m = parse_entry({b"f": frame, b"r": b"live:{id}", b"c": b"api:k1"})
    assert m == StoredMessage("r", 7, 5, "gift", 2, None, orjson.dumps({"t": "多谢", "n": 1.25, "l": [1, None]}), "api:k1", "live:{id}")
    assert m is not None and m.frame("e") == frame  # the published frame, rebuilt from the store
    assert parse_entry({b"f": frame, b"r": b"live:{id}"}) == StoredMessage("r", 7, 5, "gift", 2, None, m.data, None, "live:{id}")
    for bad in (
        {b"r": b"x"}, {b"f": frame}, {b"f": b"not json", b"r": b"x"}, {b"f": b"[1]", b"r": b"x"},
        {b"f": frame.replace(b'"seq":7', b'"seq":0'), b"r": b"x"}, {b"f": frame.replace(b'"seq":7', b'"seq":"7"'), b"r": b"x"},
        {b"f": frame.replace(b'"op":"msg"', b'"op":"presence"'), b"r": b"x"}, {b"f": frame, b"r": b"\xff"},
        {b"f": frame.replace(b'"from":null', b'"from":3'), b"r": b"x"}, {b"f": b'{"op":"msg"}', b"r": b"x"},
    ):
        assert parse_entry(bad) is None, bad


async def test_the_publish_logs_recoverable_marked_messages_once(redis_server: RedisServer) -> None:
    b = await make(redis_server.url, "A", archive_streams=2)  # no consumer: the entries stay
    try:
        room = "live:logged"
        key = f"gw:{{archive}}:{zlib.crc32(room.encode()) % 2}"
        r1 = await pub(b, room, 1, cid="c1", idem="u1:c1")
        assert (await pub(b, room, 1, cid="c1", idem="u1:c1")).duplicate  # a retry: not logged again
        await pub(b, room, 2)
        await pub(b, room, 3, recoverable=False)  # no seq: nothing to store
        await pub(b, room, 4, archive=False)  # not marked
        assert xlen(redis_server, key) == 2 and xlen(redis_server, key.replace(key[-1], str(1 - int(key[-1])))) == 0
        raw = command(redis_server.port, "XRANGE", key, "-", "+").splitlines()
        first = raw[raw.index("f") + 1]
        assert orjson.loads(first)["seq"] == r1.seq == 1 and orjson.loads(first)["epoch"] == r1.epoch
        assert raw[raw.index("r") + 1] == "live:{id}" and raw[raw.index("c") + 1] == "c1"
        assert raw.count("c") == 1  # the second message has no cid
        assert not b.archive_log  # the broker logs without consuming on a node without a store
    finally:
        await b.close()


async def test_written_then_acknowledged_and_kept_in_redis_while_the_store_is_down(redis_server: RedisServer) -> None:
    store = FakeStore()
    b = await make(redis_server.url, "A", store, archive_streams=3)
    keys = [f"gw:{{archive}}:{i}" for i in range(3)]
    try:
        await asyncio.gather(*(pub(b, f"live:{i % 5}", i) for i in range(60)))
        await eventually(lambda: len(store.rows) == 60, what="60 written")
        assert b.archive_log is not None and b.archive_log.stats.written == 60
        await eventually(lambda: backlog(redis_server, keys) == 0, what="all acknowledged")
        store.down = True
        calls = store.calls
        await asyncio.gather(*(pub(b, f"live:{i % 5}", i) for i in range(60, 90)))
        await eventually(lambda: store.calls >= calls + 3, what="retries of the failing write")
        assert len(store.rows) == 60 and backlog(redis_server, keys) == 30  # nothing lost, nothing acked
        st = b.archive_log.stats
        await eventually(lambda: st.lag + st.pending == 30, what="the metrics show the backlog")
        assert st.errors["store"] >= 3
        store.down = False
        await eventually(lambda: len(store.rows) == 90, what="the backlog written once the store is back")
        assert store.duplicates == 0 and st.written == 90 and st.claimed == 0
        for r in range(5):
            assert store.seqs(f"live:{r}") == list(range(1, 19)), "every seq of every room, once"
        await eventually(lambda: backlog(redis_server, keys) == 0 and st.pending == 0 and st.lag == 0, what="acknowledged")
        # Acknowledged entries are trimmed (whole blocks of 100: these streams hold fewer)
        assert sum(xlen(redis_server, k) for k in keys) <= 90
    finally:
        await b.close()


async def test_a_stuck_consumers_entries_are_taken_over_and_written_once(redis_server: RedisServer) -> None:
    stuck, healthy = FakeStore(), FakeStore()
    stuck.hang = True
    a = await make(redis_server.url, "A", stuck, archive_streams=1, archive_claim_after=0.5)
    try:
        await asyncio.gather(*(pub(a, "live:x", i) for i in range(40)))
        await eventually(lambda: stuck.calls == 1, what="A holding a batch it cannot write")
        b = await make(redis_server.url, "B", healthy, archive_streams=1, archive_claim_after=0.5)
        try:
            await eventually(lambda: healthy.seqs("live:x") == list(range(1, 41)), timeout=10, what="B wrote all 40")
            assert b.archive_log is not None and b.archive_log.stats.claimed >= 1
            assert healthy.duplicates == 0 and not stuck.rows
            await eventually(lambda: backlog(redis_server, ["gw:{archive}:0"]) == 0, what="all acknowledged")
        finally:
            await b.close()
    finally:
        await a.close()  # gives up the hung write after stop_timeout


async def test_a_graceful_stop_writes_the_batch_in_hand(redis_server: RedisServer) -> None:
    store = FakeStore()
    gate, reading = asyncio.Event(), asyncio.Event()
    real = store.write_archive

    async def slow(msgs: Sequence[StoredMessage]) -> int:
        reading.set()
        await gate.wait()
        return await real(msgs)

    # All ten are in the log before the consumer starts: its first read takes them all.
    publisher = await make(redis_server.url, "P", archive_streams=1)
    await asyncio.gather(*(pub(publisher, "live:s", i) for i in range(10)))
    await publisher.close()
    b = RedisBroker(BrokerConfig(kind="redis", url=redis_server.url, archive_streams=1))
    b.consume_archive(slow)
    await b.start(Sink(), "A")
    await asyncio.wait_for(reading.wait(), 10)  # read, waiting for the store
    closing = asyncio.ensure_future(b.close())
    await asyncio.sleep(0.1)
    assert not closing.done()
    gate.set()
    await asyncio.wait_for(closing, 5)
    assert len(store.rows) == 10
    assert backlog(redis_server, ["gw:{archive}:0"]) == 0, "written and acknowledged before the stop"


async def test_entries_trimmed_before_they_were_read_are_counted_as_lost(redis_server: RedisServer) -> None:
    store = FakeStore()
    store.down = True
    b = await make(redis_server.url, "A", store, archive_streams=1, archive_maxlen=100)
    try:
        for i in range(600):  # one at a time: the consumer holds its first read, the rest piles up
            await pub(b, "live:t", i)
        await eventually(lambda: xlen(redis_server, "gw:{archive}:0") < 600, what="MAXLEN trimmed")
        store.down = False
        assert b.archive_log is not None
        st = b.archive_log.stats
        await eventually(lambda: st.lost["trimmed_unread"] > 0 and st.lag == 0 and st.pending == 0, what="written what was left")
        assert st.written + st.lost["trimmed_unread"] + st.lost["trimmed_pending"] == 600, (st, len(store.rows))
        assert len(store.rows) == st.written
        assert store.seqs("live:t")[-100:] == list(range(501, 601)), "the newest entries were kept"
        # A lost entry is counted once: later upkeep rounds find nothing more.
        lost = st.lost["trimmed_unread"]
        await asyncio.sleep(0.5)
        assert st.lost["trimmed_unread"] == lost
    finally:
        await b.close()


async def test_malformed_entries_are_acknowledged_and_counted(redis_server: RedisServer) -> None:
    store = FakeStore()
    b = await make(redis_server.url, "A", store, archive_streams=1)
    try:
        await pub(b, "live:m", 1)
        await eventually(lambda: len(store.rows) == 1)
        command(redis_server.port, "XADD", "gw:{archive}:0", "*", "f", "garbage", "r", "x")
        command(redis_server.port, "XADD", "gw:{archive}:0", "*", "nothing", "here")
        await pub(b, "live:m", 2)
        await eventually(lambda: len(store.rows) == 2)
        assert b.archive_log is not None
        assert b.archive_log.stats.lost["malformed"] == 2
        await eventually(lambda: backlog(redis_server, ["gw:{archive}:0"]) == 0)
    finally:
        await b.close()


async def test_the_log_survives_a_flushall(redis_server: RedisServer) -> None:
    store = FakeStore()
    b = await make(redis_server.url, "A", store, archive_streams=2)
    try:
        await pub(b, "live:f", 1)
        await eventually(lambda: len(store.rows) == 1)
        command(redis_server.port, "FLUSHALL")  # the streams and the group are gone
        await asyncio.sleep(0.3)
        for i in range(2, 12):
            await pub(b, "live:f2", i)
        await eventually(lambda: len(store.rows) == 11, what="written after the group was created again")
    finally:
        await b.close()
