"""examples/webhook.py: events POSTed to a real aiohttp server, through a real gateway
(retry after a 500) and against the plugin directly (bounded attempts, no retry on 4xx,
bounded queue that never blocks)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from gateway.app import Client, Message
from gateway.auth import ConfigError, Identity
from gateway.broker import PublishResult
from support.gateway import GatewayProcess
from support.wait import eventually

from examples.webhook import WebhookForwarder, WebhookSettings

WEBHOOK_SECRET = "hook-secret"


class Receiver:
    """The backend: answers each request with the next status of ``script`` (then 200)
    and records (status, headers, json)."""

    def __init__(self, script: list[int] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[tuple[int, dict[str, str], dict[str, Any]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = await request.json()
        status = self.script.pop(0) if self.script else 200
        headers = dict(request.headers)
        headers["_raw"] = raw.decode()
        self.requests.append((status, headers, body))
        return web.json_response({"ok": status < 300}, status=status)

    def events(self, status: int | None = 200) -> list[dict[str, Any]]:
        return [e for s, _, b in self.requests if status is None or s == status for e in b["events"]]


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/events", rec.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield rec, f"http://127.0.0.1:{server.port}/events"
    await server.close()


# ---- through a real gateway -------------------------------------------------------------


async def test_published_message_is_forwarded_after_a_500(example_gateway: Any, clients: Any, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.script = [500]  # the first POST fails, the retry succeeds
    gw: GatewayProcess = example_gateway(
        "examples.webhook:make_app",
        "auth.mode=dev",
        env={
            "WEBHOOK_URL": url,
            "WEBHOOK_SECRET": WEBHOOK_SECRET,
            "WEBHOOK_BACKOFF_BASE": "0.05",
            "WEBHOOK_MAX_ATTEMPTS": "4",
            "WEBHOOK_WORKERS": "2",
        },
    )
    alice = await clients(gw, "alice")
    await alice.join("live:42")
    ack = await alice.publish("live:42", {"text": "hi", "n": [1, 2]}, type="chat")
    assert ack["op"] == "ack" and ack["seq"] > 0

    await eventually(lambda: any(e["event"] == "publish" for e in rec.events()))
    failed, ok = rec.requests[0], rec.requests[1]
    assert failed[0] == 500 and ok[0] == 200
    assert failed[2] == ok[2], "the retry carries the same events"
    assert failed[1]["X-Gateway-Delivery"] == ok[1]["X-Gateway-Delivery"]
    assert (failed[1]["X-Gateway-Attempt"], ok[1]["X-Gateway-Attempt"]) == ("1", "2")
    ev = next(e for e in rec.events() if e["event"] == "publish")
    assert ev["room"] == "live:42" and ev["seq"] == ack["seq"] and ev["type"] == "chat"
    assert ev["data"] == {"text": "hi", "n": [1, 2]} and ev["from"] == "alice"
    assert ev["node"] == gw.node_id and ev["id"] and isinstance(ev["ts"], int) and ev["epoch"]
    # Signed: HMAC-SHA256(secret, timestamp + "." + body).
    h = ok[1]
    want = hmac.new(WEBHOOK_SECRET.encode(), f"{h['X-Gateway-Timestamp']}.{h['_raw']}".encode(), hashlib.sha256).hexdigest()
    assert h["X-Gateway-Signature"] == f"sha256={want}"

    # Counters are on the gateway's /metrics.
    metrics = gw.metrics()
    assert re.search(r'gateway_webhook_events_total\{outcome="sent"\} 1\.0', metrics), metrics
    assert re.search(r"gateway_webhook_retries_total 1\.0", metrics)

    # A disconnect is forwarded too.
    await alice.close()
    await eventually(lambda: any(e["event"] == "disconnect" for e in rec.events()))
    dis = next(e for e in rec.events() if e["event"] == "disconnect")
    assert dis["user"] == "alice" and dis["code"] == 1000 and dis["session"] == alice.session


async def test_events_queued_at_shutdown_are_flushed(example_gateway: Any, clients: Any, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    gw: GatewayProcess = example_gateway(
        "examples.webhook:make_app",
        "auth.mode=dev",
        env={"WEBHOOK_URL": url, "WEBHOOK_EVENTS": "disconnect", "WEBHOOK_BACKOFF_BASE": "0.05"},
    )
    for user in ("u1", "u2", "u3"):
        await clients(gw, user)
    assert await gw.astop() == 0  # graceful: drain closes the clients, teardown flushes
    users = sorted(e["user"] for e in rec.events())
    assert users == ["u1", "u2", "u3"]
    assert {e["code"] for e in rec.events()} == {1012}  # service restart (drain)
    assert not any(e["event"] == "publish" for e in rec.events())


# ---- the plugin on its own --------------------------------------------------------------


def fake_publish(fw: WebhookForwarder, n: int, room: str = "live:1", mtype: str = "chat") -> None:
    client = Client(1, Identity("u1"), "s", "peer")
    for i in range(n):
        fw.after_publish(Message(room, mtype, {"i": i}, client), PublishResult(i + 1, "e1"))


async def started(settings: WebhookSettings) -> WebhookForwarder:
    fw = WebhookForwarder(settings)
    await fw.setup(SimpleNamespace(node_id="t1"))  # type: ignore[arg-type]
    return fw


async def test_attempts_are_bounded(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.script = [503] * 10
    fw = await started(WebhookSettings(url, max_attempts=3, backoff_base=0.01, workers=1))
    try:
        fake_publish(fw, 1)
        await eventually(lambda: len(rec.requests) >= 3)
        await asyncio.sleep(0.3)  # no fourth attempt
        assert len(rec.requests) == 3
        assert fw.failed == 1 and fw.sent == 0 and fw.retries == 2
    finally:
        await fw.teardown()


async def test_client_errors_are_not_retried(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.script = [400]
    fw = await started(WebhookSettings(url, backoff_base=0.01, workers=1))
    try:
        fake_publish(fw, 1)
        await eventually(lambda: len(rec.requests) >= 1)
        await asyncio.sleep(0.2)
        assert len(rec.requests) == 1 and fw.rejected == 1 and fw.retries == 0
        fake_publish(fw, 1)  # the next event goes through
        await eventually(lambda: len(rec.events()) == 1)
        assert fw.sent == 1
    finally:
        await fw.teardown()


async def test_retry_after_connection_refused_then_backend_up() -> None:
    # Reserve a port without listening on it: connections are refused, and no other
    # process can take the port before the backend comes up on it.
    reserved = socket.socket()
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserved.bind(("127.0.0.1", 0))
    port = reserved.getsockname()[1]
    rec = Receiver()
    fw = await started(WebhookSettings(f"http://127.0.0.1:{port}/events", backoff_base=0.2, backoff_max=0.4, max_attempts=30, workers=1))
    app = web.Application()
    app.router.add_post("/events", rec.handle)
    server = TestServer(app, host="127.0.0.1", port=port)
    try:
        fake_publish(fw, 1)
        await eventually(lambda: fw.retries, 5, what="a retry after the refused first attempt")
        assert fw.retries >= 1 and fw.sent == 0
        reserved.close()
        await server.start_server()
        await eventually(lambda: len(rec.events()) == 1)
        assert fw.sent == 1 and fw.failed == 0 and rec.events()[0]["data"] == {"i": 0}
    finally:
        reserved.close()
        await fw.teardown()
        await server.close()


async def test_full_queue_drops_and_counts_without_blocking() -> None:
    fw = WebhookForwarder(WebhookSettings("http://127.0.0.1:9/none", queue_size=3))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    fake_publish(fw, 10)  # no sender running: the queue fills up
    assert loop.time() - t0 < 0.05
    assert fw.queued == 3 and fw.dropped == 7


async def test_batches_and_filters(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    fw = WebhookForwarder(WebhookSettings(url, batch_max=10, workers=1, types=frozenset({"gift"}), rooms=("live:",)))
    fake_publish(fw, 25, mtype="gift")  # queued before the sender starts: batched
    fake_publish(fw, 5, mtype="chat")  # type filtered
    fake_publish(fw, 5, room="cs:1", mtype="gift")  # room filtered
    await fw.setup(SimpleNamespace(node_id="t1"))  # type: ignore[arg-type]
    try:
        await eventually(lambda: len(rec.events()) == 25)
        assert [len(b["events"]) for _, _, b in rec.requests] == [10, 10, 5]
        assert [e["seq"] for e in rec.events()] == list(range(1, 26))
        assert len({e["id"] for e in rec.events()}) == 25
    finally:
        await fw.teardown()


def test_settings_from_env() -> None:
    s = WebhookSettings.from_env({"WEBHOOK_URL": "http://h/x", "WEBHOOK_WORKERS": "8", "WEBHOOK_TYPES": "gift, chat", "WEBHOOK_EVENTS": "publish"})
    assert s.workers == 8 and s.types == {"gift", "chat"} and s.events == {"publish"}
    with pytest.raises(ConfigError, match="WEBHOOK_URL"):
        WebhookSettings.from_env({})
    with pytest.raises(ConfigError, match="WEBHOOK_QUEUE_SIZE"):
        WebhookSettings.from_env({"WEBHOOK_URL": "http://h/x", "WEBHOOK_QUEUE_SIZE": "lots"})
    with pytest.raises(ConfigError, match="WEBHOOK_EVENTS"):
        WebhookSettings.from_env({"WEBHOOK_URL": "http://h/x", "WEBHOOK_EVENTS": "join"})
