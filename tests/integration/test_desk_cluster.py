"""The desk on two gateway nodes sharing a real redis-server (broker and assignment
engine) and a real PostgreSQL (store): concurrent accepts of the same session on both
nodes, exactly one winner, over 1,000 sessions; an agent's presence across nodes (a
reconnect on the other node keeps the chats, a departure re-queues them once); a Redis
wipe (FLUSHALL) while the nodes run is noticed and the engine rebuilt from the store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support.gateway import GatewayProcess, uniq
from support.postgres import migrate
from support.redis import RedisServer
from support.wait import eventually

from gateway.client import GatewayClient, GatewayError

from test_desk import ROUTES

DESK = """
[plugins.desk]
enabled = true
strategy = "manual"
sticky = false
bot_turns = 0
capacity = 1000
"""

SESSIONS = 1000
PAIRS = 8  # agent connections per node; session i is raced by agent i % PAIRS of each node


PRESENCE = """
[plugins.desk]
enabled = true
strategy = "least_busy"
sticky = false
bot_turns = 0
grace = 1.5
capacity = 1
"""


def nodes(redis_server: RedisServer, dsn: str, tmp_path: Path, desk: str = DESK) -> list[GatewayProcess]:
    migrate(dsn)
    # A prefix of its own: the session's Redis is shared, and another test's agents (still
    # "online" until their node's reports expire) must not be picked for this test's sessions.
    sets = ["store.kind=postgres", f"store.dsn={dsn}", "limits.client_rate=0", "hooks.timeout=30", "broker.leave_grace=0.5",
            f"broker.prefix={uniq('t')}"]
    args = ["--broker", "redis", "--redis-url", redis_server.url]
    return [GatewayProcess(tmp_path / f"n{i}", sets, config=ROUTES + desk, args=args).start() for i in range(2)]


async def _accept(c: GatewayClient, sid: str) -> str:
    try:
        await c.request("cs.accept", session=sid, timeout=60)
        return "ok"
    except GatewayError as e:
        return str(e.code)


@pytest.mark.timeout(180)
async def test_concurrent_accepts_on_two_nodes_have_exactly_one_winner(redis_server: RedisServer, postgres_db: str, tmp_path: Path) -> None:
    n0, n1 = nodes(redis_server, postgres_db, tmp_path)
    tag = uniq("k")
    try:
        sids: list[str] = []
        for k in range(0, SESSIONS, 50):
            res = await asyncio.gather(*((n0 if i % 2 else n1).api("POST", "/v1/cs/sessions", {"shopper": f"{tag}s{i}"}) for i in range(k, k + 50)))
            for status, body in res:
                assert status == 201, body
                sids.append(body["session"])
        assert len(set(sids)) == SESSIONS
        xs = [await n0.client(f"{tag}x{j}", params={"role": "agent"}) for j in range(PAIRS)]
        ys = [await n1.client(f"{tag}y{j}", params={"role": "agent"}) for j in range(PAIRS)]
        for c in xs + ys:
            await c.request("cs.status", status="online")
        # Every session: one accept from a node-0 agent and one from a node-1 agent, at once.
        tasks = [asyncio.gather(_accept(xs[i % PAIRS], sid), _accept(ys[i % PAIRS], sid)) for i, sid in enumerate(sids)]
        results = await asyncio.gather(*tasks)
        winners: dict[str, str] = {}
        for i, (sid, (rx, ry)) in enumerate(zip(sids, results, strict=True)):
            assert sorted((rx, ry)) == ["4090", "ok"], (sid, rx, ry)
            winners[sid] = f"{tag}x{i % PAIRS}" if rx == "ok" else f"{tag}y{i % PAIRS}"
        both = {w[len(tag)] for w in winners.values()}
        assert both == {"x", "y"}, "both nodes won some races"
        # The store agrees with the winners, and the engine's loads add up.
        status, body = await n0.api("GET", "/v1/cs/sessions?state=assigned&limit=1000")
        assert status == 200
        stored = {s["session"]: s["agent"] for s in body["sessions"]}
        assert stored == winners
        status, body = await n1.api("GET", "/v1/cs/agents")
        loads: dict[str, Any] = {a["user"]: a["load"] for a in body["agents"] if a["user"].startswith(tag)}
        assert sum(loads.values()) == SESSIONS
        for j in range(PAIRS):
            assert loads[f"{tag}x{j}"] + loads[f"{tag}y{j}"] == SESSIONS // PAIRS
        # Exactly one agent in each sampled conversation.
        for sid in sids[:20]:
            status, body = await n1.api("GET", f"/v1/conversations/cs:{sid}/members")
            assert status == 200, body
            agents = [m["user"] for m in body["members"] if m["role"] == "agent"]
            assert agents == [winners[sid]], (sid, body)
        for c in xs + ys:
            await c.close()
    finally:
        assert not n0.finish()
        assert not n1.finish()


async def _session(g: GatewayProcess, sid: str) -> dict[str, Any]:
    status, body = await g.api("GET", f"/v1/cs/sessions/{sid}")
    assert status == 200, body
    return dict(body)


async def _agents(g: GatewayProcess, tag: str) -> dict[str, tuple[str, int]]:
    status, body = await g.api("GET", "/v1/cs/agents")
    assert status == 200, body
    return {a["user"]: (a["status"], a["load"]) for a in body["agents"] if a["user"].startswith(tag)}


async def _requeues(c: GatewayClient, room: str) -> int:
    page = await c.request("history", room=room, limit=100)
    return sum(1 for m in page["msgs"] if m["type"] == "cs.state" and m["data"]["by"] == "requeue")


async def _requeued_once(c: GatewayClient, room: str) -> int:
    """The requeue notices in ``room`` once the first is stored (the session's state is
    written before its notice is posted, so one seen queued may not show it yet), read
    again a moment later so that a second one would be counted."""
    await eventually(lambda: _requeues(c, room), timeout=10, what=f"a requeue notice in {room}")
    await asyncio.sleep(0.5)
    return await _requeues(c, room)


@pytest.mark.timeout(90)
async def test_an_agent_moving_between_nodes_keeps_the_chats_and_a_departure_requeues_once(
        redis_server: RedisServer, postgres_db: str, tmp_path: Path) -> None:
    n0, n1 = nodes(redis_server, postgres_db, tmp_path, PRESENCE)
    tag = uniq("p")
    alice, shopper = f"{tag}alice", f"{tag}shop"
    try:
        a0 = await n0.client(alice, params={"role": "agent"})
        await a0.request("cs.status", status="online")
        s = await n1.client(shopper)
        sid = (await s.request("cs.open"))["session"]
        await eventually(lambda: _is(n0, sid, "assigned"), timeout=10, what="assigned")
        # (The broker's join/leave debounce makes the desk's disconnect hook run once, when
        # the agent is gone from every node for leave_grace, 0.5 s here; then grace runs.)
        # 1. The console reconnected on node 1 before node 0 noticed the old socket die.
        a1 = await n1.client(alice, params={"role": "agent"})
        await a0.close()
        await asyncio.sleep(3.0)  # leave_grace + grace, and more
        got = await _session(n0, sid)
        assert (got["state"], got["agent"]) == ("assigned", alice), "connected on node 1: no re-queue"
        # 2. A blip across nodes: gone from node 1, back on node 0 within grace.
        await a1.close()
        await asyncio.sleep(0.3)
        a2 = await n0.client(alice, params={"role": "agent"})
        await asyncio.sleep(3.0)
        got = await _session(n1, sid)
        assert (got["state"], got["agent"]) == ("assigned", alice), "back within grace on another node"
        # 3. Really gone, from both nodes at once: re-queued after grace, once.
        a3 = await n1.client(alice, params={"role": "agent"})
        await asyncio.gather(a2.close(), a3.close())
        await eventually(lambda: _is(n1, sid, "queued"), timeout=10, what="re-queued after grace")
        await asyncio.sleep(2.0)  # any second node's timer has run by now
        assert await _requeued_once(s, f"cs:{sid}") == 1
        assert (await _agents(n0, tag))[alice] == ("offline", 0)
        await s.close()
    finally:
        assert not n0.finish()
        assert not n1.finish()


@pytest.mark.timeout(90)
async def test_an_agent_whose_node_dies_is_requeued_by_the_other_node(redis_server: RedisServer, postgres_db: str, tmp_path: Path) -> None:
    n0, n1 = nodes(redis_server, postgres_db, tmp_path, PRESENCE)
    tag = uniq("d")
    alice, shopper = f"{tag}alice", f"{tag}shop"
    try:
        a = await n1.client(alice, params={"role": "agent"})
        await a.request("cs.status", status="online")
        s = await n0.client(shopper)
        sid = (await s.request("cs.open"))["session"]
        await eventually(lambda: _is(n0, sid, "assigned"), timeout=10, what="assigned")
        n1.kill()  # no disconnect event anywhere: node 0 notices node 1's reports expire
        await eventually(lambda: _is(n0, sid, "queued"), timeout=15, what="re-queued by node 0")
        assert await _requeued_once(s, f"cs:{sid}") == 1
        await s.close()
    finally:
        assert not n0.finish()
        n1.finish()


@pytest.mark.timeout(90)
async def test_an_agent_gone_while_their_node_stops_is_requeued_by_the_other_node(
        redis_server: RedisServer, postgres_db: str, tmp_path: Path) -> None:
    """The node that heard the agent leave stops (a rolling deploy) before the grace ran
    out: its timer is lost; the other node finds the gone mark and re-queues once."""
    n0, n1 = nodes(redis_server, postgres_db, tmp_path, PRESENCE)
    tag = uniq("g")
    alice, shopper = f"{tag}alice", f"{tag}shop"
    try:
        a = await n1.client(alice, params={"role": "agent"})
        await a.request("cs.status", status="online")
        s = await n0.client(shopper)
        sid = (await s.request("cs.open"))["session"]
        await eventually(lambda: _is(n0, sid, "assigned"), timeout=10, what="assigned")
        await a.close()
        await asyncio.sleep(0.8)  # leave_grace: node 1 marked her gone and waits for the grace
        assert await _is(n0, sid, "assigned")
        assert n1.stop() == 0
        await eventually(lambda: _is(n0, sid, "queued"), timeout=15, what="re-queued by node 0")
        assert await _requeued_once(s, f"cs:{sid}") == 1
        await s.close()
    finally:
        assert not n0.finish()
        assert not n1.finish()


async def _is(g: GatewayProcess, sid: str, state: str) -> bool:
    return (await _session(g, sid))["state"] == state


@pytest.mark.timeout(90)
async def test_a_redis_wipe_is_noticed_and_the_engine_rebuilt_from_the_store(redis_server: RedisServer, postgres_db: str, tmp_path: Path) -> None:
    n0, n1 = nodes(redis_server, postgres_db, tmp_path, PRESENCE)
    tag = uniq("w")
    alice, bob = f"{tag}alice", f"{tag}bob"
    try:
        a = await n0.client(alice, params={"role": "agent"})
        await a.request("cs.status", status="online")
        b = await n1.client(bob, params={"role": "agent"})
        await b.request("cs.status", status="away", capacity=3)
        shoppers = [await (n0 if i % 2 else n1).client(f"{tag}s{i}") for i in range(3)]
        sids = [(await c.request("cs.open"))["session"] for c in shoppers]
        await eventually(lambda: _is(n0, sids[0], "assigned"), timeout=10, what="the first assigned")
        assert [(await _session(n0, x))["state"] for x in sids] == ["assigned", "queued", "queued"]
        before = await _agents(n1, tag)
        assert before == {alice: ("online", 1), bob: ("away", 0)}
        await asyncio.sleep(1.0)  # a presence round (every 0.5 s) of each node has seen the agents
        assert redis_server.cli("FLUSHALL").strip() == "OK"
        # Noticed by the presence loop (every grace/3 s): agents, loads and queues are back.
        await eventually(lambda: _agents_are(n1, tag, before), timeout=10, what="agents rebuilt")
        q = await b.request("cs.queue")
        assert [x["session"] for x in q["sessions"]] == sids[1:]
        status, body = await n0.api("GET", "/v1/cs/sessions?state=queued")
        assert status == 200 and [x["session"] for x in body["sessions"]] == sids[1:]
        # The engine works again: alice closes hers and gets the next one (oldest first).
        await a.request("cs.close", session=sids[0])
        await eventually(lambda: _is(n1, sids[1], "assigned"), timeout=10, what="the next one assigned")
        got = await _session(n1, sids[1])
        assert got["agent"] == alice and (await _agents(n0, tag))[alice] == ("online", 1)
        # One node rebuilt it.
        rebuilt = sum(g.log_text().count("rebuilding it from the store") for g in (n0, n1))
        assert rebuilt == 1
        for c in [a, b, *shoppers]:
            await c.close()
    finally:
        assert not n0.finish()
        assert not n1.finish()


async def _agents_are(g: GatewayProcess, tag: str, want: dict[str, tuple[str, int]]) -> bool:
    return await _agents(g, tag) == want
