"""Business hooks of a user app (tests/apps.py) through real sockets: allow, deny,
modify, drop, re-route, timeouts with both fallbacks, and notifications."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from gateway.client import GatewayError
from support.clients import recv_until
from support.gateway import GatewayProcess, uniq
from support.ws import RawWS

APP = "tests.apps:make_app"
AUDIT = "audit:hooks"


@pytest.fixture(scope="module")
def hook_gw(module_gateway_factory: Any) -> GatewayProcess:
    """Hooks time out after 1 s and then deny."""
    # No engine rate limit: a test here floods past the backlog bound on purpose.
    return module_gateway_factory("hooks.timeout=1", "hooks.fallback=deny", "limits.client_rate=0", app=APP, allow_errors=True)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def allow_gw(module_gateway_factory: Any) -> GatewayProcess:
    """Hooks time out after 1 s and then allow."""
    return module_gateway_factory("hooks.timeout=1", "hooks.fallback=allow", app=APP)  # type: ignore[no-any-return]



# ---- on_connect --------------------------------------------------------------------------------


async def test_on_connect_can_refuse(hook_gw: GatewayProcess) -> None:
    ws = await RawWS.connect(hook_gw.host, hook_gw.port, f"/ws?user={uniq('blocked')}")
    assert ws.status == 403
    ws.close()


async def test_on_connect_can_replace_the_identity(hook_gw: GatewayProcess) -> None:
    room = f"live:{uniq('vip')}"
    c = await hook_gw.client(uniq("vip"))
    try:
        await c.join(room)
        _, body = await hook_gw.api("GET", f"/v1/rooms/{room}/members")
        assert body["members"][0]["meta"] == {"role": "vip"}
    finally:
        await c.close()


async def test_on_connect_timeout_denies_or_allows(hook_gw: GatewayProcess, allow_gw: GatewayProcess) -> None:
    t0 = time.monotonic()
    ws = await RawWS.connect(hook_gw.host, hook_gw.port, f"/ws?user={uniq('slowconnect')}")
    assert ws.status == 503
    assert time.monotonic() - t0 < 4.5, "refused at the hook timeout, not the auth deadline"
    ws.close()
    c = await allow_gw.client(uniq("slowconnect"))
    assert c.connected
    await c.close()


# ---- on_join ---------------------------------------------------------------------------------------


async def test_on_join_allow_and_deny(hook_gw: GatewayProcess) -> None:
    c = await hook_gw.client()
    try:
        await c.join(f"live:{uniq('ok')}")
        with pytest.raises(GatewayError) as e:
            await c.join(f"live:forbidden{uniq()}")
        assert e.value.code == 4003
        with pytest.raises(GatewayError) as e:
            await c.join(f"live:rejectjoin{uniq()}")
        assert (e.value.code, e.value.message) == (4003, "join rejected by the test hook")
        t0 = time.monotonic()
        with pytest.raises(GatewayError) as e:
            await c.join(f"live:slowjoin{uniq()}")
        assert e.value.code == 4080
        assert time.monotonic() - t0 < 4.5
    finally:
        await c.close()


async def test_on_join_timeout_with_allow_fallback(allow_gw: GatewayProcess) -> None:
    c = await allow_gw.client()
    try:
        room = f"live:slowjoin{uniq()}"
        ack = await c.join(room)
        assert ack["room"] == room
    finally:
        await c.close()


# ---- on_message --------------------------------------------------------------------------------


async def test_on_message_modify_drop_reject_and_fail(hook_gw: GatewayProcess) -> None:
    room = f"live:{uniq('msg')}"
    a, b = await hook_gw.client(), await hook_gw.client()
    try:
        await a.join(room)
        await b.join(room)
        ack = await a.publish(room, {"text": "quiet please"}, type="shout")
        m = await b.recv(10)
        assert m["data"] == {"text": "QUIET PLEASE", "by": a.user} and m["type"] == "shout"
        assert ack["seq"] == m["seq"]
        # Dropped silently: the sender still gets an ack (seq 0), nobody gets the message.
        assert (await a.publish(room, {"text": "spam"}, type="drop"))["seq"] == 0
        with pytest.raises(GatewayError) as e:
            await a.publish(room, {}, type="reject")
        assert (e.value.code, e.value.message) == (4050, "rejected by the test hook")
        with pytest.raises(GatewayError) as e:
            await a.publish(room, {}, type="boom")
        assert e.value.code == 5000
        assert a.connected, "a failing hook does not close the connection"
        last = await a.publish(room, {"text": "after"})
        m = await b.recv(10)
        assert m["data"] == {"text": "after"} and m["seq"] == last["seq"], "the dropped message was not delivered"
        stats = await hook_gw.stats()
        assert stats["hook_errors"]["on_message"] >= 1
    finally:
        await a.close()
        await b.close()


async def test_on_message_reroutes_to_other_rooms(hook_gw: GatewayProcess) -> None:
    src, dst1, dst2 = (f"live:{uniq(p)}" for p in ("src", "dst", "dst"))
    a, b = await hook_gw.client(), await hook_gw.client()
    try:
        await a.join(src)
        for r in (src, dst1, dst2):
            await b.join(r)
        await a.publish(src, {"rooms": [dst1, dst2], "text": "to both"}, type="fanout")
        got = await b.recv_many(2, 10)
        assert sorted(m["room"] for m in got) == sorted([dst1, dst2])
        assert b.recv_nowait() is None
    finally:
        await a.close()
        await b.close()


async def test_hook_doing_http_as_its_first_await(hook_gw: GatewayProcess) -> None:
    """aiohttp and asyncio.timeout need a current task: hooks run inside one."""
    room = f"live:{uniq('http')}"
    c = await hook_gw.client()
    try:
        await c.join(room)
        await c.publish(room, {}, type="http")
        m = await c.recv(10)
        assert m["data"] == {"status": 200}
    finally:
        await c.close()


async def test_on_message_timeout_denies_and_does_not_stall_others(hook_gw: GatewayProcess) -> None:
    room = f"live:{uniq('slow')}"
    slow, fast = await hook_gw.client(), await hook_gw.client()
    try:
        await slow.join(room)
        await fast.join(room)
        before = (await hook_gw.stats())["hook_timeouts"]["on_message"]
        t0 = time.monotonic()
        pending = asyncio.ensure_future(slow.publish(room, {"sleep": 30}, type="slow"))
        # Messages of the same client wait behind the slow one (per-client order) ...
        behind = asyncio.ensure_future(slow.publish(room, {"text": "second"}))
        # ... but other clients are served meanwhile.
        fast_ack = await fast.publish(room, {"text": "not stalled"})
        assert fast_ack["seq"] >= 1
        assert not pending.done() and not behind.done(), "the fast client's ack came first"
        with pytest.raises(GatewayError) as e:
            await pending
        assert e.value.code == 4080
        assert time.monotonic() - t0 < 4.5
        second = await behind
        assert second["seq"] > fast_ack["seq"]
        after = (await hook_gw.stats())["hook_timeouts"]["on_message"]
        assert after == before + 1
    finally:
        await slow.close()
        await fast.close()


async def test_a_hook_ignoring_cancellation_still_times_out(hook_gw: GatewayProcess) -> None:
    c = await hook_gw.client()
    room = f"live:{uniq('stubborn')}"
    try:
        await c.join(room)
        t0 = time.monotonic()
        with pytest.raises(GatewayError) as e:
            await c.publish(room, {"sleep": 8}, type="stubborn")
        assert e.value.code == 4080
        assert time.monotonic() - t0 < 4.5, "the timeout must not wait for the hook to give up"
    finally:
        await c.close()


async def test_on_message_timeout_with_allow_fallback_publishes(allow_gw: GatewayProcess) -> None:
    room = f"live:{uniq('slowok')}"
    a, b = await allow_gw.client(), await allow_gw.client()
    try:
        await a.join(room)
        await b.join(room)
        ack = await a.publish(room, {"sleep": 30, "text": "late but fine"}, type="slow")
        assert ack["op"] == "ack"
        m = await b.recv(10)
        assert m["data"]["text"] == "late but fine"
    finally:
        await a.close()
        await b.close()


# ---- notifications -------------------------------------------------------------------------------


async def test_after_publish_leave_and_disconnect_hooks(hook_gw: GatewayProcess) -> None:
    room = f"live:{uniq('audit')}"
    auditor, actor = await hook_gw.client(), await hook_gw.client()
    try:
        await auditor.join(AUDIT)
        await actor.join(room)
        ack = await actor.publish(room, {"text": "hello"})
        events: list[dict[str, Any]] = []
        ap = await recv_until(auditor, lambda e: e["event"] == "after_publish" and e["room"] == room, events, timeout=20)
        assert ap == {"event": "after_publish", "room": room, "seq": ack["seq"], "type": "chat"}
        assert {"event": "joined", "room": room, "user": actor.user} in events, "after_join notification"
        await actor.leave(room)
        user = actor.user
        await actor.close()
        seen: list[dict[str, Any]] = []
        await recv_until(auditor, lambda e: e["event"] == "disconnect" and e.get("user") == user, seen, timeout=20)
        assert {"event": "leave", "room": room, "user": user} in seen
        disc = next(e for e in seen if e["event"] == "disconnect")
        assert disc["code"] == 1000
    finally:
        await auditor.close()
        await actor.close()


async def test_requests_behind_a_slow_hook_are_bounded(hook_gw: GatewayProcess) -> None:
    """A client keeps sending while its slow hook runs: 256 requests wait (and are then
    served in order), the rest are refused at once with 4029."""
    room = f"live:{uniq('backlog')}"
    c = await hook_gw.client()
    try:
        await c.join(room)
        slow = asyncio.ensure_future(c.publish(room, {"sleep": 30}, type="slow"))
        joins = [asyncio.ensure_future(c.join(room)) for _ in range(300)]
        results = await asyncio.gather(*joins, return_exceptions=True)
        with pytest.raises(GatewayError) as e:
            await slow
        assert e.value.code == 4080
        refused = [r for r in results if isinstance(r, GatewayError)]
        served = [r for r in results if isinstance(r, dict)]
        assert len(served) == 256 and len(refused) == 44, (len(served), len(refused))
        assert all(r.code == 4029 and "waiting" in r.message for r in refused)
        assert all(isinstance(r, GatewayError) for r in results[256:]), "the first 256 waited, in order"
        assert c.connected
    finally:
        await c.close()
