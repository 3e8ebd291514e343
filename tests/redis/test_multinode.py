"""Two real gateway processes, one real redis-server, real WebSocket clients."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support.clients import drain, next_event
from support.gateway import GatewayProcess
from support.redis import RedisServer
from support.wait import eventually

pytestmark = pytest.mark.redis


async def test_cross_node_publish_delivered_once(two_nodes: tuple[GatewayProcess, GatewayProcess], clients: Any) -> None:
    a, b = two_nodes
    ca = await clients(a, "alice")
    cb = await clients(b, "bob")
    await ca.join("live:x1")
    await cb.join("live:x1")
    for i in range(20):
        r = await cb.request("publish", room="live:x1", type="chat", data={"i": i})
        assert r["op"] == "ack" and r["seq"] == i + 1, r
    got_a = await ca.recv_many(20, 30)
    got_b = await cb.recv_many(20, 30)
    for got in (got_a, got_b):
        assert [m["seq"] for m in got] == list(range(1, 21))
        assert [m["data"]["i"] for m in got] == list(range(20))
        assert len({m["epoch"] for m in got}) == 1 and all(m["from"] == "bob" and m["room"] == "live:x1" for m in got)
    # And the other way round, through the HTTP API of node A.
    status, body = await a.api("POST", "/v1/publish", {"room": "live:x1", "type": "chat", "data": {"api": True}})
    assert status == 200 and body["seq"] == 21, body
    assert (await cb.recv(5))["data"] == {"api": True}
    assert (await ca.recv(5))["data"] == {"api": True}
    # Node A received 20 messages from B through pub/sub: their lag is in its histogram.
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(await asyncio.to_thread(a.metrics))}
    count = [x.value for x in fams["gateway_broker_pubsub_lag_seconds"].samples if x.name.endswith("_count")]
    assert count == [20.0], count
    await asyncio.sleep(0.3)
    assert drain(ca) == [] and drain(cb) == [], "no duplicates on either node"


async def test_presence_is_summed_across_nodes(two_nodes: tuple[GatewayProcess, GatewayProcess], clients: Any) -> None:
    a, b = two_nodes
    for node, user in ((a, "p1"), (a, "p2"), (b, "p3")):
        c = await clients(node, user)
        await c.join("live:pres")

    async def counts(node: GatewayProcess) -> tuple[int, int] | None:
        status, body = await node.api("GET", "/v1/rooms/live:pres/presence")
        return (body["conns"], body["users"]) if status == 200 else None

    await eventually(lambda: _eq(counts(a), (3, 3)), 5, what="presence on A")
    await eventually(lambda: _eq(counts(b), (3, 3)), 5, what="presence on B")
    # Node B dies without a goodbye: its counts expire (presence_ttl = 2 s in the test config).
    b.stop(signal.SIGKILL)
    t0 = time.monotonic()
    await eventually(lambda: _eq(counts(a), (2, 2)), 6, what="B's counts expire")
    assert time.monotonic() - t0 < 5


async def test_member_list_of_a_small_room_covers_every_node(two_nodes: tuple[GatewayProcess, GatewayProcess], clients: Any) -> None:
    a, b = two_nodes
    for node, user in ((a, "m1"), (b, "m2"), (b, "m3")):
        c = await clients(node, user)
        await c.join("live:members")

    async def listed(node: GatewayProcess) -> tuple[str, list[str]] | None:
        status, body = await node.api("GET", "/v1/rooms/live:members/members")
        return (body["scope"], sorted(m["user"] for m in body["members"])) if status == 200 else None

    want = ("cluster", ["m1", "m2", "m3"])
    await eventually(lambda: _eq(listed(a), want), 5, what="members of both nodes on A")
    await eventually(lambda: _eq(listed(b), want), 5, what="members of both nodes on B")
    # A dead node's members vanish with its presence (presence_ttl = 2 s in the test config).
    b.stop(signal.SIGKILL)
    await eventually(lambda: _eq(listed(a), ("cluster", ["m1"])), 6, what="B's members expire")


async def _eq(coro: Any, want: Any) -> bool:
    return bool(await coro == want)


async def test_send_user_and_kick_across_nodes(two_nodes: tuple[GatewayProcess, GatewayProcess], clients: Any) -> None:
    a, b = two_nodes
    target = await clients(a, "u-target")
    other = await clients(b, "u-other")
    status, body = await b.api("POST", "/v1/send", {"user": "u-target", "type": "order", "data": {"id": 7}})
    assert status == 200, body
    push = await next_event(target, lambda e: e.get("op") == "push", 5)
    assert push["type"] == "order" and push["data"] == {"id": 7}
    status, _ = await b.api("POST", "/v1/kick", {"user": "u-target", "reason": "bye"})
    assert status == 200
    code, _reason = await target.wait_closed(5)
    assert code == 4003
    await asyncio.sleep(0.2)
    assert other.connected, "only the kicked user is closed"


async def test_resume_on_the_other_node_without_gap(two_nodes: tuple[GatewayProcess, GatewayProcess], clients: Any) -> None:
    a, b = two_nodes
    pub = await clients(b, "publisher")
    await pub.join("live:res")
    c = await clients(a, "mobile")
    ack = await c.join("live:res", history=5)
    assert ack["msgs"] == []
    for i in range(3):
        await pub.request("publish", room="live:res", data={"i": i})
    seen = await c.recv_many(3, 15)
    assert all(m["room"] == "live:res" for m in seen)
    last = seen[-1]
    await c.close()
    # While the client is away, 5 more messages (2 of them not recoverable: likes).
    for i in range(3, 8):
        await pub.request("publish", room="live:res", type="like" if i in (4, 6) else "chat", data={"i": i})
    c2 = await clients(b, "mobile")
    ack = await c2.join("live:res", resume={"seq": last["seq"], "epoch": last["epoch"]})
    assert ack["recovered"] is True, ack
    assert [m["seq"] for m in ack["msgs"]] == [4, 5, 6]
    assert [m["data"]["i"] for m in ack["msgs"]] == [3, 5, 7], "likes are not recoverable"
    assert ack["seq"] == 6 and ack["epoch"] == last["epoch"]
    # A stale epoch cannot be resumed: the client must resync.
    c3 = await clients(a, "late")
    ack = await c3.join("live:res", resume={"seq": 2, "epoch": "deadbeef"})
    assert ack["recovered"] is False and ack["msgs"] == []
    # Last K for a joiner, from either node.
    ack = await c3.join("live:res", history=2)
    assert [m["seq"] for m in ack["msgs"]] == [5, 6]


async def test_redis_killed_and_restarted_during_a_publish_stream(
    redis_server: RedisServer, two_nodes: tuple[GatewayProcess, GatewayProcess], clients: Any
) -> None:
    a, b = two_nodes
    pub = await clients(a, "streamer")
    local = await clients(a, "local-listener")
    remote = await clients(b, "remote-listener")
    for c in (pub, local, remote):
        await c.join("live:stream")

    sent = 0
    stop = asyncio.Event()

    async def stream() -> None:
        nonlocal sent
        while not stop.is_set():
            await pub.send({"op": "publish", "id": sent, "room": "live:stream", "data": {"n": sent}})
            sent += 1
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(stream())
    try:
        await remote.recv_many(10, 50)
        redis_server.kill()
        await eventually(lambda: a.ready_status() == 503, 5, what="node A not ready while Redis is down")
        await asyncio.sleep(0.3)  # frames sent before the kill may still be on the wire
        drain(local)
        drain(remote)
        await asyncio.sleep(1.0)
        during_local = drain(local)
        assert len(during_local) >= 30, f"local delivery continues while Redis is down ({len(during_local)})"
        assert all(m["seq"] == 0 for m in during_local), [m["seq"] for m in during_local]
        assert a.running() and b.running()
        redis_server.start()
        await eventually(lambda: a.ready_status() == 200 and b.ready_status() == 200, 10, what="both nodes ready again")
        drain(remote)
        after = await remote.recv_many(10, 100)
        assert all(m["seq"] > 0 for m in after), "recoverable again after the restart"
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await task
    assert a.running() and b.running(), "no crash"
    errors = a.metric("gateway_broker_publish_errors_total")
    assert errors is not None and errors >= 30, f"failures are counted ({errors})"
    assert "Traceback" not in a.log_text() and "Traceback" not in b.log_text()


# ---- behaviour that needs the app.py integration diff (docs/scaling.md) ------------------


async def test_publish_while_redis_down_acks_degraded(redis_server: RedisServer, two_nodes: tuple[GatewayProcess, GatewayProcess], clients: Any) -> None:
    a, _ = two_nodes
    c = await clients(a, "degraded")
    await c.join("live:deg")
    redis_server.kill()
    await eventually(lambda: a.ready_status() == 503, 5, what="not ready")
    t0 = time.monotonic()
    r = await c.request("publish", room="live:deg", data={"x": 1})
    assert time.monotonic() - t0 < 0.5
    assert r["op"] == "ack" and r["seq"] == 0 and r.get("degraded") is True, r
    assert (await c.recv(5))["data"] == {"x": 1}
    # Joining still works (no history while Redis is down).
    ack = await c.join("live:deg2", history=5)
    assert ack["msgs"] == [] and ack.get("degraded") is True
    # The API says 503 for cross-node operations it could not complete.
    status, _ = await a.api("POST", "/v1/kick", {"user": "nobody"})
    assert status == 503
    status, body = await a.api("GET", "/v1/stats")
    assert status == 200 and body["broker"]["publish_errors"] >= 1 and body["broker"]["connected"] is False


_HOOK_LOG_APP = """\
from gateway.app import Gateway, Plugin
LOG = {log!r}
class P(Plugin):
    def on_leave(self, client, room):
        open(LOG, 'a').write(f'leave {{client.user}} {{room}}\\n')
    def on_disconnect(self, client, code, reason):
        open(LOG, 'a').write(f'disconnect {{client.user}}\\n')
    def after_join(self, client, room):
        open(LOG, 'a').write(f'join {{client.user}} {{room}}\\n')
    def after_connect(self, client):
        open(LOG, 'a').write(f'connect {{client.user}}\\n')
def make_app(config):
    return Gateway(config, plugins=[P()])
"""


def _hook_log_nodes(tmp_path: Path, redis_node: Any, *names: str) -> tuple[Path, list[GatewayProcess]]:
    """Nodes running an app that appends every join/leave notification to a log file."""
    log = tmp_path / "hooks.log"
    (tmp_path / "hooklog.py").write_text(_HOOK_LOG_APP.format(log=str(log)))
    return log, [redis_node(n, app="hooklog:make_app", env={"PYTHONPATH": str(tmp_path)}) for n in names]


async def test_leave_hook_debounced_across_nodes(redis_node: Any, tmp_path: Path, clients: Any) -> None:
    """A reconnect to the other node within leave_grace produces no leave/join pair; a
    real leave is reported once."""
    log, (a, b) = _hook_log_nodes(tmp_path, redis_node, "HA", "HB")
    c = await clients(a, "hopper")
    await c.join("live:hook")
    await c.close()
    c2 = await clients(b, "hopper")  # within leave_grace (0.5 s)
    await c2.join("live:hook")
    await asyncio.sleep(1.5)
    text = log.read_text() if log.exists() else ""
    assert "leave hopper live:hook" not in text and "disconnect hopper" not in text, text
    # The reconnect is no new join either: one join and one connect notification so far.
    lines = text.splitlines()
    assert lines.count("join hopper live:hook") == 1 and lines.count("connect hopper") == 1, text
    await c2.close()
    await asyncio.sleep(1.5)
    text = log.read_text()
    assert text.count("leave hopper live:hook") == 1 and text.count("disconnect hopper") == 1, text


async def test_leave_hook_fires_after_the_users_old_node_crashed(redis_node: Any, tmp_path: Path, clients: Any) -> None:
    """A node killed with SIGKILL never takes its users' counts back. Once it misses its
    heartbeat deadline (broker.node_timeout, 2 s here) they stop counting, so the leave of
    a user who moved to another node is reported (before: never, for a day)."""
    log, (a, b) = _hook_log_nodes(tmp_path, redis_node, "CA", "CB")
    c = await clients(a, "phoenix")
    await c.join("live:crash")
    a.stop(signal.SIGKILL)  # no drain, no leave, no more heartbeats
    c2 = await clients(b, "phoenix")  # the client reconnects through the load balancer
    await c2.join("live:crash")
    await asyncio.sleep(1.0)
    text = log.read_text()
    assert text.splitlines().count("join phoenix live:crash") == 1, "the reconnect is no new join: " + text
    await asyncio.sleep(3.0)  # past node_timeout: B's heartbeat lists A as gone
    await c2.close()
    await eventually(lambda: "disconnect phoenix" in log.read_text(), 10, what="the leave hooks on B")
    await asyncio.sleep(0.3)
    text = log.read_text()
    assert text.count("leave phoenix live:crash") == 1 and text.count("disconnect phoenix") == 1, text
