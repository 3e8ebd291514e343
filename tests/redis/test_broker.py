"""RedisBroker against a real redis-server, in process: contracts of every Broker method,
one publish per room message, batching, ordering, idempotency keys, moderation kept for
later nodes, presence, the hook debounce, failure and recovery, Redis Cluster. (The pure
re-ordering is tested in tests/unit/test_reorder.py.)"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from gateway.broker import Ban, BrokerError, CloseRoom, Command, HistoryPolicy, Kick, Mute, Unban, Unmute
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
        self.ctl: list[Command] = []
        self.counts: dict[str, tuple[int, int]] = {}

    def deliver_room(self, room: str, payload: bytes, prio: int) -> int:
        self.room.append((room, payload, prio))
        return 1

    def deliver_user(self, user: str, payload: bytes, prio: int) -> int:
        self.user.append((user, payload, prio))
        return 1

    def apply(self, cmd: Command) -> None:
        self.ctl.append(cmd)

    def local_counts(self, room: str) -> tuple[int, int]:
        return self.counts.get(room, (0, 0))

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


async def pub(b: RedisBroker, room: str, text: str, recoverable: bool = True, policy: HistoryPolicy = POLICY, idem: str | None = None) -> Any:
    head, tail = parts(room, text)
    return await b.publish(room, head, tail, 1, recoverable, policy, idem)


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
    a.presence.cache_ttl = b.presence.cache_ttl = 0.1
    assert a.presence.shared is True
    try:
        await a.presence.report({"live:p": (2, 2), "live:q": (1, 1)})
        await b.presence.report({"live:p": (3, 1)})
        assert await b.presence.counts("live:p") == (5, 3)
        await asyncio.sleep(a.presence.cache_ttl)
        assert await a.presence.counts("live:p") == (5, 3)
        assert await a.presence.counts("live:q") == (1, 1)
        # A leaves live:q (not reported any more): its count is removed at once.
        await a.presence.report({"live:p": (2, 2)})
        await asyncio.sleep(a.presence.cache_ttl)
        assert await b.presence.counts("live:q") == (0, 0)
        # B dies (stops reporting): its counts vanish after presence_ttl.
        await b.close()
        await asyncio.sleep(1.2)
        await a.presence.report({"live:p": (2, 2)})
        assert await a.presence.counts("live:p") == (2, 2)
    finally:
        await a.close()
        await b.close()


async def test_control_and_send_user_reach_every_node_once(pair: Any) -> None:
    a, sa, b, sb = pair
    await a.command(Kick("u7", 4003, "bye"))
    assert await b.send_user("u8", b'{"op":"push","type":"order","data":1,"ts":1}', 2) is True
    await await_until(lambda: sb.ctl and sa.user, 3, what="control on B, push on A")
    await asyncio.sleep(0.2)
    assert sa.ctl == sb.ctl == [Kick("u7", 4003, "bye")]
    assert sa.user == sb.user == [("u8", b'{"op":"push","type":"order","data":1,"ts":1}', 2)]


async def test_publish_frame_reaches_members_everywhere(pair: Any) -> None:
    a, sa, b, sb = pair
    await b.subscribe("live:f")
    await a.publish_frame("live:f", b'{"op":"presence","room":"live:f","event":"join","user":"x"}', 0)
    await await_until(lambda: sb.room, 3, what="frame on B")
    assert sa.room == sb.room == [("live:f", b'{"op":"presence","room":"live:f","event":"join","user":"x"}', 0)]


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
        for call in (a.history("live:d", limit=5), a.presence.counts("live:zz"), a.command(Kick("x")), a.presence.report({"live:d": (1, 1)})):
            with pytest.raises(BrokerError):
                await call
        assert sa.ctl == [Kick("x")], "control still applies locally"
        for call2 in (a.moderation(), a.presence.members("live:d"), a.debounce.join("live:d", "u"), a.send_user("u", b"{}", 1)):
            with pytest.raises(BrokerError):
                await call2
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
        da, db = a.debounce, b.debounce
        assert da.grace == 0.3
        assert await da.join("live:m", "u1") is True
        assert await db.join("live:m", "u1") is False, "second connection: no join"
        assert await da.leave("live:m", "u1") is False, "one connection left"
        # Last connection leaves on B, the user reconnects on A within the grace period.
        leave = asyncio.ensure_future(db.leave("live:m", "u1"))
        await asyncio.sleep(0.1)
        assert await da.join("live:m", "u1") is False, "reconnect within grace: no join"
        assert await leave is False, "and no leave"
        # A real leave: reported once, after the grace period.
        t0 = time.perf_counter()
        assert await da.leave("live:m", "u1") is True
        assert time.perf_counter() - t0 >= 0.3
        assert await db.join("live:m", "u1") is True
        # Node-wide (connect/disconnect) scope.
        # (a connection's leave comes from the node it joined on: counts are per node)
        assert await da.join(None, "u2") is True
        assert await db.join(None, "u2") is False
        assert await da.leave(None, "u2") is False
        assert await db.leave(None, "u2") is True
    finally:
        await a.close()
        await b.close()


async def test_member_debounce_forgets_a_crashed_node(redis_server: RedisServer) -> None:
    """A node that dies without leaving must not hold back a user's later leave: once it
    misses its heartbeat deadline (``broker.node_timeout``) its counts are ignored."""
    a, _ = await make(redis_server.url, "A", leave_grace=0.1, node_timeout=0.4)
    b, _ = await make(redis_server.url, "B", leave_grace=0.1, node_timeout=0.4)
    try:
        da, db = a.debounce, b.debounce
        assert await da.join("live:crash", "u1") is True
        assert da.hb_task is not None
        da.hb_task.cancel()  # A "crashes": no more heartbeats, and no leave for u1
        assert await db.join("live:crash", "u1") is False, "u1 is still counted on A"
        assert await db.leave("live:crash", "u1") is False, "A is not gone yet: u1 is still there"
        assert await db.join("live:crash", "u1") is False
        await await_until(lambda: da.instance in db.gone, 5, what="B to see A gone")
        # Before per-node counts this stayed False for a day (A's count never went down).
        assert await db.leave("live:crash", "u1") is True
        assert await db.join("live:crash", "u1") is True, "and the next join is a real one"
        hb = command(redis_server.port, "HKEYS", "gw:{nodes}:hb")
        assert da.instance.decode() in hb and db.instance.decode() in hb, hb
    finally:
        await a.close()
        await b.close()
    # A graceful stop leaves the heartbeat hash: it is never listed as gone.
    hb = command(redis_server.port, "HKEYS", "gw:{nodes}:hb")
    assert b.debounce.instance.decode() not in hb, hb


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
        await a.presence.report({r: (1, 1) for r in rooms})
        await b.presence.report({rooms[0]: (2, 2)})
        await asyncio.sleep(a.presence.cache_ttl)
        assert await a.presence.counts(rooms[0]) == (3, 3)
        await a.command(Mute(rooms[0], "u1"))
        await b.send_user("u1", b"{}", 1)
        await await_until(lambda: sb.ctl and sa.user, 3, what="control over sharded channel")
        assert await a.debounce.join(rooms[1], "u3") is True
        # Idempotency keys live in the room's slot (publish) and the control channel's
        # slot (send_user): one script each, also in cluster mode.
        r1 = await pub(a, rooms[2], "once", idem="c:1")
        r2 = await pub(b, rooms[2], "once", idem="c:1")
        assert r2.duplicate and (r2.seq, r2.epoch) == (r1.seq, r1.epoch)
        assert await b.send_user("u1", b"{}", 1, idem="c:2") is True
        assert await a.send_user("u1", b"{}", 1, idem="c:2") is False
        await await_until(lambda: len(sa.user) == 2, 3, what="idempotent send_user over the sharded channel")
        # Moderation state is kept for nodes that start later.
        c, _sc = await make(url, "C", cluster=True)
        try:
            assert await c.moderation() == [Mute(rooms[0], "u1")]
        finally:
            await c.close()
    finally:
        await a.close()
        await b.close()


# ---- idempotency keys -------------------------------------------------------------------------


@pytest.fixture
async def quiet_pair(redis_server: RedisServer) -> Any:
    """Two nodes whose debounce heartbeat (an EVALSHA too) stays out of the way of
    commandstats: the first beat at start, the next one 15 s later."""
    a, sa = await make(redis_server.url, "A", node_timeout=60.0)
    b, sb = await make(redis_server.url, "B", node_timeout=60.0)
    await asyncio.sleep(0.3)  # the first heartbeats are done
    yield a, sa, b, sb
    await a.close()
    await b.close()


async def test_publish_with_an_idempotency_key_is_published_once_across_nodes(quiet_pair: Any, redis_server: RedisServer) -> None:
    a, sa, b, sb = quiet_pair
    await a.subscribe("live:i")
    await b.subscribe("live:i")
    before = commandstats(redis_server.port)
    r1 = await pub(a, "live:i", "hello", idem="u1:m1")
    # The client timed out and retries on another node: the same key.
    r2 = await pub(b, "live:i", "hello", idem="u1:m1")
    r3 = await pub(a, "live:i", "hello", idem="u1:m1")
    after = commandstats(redis_server.port)
    assert (r1.seq, r1.duplicate) == (1, False)
    assert (r2.seq, r2.epoch, r2.duplicate) == (1, r1.epoch, True) and r3 == r2
    assert after.get("publish", 0) - before.get("publish", 0) == 1
    assert after.get("evalsha", 0) - before.get("evalsha", 0) == 3, "one round trip per publish, duplicates included"
    await asyncio.sleep(0.2)
    assert sa.seqs("live:i") == sb.seqs("live:i") == [1], "delivered once on each node"
    assert len((await a.history("live:i", limit=10)).messages) == 1
    ttl = int(command(redis_server.port, "PTTL", "gw:{live:i}:i:u1:m1"))
    assert 590_000 < ttl <= 600_000, "kept broker.idempotency_ttl (600 s by default)"
    # Not recoverable (seq 0): deduplicated all the same; other keys are published.
    l1 = await pub(b, "live:i", "like", recoverable=False, idem="u1:m2")
    l2 = await pub(a, "live:i", "like", recoverable=False, idem="u1:m2")
    assert (l1.seq, l1.duplicate, l2.seq, l2.duplicate) == (0, False, 0, True) and l2.epoch == l1.epoch
    assert (await pub(b, "live:i", "next", idem="u1:m3")).seq == 2
    assert (await pub(b, "live:other", "hello", idem="u1:m1")).duplicate is False, "keys are per room"
    await await_until(lambda: sa.seqs("live:i") == [1, 0, 2] and sb.seqs("live:i") == [1, 0, 2], 3, what="one like, then seq 2")


async def test_idempotency_keys_expire(redis_server: RedisServer) -> None:
    a, sa = await make(redis_server.url, "A", idempotency_ttl=0.3)
    try:
        assert (await pub(a, "live:e", "x", idem="k")).duplicate is False
        assert (await pub(a, "live:e", "x", idem="k")).duplicate is True
        assert await a.send_user("u1", b"{}", 1, idem="k") is True
        assert await a.send_user("u1", b"{}", 1, idem="k") is False
        await asyncio.sleep(0.4)
        r = await pub(a, "live:e", "x", idem="k")
        assert (r.seq, r.duplicate) == (2, False)
        assert await a.send_user("u1", b"{}", 1, idem="k") is True
        assert len(sa.user) == 2
    finally:
        await a.close()


async def test_send_user_with_an_idempotency_key_is_sent_once_across_nodes(quiet_pair: Any, redis_server: RedisServer) -> None:
    a, sa, b, sb = quiet_pair
    before = commandstats(redis_server.port)
    assert await a.send_user("u8", b'{"op":"push"}', 2, idem="api:1") is True
    assert await b.send_user("u8", b'{"op":"push"}', 2, idem="api:1") is False
    assert await b.send_user("u9", b'{"op":"push"}', 2, idem="api:1") is True, "keys are per target user"
    after = commandstats(redis_server.port)
    assert after.get("evalsha", 0) - before.get("evalsha", 0) == 3 and after.get("publish", 0) - before.get("publish", 0) == 2
    await await_until(lambda: len(sa.user) == 2 and len(sb.user) == 2, 3, what="two pushes on each node")
    await asyncio.sleep(0.2)
    assert sa.user == sb.user == [("u8", b'{"op":"push"}', 2), ("u9", b'{"op":"push"}', 2)]


async def test_idempotency_while_redis_is_down_is_local(redis_server: RedisServer) -> None:
    """Redis unreachable: the message reaches local members once (a retry that fails
    again is not delivered here again); once Redis is back the retry is published."""
    a, sa = await make(redis_server.url, "A")
    try:
        await a.subscribe("live:dn")
        redis_server.kill()
        await await_until(lambda: not a.ready, 3, what="broker notices")
        for _ in range(2):
            with pytest.raises(BrokerError):
                await pub(a, "live:dn", "x", idem="k1")
            with pytest.raises(BrokerError):
                await a.send_user("u1", b"{}", 1, idem="k1")
        assert sa.seqs("live:dn") == [0] and len(sa.user) == 1
        redis_server.start()
        await await_until(lambda: a.ready, 10, what="reconnect")
        r = await pub(a, "live:dn", "x", idem="k1")
        assert (r.seq, r.duplicate) == (1, False)
        assert (await pub(a, "live:dn", "x", idem="k1")).duplicate is True
    finally:
        await a.close()


# ---- moderation kept in Redis ------------------------------------------------------------------


async def test_mutes_and_bans_reach_nodes_that_start_later(pair: Any, redis_server: RedisServer) -> None:
    a, sa, b, sb = pair
    now = time.time()
    in_force: list[Command] = [
        Mute("live:1", "u1", now + 60),
        Mute("live:1", None, None, ("mod",)),
        Ban("*", "u2"),
        Ban("live:1", "u3", now + 60),
    ]
    for cmd in in_force:
        await a.command(cmd)
    await a.command(Ban("live:1", "u4", now + 0.3))  # expires soon
    await a.command(Kick("u5"))  # not state
    await b.command(CloseRoom("live:2"))  # not state
    await await_until(lambda: len(sb.ctl) == 7 and len(sa.ctl) == 7, 3, what="commands on both nodes")
    await asyncio.sleep(0.4)
    c, sc = await make(redis_server.url, "C")  # started later (or restarted)
    try:
        got = await c.moderation()
        assert sorted(map(repr, got)) == sorted(map(repr, in_force)), "the expired ban is not returned"
        assert int(command(redis_server.port, "HLEN", "gw:{mod}:state")) == 4, "and was pruned"
        assert sc.ctl == [], "moderation() only returns them: the app applies them"
        # Lifting removes them; a second mute of the same (room, user) replaces the first.
        await b.command(Unban("*", "u2"))
        await b.command(Unmute("live:1"))
        await a.command(Mute("live:1", "u1", None))
        assert sorted(map(repr, await c.moderation())) == sorted(map(repr, [Mute("live:1", "u1"), Ban("live:1", "u3", now + 60)]))
        await await_until(lambda: Unban("*", "u2") in sc.ctl and Mute("live:1", "u1") in sc.ctl, 3, what="C hears the later commands")
    finally:
        await c.close()


async def test_bad_control_messages_are_ignored(pair: Any, redis_server: RedisServer) -> None:
    a, sa, b, sb = pair
    for msg in ("X|garbage", 'X|{"k":"explode","d":{}}', 'X|{"v":9,"k":"kick","d":{"user":"u"}}', 'X|{"k":"kick","d":{"user":5}}', "no node"):
        command(redis_server.port, "PUBLISH", "gw:ctl", msg)
    await a.command(Kick("u1"))
    await await_until(lambda: sb.ctl, 3, what="the valid command after the bad ones")
    assert sb.ctl == [Kick("u1")] and sa.ctl == [Kick("u1")]
    assert b.ready and a.ready
