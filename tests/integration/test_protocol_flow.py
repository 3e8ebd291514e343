"""The client protocol through real sockets: acks, errors, rate limits, history, resume,
merge windows and presence (docs/protocol.md)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from gateway.client import GatewayError
from support.gateway import GatewayProcess, uniq
from support.ws import OP_BINARY, RawWS



# ---- publish and the message envelope --------------------------------------------------------


async def test_publish_ack_and_delivery(gw: GatewayProcess) -> None:
    room = f"live:{uniq('pub')}"
    a, b = await gw.client(uniq("alice")), await gw.client()
    try:
        ja = await a.join(room)
        await b.join(room)
        assert ja["room"] == room and ja["seq"] == 0 and ja["msgs"] == []
        assert isinstance(ja["epoch"], str) and ja["epoch"], "a join ack carries the room's epoch"
        ack = await a.publish(room, {"text": "hi"})
        assert ack == {"op": "ack", "id": ack["id"], "seq": 1}
        for c in (a, b):
            m = await c.recv(10)
            assert m["op"] == "msg" and m["room"] == room and m["seq"] == 1
            assert m["epoch"] == ja["epoch"], "messages carry the epoch announced at join"
            assert (m["type"], m["prio"], m["from"], m["data"]) == ("chat", 1, a.user, {"text": "hi"})
            assert isinstance(m["ts"], int)
        # Types map to priorities; non-recoverable types get seq 0.
        like = await a.publish(room, {}, type="like")
        gift = await a.publish(room, {"rose": 1}, type="gift")
        assert like["seq"] == 0 and gift["seq"] == 2
        got = [await b.recv(10) for _ in range(2)]
        assert [(m["type"], m["prio"], m["seq"]) for m in got] == [("like", 0, 0), ("gift", 2, 2)]
    finally:
        await a.close()
        await b.close()


async def test_message_envelope_starts_with_op_msg(gw: GatewayProcess) -> None:
    room = f"live:{uniq('env')}"
    ws = await RawWS.connect(gw.host, gw.port, f"/ws?user={uniq('raw')}")
    assert (await ws.recv_json())["op"] == "connected"
    await ws.send_json({"op": "join", "id": "j1", "room": room})
    assert (await ws.recv_json())["id"] == "j1"
    await gw.publish(room, {"x": 1})
    while True:
        _fin, op, payload = await ws.recv_frame()
        if b'"presence"' not in payload:
            break
    assert payload.startswith(b'{"op":"msg",')
    assert orjson.loads(payload)["data"] == {"x": 1}
    ws.close()


# ---- errors: the connection stays open ----------------------------------------------------------


async def test_bad_json_gets_an_error_and_the_connection_stays_open(gw: GatewayProcess) -> None:
    c = await gw.client()
    try:
        for bad in ("not json", "{\"op\":", "[1, 2]", "42"):
            fut = c.wait_event(lambda f: f.get("op") == "error", timeout=10)
            await c.send(bad)
            err = await fut
            assert err["code"] == 4000 and err["id"] is None, err
        assert c.connected
        room = f"live:{uniq('after')}"
        await c.join(room)
        assert (await c.publish(room, "still here"))["seq"] == 1
    finally:
        await c.close()


async def test_binary_frames_get_an_error(gw: GatewayProcess) -> None:
    ws = await RawWS.connect(gw.host, gw.port, f"/ws?user={uniq('bin')}")
    assert (await ws.recv_json())["op"] == "connected"
    await ws.send_frame(OP_BINARY, b"\x01\x02")
    err = await ws.recv_json()
    assert err["op"] == "error" and err["code"] == 4000
    await ws.send_json({"op": "ping"})
    assert (await ws.recv_json())["op"] == "pong"
    ws.close()


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        ({"op": "subscribe", "room": "live:1"}, 4001),
        ({"op": 7}, 4000),
        ({"room": "live:1"}, 4000),
        ({"op": "join"}, 4000),
        ({"op": "join", "room": ""}, 4000),
        ({"op": "join", "room": "no-colon"}, 4005),
        ({"op": "join", "room": "live:bad room!"}, 4005),
        ({"op": "join", "room": "live:h1", "history": -1}, 4000),
        ({"op": "join", "room": "live:h1", "history": "ten"}, 4000),
        ({"op": "join", "room": "live:h1", "resume": {"seq": "x"}}, 4000),
        ({"op": "join", "room": "user:someone-else"}, 4003),
        ({"op": "leave", "room": "live:never-joined"}, 4004),
        ({"op": "publish", "room": "live:never-joined", "data": 1}, 4004),
        ({"op": "publish", "room": "live:x"}, 4000),
        ({"op": "publish", "room": "live:x", "data": 1, "type": ""}, 4000),
    ],
)
async def test_request_errors(gw: GatewayProcess, request_: dict[str, Any], code: int) -> None:
    c = await gw.client()
    try:
        fields = dict(request_)
        op = fields.pop("op", None)
        with pytest.raises(GatewayError) as e:
            await c.request(op, **fields)
        assert e.value.code == code, e.value
        assert e.value.message
        # Still usable.
        assert (await c.ping())["op"] == "pong"
    finally:
        await c.close()


async def test_unknown_op_echoes_the_request_id(gw: GatewayProcess) -> None:
    c = await gw.client()
    try:
        fut = c.wait_event(lambda f: f.get("op") == "error", timeout=10)
        await c.send({"op": "dance", "id": "abc"})
        err = await fut
        assert err == {"op": "error", "id": "abc", "code": 4001, "message": err["message"]}
        assert "dance" in err["message"]
    finally:
        await c.close()


async def test_oversized_message_for_the_room_gets_4009(gw: GatewayProcess) -> None:
    c = await gw.client()
    room = f"live:{uniq('big')}"
    try:
        await c.join(room)
        with pytest.raises(GatewayError) as e:
            await c.publish(room, "x" * 20_000)  # the route allows 12288 bytes
        assert e.value.code == 4009
    finally:
        await c.close()


# ---- rate limits ----------------------------------------------------------------------------------


async def test_user_rate_limit_errors(gw: GatewayProcess) -> None:
    c = await gw.client()
    room = f"live:{uniq('rate')}"
    try:
        await c.join(room)
        results = await asyncio.gather(*(c.publish(room, {"n": i}) for i in range(30)), return_exceptions=True)
        ok = [r for r in results if isinstance(r, dict)]
        errs = [r for r in results if isinstance(r, GatewayError)]
        assert len(ok) + len(errs) == 30, results
        assert len(ok) >= 10, "the burst (10) must pass"
        assert errs, "30 messages at once exceed 5 msgs/s with a burst of 10"
        assert all(e.code == 4029 and "rate limited" in e.message for e in errs)
        assert c.connected
        stats = await gw.stats()
        assert stats["dropped"]["rate_limit"] >= len(errs)
    finally:
        await c.close()


async def test_too_many_errors_in_a_row_close_with_4029(gw: GatewayProcess) -> None:
    c = await gw.client()
    for _ in range(60):
        try:
            await c.send("garbage")
        except Exception:
            break
    code, _ = await c.wait_closed(20)
    assert code == 4029


# ---- history and resume --------------------------------------------------------------------------


async def test_history_on_join(gw: GatewayProcess) -> None:
    room = f"live:{uniq('hist')}"
    for i in range(5):
        await gw.publish(room, {"i": i})
    await gw.publish(room, {}, type="like")  # not recoverable: not in history
    c = await gw.client()
    try:
        ack = await c.join(room, history=3)
        assert ack["seq"] == 5
        assert [m["seq"] for m in ack["msgs"]] == [3, 4, 5]
        assert [m["data"]["i"] for m in ack["msgs"]] == [2, 3, 4]
        assert all(m["epoch"] == ack["epoch"] for m in ack["msgs"])
        assert "recovered" not in ack
        again = await c.join(room, history=100)  # capped at 50; only 5 exist
        assert [m["seq"] for m in again["msgs"]] == [1, 2, 3, 4, 5]
        none = await c.join(room)
        assert none["msgs"] == []
    finally:
        await c.close()


async def test_resume_recovers_missed_messages(gw: GatewayProcess) -> None:
    room = f"live:{uniq('resume')}"
    c = await gw.client()
    try:
        await c.join(room)
        for i in range(2):
            await gw.publish(room, {"i": i})
        assert [m["seq"] for m in await c.recv_many(2, 10)] == [1, 2]
        c.abort()  # the network drops
        await c.wait_closed(10)
        for i in range(2, 5):
            await gw.publish(room, {"i": i})
        acks = await c.reconnect()
        assert acks[room]["recovered"] is True
        assert [m["seq"] for m in acks[room]["msgs"]] == [3, 4, 5]
        # The missed messages come out of recv as if never missed, then live ones.
        await gw.publish(room, {"i": 5})
        got = await c.recv_many(4, 10)
        assert [(m["seq"], m["data"]["i"]) for m in got] == [(3, 2), (4, 3), (5, 4), (6, 5)]
        assert c.positions[room][0] == 6
    finally:
        await c.close()


async def test_resume_after_joining_an_empty_room(gw: GatewayProcess) -> None:
    """The epoch of a join ack on an empty room must be the one its messages get."""
    room = f"live:{uniq('fresh')}"
    c = await gw.client()
    try:
        ack = await c.join(room)
        assert ack["seq"] == 0
        c.abort()
        await c.wait_closed(10)
        await gw.publish(room, {"i": 0})
        await gw.publish(room, {"i": 1})
        acks = await c.reconnect()
        assert acks[room]["recovered"] is True, acks
        assert [m["seq"] for m in acks[room]["msgs"]] == [1, 2]
    finally:
        await c.close()


async def test_resume_with_a_wrong_epoch_or_a_trimmed_history_is_not_recovered(gw: GatewayProcess) -> None:
    room = f"live:{uniq('lost')}"
    pub = await gw.publish(room, {"i": 0})
    c = await gw.client()
    try:
        ack = await c.join(room, resume=(0, "not-" + pub["epoch"]))
        assert ack["recovered"] is False and ack["msgs"] == []
        assert ack["epoch"] == pub["epoch"] and ack["seq"] == 1
        ahead = await c.join(room, resume=(99, pub["epoch"]))
        assert ahead["recovered"] is False
        same = await c.join(room, resume=(1, pub["epoch"]))
        assert same["recovered"] is True and same["msgs"] == []
        for i in range(60):  # the route keeps 50
            await gw.publish(room, {"i": i + 1})
        trimmed = await c.join(room, resume=(1, pub["epoch"]))
        assert trimmed["recovered"] is False
    finally:
        await c.close()


# ---- merge window ------------------------------------------------------------------------------

MERGE_CONFIG = """
[auth]
mode = "dev"

[[routes]]
pattern = "merge:vip:{id}"
user_rate = 0.0
room_rate = 0.0

[[routes]]
pattern = "merge:{id}"
merge_ms = 50
user_rate = 0.0
room_rate = 0.0

[[routes]]
pattern = "solo:{id}"
single_session = true

[[routes]]
pattern = "live:{room_id}"

[[routes]]
pattern = "*"
"""


@pytest.fixture(scope="module")
def merge_gw(module_gateway_factory: Any) -> GatewayProcess:
    return module_gateway_factory(config=MERGE_CONFIG)  # type: ignore[no-any-return]


async def _frames_until(ws: RawWS, n: int) -> list[dict[str, Any]]:
    frames, count = [], 0
    while count < n:
        f = await ws.recv_json(20, skip=())
        frames.append(f)
        if f["op"] == "msg":
            count += 1
        elif f["op"] == "batch":
            count += sum(1 for m in f["msgs"] if m["op"] == "msg")
    return frames


async def test_merge_window_delivers_batch_frames(merge_gw: GatewayProcess) -> None:
    gw = merge_gw
    room = f"merge:{uniq('m')}"
    ws = await RawWS.joined(gw.host, gw.port, uniq("r"), room)
    pub = await gw.client()
    c = await gw.client()
    try:
        await pub.join(room)
        await c.join(room)
        acks = await asyncio.gather(*(pub.publish(room, {"n": i}) for i in range(10)))
        assert sorted(a["seq"] for a in acks) == list(range(1, 11))
        frames = await _frames_until(ws, 10)
        batches = [f for f in frames if f["op"] == "batch"]
        assert batches, f"10 messages within 50 ms must be merged: {[f['op'] for f in frames]}"
        assert all(b["room"] == room and len(b["msgs"]) <= 20 for b in batches)
        assert any(sum(m["op"] == "msg" for m in b["msgs"]) >= 2 for b in batches)
        unpacked = [m for f in frames for m in (f["msgs"] if f["op"] == "batch" else [f]) if m["op"] == "msg"]
        assert [m["seq"] for m in unpacked] == list(range(1, 11))
        # The client library unpacks batches transparently.
        assert [m["seq"] for m in await c.recv_many(10, 20)] == list(range(1, 11))
    finally:
        ws.close()
        await pub.close()
        await c.close()


async def test_a_more_specific_route_without_merge_is_not_merged(merge_gw: GatewayProcess) -> None:
    gw = merge_gw
    room = f"merge:vip:{uniq('v')}"
    ws = await RawWS.joined(gw.host, gw.port, uniq("r"), room)
    pub = await gw.client()
    try:
        await pub.join(room)
        await asyncio.gather(*(pub.publish(room, {"n": i}) for i in range(10)))
        frames = await _frames_until(ws, 10)
        assert [f["op"] for f in frames if f["op"] != "presence"] == ["msg"] * 10
    finally:
        ws.close()
        await pub.close()


# ---- presence ----------------------------------------------------------------------------------


async def test_presence_events_in_a_small_room(gw: GatewayProcess) -> None:
    room = f"live:{uniq('pres')}"
    a, b = await gw.client(), await gw.client()
    try:
        await a.join(room)
        joined = a.wait_event(lambda f: f.get("op") == "presence" and f.get("event") == "join" and f.get("user") == b.user, 10)
        await b.join(room)
        assert (await joined)["room"] == room
        left = a.wait_event(lambda f: f.get("op") == "presence" and f.get("event") == "leave" and f.get("user") == b.user, 10)
        await b.leave(room)
        assert (await left)["room"] == room
        status, body = await gw.api("GET", f"/v1/rooms/{room}/presence")
        assert status == 200 and (body["conns"], body["users"]) == (1, 1)
    finally:
        await a.close()
        await b.close()


# ---- single-session routes ----------------------------------------------------------------------


async def test_single_session_route_replaces_the_older_login(merge_gw: GatewayProcess) -> None:
    gw = merge_gw
    user = uniq("solo")
    room = f"solo:{uniq('r')}"
    old, new, other = await gw.client(user), await gw.client(user), await gw.client()
    try:
        shared = f"live:{uniq('both')}"
        await old.join(shared)
        await new.join(shared)  # an ordinary route: both stay
        await old.join(room)
        await other.join(room)
        await new.join(room)
        code, reason = await old.wait_closed(10)
        assert (code, reason) == (4004, "replaced by a newer login")
        assert new.connected and other.connected
        assert (await new.publish(room, "I am the one"))["op"] == "ack"
        status, body = await gw.api("GET", f"/v1/rooms/{room}/presence")
        assert (body["conns"], body["users"]) == (2, 2)
    finally:
        for c in (old, new, other):
            await c.close()
