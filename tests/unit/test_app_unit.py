"""The Gateway app in-process against a recording fake engine: per-connection memory,
degraded broker paths (publish, join, presence), the hook debounce ordering, token
expiry and the metrics API for plugins."""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
import tracemalloc
from typing import Any

import orjson
import pytest
from gateway import protocol as P
from gateway.app import Client, Gateway
from gateway.protocol import Join
from gateway.auth import EMPTY_META, Authenticator, AuthConfig, ConnectRequest, Identity
from gateway.broker import Broker, BrokerError, Command, HistoryPolicy, HistoryResult, MemberDebounce, MemoryBroker, Presence, PublishResult
from gateway.config import Config
from gateway.metrics import render


class FakeEngine:
    """Records what the app asks of the engine."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, dict[str, Any]]] = []
        self.published: list[tuple[str, bytes]] = []
        self.disconnected: list[tuple[int, int, str]] = []
        self.members: dict[str, set[int]] = {}
        self.running = True
        self.draining = False

    def accept(self, conn: int, **kw: Any) -> bool:
        return True

    def reject(self, *a: Any) -> bool:
        return True

    def user_conns(self, user: str) -> list[int]:
        return []

    def room_members(self, room: str, offset: int = 0, limit: int = 100) -> list[tuple[int, str | None, str | None]]:
        return [(c, f"u{c}", None) for c in sorted(self.members.get(room, ()))][offset : offset + limit]

    def send(self, conn: int, data: bytes, prio: int = 2) -> bool:
        self.sent.append((conn, orjson.loads(data)))
        return True

    def publish(self, room: str, data: bytes, prio: int = 1) -> int:
        self.published.append((room, data))
        return len(self.members.get(room, ()))

    def is_member(self, conn: int, room: str) -> bool:
        return conn in self.members.get(room, ())

    def conn_rooms(self, conn: int) -> list[str]:
        return [r for r, m in self.members.items() if conn in m]

    def join(self, conn: int, room: str) -> int:
        m = self.members.setdefault(room, set())
        if conn in m:
            return 0
        m.add(conn)
        return 1

    def leave(self, conn: int, room: str) -> bool:
        return conn in self.members.get(room, set()) and (self.members[room].discard(conn) is None)

    def room_counts(self, room: str) -> tuple[int, int]:
        n = len(self.members.get(room, ()))
        return n, n

    def rooms(self) -> list[tuple[str, int, int]]:
        return [(r, len(m), len(m)) for r, m in self.members.items() if m]

    def disconnect(self, conn: int, code: int = 1000, reason: str = "") -> bool:
        self.disconnected.append((conn, code, reason))
        return True

    # -- stop --
    @property
    def fd(self) -> int:
        if not hasattr(self, "_pipe"):
            self._pipe = os.pipe()
        return self._pipe[0]

    def poll(self, n: int) -> tuple[list[Any], bool]:
        return [], False

    def drain(self, *a: Any) -> int:
        self.draining = True
        return 0

    def wait_closed(self, timeout: float) -> int:
        return 0

    def stop(self, *a: Any) -> int:
        self.running = False
        for fd in getattr(self, "_pipe", ()):
            os.close(fd)
        return 0


def _gateway(broker: Any = None, **auth: Any) -> tuple[Gateway, FakeEngine]:
    cfg = Config(node_id="n1")
    cfg.auth.mode = "dev"
    cfg.server.host = "127.0.0.1"
    for k, v in auth.items():
        setattr(cfg.auth, k, v)
    cfg.check()
    gw = Gateway(cfg, broker=broker)
    eng = FakeEngine()
    gw.engine = eng  # type: ignore[assignment]
    return gw, eng


def _client(gw: Gateway, conn: int = 7, user: str = "u1", expires_at: float | None = None) -> Client:
    c = Client(conn, Identity(user, EMPTY_META, None, False, expires_at), None, "127.0.0.1:1", node=gw.node_id, engine=lambda: gw.engine)
    gw.clients[conn] = c
    return c


# ---- per-connection memory -----------------------------------------------------------------


def test_client_is_small_and_lazy() -> None:
    c = Client(10, Identity("u"), None, "1.2.3.4:5", node="n1")
    assert not hasattr(c, "__dict__")
    assert c.rooms == () and c.backlog is None
    assert c.session == "n1-10" and c.user == "u"
    assert sys.getsizeof(c) <= 120
    # Backward compatible construction (examples and tests build clients positionally).
    old = Client(1, Identity("u1"), "s", "peer")
    assert old.session == "s" and old.peer == "peer" and old.rooms == ()
    assert "u1" in repr(old)


async def test_python_bytes_per_idle_connection() -> None:
    """What _connect keeps per connection (Client, Identity, strings, the clients
    entry): 1.4 KiB before the slimming (set, deque, session string, meta dict); about
    400 bytes now."""
    gw, _ = _gateway()
    n = 5000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(n):
            gw.sessions.on_connect((1, 1_000_000 + i, f"10.0.{i % 256}.{i // 256}:{40000 + i}", "/ws", f"user=user-{i:06d}", [("host", "x")], []))
        await asyncio.sleep(0)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert len(gw.clients) == n
    per_conn = sum(s.size_diff for s in after.compare_to(before, "filename")) / n
    assert per_conn < 640, f"{per_conn:.0f} bytes of Python state per idle connection"


def test_identities_without_meta_share_one_read_only_dict() -> None:
    auth = Authenticator(AuthConfig(mode="dev", allow_guests=True))
    a = auth.authenticate(ConnectRequest(1, "p", "/ws", "user=a", (), ()))
    b = auth.authenticate(ConnectRequest(2, "p", "/ws", "user=b", (), ()))
    g = auth.authenticate(ConnectRequest(3, "p", "/ws", "", (), ()))
    assert a.meta is b.meta is g.meta is EMPTY_META
    assert a.meta == {} and not a.meta and orjson.dumps(a.meta) == b"{}"
    with pytest.raises(TypeError):
        a.meta["role"] = "x"
    with pytest.raises(TypeError):
        a.meta.update(role="x")
    assert {**a.meta, "role": "vip"} == {"role": "vip"}
    named = auth.authenticate(ConnectRequest(4, "p", "/ws", "user=c&name=Cy", (), ()))
    assert named.meta == {"name": "Cy"} and named.meta is not EMPTY_META
    assert Identity("x").meta is not Identity("y").meta, "explicit identities get their own dict"


async def test_backlog_exists_only_while_a_hook_holds_the_client() -> None:
    gw, eng = _gateway()
    release = asyncio.Event()

    async def slow(client: Client, msg: Any) -> None:
        await release.wait()

    gw.on_message(slow)
    c = _client(gw)
    await gw.sessions.join(c, Join(1, "live:1"))
    gw.sessions.on_message(c.conn, orjson.dumps({"op": "publish", "id": 2, "room": "live:1", "data": 1}), False)
    assert c.busy and c.backlog is None
    gw.sessions.on_message(c.conn, orjson.dumps({"op": "publish", "id": 3, "room": "live:1", "data": 2}), False)
    assert c.backlog is not None and len(c.backlog) == 1
    release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not c.busy and c.backlog is None
    assert [f["id"] for _, f in eng.sent if f["op"] == "ack"] == [1, 2, 3]


# ---- broker failures: degraded, not errors -------------------------------------------------------


class FailingPresence(Presence):
    """Shared presence that fails while the broker is down; up: (100, 90)."""

    def __init__(self, broker: FailingBroker) -> None:
        self.broker = broker

    @property
    def shared(self) -> bool:
        return True

    async def report(self, counts: dict[str, tuple[int, int]]) -> None:
        self.broker._check()

    async def counts(self, room: str) -> tuple[int, int]:
        self.broker._check()
        return (100, 90)

    async def report_members(self, members: dict[str, list[dict[str, Any]]]) -> None:
        self.broker._check()

    async def members(self, room: str) -> list[dict[str, Any]] | None:
        self.broker._check()
        return None


class FailingBroker(Broker):
    """A shared broker (not the memory one) whose Redis is down while ``down``: local
    delivery, then BrokerError, as RedisBroker does. Up, it behaves like MemoryBroker
    with cluster-wide presence of (100, 90)."""

    def __init__(self) -> None:
        self.mem = MemoryBroker()
        self.stats = self.mem.stats
        self.presence = FailingPresence(self)
        self.debounce = self.mem.debounce
        self.down = True

    def _check(self) -> None:
        if self.down:
            raise BrokerError("redis unavailable")

    async def start(self, handler: Any, node_id: str) -> None:
        await self.mem.start(handler, node_id)

    async def close(self) -> None:
        await self.mem.close()

    async def publish(self, room: str, head: bytes, tail: bytes, prio: int, recoverable: bool, history: HistoryPolicy, idem: str | None = None,
                      archive: tuple[str, str | None] | None = None) -> PublishResult:
        if not self.down:
            return await self.mem.publish(room, head, tail, prio, recoverable, history, idem, archive)
        if self.mem._handler is not None:
            self.mem._handler.deliver_room(room, P.splice(head, 0, "", tail), prio)
        self.stats.publish_errors += 1
        raise BrokerError("redis unavailable")

    async def publish_frame(self, room: str, frame: bytes, prio: int) -> None:
        await self.mem.publish_frame(room, frame, prio)
        self._check()

    async def history(self, room: str, *, limit: int, since: int | None = None, epoch: str | None = None) -> HistoryResult:
        self._check()
        return await self.mem.history(room, limit=limit, since=since, epoch=epoch)

    async def subscribe(self, room: str) -> None:
        await self.mem.subscribe(room)

    async def unsubscribe(self, room: str) -> None:
        await self.mem.unsubscribe(room)

    async def send_user(self, user: str, payload: bytes, prio: int, idem: str | None = None) -> bool:
        sent = await self.mem.send_user(user, payload, prio, idem)
        self._check()
        return sent

    async def command(self, cmd: Command) -> None:
        await self.mem.command(cmd)
        self._check()

    async def moderation(self) -> list[Command]:
        self._check()
        return await self.mem.moderation()


async def test_publish_while_the_broker_is_down_acks_degraded() -> None:
    broker = FailingBroker()
    gw, eng = _gateway(broker)
    await broker.start(gw, "n1")
    c = _client(gw)
    broker.down = False
    await gw.sessions.join(c, Join(1, "live:1"))
    broker.down = True
    eng.sent.clear()
    await gw.sessions.handle(c, orjson.dumps({"op": "publish", "id": 5, "room": "live:1", "data": {"x": 1}}))
    assert eng.sent == [(7, {"op": "ack", "id": 5, "seq": 0, "degraded": True})]
    assert eng.published and b'"seq":0' in eng.published[-1][1], "delivered locally"
    assert gw.stats.broker_publish_errors == 1 and c.errors == 0


async def test_join_while_the_broker_is_down_succeeds_without_history() -> None:
    gw, eng = _gateway(FailingBroker())
    c = _client(gw)
    await gw.sessions.handle(c, orjson.dumps({"op": "join", "id": 1, "room": "live:2", "history": 5}))
    ack = eng.sent[-1][1]
    assert ack["op"] == "ack" and ack["msgs"] == [] and ack["degraded"] is True and "recovered" not in ack
    assert (ack["conns"], ack["users"]) == (1, 1)
    assert c.rooms == ("live:2",)
    await gw.sessions.handle(c, orjson.dumps({"op": "join", "id": 2, "room": "live:3", "resume": {"seq": 3, "epoch": "e"}}))
    ack = eng.sent[-1][1]
    assert ack["recovered"] is False and ack["degraded"] is True


async def test_presence_tick_falls_back_to_local_counts() -> None:
    broker = FailingBroker()
    gw, eng = _gateway(broker)
    eng.members["live:p"] = {1, 2}
    await gw.rooms.presence_tick()
    assert [(r, orjson.loads(f)) for r, f in eng.published] == [("live:p", {"op": "presence", "room": "live:p", "conns": 2, "users": 2})]
    broker.down = False
    eng.published.clear()
    await gw.rooms.presence_tick()
    assert orjson.loads(eng.published[-1][1])["conns"] == 100, "cluster-wide counts when the broker is back"
    # A join ack uses the last cluster-wide counts (no broker round trip), never below local.
    c = _client(gw, 3)
    await gw.sessions.join(c, Join(9, "live:p"))
    ack = eng.sent[-1][1]
    assert (ack["conns"], ack["users"]) == (100, 90)


# ---- hook debounce ordering ------------------------------------------------------------------------


class SlowDebounce(MemberDebounce):
    """A debounce like Redis' one: joins take a round trip, leaves wait ``grace``."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.wait = 0.0

    @property
    def grace(self) -> float:
        return self.wait

    async def join(self, room: str | None, user: str) -> bool:
        await asyncio.sleep(0.05)
        self.log.append(f"join {room} {user}")
        return True

    async def leave(self, room: str | None, user: str) -> bool:
        self.log.append(f"leave {room} {user}")
        await asyncio.sleep(self.wait)
        return True


class DebounceBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []
        self.slow = SlowDebounce(self.log)
        self.debounce = self.slow


async def test_a_leave_is_counted_after_the_join_still_in_flight() -> None:
    broker = DebounceBroker()
    gw, eng = _gateway(broker)
    seen: list[tuple[str, tuple[str, ...]]] = []
    gw.on_disconnect(lambda client, code, reason: seen.append(("disconnect", client.rooms)))
    gw.on_leave(lambda client, room: seen.append(("leave", (room,))))
    await gw.sessions.connect(ConnectRequest(11, "p", "/ws", "user=quick", (), ()))
    c = gw.clients[11]
    await gw.sessions.join(c, Join(1, "live:q"))
    # The connection drops before Redis answered the joins.
    gw.sessions.on_closed((3, 11, 1006, "", ["live:q"], "quick"))
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(seen) == 2:
            break
    assert broker.log.index("join None quick") < broker.log.index("leave None quick")
    assert broker.log.index("join live:q quick") < broker.log.index("leave live:q quick")
    assert sorted(seen) == [("disconnect", ("live:q",)), ("leave", ("live:q",))], "on_disconnect sees the rooms"


async def test_stop_lets_pending_leave_notifications_finish() -> None:
    broker = DebounceBroker()
    broker.slow.wait = 0.3  # the debounce wait (broker.leave_grace) of a drained client
    gw, eng = _gateway(broker)
    gw.config.broker.leave_grace = 0.3
    seen: list[str] = []
    gw.on_disconnect(lambda client, code, reason: seen.append(client.user))
    await gw.sessions.connect(ConnectRequest(12, "p", "/ws", "user=drained", (), ()))
    await asyncio.sleep(0.1)
    gw.sessions.on_closed((3, 12, 1012, "restarting", [], "drained"))
    assert seen == []
    await gw.stop()
    assert seen == ["drained"]


# ---- token expiry --------------------------------------------------------------------------------


async def test_expired_tokens_close_their_connections_with_4001() -> None:
    gw, eng = _gateway(leeway=0.0)
    now = time.time()
    gone = _client(gw, 1, "a", expires_at=now + 0.05)
    _client(gw, 2, "b", expires_at=now + 0.05)
    _client(gw, 3, "c", expires_at=now + 3600)
    _client(gw, 4, "d", expires_at=None)
    for c in list(gw.clients.values()):
        if c.identity.expires_at is not None:
            gw.sessions.expiry.watch(c.conn, c.identity.expires_at)
    gw.clients.pop(gone.conn)  # closed before its token expired
    await asyncio.sleep(0.2)
    assert eng.disconnected == [(2, P.CloseCode.AUTH, "token expired")]
    assert gw.stats.tokens_expired == 1
    expiry = gw.sessions.expiry
    assert expiry.timer is not None and expiry.armed_at == now + 3600, "armed for the next deadline"
    expiry.timer.cancel()


async def test_expiry_heap_is_compacted() -> None:
    gw, _ = _gateway()
    far = time.time() + 3600
    for conn in range(3000):
        gw.sessions.expiry.watch(conn, far)  # connections that are gone (not in gw.clients)
    assert len(gw.sessions.expiry.heap) <= 1025
    assert gw.sessions.expiry.timer is not None
    gw.sessions.expiry.timer.cancel()


# ---- metrics API for plugins -----------------------------------------------------------------------


def test_plugin_metrics_are_served() -> None:
    gw = Gateway()
    c = gw.counter("myplugin_events", "Events seen", ["kind"])
    c.labels("a").inc(3)
    assert gw.counter("myplugin_events", "Events seen", ["kind"]) is c
    gw.gauge("myplugin_queue", "Queued").set(5)
    gw.histogram("myplugin_seconds", "Latency", buckets=(0.1, 1.0)).observe(0.5)
    with pytest.raises(ValueError):
        gw.gauge("myplugin_events", "not a counter", ["kind"])
    with pytest.raises(ValueError):
        gw.counter("myplugin_events", "other labels", ["room"])
    text = render(gw)[0].decode()
    assert 'myplugin_events_total{kind="a"} 3.0' in text
    assert "myplugin_queue 5.0" in text
    assert 'myplugin_seconds_bucket{le="1.0"} 1.0' in text
    assert gw.metrics_registry is gw.metrics_registry


def test_connected_frame_fields() -> None:
    f = orjson.loads(P.connected("n1-1", "u", 30, "n1", 90.0))
    assert f["idle_timeout"] == 90 and isinstance(f["idle_timeout"], int)
    assert orjson.loads(P.connected("n1-1", "u", 30, "n1", 45.5))["idle_timeout"] == 45.5
    assert "idle_timeout" not in orjson.loads(P.connected("n1-1", "u", 30, "n1"))
