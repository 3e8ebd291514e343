"""gateway.client.GatewayClient against scripted servers (websockets) for what the real
gateway never does (unanswered pings, odd frames), and against the real one for resume
after a kick."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from gateway.client import GatewayClient, GatewayClosed, GatewayError
from support.gateway import GatewayProcess, uniq
from support.wait import eventually
from websockets.asyncio.server import ServerConnection, serve

Script = Callable[[ServerConnection], Awaitable[None]]


class FakeServer:
    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.received: list[dict[str, Any]] = []
        self.script: Script | None = None
        self.port = 0

    async def handler(self, ws: ServerConnection) -> None:
        self.requests.append(ws.request)
        await ws.send(orjson.dumps({"op": "connected", "session": "s1", "user": "fake", "heartbeat": 1, "ts": 1, "node": "n"}).decode())
        assert self.script is not None
        await self.script(ws)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    f = FakeServer()

    def choose(conn: ServerConnection, offered: Any) -> Any:
        return "gateway.v1" if "gateway.v1" in offered else None

    async with serve(f.handler, "127.0.0.1", 0, select_subprotocol=choose, ping_interval=None) as server:
        f.port = server.sockets[0].getsockname()[1]
        yield f


async def _recv_loop(ws: ServerConnection, f: FakeServer, on: Callable[[dict[str, Any]], Awaitable[None]] | None = None) -> None:
    async for raw in ws:
        frame = orjson.loads(raw)
        f.received.append(frame)
        if on is not None:
            await on(frame)


async def test_heartbeat_declares_a_silent_server_dead(fake: FakeServer) -> None:
    async def never_answer(ws: ServerConnection) -> None:
        await _recv_loop(ws, fake)

    fake.script = never_answer
    c = GatewayClient(fake.url, user="u", heartbeat=0.3)  # overrides the announced 1 s
    await c.connect()
    assert c.heartbeat == 0.3
    code, _ = await c.wait_closed(15)
    assert code == 1006 and c.dead_reason and "pong" in c.dead_reason
    pings = [f for f in fake.received if f.get("op") == "ping"]
    assert len(pings) == 3, "dead after 3 unanswered pings"
    with pytest.raises(GatewayClosed):
        await c.publish("live:1", "x")


async def test_heartbeat_keeps_a_responsive_server(fake: FakeServer) -> None:
    async def answer(ws: ServerConnection) -> None:
        async def on(frame: dict[str, Any]) -> None:
            if frame.get("op") == "ping":
                await ws.send('{"op":"pong","ts":1}')

        await _recv_loop(ws, fake, on)

    fake.script = answer
    c = GatewayClient(fake.url, user="u", heartbeat=0.2)
    await c.connect()

    def eight_pongs() -> bool:
        assert c.connected
        return c.pongs >= 8  # well past 3 intervals

    await eventually(eight_pongs, 15, 0.2, what="8 pongs")
    await c.close()
    assert c.close_code == 1000


async def test_requests_batches_errors_and_close(fake: FakeServer) -> None:
    async def script(ws: ServerConnection) -> None:
        async def on(frame: dict[str, Any]) -> None:
            rid = frame.get("id")
            if frame["op"] == "join":
                await ws.send(orjson.dumps({"op": "ack", "id": rid, "room": frame["room"], "seq": 4, "epoch": "E", "msgs": []}).decode())
                batch = {"op": "batch", "room": "live:1", "msgs": [
                    {"op": "msg", "room": "live:1", "seq": 5, "epoch": "E", "data": 5},
                    {"op": "presence", "room": "live:1", "event": "join", "user": "z"},
                    {"op": "msg", "room": "live:1", "seq": 6, "epoch": "E", "data": 6},
                ]}
                await ws.send(orjson.dumps(batch).decode())
            elif frame["op"] == "publish":
                await ws.send(orjson.dumps({"op": "error", "id": rid, "code": 4029, "message": "slow down"}).decode())
            elif frame["op"] == "leave":
                await ws.send(orjson.dumps({"op": "msg", "room": "live:1", "seq": 7, "epoch": "E", "data": 7}).decode())
                await ws.close(4003, "kicked")

        await _recv_loop(ws, fake, on)

    fake.script = script
    c = GatewayClient(fake.url, token="abc", token_in="protocol")
    await c.connect()
    req = fake.requests[0]
    assert req.headers["Sec-WebSocket-Protocol"] == "gateway.v1, token.abc"
    assert c.subprotocol == "gateway.v1"
    ack = await c.join("live:1")
    assert ack["seq"] == 4  # the batch may already have moved the position on
    assert [m["data"] for m in await c.recv_many(2, 5)] == [5, 6]
    assert any(e.get("event") == "join" for e in c.events), "presence inside a batch is an event"
    assert c.positions["live:1"] == (6, "E")
    with pytest.raises(GatewayError) as e:
        await c.publish("live:1", "x")
    assert (e.value.code, e.value.message) == (4029, "slow down")
    with pytest.raises(GatewayClosed) as closed:
        await c.leave("live:1")
    assert closed.value.code == 4003
    # Messages that arrived before the close are still handed out, then the close.
    assert (await c.recv(5))["data"] == 7
    with pytest.raises(GatewayClosed):
        await c.recv(5)
    assert [m async for m in c] == []
    assert (c.close_code, c.close_reason) == (4003, "kicked")


async def test_query_and_header_tokens(fake: FakeServer) -> None:
    async def idle(ws: ServerConnection) -> None:
        await _recv_loop(ws, fake)

    fake.script = idle
    for where, check in (
        ("query", lambda r: "token=t0k" in r.path and "user=" not in r.path),
        ("header", lambda r: r.headers["Authorization"] == "Bearer t0k"),
    ):
        c = GatewayClient(fake.url + "?x=1", token="t0k", token_in=where, heartbeat=0)
        await c.connect()
        assert check(fake.requests[-1])
        await c.close()


async def test_reconnect_after_a_kick_resumes(gw: GatewayProcess) -> None:
    user = uniq("kicked")
    room = f"live:{uniq('rk')}"
    c = GatewayClient(gw.ws_url(), user=user)
    await c.connect()
    try:
        await c.join(room)
        await gw.publish(room, {"i": 1})
        await c.recv(10)
        status, _ = await gw.api("POST", "/v1/kick", {"user": user, "reason": "go away"})
        assert status == 200
        assert (await c.wait_closed(10))[0] == 4003
        await gw.publish(room, {"i": 2})
        acks = await c.reconnect()
        assert acks[room]["recovered"] is True
        assert (await c.recv(10))["data"] == {"i": 2}
        assert c.connected and c.rooms == {room}
    finally:
        await c.close()
