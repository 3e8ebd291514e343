"""Conversations across two gateway nodes (issue 15): a real redis-server as the broker and
a real PostgreSQL as the store. Offline delivery picked up on the other node, a group
with members on both nodes and concurrent senders (one gapless order everywhere, the
store's), and a read on one node clearing the badge on the other."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from support.gateway import GatewayProcess, uniq
from support.postgres import migrate
from support.redis import RedisServer
from support.routes import conversation, routes

ROUTES = routes(conversation("dm:{a}:{b}", "dm", members_max=2), conversation("group:{group_id}", "group"))


def nodes(redis_server: RedisServer, dsn: str, tmp_path: Path) -> list[GatewayProcess]:
    migrate(dsn)
    sets = ["store.kind=postgres", f"store.dsn={dsn}", "limits.client_rate=0"]
    args = ["--broker", "redis", "--redis-url", redis_server.url]
    return [GatewayProcess(tmp_path / f"n{i}", sets, config=ROUTES, args=args).start() for i in range(2)]


def conv(ack: dict[str, Any], room: str) -> dict[str, Any]:
    (found,) = [x for x in ack["convs"] if x["room"] == room]
    return found


async def test_offline_messages_reach_the_user_on_the_other_node(redis_server: RedisServer, postgres_db: str, tmp_path: Path) -> None:
    n0, n1 = nodes(redis_server, postgres_db, tmp_path)
    alice, bob = f"alice{uniq()}", f"bob{uniq()}"
    room = f"dm:{min(alice, bob)}:{max(alice, bob)}"
    try:
        a = await n0.client(alice)
        await a.request("sync")
        acks = []
        for k in range(0, 1000, 25):  # 25 in flight (a client's requests queue behind a slow one, up to a bound)
            acks += await asyncio.gather(*(a.publish(room, {"i": i}, cid=f"m{i}") for i in range(k, k + 25)))
        assert sorted(x["seq"] for x in acks) == list(range(1, 1001))
        b = await n1.client(bob)
        s = await b.request("sync")
        c = conv(s, room)
        assert (c["unread"], c["last_seq"]) == (1000, 1000)
        seqs, after = [], 0
        while True:
            page = await b.request("history", room=room, after_seq=after, limit=200)
            seqs += [m["seq"] for m in page["msgs"]]
            if not page["more"]:
                break
            after = seqs[-1]
        assert seqs == list(range(1, 1001))
        # Live from now on, across nodes.
        ack = await a.publish(room, {"i": "live"})
        m = await b.recv(timeout=10)
        assert (m["seq"], m["data"]) == (ack["seq"], {"i": "live"})
        await a.close()
        await b.close()
    finally:
        for n in (n0, n1):
            assert not n.finish()


async def test_a_group_on_two_nodes_one_order_for_everyone_and_reads_sync_across_nodes(
    redis_server: RedisServer, postgres_db: str, tmp_path: Path,
) -> None:
    n0, n1 = nodes(redis_server, postgres_db, tmp_path)
    users = [f"g{uniq()}" for _ in range(6)]
    try:
        clients = [await (n0 if i % 2 == 0 else n1).client(u) for i, u in enumerate(users)]
        for c in clients:
            await c.request("sync")
        waiters = [c.wait_event(lambda f: f.get("op") == "conv" and f.get("event") == "added", timeout=15) for c in clients[1:]]
        room = (await clients[0].request("create", members=users[1:], meta={"name": "two nodes"}))["room"]
        await asyncio.gather(*waiters)
        # Concurrent senders on both nodes.
        acks = await asyncio.gather(*(c.publish(room, {"from": i, "k": k}) for k in range(20) for i, c in enumerate(clients)))
        sent = sorted(a["seq"] for a in acks)
        assert sent == list(range(sent[0], sent[0] + 120)), "gapless"

        async def seen(c: Any) -> list[int]:
            got: list[int] = []
            while len([s for s in got if s >= sent[0]]) < 120:
                got.append((await c.recv(timeout=20))["seq"])
            return [s for s in got if s >= sent[0]]

        orders = await asyncio.gather(*(seen(c) for c in clients))
        assert all(o == sent for o in orders), "the same order on every member, on both nodes"
        page = await clients[1].request("history", room=room, after_seq=sent[0] - 1, limit=200)
        assert [m["seq"] for m in page["msgs"]] == sent, "and in the store"
        # Two devices of one user on two nodes: a read on one clears the other's badge.
        phone = await n1.client(users[0])
        await phone.request("sync")
        cleared = phone.wait_event(lambda f: f.get("op") == "read" and f.get("user") == users[0], timeout=10)
        await clients[0].request("read", room=room, seq=sent[-1])
        assert (await cleared)["seq"] == sent[-1]
        assert conv(await phone.request("sync"), room)["unread"] == 0
        for c in (*clients, phone):
            await c.close()
    finally:
        for n in (n0, n1):
            assert not n.finish()
