"""The message store with PostgreSQL through real gateways (issue 14): two nodes on a Redis
broker publishing into one durable room, Redis ``FLUSHALL``, and the database stopped.
A real PostgreSQL (Debian's, started by the test fixtures) and a real redis-server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.gateway import GatewayProcess, uniq
from support.postgres import PostgresServer, migrate
from support.redis import RedisServer, command
from support.wait import eventually

from gateway.client import GatewayError

ROUTES = """
[[routes]]
pattern = "cs:{id}"
join = "all"
publish = "all"
user_rate = 0
room_rate = 0
store = "durable"
history_size = 10

[[routes]]
pattern = "live:{id}"
join = "all"
publish = "all"

[[routes]]
pattern = "arch:{id}"
join = "all"
publish = "all"
user_rate = 0
room_rate = 0
store = "archive"
"""




async def test_two_nodes_one_durable_room_gapless_and_kept_through_flushall(
    redis_server: RedisServer, postgres_db: str, tmp_path: Path,
) -> None:
    migrate(postgres_db)
    sets = ["store.kind=postgres", f"store.dsn={postgres_db}", "limits.client_rate=0"]
    args = ["--broker", "redis", "--redis-url", redis_server.url]
    nodes = [GatewayProcess(tmp_path / f"n{i}", sets, config=ROUTES, args=args).start() for i in range(2)]
    room = f"cs:{uniq()}"
    try:
        clients = [await n.client(f"agent{i}") for i, n in enumerate(nodes)]
        for c in clients:
            await c.join(room)
        acks = await asyncio.gather(*(c.publish(room, {"i": i, "k": k}) for k in range(50) for i, c in enumerate(clients)))
        assert sorted(a["seq"] for a in acks) == list(range(1, 101)), "gapless across nodes"

        async def received(c: object) -> list[int]:
            return [(await c.recv(timeout=20))["seq"] for _ in range(100)]  # type: ignore[attr-defined]

        orders = await asyncio.gather(*(received(c) for c in clients))
        assert orders[0] == orders[1] == list(range(1, 101)), "the same order on both nodes"
        page = await clients[0].history(room, limit=100)
        assert [m["seq"] for m in page["msgs"]] == list(range(1, 101)), "and in the store"

        command(redis_server.port, "FLUSHALL")
        late = await nodes[1].client("late")
        ack = await late.join(room, history=5)
        assert [m["seq"] for m in ack["msgs"]] == [96, 97, 98, 99, 100], "history from the store after FLUSHALL"
        nxt = await clients[0].publish(room, {"after": "flush"})
        assert nxt["seq"] == 101, "the sequence goes on past what the store holds"
        page = await late.history(room, before_seq=3, limit=10)
        assert [m["seq"] for m in page["msgs"]] == [1, 2]
        for c in (*clients, late):
            await c.close()
    finally:
        for n in nodes:
            assert not n.finish()


async def test_database_down_durable_publishes_fail_clearly_live_rooms_go_on(private_pg: PostgresServer, tmp_path: Path) -> None:
    dsn = private_pg.dsn()
    migrate(dsn)
    g = GatewayProcess(tmp_path, ["store.kind=postgres", f"store.dsn={dsn}", "limits.client_rate=0"], config=ROUTES).start()
    cs, live, arch = f"cs:{uniq()}", f"live:{uniq()}", f"arch:{uniq()}"
    try:
        c = await g.client("u1")
        await c.join(cs)
        await c.join(live)
        await c.join(arch)
        assert (await c.publish(cs, {"n": 1}, cid="m1"))["seq"] == 1
        private_pg.stop()
        with pytest.raises(GatewayError) as e:
            await c.publish(cs, {"n": 2}, cid="m2")
        assert e.value.code == 5030
        assert (await c.publish(live, {"still": "live"}))["seq"] >= 1
        # An archive room goes on too; its message is written once the database is back.
        assert (await c.publish(arch, {"kept": "later"}))["seq"] == 1
        assert (await c.recv(timeout=10))["data"] == {"n": 1}
        private_pg.start()
        # The retry with the same cid is stored once, under the seq it was published with.
        ack = await eventually(lambda: _try(c.publish(cs, {"n": 2}, cid="m2")), timeout=20)
        assert ack["seq"] == 2
        page = await c.history(cs)
        assert [(m["seq"], m["data"]) for m in page["msgs"]] == [(1, {"n": 1}), (2, {"n": 2})]
        assert (g.metric("gateway_store_unavailable_total") or 0) >= 1
        archived = await eventually(lambda: _stored(c, arch), timeout=20)
        assert [m["data"] for m in archived["msgs"]] == [{"kept": "later"}]
        await c.close()
    finally:
        assert not g.finish()


async def _try(coro: object) -> object:
    try:
        return await coro  # type: ignore[misc]
    except GatewayError as e:
        if e.code != 5030:
            raise
        return None


async def _stored(c: object, room: str) -> object:
    """The room's history page once it holds something (None while the store is down or empty)."""
    page = await _try(c.history(room))  # type: ignore[attr-defined]
    return page if page and page["msgs"] else None  # type: ignore[index]
