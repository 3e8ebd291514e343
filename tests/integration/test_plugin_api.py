"""Plugin-facing features and protocol additions through real sockets: plugin settings
(``[plugins.<name>]``), ``Gateway.counter`` on ``/metrics``, ``after_publish`` per re-routed
target, the rooms seen by ``on_disconnect``, token expiry on open connections, and the
``connected`` / join ack fields added in protocol v1 (``idle_timeout``, ``conns``/``users``,
last messages after a failed resume)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from gateway.auth import mint_token
from gateway.client import GatewayClient, GatewayClosed, GatewayError
from support.clients import recv_until
from support.gateway import JWT_SECRET, GatewayProcess, uniq

APP = "tests.integration.feature_app:make_app"
AUDIT = "audit:feature"


@pytest.fixture(scope="module")
def feature_gw(module_gateway_factory: Any) -> GatewayProcess:
    return module_gateway_factory("plugins.feature.tag=from-config", "heartbeat.idle_timeout=75", app=APP)  # type: ignore[no-any-return]


# ---- plugin ops (on_request) ---------------------------------------------------------------


async def test_plugin_ops_answer_with_acks_errors_and_timeouts(gateway_factory: Any) -> None:
    # A plugin op that returns garbage logs its traceback: allowed here.
    feature_gw = gateway_factory("hooks.timeout=0.5", app=APP, allow_errors=True)
    c = await feature_gw.client()
    try:
        ack = await c.request("feature.echo", data={"n": [1, 2]})
        assert ack == {"op": "ack", "id": ack["id"], "echo": {"n": [1, 2]}}, "the plugin's fields; op and id stay the protocol's"
        assert isinstance(ack["id"], int)
        assert await c.request("feature.whoami") == {"op": "ack", "id": ack["id"] + 1}
        for op, code in (("feature.refuse", 4050), ("feature.slow", 4080), ("feature.broken", 5000), ("feature.missing", 4001), ("Feature.Echo", 4001)):
            with pytest.raises(GatewayError) as e:
                await c.request(op)
            assert e.value.code == code, (op, e.value)
        assert (await c.ping())["op"] == "pong", "the connection survives every failure"
        text = feature_gw.metrics()
        assert 'gateway_plugin_requests_total{op="feature.echo",outcome="ok"} 1.0' in text
        assert 'gateway_plugin_requests_total{op="feature.refuse",outcome="rejected"} 1.0' in text
        assert 'gateway_plugin_requests_total{op="feature.slow",outcome="timeout"} 1.0' in text
        assert 'gateway_plugin_requests_total{op="feature.broken",outcome="error"} 1.0' in text
    finally:
        await c.close()


async def test_plugin_ops_share_the_engines_size_cap(feature_gw: GatewayProcess) -> None:
    c = await feature_gw.client()
    try:
        with pytest.raises(GatewayClosed):  # closed by the engine, before Python sees it
            await c.request("feature.echo", data="x" * 70_000)
        assert c.close_code == 1009
    finally:
        await c.close()


def test_plugin_ops_cannot_take_protocol_names() -> None:
    from gateway.app.hooks import Hooks
    from gateway.app.stats import Stats
    from gateway.config import HooksConfig

    hooks = Hooks(HooksConfig(), Stats())
    for bad in ("join", "publish", "sync", "Cs.Open", "cs..open", ""):
        with pytest.raises(ValueError):
            hooks.add_op(bad, lambda *a: None)
    hooks.add_op("cs.open", lambda *a: None)
    with pytest.raises(ValueError, match="two plugins"):
        hooks.add_op("cs.open", lambda *a: None)



# ---- protocol additions --------------------------------------------------------------------


async def test_connected_frame_announces_idle_timeout(feature_gw: GatewayProcess, gw: GatewayProcess) -> None:
    c = await feature_gw.client()
    d = await gw.client()
    try:
        assert c.idle_timeout == 75 and c.heartbeat == 30
        assert d.idle_timeout == 90, "the default: 3 heartbeat intervals"
    finally:
        await c.close()
        await d.close()


async def test_join_ack_carries_room_counts(gw: GatewayProcess) -> None:
    room = f"live:{uniq('counts')}"
    a, b, b2 = await gw.client(), await gw.client(uniq("bee")), None
    try:
        ja = await a.join(room)
        assert (ja["conns"], ja["users"]) == (1, 1)
        jb = await b.join(room)
        assert (jb["conns"], jb["users"]) == (2, 2)
        b2 = await gw.client(b.user)  # the same user on a second connection
        jb2 = await b2.join(room)
        assert (jb2["conns"], jb2["users"]) == (3, 2)
        again = await b2.join(room)  # already a member: same counts
        assert (again["conns"], again["users"]) == (3, 2)
    finally:
        for c in (a, b, b2):
            if c is not None:
                await c.close()


async def test_failed_resume_with_history_returns_the_last_messages(gw: GatewayProcess) -> None:
    room = f"live:{uniq('resync')}"
    pub = await gw.client()
    late = await gw.client()
    try:
        j = await pub.join(room)
        for i in range(6):
            await pub.publish(room, {"i": i})
        # A stale epoch: the gap cannot be filled.
        ack = await late.request("join", room=room, resume={"seq": 2, "epoch": "stale"}, history=3)
        assert ack["recovered"] is False
        assert [m["seq"] for m in ack["msgs"]] == [4, 5, 6] and ack["seq"] == 6 and ack["epoch"] == j["epoch"]
        # Without history, a failed resume carries no messages (as before).
        other = await gw.client()
        try:
            ack = await other.request("join", room=room, resume={"seq": 2, "epoch": "stale"})
            assert ack["recovered"] is False and ack["msgs"] == []
        finally:
            await other.close()
        # A successful resume ignores history: exactly the missed messages.
        third = await gw.client()
        try:
            ack = await third.request("join", room=room, resume={"seq": 4, "epoch": j["epoch"]}, history=1)
            assert ack["recovered"] is True and [m["seq"] for m in ack["msgs"]] == [5, 6]
        finally:
            await third.close()
    finally:
        await pub.close()
        await late.close()


# ---- hooks ----------------------------------------------------------------------------------


async def test_after_publish_sees_each_target_room(feature_gw: GatewayProcess) -> None:
    src, dst1, dst2 = (f"live:{uniq(p)}" for p in ("src", "dsta", "dstb"))
    auditor, a = await feature_gw.client(), await feature_gw.client()
    try:
        await auditor.join(AUDIT)
        await a.join(src)
        ack = await a.publish(src, {"rooms": [dst1, dst2, src]}, type="fanout")
        seen: list[dict[str, Any]] = []
        events = {}
        for room in (dst1, dst2, src):
            events[room] = await recv_until(auditor, lambda e, r=room: e["event"] == "after_publish" and e["room"] == r, seen)
        for room, e in events.items():
            assert e["rooms"] == [dst1, dst2, src], "msg.rooms still lists every target"
            assert e["tag"] == "from-config", "plugin settings from [plugins.feature]"
        assert events[src]["seq"] == ack["seq"], "the ack carries the original room's seq"
        # A plain publish passes the message itself (rooms None).
        await a.publish(src, {"x": 1})
        e = await recv_until(auditor, lambda e: e["event"] == "after_publish" and e["room"] == src and e["rooms"] is None, seen)
        assert e["seq"] == ack["seq"] + 1
        # The plugin's counter is on /metrics.
        status, text = await feature_gw.api("GET", "/metrics")
        assert status == 200
        assert 'feature_published_total{kind="live"}' in text
        line = next(x for x in text.splitlines() if x.startswith('feature_published_total{kind="live"}'))
        assert float(line.split()[-1]) >= 4
    finally:
        await auditor.close()
        await a.close()


async def test_on_disconnect_sees_the_rooms(feature_gw: GatewayProcess) -> None:
    r1, r2, r3 = f"live:{uniq('d1')}", f"live:{uniq('d2')}", f"live:{uniq('d3')}"
    auditor, c = await feature_gw.client(), await feature_gw.client()
    try:
        await auditor.join(AUDIT)
        await c.join(r1)
        await c.join(r2)
        await c.join(r3)
        await c.leave(r3)
        user = c.user
        await c.close()
        e = await recv_until(auditor, lambda e: e["event"] == "disconnect" and e["user"] == user, [])
        assert e["rooms"] == sorted([r1, r2]) and e["code"] == 1000
    finally:
        await auditor.close()


# ---- token expiry ----------------------------------------------------------------------------


async def test_connection_closed_4001_when_its_token_expires(jwt_gw: GatewayProcess) -> None:
    short = GatewayClient(jwt_gw.ws_url(), token=mint_token(JWT_SECRET, uniq("short"), ttl=2))
    long = GatewayClient(jwt_gw.ws_url(), token=mint_token(JWT_SECRET, uniq("long"), ttl=600))
    forever = GatewayClient(jwt_gw.ws_url(), token=mint_token(JWT_SECRET, uniq("noexp"), ttl=None))
    for c in (short, long, forever):
        await c.connect()
    try:
        t0 = time.monotonic()
        code, reason = await short.wait_closed(6)
        assert (code, reason) == (4001, "token expired")
        assert time.monotonic() - t0 < 4
        await asyncio.sleep(0.3)
        assert long.connected and forever.connected, "other connections are untouched"
        assert (await long.ping())["op"] == "pong"
        stats = await jwt_gw.stats()
        assert stats["tokens_expired"] >= 1
    finally:
        for c in (short, long, forever):
            await c.close()


# ---- API ----------------------------------------------------------------------------------------


async def test_stats_broker_section(gw: GatewayProcess) -> None:
    stats = await gw.stats()
    assert stats["broker"]["kind"] == "memory" and stats["broker"]["connected"] is True
    assert stats["broker"]["publish_errors"] == 0 and stats["broker"]["reconnects"] == 0
    status, text = await gw.api("GET", "/metrics")
    assert "gateway_broker_reconnects_total 0.0" in text
    assert "gateway_tokens_expired_total" in text


async def test_room_hooks_of_a_plugin_scoped_to_rooms_skip_the_others() -> None:
    from gateway.app import Message, Plugin
    from gateway.app.hooks import Hooks
    from gateway.app.stats import Stats
    from gateway.config import HooksConfig

    seen: list[tuple[str, str]] = []

    class Scoped(Plugin):
        name = "scoped"
        rooms = ("cs:", "csi:")

        def on_message(self, client: Any, msg: Message) -> None:
            seen.append(("on_message", msg.room))

        def after_publish(self, msg: Message, result: Any) -> None:
            seen.append(("after_publish", msg.room))

        def on_join(self, client: Any, room: str) -> None:
            seen.append(("on_join", room))

        def on_disconnect(self, client: Any, code: int, reason: str) -> None:
            seen.append(("on_disconnect", reason))

    hooks = Hooks(HooksConfig(), Stats())
    hooks.add_plugin(Scoped())
    assert hooks.wants("after_publish", "cs:1") and hooks.wants("after_publish", "csi:1")
    assert not hooks.wants("after_publish", "live:1"), "a live room's publish spawns no after_publish task"
    for room in ("live:1", "cs:1"):
        m = Message(room, "chat", {}, None)
        assert await hooks.chain("on_message", None, m, lambda s, r: s) is m
        await hooks.notify("after_publish", m, None)
        await hooks.chain("on_join", None, room, lambda s, r: s)
    await hooks.notify("on_disconnect", None, 1000, "bye")
    assert seen == [("on_message", "cs:1"), ("after_publish", "cs:1"), ("on_join", "cs:1"), ("on_disconnect", "bye")]
    with pytest.raises(ValueError, match="prefixes"):
        hooks.add("on_connect", lambda *a: None, rooms=("cs:",))
    with pytest.raises(ValueError, match="prefixes"):
        hooks.add("on_message", lambda *a: None, rooms="cs:")  # type: ignore[arg-type]
