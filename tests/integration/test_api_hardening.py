"""The internal API's guards, through real sockets: JSON-only bodies, Host and Origin checks
without a key, the read deadline (slowloris headers, slow bodies, idle connections), the
connection cap under a flood, ``/metrics`` behind the key, idempotent publish and send,
and the ``gateway_api_refused_total{reason}`` counter."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from typing import Any

import pytest
from gateway.client import GatewayClient
from gwtest import GatewayProcess, uniq

READ_TIMEOUT = 2.0
CAP = 50


@pytest.fixture(scope="module")
def open_gw(module_gateway_factory: Any) -> GatewayProcess:
    """No API key (loopback): the Host, Origin and content-type guards are the defence."""
    return module_gateway_factory(  # type: ignore[no-any-return]
        f"api.read_timeout={READ_TIMEOUT}",
        f"api.max_connections={CAP}",
        'api.allowed_hosts=["gateway.internal", "http://console.internal"]',
        api_key=None,
    )


@pytest.fixture(scope="module")
def key_gw(module_gateway_factory: Any) -> GatewayProcess:
    """With the API key and ``/metrics`` behind it."""
    return module_gateway_factory("api.metrics_need_key=true")  # type: ignore[no-any-return]


async def _client(gw: GatewayProcess, user: str | None = None) -> GatewayClient:
    c = GatewayClient(gw.ws_url(), user=user or uniq("u"))
    await c.connect()
    return c


def _pushes(c: GatewayClient) -> list[dict[str, Any]]:
    """Every push frame ``c`` receives from now on (appended as they come)."""
    seen: list[dict[str, Any]] = []

    def collect(f: dict[str, Any]) -> bool:
        if f.get("op") == "push":
            seen.append(f)
        return False

    c.wait_event(collect)
    return seen


async def _refused(gw: GatewayProcess) -> dict[str, float]:
    """``gateway_api_refused_total`` by reason, from ``/metrics``."""
    status, text = await gw.api("GET", "/metrics")
    assert status == 200, text
    return {m[1]: float(m[2]) for m in re.finditer(r'^gateway_api_refused_total\{reason="(\w+)"\} (\S+)$', text, re.MULTILINE)}


async def _raw(port: int, data: bytes = b"", timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        if data:
            w.write(data)
        return await asyncio.wait_for(r.read(), timeout)
    finally:
        w.close()


def _status(resp: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", resp)
    return int(m.group(1)) if m else 0


async def _responsive(gw: GatewayProcess, stop: asyncio.Event, worst: list[float]) -> int:
    """Call ``/healthz``, ``/v1/stats`` and publish until ``stop``; every answer must be a
    200. Records the slowest call in ``worst``; returns the number of calls."""
    n = 0
    room = f"live:{uniq('resp')}"
    while not stop.is_set():
        for method, path, body in (("GET", "/healthz", None), ("GET", "/v1/stats", None), ("POST", "/v1/publish", {"room": room, "data": n})):
            t0 = time.monotonic()
            status, out = await gw.api(method, path, body)
            worst.append(time.monotonic() - t0)
            assert status == 200, (path, status, out)
            n += 1
        await asyncio.sleep(0.05)
    return n


# ---- content type ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None])
async def test_non_json_broadcast_is_refused_and_delivers_nothing(open_gw: GatewayProcess, ctype: str | None) -> None:
    c = await _client(open_gw)
    try:
        seen = _pushes(c)
        before = await _refused(open_gw)
        headers = {"Content-Type": ctype} if ctype else {}
        if ctype is None:
            # No Content-Type header at all: aiohttp would add one for bytes, a raw socket does not.
            body = b'{"data": {"evil": true}}'
            req = (f"POST /v1/broadcast HTTP/1.1\r\nHost: 127.0.0.1:{open_gw.api_port}\r\nContent-Length: {len(body)}\r\n"
                   "Connection: close\r\n\r\n").encode() + body
            resp = await _raw(open_gw.api_port, req)
            status, out = _status(resp), resp.split(b"\r\n\r\n", 1)[1].decode()
        else:
            status, out = await open_gw.api("POST", "/v1/broadcast", data=b'{"data": {"evil": true}}', headers=headers)
        assert status == 415, out
        assert "application/json" in str(out)
        await asyncio.sleep(0.5)
        assert seen == []
        after = await _refused(open_gw)
        assert after["content_type"] >= before["content_type"] + 1
        # The same call as JSON goes through.
        status, out = await open_gw.api("POST", "/v1/broadcast", {"data": {"ok": True}})
        assert (status, out) == (200, {"sent": True})
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.05)
        assert [p["data"] for p in seen] == [{"ok": True}]
    finally:
        await c.close()


async def test_json_content_type_is_required_with_a_key_too(key_gw: GatewayProcess) -> None:
    status, out = await key_gw.api("POST", "/v1/publish", data=b'{"room": "live:1", "data": 1}', headers={"Content-Type": "text/plain"})
    assert status == 415, out
    # application/json with a charset is fine; a body-less POST (close) needs no type.
    status, out = await key_gw.api("POST", "/v1/publish", data=b'{"room": "live:ct", "data": 1}', headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200, out
    status, out = await key_gw.api("POST", "/v1/rooms/live:ct/close")
    assert status == 200, out


# ---- Host and Origin -----------------------------------------------------------------------------


async def test_host_is_checked_without_a_key(open_gw: GatewayProcess) -> None:
    port = open_gw.api_port
    before = await _refused(open_gw)
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.2", "localhost.evil.example", "[::2]"):
        status, out = await open_gw.api("GET", "/v1/stats", headers={"Host": host})
        assert status == 421, (host, status, out)
        assert "Host" in out["error"]
        status, out = await open_gw.api("POST", "/v1/broadcast", {"data": 1}, headers={"Host": host})
        assert status == 421, (host, status, out)
    for host in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", f"[::1]:{port}", "gateway.internal", f"gateway.internal:{port}"):
        status, out = await open_gw.api("GET", "/v1/stats", headers={"Host": host})
        assert status == 200, (host, status, out)
    # HTTP/1.0 without a Host header: refused too.
    resp = await _raw(port, b"GET /v1/stats HTTP/1.0\r\n\r\n")
    assert _status(resp) == 421, resp[:200]
    # Probes stay open whatever the Host.
    status, _ = await open_gw.api("GET", "/healthz", headers={"Host": "evil.example"})
    assert status == 200
    status, _ = await open_gw.api("GET", "/readyz", headers={"Host": "evil.example"})
    assert status == 200
    after = await _refused(open_gw)
    assert after["host"] >= before["host"] + 11


async def test_foreign_origin_is_refused_without_a_key(open_gw: GatewayProcess) -> None:
    c = await _client(open_gw)
    try:
        seen = _pushes(c)
        before = await _refused(open_gw)
        # A browser page, even one served from this machine, sends an Origin on a POST.
        for origin in ("http://evil.example", f"http://127.0.0.1:{open_gw.api_port}", "http://localhost:3000", "null"):
            status, out = await open_gw.api("POST", "/v1/broadcast", {"data": 1}, headers={"Origin": origin})
            assert status == 403, (origin, status, out)
            assert "Origin" in out["error"]
        status, out = await open_gw.api("GET", "/v1/stats", headers={"Origin": "http://evil.example"})
        assert status == 403
        await asyncio.sleep(0.3)
        assert seen == []
        # An origin listed in api.allowed_hosts is accepted.
        status, out = await open_gw.api("GET", "/v1/stats", headers={"Origin": "http://console.internal"})
        assert status == 200, out
        after = await _refused(open_gw)
        assert after["origin"] >= before["origin"] + 5
    finally:
        await c.close()


async def test_host_and_origin_are_not_checked_with_a_key(key_gw: GatewayProcess) -> None:
    status, out = await key_gw.api("GET", "/v1/stats", headers={"Host": "gw.example.com", "Origin": "http://evil.example"})
    assert status == 200, out
    status, out = await key_gw.api("GET", "/v1/stats", key=False, headers={"Host": "gw.example.com"})
    assert status == 401, out


# ---- read deadline ---------------------------------------------------------------------------------


async def _slowloris(port: int, prefix: bytes, interval: float, limit: float) -> tuple[bytes, float]:
    """Send ``prefix`` then a never-ending header value, one byte every ``interval``
    (``prefix`` at once when ``interval`` is 0); returns what the server answered and when
    (seconds after the first byte) it closed the connection."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.monotonic()
    got = b""
    chunks = [prefix] if interval == 0 else [bytes([b]) for b in prefix]
    try:
        while time.monotonic() - t0 < limit:
            try:
                w.write(chunks.pop(0) if chunks else b"a")
                await w.drain()
                got += await asyncio.wait_for(r.read(4096), max(interval, 0.05))
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                break
            if r.at_eof():
                break
    finally:
        w.close()
    return got, time.monotonic() - t0


async def test_slowloris_headers_get_408_while_others_are_served(open_gw: GatewayProcess) -> None:
    before = await _refused(open_gw)
    stop, worst = asyncio.Event(), []  # type: ignore[var-annotated]
    served = asyncio.create_task(_responsive(open_gw, stop, worst))
    try:
        prefix = f"GET /v1/stats HTTP/1.1\r\nHost: 127.0.0.1:{open_gw.api_port}\r\nX-Slow: ".encode()
        results = await asyncio.gather(*(_slowloris(open_gw.api_port, prefix, 0.05, READ_TIMEOUT + 5) for _ in range(5)))
    finally:
        stop.set()
        n = await served
    for got, took in results:
        assert READ_TIMEOUT - 0.3 <= took <= READ_TIMEOUT + 1.5, took
        # 408 when the answer got through; a reset may beat it to the client.
        assert got == b"" or _status(got) == 408, got[:200]
    assert any(_status(got) == 408 for got, _ in results)
    assert n >= 10 and max(worst) < 1.0, (n, max(worst))
    after = await _refused(open_gw)
    assert after["timeout"] >= before["timeout"] + 5


async def test_slow_body_gets_408(open_gw: GatewayProcess) -> None:
    before = await _refused(open_gw)
    stop, worst = asyncio.Event(), []  # type: ignore[var-annotated]
    served = asyncio.create_task(_responsive(open_gw, stop, worst))
    try:
        head = (f"POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1:{open_gw.api_port}\r\nContent-Type: application/json\r\n"
                "Content-Length: 100000\r\n\r\n").encode()
        got, took = await _slowloris(open_gw.api_port, head + b'{"room": "live:slow", "data": "', 0.0, READ_TIMEOUT + 5)
    finally:
        stop.set()
        n = await served
    assert READ_TIMEOUT - 0.3 <= took <= READ_TIMEOUT + 1.5, took
    assert got == b"" or _status(got) == 408, got[:300]
    if got:
        assert b"read_timeout" in got
    assert n >= 5 and max(worst) < 1.0
    after = await _refused(open_gw)
    assert after["timeout"] >= before["timeout"] + 1


async def test_idle_connection_is_closed(open_gw: GatewayProcess) -> None:
    t0 = time.monotonic()
    got = await _raw(open_gw.api_port, b"", timeout=READ_TIMEOUT + 5)
    took = time.monotonic() - t0
    assert got == b"" and READ_TIMEOUT - 0.3 <= took <= READ_TIMEOUT + 1.5, (got, took)
    # An idle keep-alive connection after a response too.
    r, w = await asyncio.open_connection("127.0.0.1", open_gw.api_port)
    try:
        w.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{open_gw.api_port}\r\n\r\n".encode())
        t0 = time.monotonic()
        data = await asyncio.wait_for(r.read(), READ_TIMEOUT + 5)
        took = time.monotonic() - t0
    finally:
        w.close()
    assert _status(data) == 200 and READ_TIMEOUT - 0.3 <= took <= READ_TIMEOUT + 1.5, (data, took)


# ---- the connection cap ------------------------------------------------------------------------------


async def test_flood_of_idle_connections_does_not_lock_out_the_api(open_gw: GatewayProcess) -> None:
    room = f"live:{uniq('flood')}"
    c = await _client(open_gw)
    socks: list[asyncio.StreamWriter] = []
    try:
        await c.join(room)
        before = await _refused(open_gw)
        for _ in range(1000):
            _, w = await asyncio.open_connection("127.0.0.1", open_gw.api_port)
            socks.append(w)
        # The flood holds its sockets open (the server closes most of them: the cap).
        worst: list[float] = []
        for i in range(20):
            t0 = time.monotonic()
            status, _ = await open_gw.api("GET", "/healthz")
            status2, out = await open_gw.api("POST", "/v1/publish", {"room": room, "data": i})
            worst.append(time.monotonic() - t0)
            assert (status, status2) == (200, 200), out
        assert max(worst) < 1.0, worst
        got = await c.recv_many(20, 10)
        assert [m["data"] for m in got] == list(range(20))
        after = await _refused(open_gw)
        # Every flood socket beyond the cap was closed to make room (or when idle too long).
        assert after["evicted"] + after["timeout"] - before["evicted"] - before["timeout"] >= 1000 - CAP
    finally:
        for w in socks:
            w.close()
        await c.close()


async def test_connections_beyond_the_cap_get_503_when_all_are_busy(gateway_factory: Any) -> None:
    gw = gateway_factory("api.read_timeout=2", "api.max_connections=3", api_key=None)
    head = (f"POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1:{gw.api_port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 50\r\n\r\n{").encode()
    busy = [await asyncio.open_connection("127.0.0.1", gw.api_port) for _ in range(3)]
    try:
        for _, w in busy:
            w.write(head)  # headers done, the body never comes: busy in the handler
            await w.drain()
        await asyncio.sleep(0.3)
        resp = await _raw(gw.api_port, b"", timeout=5)
        assert _status(resp) == 503 and b"api.max_connections" in resp, resp
        # The busy ones get 408 at their deadline; then the API answers again.
        for r, _ in busy:
            assert _status(await asyncio.wait_for(r.read(), 5)) == 408
        status, _ = await gw.api("GET", "/healthz")
        assert status == 200
        refused = await _refused(gw)
        assert refused["conn_cap"] >= 1 and refused["timeout"] >= 3
    finally:
        for _, w in busy:
            w.close()


# ---- bad input --------------------------------------------------------------------------------------


async def test_bad_requests_get_4xx_and_the_node_lives(open_gw: GatewayProcess) -> None:
    port = open_gw.api_port
    before = await _refused(open_gw)
    # Unparsable requests: 400, counted, and no traceback in the log (the fixture checks).
    assert _status(await _raw(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n")) == 400
    assert _status(await _raw(port, b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n")) in (400, 414)
    assert _status(await _raw(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")) in (400, 431)
    assert (await _refused(open_gw))["bad_request"] >= before["bad_request"] + 3
    big = b'{"room": "live:big", "data": "' + b"x" * (2 << 20) + b'"}'
    status, out = await open_gw.api("POST", "/v1/publish", data=big, headers={"Content-Type": "application/json"})
    assert status == 413, out
    after = await _refused(open_gw)
    assert after["too_large"] == before["too_large"] + 1
    status, out = await open_gw.api("POST", "/v1/publish", data=b'{"room": "live:1", "data": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                                    headers={"Content-Type": "application/json"})
    assert status == 400, out
    status, _ = await open_gw.api("GET", "/healthz")
    assert status == 200


# ---- /metrics behind the key ---------------------------------------------------------------------------


async def test_metrics_behind_the_key(key_gw: GatewayProcess) -> None:
    status, out = await key_gw.api("GET", "/metrics", key=False)
    assert (status, out) == (401, {"error": "missing or wrong API key"})
    status, out = await key_gw.api("GET", "/metrics", key="wrong")
    assert status == 401
    status, text = await key_gw.api("GET", "/metrics")
    assert status == 200 and "gateway_connections " in text
    assert re.search(r'^gateway_api_refused_total\{reason="auth"\} ([1-9]\d*)\.0$', text, re.MULTILINE), text[-2000:]
    for path in ("/healthz", "/readyz"):
        status, _ = await key_gw.api("GET", path, key=False)
        assert status == 200


async def test_metrics_are_open_by_default(open_gw: GatewayProcess) -> None:
    status, text = await open_gw.api("GET", "/metrics")
    assert status == 200 and "gateway_api_refused_total" in text


# ---- idempotency ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["header", "body"])
async def test_idempotent_publish(key_gw: GatewayProcess, where: str) -> None:
    room = f"live:{uniq('idem')}"
    c = await _client(key_gw)
    try:
        await c.join(room)
        k = uniq("msg-")
        headers = {"Idempotency-Key": k} if where == "header" else {}
        extra = {"idempotency_key": k} if where == "body" else {}
        status, first = await key_gw.api("POST", "/v1/publish", {"room": room, "data": "once", **extra}, headers=headers)
        assert status == 200, first
        assert "duplicate" not in first
        # The retry after a timeout or a 503: the original seq, nothing delivered again.
        status, again = await key_gw.api("POST", "/v1/publish", {"room": room, "data": "once", **extra}, headers=headers)
        assert status == 200, again
        assert again == {**first, "duplicate": True}
        status, other = await key_gw.api("POST", "/v1/publish", {"room": room, "data": "next"}, headers={"Idempotency-Key": k + "b"})
        assert status == 200 and other["seq"] == first["seq"] + 1 and "duplicate" not in other
        got = await c.recv_many(2, 10)
        assert [m["data"] for m in got] == ["once", "next"]
        await asyncio.sleep(0.3)
        assert c.recv_nowait() is None
    finally:
        await c.close()


async def test_idempotent_send(key_gw: GatewayProcess) -> None:
    user = uniq("buyer")
    c = await _client(key_gw, user)
    try:
        seen = _pushes(c)
        k = uniq("order-")
        for path in ("/v1/send", f"/v1/users/{user}/send"):
            status, out = await key_gw.api("POST", path, {"user": user, "type": "order", "data": {"id": 1}}, headers={"Idempotency-Key": k})
            assert status == 200, out
            stored = {"room": f"notice:{user}", "seq": 1, "delivered": "live"}  # kept in the user's notice conversation
            if path == "/v1/send":
                assert out == {"user": user, "sent": True, **stored}
            else:
                assert out == {"user": user, "sent": True, **stored, "duplicate": True}
        await asyncio.sleep(0.5)
        assert [p["data"] for p in seen] == [{"id": 1}]
    finally:
        await c.close()


@pytest.mark.parametrize(
    ("headers", "extra", "fragment"),
    [
        ({"Idempotency-Key": "k" * 129}, {}, "1..128"),
        ({}, {"idempotency_key": "k" * 129}, "1..128"),
        ({}, {"idempotency_key": ""}, "1..128"),
        ({}, {"idempotency_key": 7}, "must be a string"),
        ({}, {"idempotency_key": "a\nb"}, "printable"),
        ({"Idempotency-Key": "a"}, {"idempotency_key": "b"}, "differ"),
    ],
)
async def test_bad_idempotency_key(key_gw: GatewayProcess, headers: dict[str, str], extra: dict[str, Any], fragment: str) -> None:
    for path, body in (("/v1/publish", {"room": "live:k", "data": 1}), ("/v1/send", {"user": "nobody", "data": 1})):
        status, out = await key_gw.api("POST", path, {**body, **extra}, headers=headers)
        assert status == 400, (path, out)
        assert fragment in out["error"]
