"""The desk's assignment engine (gateway.desk.engine): the same contract for the memory
engine and the Redis one (a real redis-server), and the Redis one's race: two engines
(two nodes' connections) claiming the same sessions at once, exactly one winner each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from support.redis import RedisServer

from gateway.desk.engine import Assigner, MemoryAssigner, RedisAssigner


@pytest.fixture(params=["memory", "redis"])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Assigner]:
    e: Assigner
    if request.param == "memory":
        e = MemoryAssigner()
    else:
        srv: RedisServer = request.getfixturevalue("redis_server")
        e = RedisAssigner(srv.url, "t")
    await e.start()
    try:
        yield e
    finally:
        await e.close()


async def test_claim_and_capacity(engine: Assigner) -> None:
    assert await engine.take_rebuild() and not await engine.take_rebuild()
    await engine.set_agent("alice", status="online", capacity=1, departments=("pre",))
    await engine.set_agent("bob", status="offline", capacity=3, departments=("pre",))
    await engine.enqueue("s1", "pre", 10)
    await engine.enqueue("s2", "pre", 5)
    assert await engine.queue("pre") == [("s2", 5), ("s1", 10)]
    assert await engine.claim("s1", "bob", "pre") == "offline"
    assert await engine.claim("s1", "alice", "pre") == "ok"
    assert await engine.claim("s1", "alice", "pre") == "mine"
    assert await engine.claim("s1", "bob", "pre", force=True) == "taken"
    assert await engine.claim("s2", "alice", "pre") == "full"
    assert await engine.queue("pre") == [("s2", 5)]
    a = await engine.agent("alice")
    assert a is not None and a.load == 1 and a.capacity == 1 and a.departments == ("pre",)
    assert await engine.owner("s1") == "alice" and await engine.sessions_of("alice") == ["s1"]
    assert await engine.release("s1", "bob") is None
    assert await engine.release("s1") == "alice"
    a = await engine.agent("alice")
    assert a is not None and a.load == 0 and await engine.sessions_of("alice") == []
    assert await engine.release("s1") is None


async def test_pick_strategies(engine: Assigner) -> None:
    for u in ("a", "b", "c"):
        await engine.set_agent(u, status="online", capacity=2, departments=("pre",))
    await engine.set_agent("z", status="online", capacity=9, departments=("after",))
    assert await engine.pick("pre", "least_busy", True) is None  # empty queue
    for i in range(4):
        await engine.enqueue(f"s{i}", "pre", 100 + i)
    assert await engine.pick("pre", "manual", True) is None
    got = [await engine.pick("pre", "round_robin", False) for _ in range(4)]
    assert got == [("s0", "a"), ("s1", "b"), ("s2", "c"), ("s3", "a")]
    # least busy: b and c have 1, a has 2; b was assigned before c
    await engine.enqueue("s4", "pre", 200)
    assert await engine.pick("pre", "least_busy", False) == ("s4", "b")
    await engine.enqueue("s5", "pre", 201)
    assert await engine.pick("pre", "least_busy", False) == ("s5", "c")
    await engine.enqueue("s6", "pre", 202)
    assert await engine.pick("pre", "least_busy", False) is None  # everybody full
    await engine.release("s0")
    # sticky: s7 wants z (another department, online with room) and is first in line
    await engine.enqueue("s7", "pre", 150, sticky="z")
    assert await engine.pick("pre", "least_busy", True) == ("s7", "z")
    assert await engine.pick("pre", "least_busy", True) == ("s6", "a")
    await engine.set_agent("a", status="away")
    await engine.release("s6")
    await engine.enqueue("s8", "pre", 300, sticky="a")  # sticky agent away: nobody else has room
    assert await engine.pick("pre", "least_busy", True) is None
    agents = {x.user: x for x in await engine.agents()}
    assert set(agents) == {"a", "b", "c", "z"} and agents["a"].status == "away" and agents["z"].load == 1
    await engine.mark_gone("b", 1234)
    b = await engine.agent("b")
    assert b is not None and b.gone == 1234
    await engine.mark_back("b")
    b = await engine.agent("b")
    assert b is not None and b.gone == 0


@pytest.mark.timeout(60)
async def test_two_redis_engines_race(redis_server: RedisServer) -> None:
    one, two = RedisAssigner(redis_server.url, "race"), RedisAssigner(redis_server.url, "race")
    await one.start()
    await two.start()
    try:
        for u in ("x", "y"):
            await one.set_agent(u, status="online", capacity=100_000, departments=("d",))
        wins = 0
        for i in range(1000):
            await one.enqueue(f"s{i}", "d", i)
        results = await asyncio.gather(*(e.claim(f"s{i}", u, "d") for i in range(1000) for e, u in ((one, "x"), (two, "y"))))
        for i in range(1000):
            pair = results[2 * i: 2 * i + 2]
            assert sorted(pair) == ["ok", "taken"], (i, pair)
            wins += 1
        x, y = await one.agent("x"), await two.agent("y")
        assert x is not None and y is not None and x.load + y.load == 1000
        assert await one.queue("d") == []
        assert wins == 1000
    finally:
        await one.close()
        await two.close()


async def test_presence_across_nodes_and_taking_a_gone_agent_once(engine: Assigner) -> None:
    await engine.set_agent("a", status="online", capacity=2, departments=("pre",))
    await engine.conn_up("a", "n1", 1000)
    await engine.conn_up("a", "n2", 2000)
    assert await engine.conns("a") == {"n1": 1000, "n2": 2000}
    assert await engine.connected("a", 1500) and not await engine.connected("a", 2000)
    await engine.conn_down("a", "n1")
    await engine.mark_gone("a", 100)
    assert not await engine.take_gone("a", 100, 1500), "a live connection on n2"
    a = await engine.agent("a")
    assert a is not None and a.status == "online" and a.gone == 100
    assert not await engine.take_gone("a", 99, 3000), "another gone mark"
    # Many nodes' timers at once: exactly one takes the agent offline.
    got = await asyncio.gather(*(engine.take_gone("a", 100, 3000) for _ in range(8)))
    assert sorted(got) == [False] * 7 + [True]
    a = await engine.agent("a")
    assert a is not None and a.status == "offline" and a.gone == 0
    # A connection clears the gone mark.
    await engine.set_agent("a", status="online")
    await engine.mark_gone("a", 200)
    await engine.conn_up("a", "n3", 5000)
    a = await engine.agent("a")
    assert a is not None and a.gone == 0 and not await engine.take_gone("a", 200, 6000)


async def test_pick_skips_a_queued_session_that_already_has_an_owner(engine: Assigner) -> None:
    """A rebuild that raced an assignment may queue an assigned session again: pick drops
    it instead of giving it to a second agent."""
    assert await engine.take_rebuild() and await engine.built()
    await engine.set_agent("a", status="online", capacity=5, departments=("pre",))
    await engine.set_agent("b", status="online", capacity=5, departments=("pre",))
    await engine.enqueue("s1", "pre", 10)
    await engine.enqueue("s2", "pre", 20)
    assert await engine.claim("s1", "a", None) == "ok"  # not out of the queue
    got = await engine.pick("pre", "least_busy", False)
    assert got is not None and got[0] == "s2"
    assert await engine.owner("s1") == "a" and await engine.queue("pre") == []
    assert sum(x.load for x in await engine.agents()) == 2
