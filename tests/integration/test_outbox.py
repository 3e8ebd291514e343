"""The outbox through a real gateway (issue 14): stored messages and room events POSTed to
a real HTTP endpoint (:class:`support.receiver.Receiver`) that is down, then fails, then
recovers, while the gateway is killed and restarted; every event arrives, in order per
room, signed. Refused events become dead letters and are replayed through the API.
The embedded SQLite store; the PostgreSQL and two-node case is in test_store_cluster.py.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from support.gateway import GatewayProcess, uniq
from support.postgres import migrate
from support.receiver import Receiver
from support.redis import RedisServer
from support.wait import eventually

SECRET = "outbox-secret"

ROUTES = """
[[routes]]
pattern = "cs:{{id}}"
join = "all"
publish = "all"
user_rate = 0
room_rate = 0
store = "durable"
recoverable_types = ["chat", "notice"]

[[routes]]
pattern = "live:{{id}}"
join = "all"
publish = "all"
user_rate = 0
room_rate = 0
store = "archive"

[[routes]]
pattern = "plain:{{id}}"
join = "all"
publish = "all"

[outbox]
poll_interval = 0.05
gap_wait = 0.5
backoff_min = 0.1
backoff_max = 0.4

[[outbox.endpoints]]
name = "crm"
url = "{url}"
secret_env = "OUTBOX_SECRET"
rooms = ["cs:*", "live:*"]
events = ["message", "join", "leave", "kick", "ban"]
batch = 7
headers = {{ Authorization = "Bearer crm-token" }}
"""


def gateway(path: Path, rec: Receiver, *sets: str) -> GatewayProcess:
    return GatewayProcess(path, ["limits.client_rate=0", *sets], config=ROUTES.format(url=rec.url), env={"OUTBOX_SECRET": SECRET})


async def api(g: GatewayProcess, method: str, path: str, json: Any = None, *, expect: int = 200, headers: dict[str, str] | None = None) -> Any:
    status, body = await g.api(method, path, json, headers=headers)
    assert status == expect, (status, body)
    return body


def in_room_order(events: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Each room's message seqs in the order first received (repeats dropped)."""
    seen: set[str] = set()
    rooms: dict[str, list[int]] = defaultdict(list)
    for e in events:
        if e["event"] == "message" and e["id"] not in seen:
            seen.add(e["id"])
            rooms[e["room"]].append(e["seq"])
    return rooms


async def test_every_event_arrives_in_order_signed_through_an_outage_500s_and_a_kill_9(tmp_path: Path) -> None:
    rec = Receiver(SECRET)  # not listening yet: the endpoint is down
    g = gateway(tmp_path, rec).start()
    cs, live = f"cs:{uniq()}", f"live:{uniq()}"
    try:
        c = await g.client("alice")
        await c.join(cs)
        await c.join(live)
        for i in range(20):
            await c.publish(cs, {"text": f"cs {i}"})
            await c.publish(live, {"text": f"live {i}"})
        plain = f"plain:{uniq()}"
        await c.join(plain)
        await c.publish(plain, {"text": "not kept, not sent"})
        await api(g, "POST", "/v1/publish", {"room": cs, "type": "notice", "data": {"order": 7, "status": "shipped"}},
                    headers={"Idempotency-Key": "order-7-shipped"})
        await eventually(lambda: (g.metric("gateway_outbox_failures_total") or 0) >= 2, timeout=20, what="failed attempts while down")
        await eventually(lambda: g.metric("gateway_store_backlog") == 0, timeout=20, what="the archive written")
        g.signal(signal.SIGKILL)  # the events wait in the store, not in the process
        g.wait(10)
        g.stopped_by_test = True
        await c.close()

        g.start()
        c = await g.client("bob")
        await c.join(cs)
        for i in range(10):
            await c.publish(cs, {"text": f"after restart {i}"})
        # The endpoint comes up failing: 500 (once with a Retry-After), then fine.
        failures = {"n": 0}

        def answer(events: list[dict[str, Any]]) -> tuple[int, dict[str, str]]:
            failures["n"] += 1
            if failures["n"] == 1:
                return 503, {"Retry-After": "1"}
            return (500, {}) if failures["n"] <= 4 else (200, {})

        rec.answer = answer
        await rec.start()
        want_cs = [f"msg:{cs}:{s}" for s in range(1, 32)]
        want_live = [f"msg:{live}:{s}" for s in range(1, 21)]
        await eventually(lambda: set(want_cs + want_live) <= rec.delivered_ids(), timeout=60, what="every message delivered")
        order = in_room_order(rec.delivered())
        assert order[cs] == list(range(1, 32)) and order[live] == list(range(1, 21))
        assert all(r.signed for r in rec.requests), "every request carries a valid signature"
        assert all(r.headers.get("Authorization") == "Bearer crm-token" for r in rec.requests)
        assert max(len(r.events) for r in rec.requests) <= 7
        # Retry-After: 1 was honoured.
        assert rec.requests[1].at - rec.requests[0].at >= 0.9
        # Retries repeat the same delivery id; the batch's events are stable.
        assert rec.requests[0].headers["X-Gateway-Delivery"] == rec.requests[1].headers["X-Gateway-Delivery"]
        n = int(rec.requests[0].headers["X-Gateway-Attempt"])  # attempts while down came first
        assert [r.headers["X-Gateway-Attempt"] for r in rec.requests[:3]] == [str(n), str(n + 1), str(n + 2)]
        notice = next(e for e in rec.delivered() if e["event"] == "message" and e["type"] == "notice")
        assert notice["data"] == {"order": 7, "status": "shipped"} and notice["from"] is None and notice["cid"] == "api:order-7-shipped"
        first = next(e for e in rec.delivered() if e["id"] == f"msg:{cs}:1")
        assert first["data"] == {"text": "cs 0"} and first["from"] == "alice" and first["route"] == "cs:{id}" and first["type"] == "chat"
        # Room events: alice's and bob's joins (alice's leave went with the kill -9).
        joins = {(e["room"], e["user"]) for e in rec.delivered() if e["event"] == "join"}
        assert {(cs, "alice"), (live, "alice"), (cs, "bob")} <= joins
        await eventually(lambda: g.metric("gateway_outbox_backlog") == 0, timeout=10)
        assert g.metric("gateway_outbox_leader") == 1
        assert (g.metric("gateway_outbox_delivered_total") or 0) >= 31 + 20 - 20  # this process's share
        await c.close()
    finally:
        await rec.stop()
        assert not g.finish()


async def test_a_refused_event_becomes_a_dead_letter_and_is_replayed(tmp_path: Path) -> None:
    rec = Receiver(SECRET)
    rec.answer = lambda events: (422, {}) if any("poison" in str(e.get("data")) for e in events) else (200, {})
    await rec.start()
    g = gateway(tmp_path, rec).start()
    cs = f"cs:{uniq()}"
    try:
        c = await g.client("carol")
        await c.join(cs)
        for text in ("one", "poison", "three", "four"):
            await c.publish(cs, {"text": text})
        ids = [f"msg:{cs}:{s}" for s in (1, 3, 4)]
        await eventually(lambda: set(ids) <= rec.delivered_ids(), timeout=20, what="the good events")
        assert f"msg:{cs}:2" not in rec.delivered_ids()
        dead = (await api(g, "GET", "/v1/outbox/crm/dead"))["dead_letters"]
        assert [(d["event_id"], d["event"]["data"]) for d in dead] == [(f"msg:{cs}:2", {"text": "poison"})]
        assert "HTTP 422" in dead[0]["error"]
        status = await api(g, "GET", "/v1/outbox")
        (ep,) = status["endpoints"]
        assert status["leader"] is True and ep["endpoint"] == "crm" and ep["dead_letters"] == 1 and ep["backlog"] == 0
        # The company fixes its endpoint and replays.
        rec.answer = lambda events: (200, {})
        assert (await api(g, "POST", "/v1/outbox/crm/dead/replay"))["replayed"] == 1
        await eventually(lambda: f"msg:{cs}:2" in rec.delivered_ids(), timeout=20, what="the replayed event")
        assert (await api(g, "GET", "/v1/outbox/crm/dead"))["dead_letters"] == []
        replayed = [e for e in rec.delivered() if e["id"] == f"msg:{cs}:2"]
        assert replayed[0]["data"] == {"text": "poison"}
        # Bad requests get clear 4xx.
        r = await api(g, "GET", "/v1/outbox/nosuch/dead", expect=404)
        assert "no outbox endpoint" in r["error"]
        r = await api(g, "POST", "/v1/outbox/crm/dead/replay", {"ids": ["x"]}, expect=400)
        assert "ids must be" in r["error"]
        await c.close()
    finally:
        await rec.stop()
        assert not g.finish()


async def test_dead_letters_after_the_endpoint_kept_failing_for_dead_letter_after(tmp_path: Path) -> None:
    rec = Receiver(SECRET)
    rec.answer = lambda events: (500, {})
    await rec.start()
    g = gateway(tmp_path, rec, "outbox.dead_letter_after=1.0").start()
    cs = f"cs:{uniq()}"
    try:
        c = await g.client("dave")
        await c.join(cs)
        for i in range(3):
            await c.publish(cs, {"n": i})
        await eventually(lambda: (g.metric("gateway_outbox_dead_letters_total") or 0) >= 3, timeout=20, what="dead letters")
        dead = (await api(g, "GET", "/v1/outbox/crm/dead"))["dead_letters"]
        assert {d["event_id"] for d in dead} >= {f"msg:{cs}:{s}" for s in (1, 2, 3)}
        assert all("HTTP 500" in d["error"] for d in dead)
        # It recovers: new events flow again.
        rec.answer = lambda events: (200, {})
        await c.publish(cs, {"n": 3})
        await eventually(lambda: f"msg:{cs}:4" in rec.delivered_ids(), timeout=20)
        await c.close()
    finally:
        await rec.stop()
        assert not g.finish()


async def test_room_events_join_leave_kick_ban(tmp_path: Path) -> None:
    rec = Receiver(SECRET)
    await rec.start()
    g = gateway(tmp_path, rec).start()
    cs, other = f"cs:{uniq()}", f"plain:{uniq()}"
    try:
        c = await g.client("erin")
        await c.join(cs)
        await c.join(other)  # not a room the endpoint asked for (a kick is about the user: it goes)
        await c.leave(cs)
        await api(g, "POST", "/v1/ban", {"room": cs, "user": "mallory", "seconds": 60})
        await api(g, "POST", "/v1/kick", {"user": "erin", "reason": "bye"})

        def kinds() -> list[tuple[str, str, str]]:
            return [(e["event"], e["room"], e["user"]) for e in rec.delivered() if e["event"] != "message"]

        await eventually(lambda: len(kinds()) >= 4, timeout=20, what="four room events")
        assert kinds() == [("join", cs, "erin"), ("leave", cs, "erin"), ("ban", cs, "mallory"), ("kick", "", "erin")]
        ev = {e["event"]: e for e in rec.delivered()}
        assert ev["kick"]["reason"] == "bye" and ev["ban"]["until"] > time.time()
        assert all(e["id"].startswith("evt:") and e["node"] == g.node_id for e in ev.values())
        await asyncio.sleep(0)
    finally:
        await rec.stop()
        assert not g.finish()


async def test_two_nodes_on_postgres_one_delivers_and_the_other_takes_over_after_kill_9(
    redis_server: RedisServer, postgres_db: str, tmp_path: Path,
) -> None:
    """Both nodes write the log (PostgreSQL); one holds the lease and delivers. Messages of
    one room published on both nodes at once arrive in seq order. The deliverer is killed
    mid-way: the other node takes the lease and delivers the rest (at least once)."""
    migrate(postgres_db)
    rec = Receiver(SECRET)
    rec.delay = 0.15  # a slow endpoint: delivery takes seconds, so the kill lands mid-way
    await rec.start()
    sets = ["store.kind=postgres", f"store.dsn={postgres_db}", "limits.client_rate=0"]
    args = ["--broker", "redis", "--redis-url", redis_server.url]
    nodes = [GatewayProcess(tmp_path / f"n{i}", sets, config=ROUTES.format(url=rec.url), args=args, env={"OUTBOX_SECRET": SECRET}).start()
             for i in range(2)]
    room = f"cs:{uniq()}"
    try:
        await eventually(lambda: sum(n.metric("gateway_outbox_leader") or 0 for n in nodes) == 1, timeout=20, what="one leader")
        leader = next(i for i, n in enumerate(nodes) if n.metric("gateway_outbox_leader") == 1)
        clients = [await n.client(f"agent{i}") for i, n in enumerate(nodes)]
        for c in clients:
            await c.join(room)
        acks = await asyncio.gather(*(c.publish(room, {"i": i, "k": k}) for k in range(60) for i, c in enumerate(clients)))
        assert sorted(a["seq"] for a in acks) == list(range(1, 121))
        await eventually(lambda: len(rec.delivered_ids()) >= 20, timeout=30, what="delivery under way")
        nodes[leader].signal(signal.SIGKILL)
        nodes[leader].wait(10)
        nodes[leader].stopped_by_test = True
        other = nodes[1 - leader]
        await eventually(lambda: other.metric("gateway_outbox_leader") == 1, timeout=30, what="the other node takes over")
        more = await clients[1 - leader].publish(room, {"after": "failover"})
        assert more["seq"] == 121
        want = {f"msg:{room}:{s}" for s in range(1, 122)}
        await eventually(lambda: want <= rec.delivered_ids(), timeout=60, what="every message delivered")
        assert in_room_order(rec.delivered())[room] == list(range(1, 122))
        assert all(r.signed for r in rec.requests)
        await clients[1 - leader].close()
    finally:
        await rec.stop()
        for n in nodes:
            assert not n.finish()


async def test_conversation_events_reach_the_outbox(tmp_path: Path) -> None:
    rec = Receiver(SECRET)
    await rec.start()
    cfg = ROUTES.format(url=rec.url).replace('rooms = ["cs:*", "live:*"]', 'rooms = ["group:*"]').replace(
        'events = ["message", "join", "leave", "kick", "ban"]', 'events = ["message", "recall", "member"]')
    cfg = cfg.replace("[outbox]", '[[routes]]\npattern = "group:{id}"\nkind = "group"\njoin = "none"\nstore = "durable"\nuser_rate = 0\n\n[outbox]')
    g = GatewayProcess(tmp_path, ["limits.client_rate=0"], config=cfg, env={"OUTBOX_SECRET": SECRET}).start()
    try:
        room = (await api(g, "POST", "/v1/conversations", {"kind": "group", "creator": "own", "members": ["m1"]}))["room"]
        await api(g, "POST", f"/v1/conversations/{room}/members", {"users": ["m2"], "by": "own"})
        seq = (await api(g, "POST", f"/v1/conversations/{room}/messages", {"from": "m1", "data": {"text": "hi"}}))["seq"]
        await api(g, "POST", f"/v1/conversations/{room}/recall", {"seq": seq, "by": "own"})

        await eventually(lambda: any(e["event"] == "recall" for e in rec.delivered()), timeout=20, what="the recall event")
        events = rec.delivered()
        members = [(e["change"], e["users"], e.get("by")) for e in events if e["event"] == "member"]
        assert members == [("created", ["own", "m1"], "own"), ("added", ["m2"], "own")]
        msgs = [(e["seq"], e["type"], e["from"]) for e in events if e["event"] == "message"]
        # Delivered as it is when the outbox reads it: the chat message, or its tombstone
        # when the recall came first.
        assert ((seq, "chat", "m1") in msgs or (seq, "recalled", "m1") in msgs) and any(t == "system" for _, t, _ in msgs)
        (recall,) = [e for e in events if e["event"] == "recall"]
        assert (recall["room"], recall["seq"], recall["by"], recall["sender"]) == (room, seq, "own", "m1")
    finally:
        await rec.stop()
        assert not g.finish()
