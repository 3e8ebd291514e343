"""The archive log through real gateways (issue 14): with the Redis broker every archive
message is stored exactly once across the nodes, also when the publishing node is killed
(``kill -9``) before it could write anything, and when the database is down for a while.
A real redis-server, a real PostgreSQL, real WebSocket clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from signal import SIGKILL
from typing import Any

import pytest
from support.gateway import GatewayProcess, uniq
from support.postgres import PostgresServer, migrate
from support.redis import RedisServer, command
from support.wait import eventually

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

ROUTES = """
[[routes]]
pattern = "arch:{id}"
join = "all"
publish = "all"
user_rate = 0
room_rate = 0
store = "archive"
history_size = 20
"""



def node(tmp: Path, name: str, redis: RedisServer, dsn: str, *sets: str) -> GatewayProcess:
    return GatewayProcess(
        tmp / name, ["store.kind=postgres", f"store.dsn={dsn}", "limits.client_rate=0", *sets], config=ROUTES,
        args=["--broker", "redis", "--redis-url", redis.url], node_id=f"{name}-{uniq()}",
    )


async def stored(dsn: str, room: str) -> list[tuple[int, Any]]:
    """(seq, data) of every row of ``room`` in the database, by seq (duplicates would show)."""
    import asyncpg  # type: ignore[import-not-found,unused-ignore]
    import orjson

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT seq, data FROM livegate.messages WHERE room = $1 ORDER BY seq", room)
    finally:
        await conn.close()
    return [(r["seq"], orjson.loads(r["data"])) for r in rows]


def log_state(redis: RedisServer, streams: int = 4) -> tuple[int, int]:
    """(pending, lag) of the archive log's consumer group, all streams together."""
    pending = lag = 0
    for i in range(streams):
        info = command(redis.port, "XINFO", "GROUPS", f"gw:{{archive}}:{i}").split()
        if "pending" in info:
            pending += int(info[info.index("pending") + 1])
            lag += int(info[info.index("lag") + 1])
    return pending, lag


class CutProxy:
    """A TCP proxy to PostgreSQL for one node, which the test can cut: open connections are
    reset and new ones refused (that node alone has lost its database)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.lock = threading.Lock()
        self.is_cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.is_cut:
                client.close()
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.is_cut = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (close() alone would not)
        self.listener.close()
        with self.lock:
            for s in self.socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self.socks.clear()


@pytest.fixture
def proxy(postgres_server: PostgresServer) -> Iterator[CutProxy]:
    p = CutProxy(postgres_server.port)
    yield p
    p.cut()



async def test_a_node_killed_after_its_acks_loses_nothing_another_node_stores_each_once(
    redis_server: RedisServer, postgres_db: str, proxy: CutProxy, tmp_path: Path,
) -> None:
    migrate(postgres_db)
    # A reaches the database through the proxy; B directly. A reads at most 40 entries a
    # round, so B finds both kinds: entries A read (pending, claimed after 2 s idle) and
    # entries nobody read yet.
    a = node(tmp_path, "A", redis_server, postgres_db.replace(f":{proxy.target}/", f":{proxy.port}/"),
             "broker.archive_batch=40", "broker.archive_claim_after=2").start()
    b = node(tmp_path, "B", redis_server, postgres_db, "broker.archive_claim_after=2")
    room, n = f"arch:{uniq()}", 200
    try:
        proxy.cut()  # A has lost its database: its consumer cannot commit anything
        c = await a.client("alice")
        await c.join(room)
        acks = await asyncio.gather(*(c.publish(room, {"k": k}) for k in range(n)))
        assert sorted(x["seq"] for x in acks) == list(range(1, n + 1)), "every publish acked, gapless"
        await eventually(lambda: log_state(redis_server)[0] > 0, what="A's consumer holding entries it cannot write")
        a.stop(SIGKILL)
        assert await stored(postgres_db, room) == [], "A stored nothing before it died"
        pending, lag = log_state(redis_server)
        assert pending + lag == n and 0 < pending <= 40, (pending, lag)

        b.start()
        rows = await eventually(lambda: _all(stored(postgres_db, room), n), timeout=30, what=f"{n} rows written by B")
        assert [s for s, _ in rows] == list(range(1, n + 1)), "every seq once: no gap, no duplicate"
        published = {x["seq"]: {"k": k} for k, x in enumerate(acks)}  # acks in publish order
        assert dict(rows) == published, "each seq holds the message acked with it"
        assert (b.metric("gateway_archive_log_claimed_total") or 0) >= 1, "B took over A's pending entries"
        assert b.metric("gateway_archive_log_written_total") == n
        assert (b.metric("gateway_store_duplicates_total") or 0) == 0
        await eventually(lambda: log_state(redis_server) == (0, 0), what="nothing left in the log")
        assert b.metric("gateway_archive_log_lost_total") in (None, 0.0)
        await c.close()
    finally:
        assert not a.finish()
        assert not b.finish()


async def _all(rows: Any, n: int) -> Any:
    r = await rows
    return r if len(r) >= n else None


async def test_two_live_nodes_consume_together_each_message_stored_once(redis_server: RedisServer, postgres_db: str, tmp_path: Path) -> None:
    migrate(postgres_db)
    nodes = [node(tmp_path, name, redis_server, postgres_db).start() for name in ("A", "B")]
    rooms = [f"arch:{uniq()}" for _ in range(4)]
    try:
        clients = [await n.client(f"user{i}") for i, n in enumerate(nodes)]
        for c in clients:
            for room in rooms:
                await c.join(room)
        # Nothing another program wrote into the log can stop it.
        command(redis_server.port, "XADD", "gw:{archive}:0", "*", "f", "not a frame", "r", "x")
        per = 300
        for k in range(per // 2):  # both nodes into every room at once
            await asyncio.gather(*(c.publish(room, {"n": k, "from": i}) for room in rooms for i, c in enumerate(clients)))
        for room in rooms:
            rows = await eventually(lambda room=room: _all(stored(postgres_db, room), per), timeout=30, what=f"{per} rows of {room}")
            assert [s for s, _ in rows] == list(range(1, per + 1)), room
            assert sorted((d["from"], d["n"]) for _, d in rows) == sorted((i, k) for i in range(2) for k in range(per // 2))
        written = [n.metric("gateway_archive_log_written_total") or 0 for n in nodes]
        assert sum(written) == per * len(rooms) and all(w > 0 for w in written), written
        for n in nodes:
            assert (n.metric("gateway_archive_log_claimed_total") or 0) == 0, "no redelivery while both are healthy"
            assert (n.metric("gateway_store_duplicates_total") or 0) == 0
        lost = [_labelled(n, "gateway_archive_log_lost_total", 'reason="malformed"') for n in nodes]
        assert sum(lost) == 1, lost
        await eventually(lambda: log_state(redis_server) == (0, 0), what="everything acknowledged")
        for c in clients:
            await c.close()
    finally:
        for n in nodes:
            assert not n.finish()


def _labelled(g: GatewayProcess, name: str, label: str) -> float:
    for line in g.metrics().splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_database_down_entries_wait_in_redis_and_are_all_stored_when_it_is_back(
    redis_server: RedisServer, private_pg: PostgresServer, tmp_path: Path,
) -> None:
    dsn = private_pg.dsn()
    migrate(dsn)
    a = node(tmp_path, "A", redis_server, dsn, "broker.archive_claim_after=2").start()
    b: GatewayProcess | None = None
    room, n = f"arch:{uniq()}", 150
    try:
        c = await a.client("carol")
        await c.join(room)
        private_pg.stop()
        acks = await asyncio.gather(*(c.publish(room, {"k": k}) for k in range(n)))
        assert sorted(x["seq"] for x in acks) == list(range(1, n + 1))
        await eventually(lambda: _labelled(a, "gateway_archive_log_errors_total", 'kind="store"') >= 2, timeout=20)
        pending, lag = log_state(redis_server)
        assert pending + lag == n and pending > 0, "every message waits in Redis; A holds a batch it cannot write"
        await eventually(lambda: a.metric("gateway_archive_log_pending") == pending, what="the pending gauge")
        await c.close()
        # A stops gracefully while the database is still down: what it read stays pending.
        assert await a.astop() == 0
        private_pg.start()
        b = node(tmp_path, "B", redis_server, dsn, "broker.archive_claim_after=2").start()
        rows = await eventually(lambda: _all(stored(dsn, room), n), timeout=30, what=f"{n} rows once the database is back")
        assert [s for s, _ in rows] == list(range(1, n + 1))
        assert sorted(d["k"] for _, d in rows) == list(range(n))
        assert (b.metric("gateway_archive_log_claimed_total") or 0) >= 1, "B took over what A had read"
        await eventually(lambda: log_state(redis_server) == (0, 0), what="nothing left in the log")
    finally:
        assert not a.finish()
        if b is not None:
            assert not b.finish()
