"""examples/webhook.py, the receiving end of the outbox: a real gateway's outbox POSTs
to the example service (a real aiohttp server on a free port); every event lands once in
its table, a forged or stale signature is refused, a repeat changes nothing."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from support.gateway import GatewayProcess, uniq
from support.http import arequest
from support.ports import free_port
from support.wait import eventually

from examples.webhook import STORE, EventStore, make_app, verify

SECRET = "crm-secret"

CONFIG = """
[[routes]]
pattern = "cs:{{id}}"
join = "all"
publish = "all"
store = "durable"

[outbox]
poll_interval = 0.05
backoff_min = 0.1
backoff_max = 0.5

[[outbox.endpoints]]
name = "crm"
url = "{url}"
secret_env = "CRM_OUTBOX_SECRET"
events = ["message", "join"]
"""


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[str, EventStore]]:
    app = make_app(SECRET, str(tmp_path / "events.db"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/livegate/events", app[STORE]
    finally:
        await runner.cleanup()


def signed(body: bytes, secret: str = SECRET, ts: int | None = None) -> dict[str, str]:
    t = str(int(time.time()) if ts is None else ts)
    sig = "sha256=" + hmac.new(secret.encode(), t.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Gateway-Timestamp": t, "X-Gateway-Signature": sig, "Content-Type": "application/json"}


async def test_a_gateways_events_land_once(service: tuple[str, EventStore], tmp_path: Path) -> None:
    url, store = service
    g = GatewayProcess(tmp_path / "gw", ["limits.client_rate=0"], config=CONFIG.format(url=url), env={"CRM_OUTBOX_SECRET": SECRET}).start()
    room = f"cs:{uniq()}"
    try:
        c = await g.client("alice")
        await c.join(room)
        for i in range(5):
            await c.publish(room, {"text": f"q{i}"})
        want = [(f"msg:{room}:{s}", "message", room, s) for s in range(1, 6)]
        await eventually(lambda: [r for r in store.rows() if r[1] == "message"] == want, timeout=20, what="five messages stored")
        assert [r[1:3] for r in store.rows() if r[1] == "join"] == [("join", room)]
        await c.close()
    finally:
        assert not g.finish()
    # A repeat of a delivered event (at-least-once) stores nothing new.
    body = orjson.dumps({"events": [{"id": f"msg:{room}:1", "event": "message", "room": room, "seq": 1, "ts": 1}]})
    r = await arequest("POST", url, data=body, headers=signed(body))
    assert (r.status, r.json()) == (200, {"stored": 0})
    assert len([x for x in store.rows() if x[1] == "message"]) == 5


async def test_forged_stale_and_malformed_requests_are_refused(service: tuple[str, EventStore]) -> None:
    url, store = service
    body = orjson.dumps({"events": [{"id": "evt:1", "event": "join", "room": "cs:1", "user": "u", "ts": 1}]})
    r = await arequest("POST", url, data=body, headers=signed(body, secret="wrong"))
    assert r.status == 401
    r = await arequest("POST", url, data=body, headers=signed(body, ts=int(time.time()) - 3600))
    assert r.status == 401
    r = await arequest("POST", url, data=body, headers={"Content-Type": "application/json"})
    assert r.status == 401
    bad = b'{"events": [{"no": "id"}]}'
    r = await arequest("POST", url, data=bad, headers=signed(bad))
    assert r.status == 400 and "not an outbox batch" in r.json()["error"]
    assert store.rows() == []
    r = await arequest("POST", url, data=body, headers=signed(body))
    assert (r.status, r.json()) == (200, {"stored": 1})


def test_verify() -> None:
    body = b'{"events":[]}'
    h = signed(body, ts=1_800_000_000)
    assert verify(SECRET.encode(), h["X-Gateway-Timestamp"], h["X-Gateway-Signature"], body, now=1_800_000_100)
    assert not verify(SECRET.encode(), h["X-Gateway-Timestamp"], h["X-Gateway-Signature"], body + b" ", now=1_800_000_100)
    assert not verify(SECRET.encode(), h["X-Gateway-Timestamp"], h["X-Gateway-Signature"], body, now=1_800_000_400)
    assert not verify(SECRET.encode(), "soon", h["X-Gateway-Signature"], body)
