"""Engine behaviour through real sockets: HTTP endpoints, subprotocols, fan-out to 1,000
members, ordering, slow consumers, bad frames, heartbeats and graceful stop."""

from __future__ import annotations

import asyncio
import signal
import struct
import time
from typing import Any

import orjson
import pytest
from gateway.client import GatewayClient
from support.gateway import GatewayProcess, uniq
from support.http import arequest
from support.wait import eventually, holds
from support.ws import OP_CLOSE, OP_CONT, OP_TEXT, RawWS, blocking_upgrade, encode_frame, read_to_end, split_frames

# ---- plain HTTP on the client port ----------------------------------------------------------


async def test_healthz_and_non_upgrade_requests(gw: GatewayProcess) -> None:
    r = await arequest("GET", gw.http_url + "/healthz")
    assert (r.status, r.body.strip()) == (200, b"ok")
    r = await arequest("GET", gw.http_url + "/ws")
    assert r.status == 426
    assert r.headers.get("sec-websocket-version") == "13"
    r = await arequest("GET", gw.http_url + "/no-such-page")
    assert r.status == 404
    # A WebSocket upgrade on another path is not served either.
    ws = await RawWS.connect(gw.host, gw.port, "/elsewhere?user=x")
    assert ws.status == 404
    ws.close()


# ---- subprotocols ----------------------------------------------------------------------------


async def test_subprotocol_is_echoed(gw: GatewayProcess) -> None:
    c = await gw.client(uniq("sp"), subprotocols=["x.unknown", "gateway.v1"])
    assert c.subprotocol == "gateway.v1"
    await c.close()
    # A client offering only something else still gets an echo (mini-programs fail without).
    ws = await RawWS.connect(gw.host, gw.port, f"/ws?user={uniq('sp')}", protocols=("weird.v9",))
    assert ws.status == 101
    assert ws.headers.get("sec-websocket-protocol") == "weird.v9"
    ws.close()
    # Nothing offered, nothing echoed.
    ws = await RawWS.connect(gw.host, gw.port, f"/ws?user={uniq('sp')}")
    assert ws.status == 101
    assert "sec-websocket-protocol" not in ws.headers
    ws.close()


# ---- application ping ------------------------------------------------------------------------


async def test_application_ping_is_answered(gw: GatewayProcess) -> None:
    ws = await RawWS.connect(gw.host, gw.port, f"/ws?user={uniq('ping')}", protocols=("gateway.v1",))
    assert ws.status == 101
    hello = await ws.recv_json()
    assert hello["op"] == "connected" and hello["heartbeat"] == 30
    before = time.time() * 1000
    await ws.send_json({"op": "ping"})
    pong = await ws.recv_json()
    assert pong["op"] == "pong"
    assert isinstance(pong["ts"], int) and pong["ts"] >= before - 5000
    ws.close()


# ---- fan-out: exact delivery to 1,000 members ---------------------------------------------------


async def _raw_member(gw: GatewayProcess, user: str, room: str, sem: asyncio.Semaphore) -> RawWS:
    async with sem:
        return await RawWS.joined(gw.host, gw.port, user, room, timeout=60)


async def _collect(ws: RawWS, n: int, timeout: float) -> list[dict[str, Any]]:
    """Read until ``n`` room messages (batches unpacked) arrived."""
    out: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(out) < n:
        f = await ws.recv_json(max(0.01, deadline - loop.time()))
        if f["op"] == "msg":
            out.append(f)
        elif f["op"] == "batch":
            out.extend(f["msgs"])
    return out


@pytest.fixture(scope="module")
def split_fanout_gw(module_gateway_factory: Any) -> GatewayProcess:
    """Rooms over 64 members are cut into pieces fanned out by several tasks."""
    return module_gateway_factory("limits.fanout_chunk=64")  # type: ignore[no-any-return]


async def test_exact_delivery_to_1000_members(gw: GatewayProcess) -> None:
    await _exact_delivery(gw)


async def test_exact_delivery_to_1000_members_with_the_room_split_across_tasks(split_fanout_gw: GatewayProcess) -> None:
    await _exact_delivery(split_fanout_gw)


async def _exact_delivery(gw: GatewayProcess) -> None:
    room, members, n = f"live:{uniq('big')}", 1000, 20
    sem = asyncio.Semaphore(100)
    conns = await asyncio.gather(*(_raw_member(gw, f"{uniq('m')}", room, sem) for _ in range(members)))
    try:
        status, body = await gw.api("GET", f"/v1/rooms/{room}/presence")
        assert status == 200 and body["conns"] == members, body
        readers = [asyncio.ensure_future(_collect(ws, n, 120)) for ws in conns]
        # Publish concurrently through the API: the server decides the order.
        async def pub(i: int) -> int:
            status, body = await gw.api("POST", "/v1/publish", {"room": room, "data": {"i": i}})
            assert status == 200
            return int(body["seq"])

        seqs = await asyncio.gather(*(pub(i) for i in range(n)))
        assert sorted(seqs) == list(range(1, n + 1))
        results = await asyncio.gather(*readers)
        first = [m["data"]["i"] for m in results[0]]
        assert sorted(first) == list(range(n))
        for msgs in results:
            # Every member got every message exactly once, in the same order, seq +1 each.
            assert [m["seq"] for m in msgs] == list(range(1, n + 1))
            assert [m["data"]["i"] for m in msgs] == first
            assert all(m["room"] == room and m["op"] == "msg" for m in msgs)
        # Nothing more is pending for anyone (no duplicates behind the n-th message):
        # a final marker message is the next frame everyone sees.
        readers = [asyncio.ensure_future(_collect(ws, 1, 60)) for ws in conns]
        await gw.publish(room, {"end": True})
        for (marker,) in await asyncio.gather(*readers):
            assert marker["data"] == {"end": True} and marker["seq"] == n + 1
    finally:
        for ws in conns:
            ws.close()


async def test_per_room_ordering_with_concurrent_publishers(gw: GatewayProcess) -> None:
    """Four publishers pipeline 10 messages each: every member sees seq 1..40 in order,
    and each publisher's messages in the order it sent them."""
    room = f"live:{uniq('order')}"
    sem = asyncio.Semaphore(50)
    members = await asyncio.gather(*(_raw_member(gw, uniq("om"), room, sem) for _ in range(50)))
    pubs: list[GatewayClient] = []
    try:
        for _ in range(4):
            pubs.append(await gw.client(uniq("op")))
            await pubs[-1].join(room)
        readers = [asyncio.ensure_future(_collect(ws, 40, 60)) for ws in members]

        async def burst(k: int, p: GatewayClient) -> list[dict[str, Any]]:
            return list(await asyncio.gather(*(p.publish(room, {"p": k, "n": i}) for i in range(10))))

        acks = await asyncio.gather(*(burst(k, p) for k, p in enumerate(pubs)))
        assert sorted(a["seq"] for batch in acks for a in batch) == list(range(1, 41))
        for msgs in await asyncio.gather(*readers):
            assert [m["seq"] for m in msgs] == list(range(1, 41))
            for k in range(4):
                assert [m["data"]["n"] for m in msgs if m["data"]["p"] == k] == list(range(10))
    finally:
        for ws in members:
            ws.close()
        for p in pubs:
            await p.close()


# ---- bad frames --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "frames", "code"),
    [
        ("oversized frame", [encode_frame(OP_TEXT, b"", length=200_000)], 1009),
        (
            "oversized message in fragments",
            [encode_frame(OP_TEXT, b"x" * 40_000, fin=False), encode_frame(OP_CONT, b"y" * 40_000, fin=True)],
            1009,
        ),
        ("invalid UTF-8", [encode_frame(OP_TEXT, b'{"op":"\xff\xfe"}')], 1007),
        ("invalid UTF-8 across fragments", [encode_frame(OP_TEXT, b"ok \xe2\x82", fin=False), encode_frame(OP_CONT, b"(", fin=True)], 1007),
        ("unmasked frame", [encode_frame(OP_TEXT, b'{"op":"ping"}', mask=False)], 1002),
        ("reserved opcode", [encode_frame(0x3, b"x")], 1002),
        ("reserved bits without an extension", [encode_frame(OP_TEXT, b"x", rsv=0x4)], 1002),
    ],
)
async def test_bad_frames_are_rejected(gw: GatewayProcess, name: str, frames: list[bytes], code: int) -> None:
    room = f"live:{uniq('bad')}"
    bystander = await gw.client(uniq("by"))
    await bystander.join(room)
    ws = await RawWS.connect(gw.host, gw.port, f"/ws?user={uniq('bad')}")
    assert ws.status == 101
    assert (await ws.recv_json())["op"] == "connected"
    for f in frames:
        ws.writer.write(f)
    await ws.writer.drain()
    got, _reason, _ = await ws.recv_close(20)
    assert got == code, f"{name}: expected close {code}, got {got}"
    assert await ws.at_eof(20)
    ws.close()
    # Other connections are unaffected.
    ack = await bystander.publish(room, {"after": name})
    msg = await bystander.recv(10)
    assert msg["seq"] == ack["seq"] and msg["data"] == {"after": name}
    assert bystander.connected
    await bystander.close()


# ---- slow consumer ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_queue_gw(module_gateway_factory: Any) -> GatewayProcess:
    return module_gateway_factory("limits.queue_bytes=65536", "deflate.enabled=false")  # type: ignore[no-any-return]


async def _join_raw(gw: GatewayProcess, sock: Any, room: str, members: int) -> None:
    """Join ``room`` on a blocking raw socket and wait (bounded) until the server has
    ``members`` connections in it."""
    sock.sendall(encode_frame(OP_TEXT, b'{"op":"join","id":1,"room":"' + room.encode() + b'"}'))

    async def joined() -> bool:
        _, body = await gw.api("GET", f"/v1/rooms/{room}/presence")
        return bool(body["conns"] == members)

    await eventually(joined, 20, what=f"{members} connections in {room}")


async def test_slow_consumer_is_closed_and_others_get_everything(small_queue_gw: GatewayProcess) -> None:
    gw = small_queue_gw
    room = f"live:{uniq('slow')}"
    normal = [await gw.client(uniq("fast")) for _ in range(3)]
    for c in normal:
        await c.join(room)
    slow = await asyncio.to_thread(blocking_upgrade, gw.host, gw.port, f"/ws?user={uniq('slow')}")
    try:
        await _join_raw(gw, slow, room, members=4)
        base = (await gw.stats())["engine"]["close_slow_consumer"]
        gift = "g" * 2000
        sent = 0
        got: list[list[int]] = [[] for _ in normal]
        while sent < 5000:
            # High-priority gifts, paced in rounds the normal clients absorb.
            for _ in range(25):
                await gw.publish(room, {"n": sent, "pad": gift}, type="gift")
                sent += 1
            for c, g in zip(normal, got):
                while len(g) < sent:
                    g.append((await c.recv(30))["data"]["n"])
            stats = await gw.stats()
            if stats["engine"]["close_slow_consumer"] > base:
                break
        assert stats["engine"]["close_slow_consumer"] == base + 1, "the non-reading client was not closed as a slow consumer"
        # Every normal client got every gift, in order, and is still connected.
        for c, g in zip(normal, got):
            assert c.connected
            assert g == list(range(sent))
            assert c.recv_nowait() is None
        # The slow client's TCP connection is closed by the server (after the frames it
        # had buffered; a close frame, if it got through, says 4008).
        code = await asyncio.to_thread(_drain_until_closed, slow, 30.0)
        assert code in (None, 4008), code
        _, body = await gw.api("GET", f"/v1/rooms/{room}/presence")
        assert body["conns"] == 3
    finally:
        slow.close()
        for c in normal:
            await c.close()


@pytest.fixture(scope="module")
def tight_socket_gw(module_gateway_factory: Any) -> GatewayProcess:
    return module_gateway_factory("limits.queue_bytes=65536", "limits.socket_send_buffer=4096", "deflate.enabled=false")  # type: ignore[no-any-return]


async def test_frame_written_partly_by_a_fan_out_stays_whole_through_a_slow_consumer_close(tight_socket_gw: GatewayProcess) -> None:
    """Fan-outs write straight into idle members' sockets. When the kernel takes only part
    of a frame, the connection's task must send the rest before anything else, even after
    the connection is closed as a slow consumer and its queue is discarded: the client
    then reads whole frames, in order, and the 4008 close frame."""
    gw = tight_socket_gw
    room = f"live:{uniq('partial')}"
    slow = await asyncio.to_thread(blocking_upgrade, gw.host, gw.port, f"/ws?user={uniq('slow')}")
    try:
        await _join_raw(gw, slow, room, members=1)
        base = (await gw.stats())["engine"]
        pad = "p" * 3000
        n = 0
        # Chat messages one round at a time (each finds the writer idle) until one is
        # taken only partly by the full socket.
        for _ in range(300):
            await gw.publish(room, {"n": n, "pad": pad})
            n += 1
            eng = (await gw.stats())["engine"]
            if eng["direct_partial"] > base["direct_partial"]:
                break
        assert eng["direct_partial"] == base["direct_partial"] + 1, "no fan-out write was partial"
        assert eng["direct_writes"] - base["direct_writes"] >= 1
        # Gifts (high priority) until the connection is closed as a slow consumer.
        for _ in range(300):
            await gw.publish(room, {"n": n, "pad": pad}, type="gift")
            n += 1
            eng = (await gw.stats())["engine"]
            if eng["close_slow_consumer"] > base["close_slow_consumer"]:
                break
        assert eng["close_slow_consumer"] == base["close_slow_consumer"] + 1
        frames = split_frames(await asyncio.to_thread(read_to_end, slow, 30.0))
    finally:
        slow.close()
    # connected, the join ack, then messages in publish order (later ones were dropped or
    # discarded; the room's presence event among them), and the close frame last.
    assert frames[-1][0] == OP_CLOSE and struct.unpack("!H", frames[-1][1][:2])[0] == 4008, frames[-1]
    body = [orjson.loads(p) for op, p in frames[:-1]]
    assert all(op == OP_TEXT for op, _ in frames[:-1])
    assert [m["op"] for m in body[:2]] == ["connected", "ack"], body[:2]
    assert {m["op"] for m in body[2:]} <= {"msg", "presence"}, body[2:5]
    got = [m["data"]["n"] for m in body[2:] if m["op"] == "msg"]
    assert got == list(range(len(got))) and len(got) >= 2, got


def _drain_until_closed(sock: Any, timeout: float) -> int | None:
    """Read a raw socket to its end; returns the close code if a close frame was seen."""
    data = read_to_end(sock, timeout, reset_ok=True)
    # Walk the frames: the stream stays well-framed up to a possible close frame.
    code = None
    for op, payload in split_frames(data, whole=False):
        if op == OP_CLOSE and len(payload) >= 2:
            code = struct.unpack("!H", payload[:2])[0]
    return code


# ---- idle timeout and heartbeats ------------------------------------------------------------


@pytest.fixture(scope="module")
def heartbeat_gw(module_gateway_factory: Any) -> GatewayProcess:
    return module_gateway_factory("heartbeat.interval=1", "heartbeat.idle_timeout=2")  # type: ignore[no-any-return]


async def test_idle_connection_is_closed_with_4000_while_pinging_one_lives(heartbeat_gw: GatewayProcess) -> None:
    gw = heartbeat_gw
    lively = await gw.client(uniq("alive"))  # pings every announced interval
    assert lively.heartbeat == 1
    silent = await RawWS.connect(gw.host, gw.port, f"/ws?user={uniq('silent')}")
    assert silent.status == 101
    t0 = time.monotonic()
    # The silent client never sends anything (WebSocket pings from the server go unanswered).
    code, _reason, seen = await silent.recv_close(20)
    elapsed = time.monotonic() - t0
    assert code == 4000, (code, seen)
    # The engine counts idle time in whole seconds: the close comes after 1-3 s here.
    assert 0.5 <= elapsed < 15, elapsed
    silent.close()
    # Meanwhile the client that sends application pings was kept: give it 1.5 idle
    # timeouts more and it must still be connected, with its pings answered.
    def alive() -> bool:
        assert lively.connected, (lively.close_code, lively.close_reason)
        return True

    await holds(alive, 3, 0.25, what="the pinging client's connection")
    assert lively.connected and lively.pongs >= 3
    await lively.close()


# ---- graceful stop ---------------------------------------------------------------------------


async def test_graceful_stop_drains_clients_and_exits_zero(gateway_factory: Any) -> None:
    gw: GatewayProcess = gateway_factory("drain.timeout=4", "drain.retry_ms=1234")
    clients = [await gw.client(uniq("d")) for _ in range(3)]
    for c in clients:
        await c.join("live:draining")
    # One client that never reads nor answers the close handshake.
    raw = await asyncio.to_thread(blocking_upgrade, gw.host, gw.port, f"/ws?user={uniq('deaf')}")
    t0 = time.monotonic()
    gw.signal(signal.SIGTERM)
    for c in clients:
        code, _ = await c.wait_closed(15)
        assert code == 1012
        assert c.drain_retry_ms == 1234
        drains = [e for e in c.events if e.get("op") == "drain"]
        assert drains == [{"op": "drain", "retry_ms": 1234}]
    exit_code = await asyncio.to_thread(gw.wait, 15)
    elapsed = time.monotonic() - t0
    raw.close()
    assert exit_code == 0
    assert elapsed < 4 + 3.5, f"took {elapsed:.1f}s with drain.timeout=4"
