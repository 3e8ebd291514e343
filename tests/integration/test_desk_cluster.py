"""The desk on two gateway nodes sharing a real redis-server (broker and assignment
engine) and a real PostgreSQL (store): concurrent accepts of the same session on both
nodes, exactly one winner, over 1,000 sessions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support.gateway import GatewayProcess, uniq
from support.postgres import migrate
from support.redis import RedisServer

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


def nodes(redis_server: RedisServer, dsn: str, tmp_path: Path) -> list[GatewayProcess]:
    migrate(dsn)
    sets = ["store.kind=postgres", f"store.dsn={dsn}", "limits.client_rate=0", "hooks.timeout=30"]
    args = ["--broker", "redis", "--redis-url", redis_server.url]
    return [GatewayProcess(tmp_path / f"n{i}", sets, config=ROUTES + DESK, args=args).start() for i in range(2)]


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
