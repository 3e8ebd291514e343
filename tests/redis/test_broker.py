"""RedisBroker against a real redis-server, in process: contracts of every Broker method,
one publish per room message, batching, ordering, failure and recovery, Redis Cluster."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from gateway.broker import BrokerError, HistoryPolicy
from gateway.broker.redis import RedisBroker
from gateway.config import BrokerConfig
from gateway.protocol import message_parts
from gwredis import RedisServer, await_until, command, commandstats, free_port, port_is_free

pytestmark = pytest.mark.redis

POLICY = HistoryPolicy(size=50, ttl=300.0)


class Sink:
    """A BrokerHandler recording what it is asked to deliver."""

    def __init__(self) -> None:
        self.room: list[tuple[str, bytes, int]] = []
        self.user: list[tuple[str, bytes, int]] = []
        self.ctl: list[tuple[str, dict[str, Any]]] = []

    def deliver_room(self, room: str, payload: bytes, prio: int) -> int:
        self.room.append((room, payload, prio))
        return 1

    def deliver_user(self, user: str, payload: bytes, prio: int) -> int:
        self.user.append((user, payload, prio))
        return 1

    def control(self, kind: str, data: dict[str, Any]) -> None:
        self.ctl.append((kind, data))

    def seqs(self, room: str) -> list[int]:
        return [orjson.loads(p)["seq"] for r, p, _ in self.room if r == room and p.startswith(b'{"op":"msg"')]


async def make(url: str, node: str, **cfg: Any) -> tuple[RedisBroker, Sink]:
    b = RedisBroker(BrokerConfig(kind="redis", url=url, **cfg))
    s = Sink()
    await b.start(s, node)
    assert b.ready
    return b, s


def parts(room: str, text: str, mtype: str = "chat") -> tuple[bytes, bytes]:
    return message_parts(room, mtype, 1, "u1", {"text": text}, 1)


async def pub(b: RedisBroker, room: str, text: str, recoverable: bool = True, policy: HistoryPolicy = POLICY) -> Any:
    head, tail = parts(room, text)
    return await b.publish(room, head, tail, 1, recoverable, policy)


@pytest.fixture
async def pair(redis_server: RedisServer) -> Any:
    a, sa = await make(redis_server.url, "A")
    b, sb = await make(redis_server.url, "B")
    yield a, sa, b, sb
    await a.close()
    await b.close()


async def test_publish_assigns_seq_and_keeps_history(pair: Any) -> None:
    a, sa, b, _ = pair
    r1 = await pub(a, "live:1", "one")
    r2 = await pub(b, "live:1", "two")
    assert (r1.seq, r2.seq) == (1, 2) and r1.epoch == r2.epoch and len(r1.epoch) == 8
    # Local delivery of the publisher: the exact frame, with seq and epoch spliced in.
    frame = orjson.loads(sa.room[0][1])
    assert frame == {"op": "msg", "room": "live:1", "seq": 1, "epoch": r1.epoch, "type": "chat", "prio": 1, "from": "u1", "data": {"text": "one"}, "ts": 1}
    h = await b.history("live:1", limit=10)
    assert [orjson.loads(m)["seq"] for m in h.messages] == [1, 2] and h.seq == 2 and h.epoch == r1.epoch and h.recovered is None
    assert h.messages[0] == sa.room[0][1]
    h = await a.history("live:1", limit=1)
    assert [orjson.loads(m)["data"]["text"] for m in h.messages] == ["two"]
    assert (await a.history("live:1", limit=0)).messages == []
    empty = await a.history("live:none", limit=10)
    assert (empty.messages, empty.seq, empty.epoch, empty.recovered) == ([], 0, "", None)


async def test_non_recoverable_messages_have_seq_0_and_no_history(pair: Any) -> None:
    a, sa, _, _ = pair
    await pub(a, "live:2", "chat")
    r = await pub(a, "live:2", "like", recoverable=False)
    assert r.seq == 0 and r.epoch  # the room's epoch, no seq
    assert orjson.loads(sa.room[-1][1])["seq"] == 0
    h = await a.history("live:2", limit=10)
    assert len(h.messages) == 1 and h.seq == 1
    r = await pub(a, "live:2b", "x", policy=HistoryPolicy(size=0, ttl=10))
    assert r.seq == 0


async def test_resume_contract(pair: Any) -> None:
    a, _, b, _ = pair
    small = HistoryPolicy(size=5, ttl=300)
    for i in range(1, 9):
        res = await pub(a, "small:1", f"m{i}", policy=small)
    ep = res.epoch
    h = await b.history("small:1", limit=50, since=5, epoch=ep)
    assert h.recovered is True and [orjson.loads(m)["seq"] for m in h.messages] == [6, 7, 8]
    h = await b.history("small:1", limit=50, since=8, epoch=ep)
    assert h.recovered is True and h.messages == [] and h.seq == 8
    # 3..8 kept? no: size 5 keeps 4..8, so resuming after 2 misses 3
    h = await b.history("small:1", limit=50, since=2, epoch=ep)
    assert h.recovered is False
    h = await b.history("small:1", limit=50, since=3, epoch=ep)
    assert h.recovered is True and len(h.messages) == 5
    h = await b.history("small:1", limit=2, since=3, epoch=ep)
    assert h.recovered is False and [orjson.loads(m)["seq"] for m in h.messages] == [7, 8]
    for bad in ((5, "other"), (9, ep), (-1, ep)):
        h = await b.history("small:1", limit=50, since=bad[0], epoch=bad[1])
        assert h.recovered is False and h.messages == [] and h.epoch == ep
    # A room that never had history: only a client that saw nothing is complete.
    assert (await b.history("live:never", limit=5, since=0, epoch="")).recovered is True
    assert (await b.history("live:never", limit=5, since=3, epoch="x")).recovered is False


async def test_epoch_changes_when_history_is_lost(pair: Any, redis_server: RedisServer) -> None:
    a, _, b, _ = pair
    r = await pub(a, "live:3", "before")
    command(redis_server.port, "FLUSHALL")
    r2 = await pub(a, "live:3", "after")
    assert r2.seq == 1 and r2.epoch != r.epoch
    h = await b.history("live:3", limit=10, since=r.seq, epoch=r.epoch)
    assert h.recovered is False and h.epoch == r2.epoch


async def test_cross_node_delivery_exactly_once_in_order(pair: Any) -> None:
    a, sa, b, sb = pair
    await a.subscribe("live:4")
    await b.subscribe("live:4")

    async def burst(x: RedisBroker, tag: str) -> None:
        for i in range(50):
            await pub(x, "live:4", f"{tag}{i}")

    await asyncio.gather(burst(a, "a"), burst(b, "b"))
    await await_until(lambda: len(sa.room) >= 100 and len(sb.room) >= 100, 5, what="100 messages on each node")
    await asyncio.sleep(0.2)
    for s in (sa, sb):
        assert s.seqs("live:4") == list(range(1, 101)), "each node delivers every message once, in seq order"


async def test_one_publish_per_message_whatever_the_subscribers(redis_server: RedisServer) -> None:
    brokers = [await make(redis_server.url, f"N{i}") for i in range(4)]
    try:
        for x, _ in brokers:
            await x.subscribe("live:5")
        await pub(brokers[0][0], "live:5", "warm-up")
        before = commandstats(redis_server.port)
        for i in range(100):
            await pub(brokers[0][0], "live:5", str(i))
        after = commandstats(redis_server.port)
        assert after.get("publish", 0) - before.get("publish", 0) == 100
        assert after.get("evalsha", 0) - before.get("evalsha", 0) == 100, "one round trip per message"
        await await_until(lambda: all(len(s.room) == 101 for _, s in brokers), 5, what="fan-out to 4 nodes")
    finally:
        for x, _ in brokers:
            await x.close()


async def test_subscribe_is_batched_and_confirmed(pair: Any, redis_server: RedisServer) -> None:
    a, sa, b, _ = pair
    before = commandstats(redis_server.port).get("subscribe", 0)
    rooms = [f"live:b{i}" for i in range(300)]
    await asyncio.gather(*(a.subscribe(r) for r in rooms))
    calls = commandstats(redis_server.port).get("subscribe", 0) - before
    assert 1 <= calls <= 3, f"300 subscriptions took {calls} SUBSCRIBE commands"
    # Confirmed on return: a message published right now is received.
    numsub = command(redis_server.port, "PUBSUB", "NUMSUB", "gw:{live:b7}:m").split()
    assert numsub[-1] == "1"
    await pub(b, "live:b7", "hello")
    await await_until(lambda: sa.seqs("live:b7") == [1], 3, what="delivery after subscribe")
    # Unsubscribe (batched too): no more deliveries.
    await asyncio.gather(*(a.unsubscribe(r) for r in rooms))
    await await_until(lambda: command(redis_server.port, "PUBSUB", "NUMSUB", "gw:{live:b7}:m").split()[-1] == "0", 3, what="unsubscribe")
    n = len(sa.room)
    await pub(b, "live:b7", "gone")
    await asyncio.sleep(0.2)
    assert len(sa.room) == n
    # Churn within the batch window nets out to nothing.
    before = commandstats(redis_server.port)
    await a.subscribe("live:c1")
    await a.unsubscribe("live:c1")
    await a.subscribe("live:c1")
    assert commandstats(redis_server.port).get("subscribe", 0) - before.get("subscribe", 0) == 1


async def test_presence_is_summed_and_expires(redis_server: RedisServer) -> None:
    a, _ = await make(redis_server.url, "A", presence_ttl=1.0)
    b, _ = await make(redis_server.url, "B", presence_ttl=1.0)
    a.presence_cache = b.presence_cache = 0.1
    try:
        await a.report_presence({"live:p": (2, 2), "live:q": (1, 1)})
        await b.report_presence({"live:p": (3, 1)})
        assert await b.presence("live:p") == (5, 3)
        await asyncio.sleep(a.presence_cache)
        assert await a.presence("live:p") == (5, 3)
        assert await a.presence("live:q") == (1, 1)
        # A leaves live:q (not reported any more): its count is removed at once.
        await a.report_presence({"live:p": (2, 2)})
        await asyncio.sleep(a.presence_cache)
        assert await b.presence("live:q") == (0, 0)
        # B dies (stops reporting): its counts vanish after presence_ttl.
        await b.close()
        await asyncio.sleep(1.2)
        await a.report_presence({"live:p": (2, 2)})
        assert await a.presence("live:p") == (2, 2)
    finally:
        await a.close()
        await b.close()


async def test_control_and_send_user_reach_every_node_once(pair: Any) -> None:
    a, sa, b, sb = pair
    await a.control("kick", {"user": "u7", "code": 4003, "reason": "bye"})
    await b.send_user("u8", b'{"op":"push","type":"order","data":1,"ts":1}', 2)
    await await_until(lambda: sb.ctl and sa.user, 3, what="control on B, push on A")
    await asyncio.sleep(0.2)
    assert sa.ctl == sb.ctl == [("kick", {"user": "u7", "code": 4003, "reason": "bye"})]
    assert sa.user == sb.user == [("u8", b'{"op":"push","type":"order","data":1,"ts":1}', 2)]


async def test_publish_frame_reaches_members_everywhere(pair: Any) -> None:
    a, sa, b, sb = pair
    await b.subscribe("live:f")
    await a.publish_frame("live:f", b'{"op":"presence","room":"live:f","event":"join","user":"x"}', 0)
    await await_until(lambda: sb.room, 3, what="frame on B")
    assert sa.room == sb.room == [("live:f", b'{"op":"presence","room":"live:f","event":"join","user":"x"}', 0)]


def test_reorder_by_seq() -> None:
    async def run() -> None:
        b = RedisBroker(BrokerConfig(kind="redis"))
        s = Sink()
        b._handler = s
        b._loop = asyncio.get_running_loop()
        ep = b"e1"
        b._set_base("live:o", 0, None)
        for seq in (1, 3, 2, 4):
            b._sequenced("live:o", seq, ep, b'{"op":"msg","room":"live:o","seq":%d}' % seq, 1)
        assert s.seqs("live:o") == [1, 2, 3, 4]
        b._sequenced("live:o", 6, ep, b'{"op":"msg","room":"live:o","seq":6}', 1)
        assert s.seqs("live:o") == [1, 2, 3, 4], "held while 5 is missing"
        await asyncio.sleep(b.reorder_wait * 2)
        assert s.seqs("live:o") == [1, 2, 3, 4, 6], "released after reorder_wait"
        b._sequenced("live:o", 1, b"e2", b'{"op":"msg","room":"live:o","seq":1}', 1)
        assert s.seqs("live:o")[-1] == 1, "a new epoch restarts the order"

    asyncio.run(run())


async def test_redis_down_fails_fast_and_recovers(redis_server: RedisServer) -> None:
    a, sa = await make(redis_server.url, "A")
    b, _sb = await make(redis_server.url, "B")
    try:
        await a.subscribe("live:d")
        await b.subscribe("live:d")
        await pub(b, "live:d", "before")
        await await_until(lambda: sa.seqs("live:d") == [1], 3, what="before")
        redis_server.kill()
        await await_until(lambda: not a.ready and not b.ready, 3, what="brokers notice")
        assert a.stats.connected is False
        t0 = time.perf_counter()
        for i in range(20):
            with pytest.raises(BrokerError):
                await pub(a, "live:d", f"down{i}")
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.2, f"20 publishes while down took {elapsed:.3f}s"
        assert a.stats.publish_errors == 20
        assert sa.seqs("live:d")[-20:] == [0] * 20, "local delivery continues, unrecoverable (seq 0)"
        for call in (a.history("live:d", limit=5), a.presence("live:zz"), a.control("kick", {"user": "x"}), a.report_presence({"live:d": (1, 1)})):
            with pytest.raises(BrokerError):
                await call
        assert sa.ctl == [("kick", {"user": "x"})], "control still applies locally"
        await a.subscribe("live:d2")  # returns at once while down; resubscribed later
        await b.subscribe("live:d2")
        redis_server.start()
        await await_until(lambda: a.ready and b.ready, 10, what="reconnect")
        assert a.stats.reconnects >= 1 and a.stats.connected
        await asyncio.sleep(0.1)
        r = await pub(b, "live:d", "after")
        assert r.seq == 1, "the dataset was lost: a new epoch starts at 1"
        r2 = await pub(b, "live:d2", "new room")
        await await_until(lambda: sa.seqs("live:d")[-1:] == [1] and sa.seqs("live:d2") == [1], 5, what="delivery resumes")
        assert r2.seq == 1
    finally:
        await a.close()
        await b.close()


async def test_unreachable_redis_blocks_nothing(redis_server: RedisServer) -> None:
    """A hung Redis (SIGSTOP: no RST, like a partition): the first command times out
    (socket_timeout), which makes the pub/sub connection probe Redis at once; the probe
    fails, the circuit opens and later calls fail in microseconds."""
    a, sa = await make(redis_server.url + "?socket_timeout=0.3", "A")
    a.probe_timeout = 0.3
    try:
        await a.subscribe("live:h")
        redis_server.pause()
        t0 = time.perf_counter()
        with pytest.raises(BrokerError):
            await pub(a, "live:h", "x")
        assert time.perf_counter() - t0 < 1.0
        await await_until(lambda: not a.ready, 2, what="probe opens the circuit")
        t0 = time.perf_counter()
        for _ in range(10):
            with pytest.raises(BrokerError):
                await pub(a, "live:h", "y")
        assert time.perf_counter() - t0 < 0.05
        assert len(sa.room) == 11, "local delivery continues"
        redis_server.resume()
        await await_until(lambda: a.ready, 10, what="reconnect after resume")
        assert (await pub(a, "live:h", "z")).seq >= 1
    finally:
        redis_server.resume()
        await a.close()


async def test_start_while_redis_is_down_then_connects(redis_binary: str, tmp_path: Path) -> None:
    srv = RedisServer(redis_binary, tmp_path / "late")
    b = RedisBroker(BrokerConfig(kind="redis", url=srv.url))
    s = Sink()
    t0 = time.perf_counter()
    await b.start(s, "L")
    assert time.perf_counter() - t0 < 3 and not b.ready
    await b.subscribe("live:late")
    try:
        srv.start()
        await await_until(lambda: b.ready, 10, what="late connect")
        await pub(b, "live:late", "x")
        # (held for a moment if the room's position is still being read after subscribing)
        await await_until(lambda: s.seqs("live:late") == [1], 2, what="local delivery")
    finally:
        await b.close()
        srv.kill()


async def test_member_debounce(redis_server: RedisServer) -> None:
    a, _ = await make(redis_server.url, "A", leave_grace=0.3)
    b, _ = await make(redis_server.url, "B", leave_grace=0.3)
    try:
        assert await a.member_join("live:m", "u1") is True
        assert await b.member_join("live:m", "u1") is False, "second connection: no join"
        assert await a.member_leave("live:m", "u1") is False, "one connection left"
        # Last connection leaves on B, the user reconnects on A within the grace period.
        leave = asyncio.ensure_future(b.member_leave("live:m", "u1"))
        await asyncio.sleep(0.1)
        assert await a.member_join("live:m", "u1") is False, "reconnect within grace: no join"
        assert await leave is False, "and no leave"
        # A real leave: reported once, after the grace period.
        t0 = time.perf_counter()
        assert await a.member_leave("live:m", "u1") is True
        assert time.perf_counter() - t0 >= 0.3
        assert await b.member_join("live:m", "u1") is True
        # Node-wide (connect/disconnect) scope.
        # (a connection's leave comes from the node it joined on: counts are per node)
        assert await a.member_join(None, "u2") is True
        assert await b.member_join(None, "u2") is False
        assert await a.member_leave(None, "u2") is False
        assert await b.member_leave(None, "u2") is True
    finally:
        await a.close()
        await b.close()


async def test_member_debounce_forgets_a_crashed_node(redis_server: RedisServer) -> None:
    """A node that dies without leaving must not hold back a user's later leave: once it
    misses its heartbeat deadline (``broker.node_timeout``) its counts are ignored."""
    a, _ = await make(redis_server.url, "A", leave_grace=0.1, node_timeout=0.4)
    b, _ = await make(redis_server.url, "B", leave_grace=0.1, node_timeout=0.4)
    try:
        assert await a.member_join("live:crash", "u1") is True
        assert a._hb_task is not None
        a._hb_task.cancel()  # A "crashes": no more heartbeats, and no leave for u1
        assert await b.member_join("live:crash", "u1") is False, "u1 is still counted on A"
        assert await b.member_leave("live:crash", "u1") is False, "A is not gone yet: u1 is still there"
        assert await b.member_join("live:crash", "u1") is False
        await await_until(lambda: a._inst in b._gone, 5, what="B to see A gone")
        # Before per-node counts this stayed False for a day (A's count never went down).
        assert await b.member_leave("live:crash", "u1") is True
        assert await b.member_join("live:crash", "u1") is True, "and the next join is a real one"
        hb = command(redis_server.port, "HKEYS", "gw:{nodes}:hb")
        assert a._inst.decode() in hb and b._inst.decode() in hb, hb
    finally:
        await a.close()
        await b.close()
    # A graceful stop leaves the heartbeat hash: it is never listed as gone.
    hb = command(redis_server.port, "HKEYS", "gw:{nodes}:hb")
    assert b._inst.decode() not in hb, hb


# ---- Redis Cluster --------------------------------------------------------------------------


@pytest.fixture
def redis_cluster(redis_binary: str, tmp_path: Path) -> Any:
    cli = shutil.which("redis-cli")
    if not cli:
        pytest.fail("redis-cli missing (it comes with redis-server)")
    servers = []
    for i in range(3):
        port = free_port(55000)
        while not port_is_free(port + 10000):  # the cluster bus uses port + 10000
            port = free_port(55000)
        d = tmp_path / f"cluster{i}"
        srv = RedisServer(redis_binary, d, port, ["--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", "2000"])
        srv.start()
        servers.append(srv)
    try:
        out = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in servers), "--cluster-replicas", "0", "--cluster-yes"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        deadline = time.monotonic() + 20
        while "cluster_state:ok" not in command(servers[0].port, "CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "cluster did not become ok"
            time.sleep(0.1)
        yield servers
    finally:
        for s in servers:
            s.kill()


async def test_cluster_sharded_pubsub(redis_cluster: list[RedisServer]) -> None:
    url = f"redis://127.0.0.1:{redis_cluster[0].port}"
    a, sa = await make(url, "A", cluster=True)
    b, sb = await make(url, "B", cluster=True)
    try:
        rooms = [f"live:k{i}" for i in range(12)]  # spread over the 3 shards
        slots = {a._redis.get_node_from_key(a._room_keys(r)[2]).name for r in rooms}
        assert len(slots) >= 2
        await asyncio.gather(*(a.subscribe(r) for r in rooms))
        await asyncio.gather(*(b.subscribe(r) for r in rooms))
        for r in rooms:
            for i in range(3):
                await pub(a if i % 2 else b, r, f"{r}-{i}")
        ok = lambda: all(sa.seqs(r) == [1, 2, 3] and sb.seqs(r) == [1, 2, 3] for r in rooms)
        try:
            await await_until(ok, 5, what="cluster fan-out")
        except AssertionError:
            raise AssertionError({r: (sa.seqs(r), sb.seqs(r)) for r in rooms}) from None
        stats = [commandstats(s.port) for s in redis_cluster]
        assert sum(st.get("spublish", 0) for st in stats) == 36 and sum(st.get("publish", 0) for st in stats) == 0
        h = await b.history(rooms[0], limit=10, since=1, epoch=(await a.history(rooms[0], limit=0)).epoch)
        assert h.recovered is True and len(h.messages) == 2
        await a.report_presence({r: (1, 1) for r in rooms})
        await b.report_presence({rooms[0]: (2, 2)})
        await asyncio.sleep(a.presence_cache)
        assert await a.presence(rooms[0]) == (3, 3)
        await a.control("mute", {"room": rooms[0], "user": "u1"})
        await b.send_user("u1", b"{}", 1)
        await await_until(lambda: sb.ctl and sa.user, 3, what="control over sharded channel")
        assert await a.member_join(rooms[1], "u3") is True
    finally:
        await a.close()
        await b.close()
