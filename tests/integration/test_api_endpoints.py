"""The internal HTTP API: every endpoint, bad input, the API key, and the effect on
connected clients (mute, ban, kick, close, send, broadcast)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from gwtest import GatewayProcess, uniq
from gateway.client import GatewayClient, GatewayError


@pytest.fixture(scope="module")
def api_gw(module_gateway_factory: Any) -> GatewayProcess:
    """A server of its own: broadcasts here reach nobody else's clients."""
    return module_gateway_factory()  # type: ignore[no-any-return]


async def _client(gw: GatewayProcess, user: str | None = None, **query: str) -> GatewayClient:
    c = GatewayClient(gw.ws_url(**query), user=user or uniq("u"))
    await c.connect()
    return c


ENDPOINTS = [
    ("POST", "/v1/publish"),
    ("POST", "/v1/send"),
    ("POST", "/v1/users/someone/send"),
    ("POST", "/v1/broadcast"),
    ("POST", "/v1/kick"),
    ("POST", "/v1/mute"),
    ("POST", "/v1/unmute"),
    ("POST", "/v1/ban"),
    ("POST", "/v1/unban"),
    ("POST", "/v1/rooms/live:1/close"),
    ("GET", "/v1/rooms/live:1/presence"),
    ("GET", "/v1/rooms/live:1/members"),
    ("GET", "/v1/stats"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
async def test_api_key_is_required(api_gw: GatewayProcess, method: str, path: str) -> None:
    for key in (False, "wrong-key"):
        status, body = await api_gw.api(method, path, {"room": "live:1", "user": "x", "data": 1}, key=key)
        assert status == 401, (path, key, status, body)
        assert body == {"error": "missing or wrong API key"}
    # The key is also accepted as a bearer token.
    status, _ = await api_gw.api("GET", "/v1/stats", key=False, headers={"Authorization": f"Bearer {api_gw.api_key}"})
    assert status == 200


async def test_open_endpoints_and_unknown_paths(api_gw: GatewayProcess) -> None:
    status, body = await api_gw.api("GET", "/healthz", key=False)
    assert (status, body) == (200, {"status": "ok"})
    status, body = await api_gw.api("GET", "/readyz", key=False)
    assert status == 200 and body["ready"] is True and body["draining"] is False
    status, body = await api_gw.api("GET", "/metrics", key=False)
    assert status == 200 and "gateway_connections " in body and "gateway_room_publishes_total" in body
    status, body = await api_gw.api("GET", "/v1/no-such-endpoint")
    assert status == 404 and "error" in body
    status, body = await api_gw.api("GET", "/v1/publish")
    assert status == 405 and "error" in body


# ---- publish ---------------------------------------------------------------------------------------


async def test_publish(api_gw: GatewayProcess) -> None:
    room = f"live:{uniq('p')}"
    c = await _client(api_gw)
    try:
        ack = await c.join(room)
        status, body = await api_gw.api("POST", "/v1/publish", {"room": room, "data": {"text": "from backend"}, "type": "admin"})
        assert status == 200
        assert body == {"room": room, "seq": 1, "epoch": ack["epoch"]}
        m = await c.recv(10)
        assert (m["type"], m["prio"], m["from"], m["data"], m["seq"]) == ("admin", 2, None, {"text": "from backend"}, 1)
        status, body = await api_gw.api("POST", "/v1/publish", {"room": room, "data": 1, "type": "chat", "priority": "low"})
        assert status == 200
        assert (await c.recv(10))["prio"] == 0
    finally:
        await c.close()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"", "JSON object"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"data": 1}', "'room'"),
        (b'{"room": "bad room", "data": 1}', "invalid room name"),
        (b'{"room": "live:1"}', "'data'"),
        (b'{"room": "live:1", "data": 1, "priority": 7}', "priority"),
        (b'{"room": "live:1", "data": 1, "type": ""}', "'type'"),
    ],
)
async def test_publish_bad_input(api_gw: GatewayProcess, body: bytes, fragment: str) -> None:
    status, out = await api_gw.api("POST", "/v1/publish", data=body, headers={"Content-Type": "application/json"})
    assert status == 400, out
    assert fragment in out["error"]


# ---- send to a user, broadcast -------------------------------------------------------------------


async def test_send_to_user_on_every_connection(api_gw: GatewayProcess) -> None:
    user = uniq("buyer")
    a, b, other = await _client(api_gw, user), await _client(api_gw, user), await _client(api_gw)
    try:
        futs = [c.wait_event(lambda f: f.get("op") == "push", 10) for c in (a, b)]
        status, body = await api_gw.api("POST", "/v1/send", {"user": user, "type": "order", "data": {"order": 7, "status": "shipped"}})
        # Stored in the user's notice conversation too (the default routes and store).
        assert (status, body) == (200, {"user": user, "sent": True, "room": f"notice:{user}", "seq": 1, "delivered": "live"})
        for f in futs:
            push = await f
            assert (push["type"], push["data"]) == ("order", {"order": 7, "status": "shipped"})
            assert isinstance(push["ts"], int)
        fut = a.wait_event(lambda f: f.get("op") == "push", 10)
        status, _ = await api_gw.api("POST", f"/v1/users/{user}/send", {"data": {"n": 2}, "priority": 0})
        assert status == 200
        assert (await fut)["type"] == "push"
        assert not any(e.get("op") == "push" for e in other.events)
        for bad in ({"data": 1}, {"user": user}, {"user": "", "data": 1}, {"user": user, "data": 1, "priority": "urgent"}):
            status, out = await api_gw.api("POST", "/v1/send", bad)
            assert status == 400, (bad, out)
    finally:
        for c in (a, b, other):
            await c.close()


async def test_broadcast(api_gw: GatewayProcess) -> None:
    clients = [await _client(api_gw) for _ in range(3)]
    try:
        futs = [c.wait_event(lambda f: f.get("op") == "push" and f.get("type") == "notice", 10) for c in clients]
        status, body = await api_gw.api("POST", "/v1/broadcast", {"type": "notice", "data": {"text": "maintenance at 3am"}})
        assert (status, body) == (200, {"sent": True})
        for f in futs:
            assert (await f)["data"] == {"text": "maintenance at 3am"}
        status, out = await api_gw.api("POST", "/v1/broadcast", {"type": "notice"})
        assert status == 400 and "'data'" in out["error"]
    finally:
        for c in clients:
            await c.close()


# ---- moderation ----------------------------------------------------------------------------------


async def test_kick(api_gw: GatewayProcess) -> None:
    user = uniq("troll")
    c = await _client(api_gw, user)
    status, body = await api_gw.api("POST", "/v1/kick", {"user": user, "reason": "spamming"})
    assert (status, body) == (200, {"user": user, "kicked": True})
    code, reason = await c.wait_closed(10)
    assert (code, reason) == (4003, "spamming")
    for bad in ({}, {"user": ""}, {"user": 5}):
        status, _ = await api_gw.api("POST", "/v1/kick", bad)
        assert status == 400


async def test_mute_and_unmute_a_user(api_gw: GatewayProcess) -> None:
    room = f"live:{uniq('mute')}"
    user = uniq("loud")
    c = await _client(api_gw, user)
    try:
        await c.join(room)
        status, body = await api_gw.api("POST", "/v1/mute", {"room": room, "user": user})
        assert (status, body) == (200, {"room": room, "user": user, "muted": True})
        with pytest.raises(GatewayError) as e:
            await c.publish(room, "can you hear me?")
        assert e.value.code == 4010 and "muted" in e.value.message
        status, _ = await api_gw.api("POST", "/v1/unmute", {"room": room, "user": user})
        assert status == 200
        assert (await c.publish(room, "back"))["seq"] == 1
        # A timed mute lifts itself.
        status, _ = await api_gw.api("POST", "/v1/mute", {"room": room, "user": user, "seconds": 1})
        assert status == 200
        with pytest.raises(GatewayError):
            await c.publish(room, "still muted")
        deadline = time.monotonic() + 10
        while True:
            try:
                await c.publish(room, "free again")
                break
            except GatewayError as err:
                assert err.code == 4010 and time.monotonic() < deadline
                await asyncio.sleep(0.2)
    finally:
        await c.close()


async def test_mute_a_room_with_a_whitelist(api_gw: GatewayProcess) -> None:
    room = f"live:{uniq('quiet')}"
    host, viewer = await _client(api_gw, uniq("host")), await _client(api_gw)
    try:
        await host.join(room)
        await viewer.join(room)
        status, _ = await api_gw.api("POST", "/v1/mute", {"room": room, "whitelist": [host.user]})
        assert status == 200
        assert (await host.publish(room, "only me"))["seq"] == 1
        with pytest.raises(GatewayError) as e:
            await viewer.publish(room, "me too")
        assert e.value.code == 4010
        status, _ = await api_gw.api("POST", "/v1/unmute", {"room": room})
        assert status == 200
        assert (await viewer.publish(room, "finally"))["seq"] == 2
        for bad in ({"room": room, "whitelist": "host"}, {"room": room, "seconds": -1}, {"room": room, "seconds": "soon"}, {"user": "x"}):
            status, _ = await api_gw.api("POST", "/v1/mute", bad)
            assert status == 400, bad
    finally:
        await host.close()
        await viewer.close()


async def test_ban_removes_from_the_room_and_blocks_rejoining(api_gw: GatewayProcess) -> None:
    room = f"live:{uniq('ban')}"
    user = uniq("banned")
    c, witness = await _client(api_gw, user), await _client(api_gw)
    try:
        await c.join(room)
        await witness.join(room)
        told = c.wait_event(lambda f: f.get("op") == "presence" and f.get("event") == "banned", 10)
        status, body = await api_gw.api("POST", "/v1/ban", {"room": room, "user": user, "seconds": 600})
        assert (status, body) == (200, {"room": room, "user": user, "banned": True})
        assert (await told) == {"op": "presence", "room": room, "event": "banned", "user": user}
        # Removed: room messages no longer reach it, publishing needs a join, joining is refused.
        with pytest.raises(GatewayError) as e:
            await c.publish(room, "hello?")
        assert e.value.code == 4004
        with pytest.raises(GatewayError) as e:
            await c.join(room)
        assert e.value.code == 4010
        status, _ = await api_gw.api("POST", "/v1/unban", {"room": room, "user": user})
        assert status == 200
        await c.join(room)
        for bad in ({"room": room}, {"user": user}, {"room": "bad room", "user": user}):
            status, _ = await api_gw.api("POST", "/v1/ban", bad)
            assert status == 400, bad
    finally:
        await c.close()
        await witness.close()


async def test_ban_everywhere(api_gw: GatewayProcess) -> None:
    user = uniq("everywhere")
    rooms = [f"live:{uniq('b')}" for _ in range(2)]
    c = await _client(api_gw, user)
    try:
        for r in rooms:
            await c.join(r)
        status, _ = await api_gw.api("POST", "/v1/ban", {"room": "*", "user": user})
        assert status == 200
        for r in rooms:
            with pytest.raises(GatewayError) as e:
                await c.join(r)
            assert e.value.code == 4010
        await api_gw.api("POST", "/v1/unban", {"room": "*", "user": user})
        await c.join(rooms[0])
    finally:
        await c.close()


async def test_close_room(api_gw: GatewayProcess) -> None:
    room = f"live:{uniq('close')}"
    members = [await _client(api_gw) for _ in range(3)]
    try:
        futs = []
        for m in members:
            await m.join(room)
            futs.append(m.wait_event(lambda f: f.get("op") == "presence" and f.get("event") == "closed", 10))
        status, body = await api_gw.api("POST", f"/v1/rooms/{room}/close")
        assert (status, body) == (200, {"room": room, "closed": True})
        for f in futs:
            assert (await f)["room"] == room
        status, body = await api_gw.api("GET", f"/v1/rooms/{room}/presence")
        assert body["conns"] == 0
        with pytest.raises(GatewayError) as e:
            await members[0].publish(room, "anyone?")
        assert e.value.code == 4004
        status, _ = await api_gw.api("POST", "/v1/rooms/no-colon/close")
        assert status == 400
    finally:
        for m in members:
            await m.close()


# ---- presence, members, stats ------------------------------------------------------------------


async def test_presence_and_members(api_gw: GatewayProcess) -> None:
    room = f"live:{uniq('who')}"
    user = uniq("multi")
    a = await _client(api_gw, user, name="Ann")
    b = await _client(api_gw, user, name="Ann")
    others = [await _client(api_gw) for _ in range(3)]
    try:
        for c in (a, b, *others):
            await c.join(room)
        status, body = await api_gw.api("GET", f"/v1/rooms/{room}/presence")
        assert (status, body) == (200, {"room": room, "conns": 5, "users": 4})
        status, body = await api_gw.api("GET", f"/v1/rooms/{room}/members?limit=1000")
        assert status == 200 and body["offset"] == 0
        users = sorted(m["user"] for m in body["members"])
        assert users == sorted([user, user, *(c.user for c in others)])
        ann = [m for m in body["members"] if m["user"] == user]
        assert all(m["meta"] == {"name": "Ann"} for m in ann)
        status, page1 = await api_gw.api("GET", f"/v1/rooms/{room}/members?offset=0&limit=2")
        status, page2 = await api_gw.api("GET", f"/v1/rooms/{room}/members?offset=2&limit=5")
        conns = [m["conn"] for m in page1["members"] + page2["members"]]
        assert len(page1["members"]) == 2 and len(conns) == 5 == len(set(conns))
        for bad in ("?limit=0", "?limit=5000", "?offset=-1", "?limit=ten"):
            status, out = await api_gw.api("GET", f"/v1/rooms/{room}/members{bad}")
            assert status == 400, (bad, out)
        status, _ = await api_gw.api("GET", "/v1/rooms/bad%20room/presence")
        assert status == 400
        status, body = await api_gw.api("GET", f"/v1/rooms/live:{uniq('empty')}/presence")
        assert body["conns"] == 0 and body["users"] == 0
    finally:
        for c in (a, b, *others):
            await c.close()


async def test_stats(api_gw: GatewayProcess) -> None:
    room = f"live:{uniq('st')}"
    c = await _client(api_gw)
    try:
        await c.join(room)
        status, body = await api_gw.api("GET", "/v1/stats")
        assert status == 200
        assert body["connections"] >= 1 and body["rooms"] >= 1
        assert any(r["room"] == room for r in body["top_rooms"]) or len(body["top_rooms"]) == 20
        for key in ("connects", "deliveries", "close_slow_consumer", "messages_in"):
            assert isinstance(body["engine"][key], int)
        assert set(body["hook_timeouts"]) >= {"on_connect", "on_message"}
        assert "rate_limit" in body["dropped"]
    finally:
        await c.close()
