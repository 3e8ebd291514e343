"""Abuse through the whole app (engine + Python), with default limits: one hostile
connection never starves an honest one, and what it can make the node hold is bounded.

The engine-level versions (ping floods, deflate bombs, caps) are in test_engine_limits.py.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import orjson
import pytest
from support.gateway import GatewayProcess, uniq
from support.ws import OP_CLOSE, OP_TEXT, RawWS, encode_frame


@pytest.fixture(scope="module")
def abuse_gw(module_gateway_factory: Any) -> GatewayProcess:
    """Default limits (limits.client_rate 50/s, burst 100; 100 rooms per connection)."""
    return module_gateway_factory()  # type: ignore[no-any-return]


async def _flood(ws: RawWS, n: int) -> None:
    """Write ``n`` joins of distinct rooms as fast as the socket takes them."""
    batch = bytearray()
    for i in range(n):
        batch += encode_frame(OP_TEXT, orjson.dumps({"op": "join", "id": i, "room": f"live:flood-{i}"}))
        if len(batch) > 1 << 16:
            ws.writer.write(bytes(batch))
            batch.clear()
            try:
                await asyncio.wait_for(ws.writer.drain(), 10)
            except (ConnectionError, asyncio.TimeoutError):
                return  # closed by the server (4029), or it stopped reading: both fine
    if batch:
        ws.writer.write(bytes(batch))
        try:
            await ws.writer.drain()
        except ConnectionError:
            return


async def _close_code(ws: RawWS, timeout: float) -> tuple[int | None, dict[int, int]]:
    """Read until the close frame: (close code, error codes seen with their counts)."""
    errors: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _fin, op, payload = await ws.recv_frame(max(0.01, deadline - time.monotonic()))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None, errors
        if op == OP_CLOSE:
            return (struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None), errors
        if op == OP_TEXT:
            f = orjson.loads(payload)
            if f.get("op") == "error":
                errors[f["code"]] = errors.get(f["code"], 0) + 1
    return None, errors


async def test_a_join_flood_never_starves_an_honest_client(abuse_gw: GatewayProcess) -> None:
    """100,000 joins of distinct rooms from one connection: refused with 4029 (rate) and
    4030 (rooms per connection), the connection is closed with 4029, the node holds at
    most limits.max_rooms_per_conn rooms for it, and meanwhile an honest client connects,
    joins and publishes within 5 s."""
    bad = await RawWS.connect(abuse_gw.host, abuse_gw.port, f"/ws?user={uniq('flooder')}")
    assert bad.status == 101
    await bad.recv_json()  # connected
    flood = asyncio.create_task(_flood(bad, 100_000))
    reader = asyncio.create_task(_close_code(bad, 30))
    await asyncio.sleep(0.2)  # the flood is under way

    t0 = time.monotonic()
    honest = await abuse_gw.client(uniq("honest"))
    room = f"live:{uniq('calm')}"
    try:
        await asyncio.wait_for(honest.join(room), 5)
        ack = await asyncio.wait_for(honest.publish(room, {"text": "still here"}), 5)
        took = time.monotonic() - t0
        assert ack["seq"] > 0 and took < 5.0, (ack, took)
    finally:
        await honest.close()

    code, errors = await reader
    flood.cancel()
    bad.writer.close()
    assert code == 4029, f"the flooding connection is closed for abuse, got {code} (errors {errors})"
    # (its queued error frames are discarded by the abuse close: nothing more is sent to it)
    stats = await abuse_gw.stats()
    assert stats["engine"]["closed_abuse"] >= 1
    assert stats["engine"]["rate_limited"] >= 100
    # The rooms it made exist only while it held them; it never held more than the cap.
    assert stats["engine"]["rooms_refused_conn"] + stats["engine"]["rate_limited"] > 0
    assert stats["rooms"] <= 100 + 10, stats["rooms"]


async def test_too_many_rooms_per_connection_is_4030(abuse_gw: GatewayProcess) -> None:
    c = await abuse_gw.client(uniq("collector"))
    try:
        for i in range(100):
            await c.join(f"live:{uniq('r')}-{i}")
            if i % 40 == 39:
                await asyncio.sleep(1.0)  # stay under the connection's rate limit
        from gateway.client import GatewayError

        with pytest.raises(GatewayError) as e:
            await c.join(f"live:{uniq('one-too-many')}")
        assert e.value.code == 4030 and "rooms per connection (100)" in str(e.value)
    finally:
        await c.close()
