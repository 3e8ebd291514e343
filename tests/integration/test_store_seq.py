"""A room's seq is never given twice in the store (issue 14), even when Redis loses the
room's state (``FLUSHALL``) and the publishing node's idea of the room's last seq is old:
two gateway nodes on Redis and one PostgreSQL, the publisher has no member in the room (so
it does not see the other node's messages)."""

from __future__ import annotations

from pathlib import Path

from support.gateway import GatewayProcess, uniq
from support.postgres import migrate
from support.redis import RedisServer, command

ROUTES = """
[[routes]]
pattern = "cs:{id}"
join = "all"
publish = "all"
user_rate = 0
room_rate = 0
store = "durable"
"""


async def test_a_stale_floor_after_flushall_never_loses_an_acknowledged_message(redis_server: RedisServer, postgres_db: str, tmp_path: Path) -> None:
    migrate(postgres_db)
    sets = ["store.kind=postgres", f"store.dsn={postgres_db}", "limits.client_rate=0"]
    args = ["--broker", "redis", "--redis-url", redis_server.url]
    a, b = (GatewayProcess(tmp_path / n, sets, config=ROUTES, args=args).start() for n in ("a", "b"))
    room = f"cs:{uniq()}"
    try:
        first = await a.publish(room, {"from": "api on a"})  # a learns the room's floor: 1
        assert first["seq"] == 1
        c = await b.client("shopper")
        await c.join(room)
        for i in range(4):
            await c.publish(room, {"i": i})  # seqs 2..5, stored by b; a has no member, sees none
        command(redis_server.port, "FLUSHALL")
        again = await a.publish(room, {"from": "api on a, after the flush"})
        assert again["seq"] == 6, again
        page = await c.history(room, limit=100)
        assert [(m["seq"], m["data"]) for m in page["msgs"]] == [
            (1, {"from": "api on a"}), *((i + 2, {"i": i}) for i in range(4)), (6, {"from": "api on a, after the flush"})]
        assert (a.metric("gateway_store_seq_collisions_total") or 0) >= 1
        await c.close()
    finally:
        for g in (a, b):
            assert not g.finish()
