"""The engine's media relay (``media_prefix``): HTTP requests under the prefix on the public
port, plain or TLS, reach an aiohttp server on loopback with the engine's headers, and the
answer comes back. The engine runs in this process (``gateway._core.Engine``) with no
Python gateway around it; the upstream is a stand-in for the node's media server."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from gateway._core import Engine, EngineError
from support.certs import TestCA

SECRET = "relay-secret-0123456789abcdef"


@dataclass
class Relay:
    engine: Engine
    http: str
    https: str
    ca: TestCA


async def _upload(request: web.Request) -> web.Response:
    """Stream the body (as the media server will), answer with what arrived."""
    h = hashlib.sha256()
    n = 0
    limit = int(request.query.get("limit", "0"))
    while chunk := await request.content.read(65536):
        h.update(chunk)
        n += len(chunk)
        if limit and n > limit:
            return web.json_response({"error": "file too large", "code": "too_large"}, status=413)
    seen = {k: request.headers.getall(k, []) for k in ("X-Gateway-Media-Secret", "X-Forwarded-For", "X-Forwarded-Proto", "Connection", "X-Real-IP", "Keep-Alive")}
    return web.json_response({"size": n, "sha256": h.hexdigest(), "headers": seen, "method": request.method, "query": request.query_string})


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def relay(ca: TestCA, tmp_path: Path) -> AsyncIterator[Relay]:
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/media/{tail:.*}", _upload)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    issued = ca.issue("relay")
    eng = Engine(
        server_host="127.0.0.1",
        server_port=0,
        server_tls_cert_file=str(issued.cert_file),
        server_tls_key_file=str(issued.key_file),
        server_tls_port=0,
        media_prefix="/media/",
        media_upstream=f"127.0.0.1:{port}",
        media_secret=SECRET,
        media_max_body=64 << 20,
        media_timeout=60.0,
        media_idle_timeout=10.0,
    )
    host, p = eng.start()
    tls = eng.tls_address
    assert tls is not None
    yield Relay(eng, f"http://{host}:{p}", f"https://localhost:{tls[1]}", ca)
    await asyncio.to_thread(eng.stop, timeout=1.0)
    await runner.cleanup()


def _body(size: int) -> bytes:
    return os.urandom(size)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_ten_megabytes_arrive_intact_with_the_engine_headers(relay: Relay, scheme: str) -> None:
    body = _body(10 << 20)
    base = relay.http if scheme == "http" else relay.https
    ssl_ctx: Any = relay.ca.client_context() if scheme == "https" else None
    headers = {"X-Gateway-Media-Secret": "forged", "X-Forwarded-For": "6.6.6.6", "X-Real-IP": "6.6.6.6", "Content-Type": "application/octet-stream"}
    async with aiohttp.ClientSession() as s, s.post(f"{base}/media/upload?room=r1", data=io.BytesIO(body), headers=headers, ssl=ssl_ctx) as r:
        assert r.status == 200, await r.text()
        got = await r.json()
    assert got["size"] == len(body)
    assert got["sha256"] == hashlib.sha256(body).hexdigest()
    assert got["query"] == "room=r1"
    assert got["headers"] == {
        "X-Gateway-Media-Secret": [SECRET],
        "X-Forwarded-For": ["127.0.0.1"],
        "X-Forwarded-Proto": [scheme],
        "Connection": ["close"],
        "X-Real-IP": [],
        "Keep-Alive": [],
    }
    c = relay.engine.counters()
    assert c["media_relay_requests"] == 1
    assert c["media_relay_bytes_in"] == len(body)


async def test_get_is_relayed(relay: Relay) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{relay.http}/media/f/m_1?e=1&s=x") as r:
        assert r.status == 200
        got = await r.json()
    assert (got["method"], got["size"], got["query"]) == ("GET", 0, "e=1&s=x")


async def test_engine_refusals_are_json(relay: Relay) -> None:
    async with aiohttp.ClientSession() as s:
        # Over media_max_body: answered before the body is read.
        big = _body((64 << 20) + 1)
        async with s.post(f"{relay.http}/media/upload", data=io.BytesIO(big)) as r:
            assert r.status == 413
            assert await r.json() == {"error": "request body too large", "code": "too_large", "limit": 64 << 20}

        # Chunked (a generator body has no length).
        async def gen() -> AsyncIterator[bytes]:
            yield b"abc"

        async with s.post(f"{relay.http}/media/upload", data=gen()) as r:
            assert r.status == 411
            assert (await r.json())["code"] == "bad_request"
    c = relay.engine.counters()
    assert (c["media_relay_refused_too_large"], c["media_relay_refused_length_required"]) == (1, 1)


async def test_upstream_refusing_mid_body_is_relayed(relay: Relay) -> None:
    """The media server answers 413 after 1 MB of a 48 MB body: the client reads that answer."""
    body = _body(48 << 20)
    async with aiohttp.ClientSession() as s, s.post(f"{relay.http}/media/upload?limit={1 << 20}", data=io.BytesIO(body)) as r:
        assert r.status == 413
        assert (await r.json())["code"] == "too_large"
    assert relay.engine.counters()["media_relay_bytes_in"] < len(body)


def test_bad_settings_name_their_key() -> None:
    with pytest.raises(EngineError, match="media_upstream"):
        Engine(media_prefix="/media/", media_upstream="localhost", media_secret=SECRET)
    with pytest.raises(EngineError, match="media_secret"):
        Engine(media_prefix="/media/", media_upstream="127.0.0.1:9")
    with pytest.raises(ValueError, match="media_timeout"):
        Engine(media_timeout=-1.0)
