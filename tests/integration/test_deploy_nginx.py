"""deploy/nginx/livegate.conf for real: nginx (from Debian, installed on demand) terminates
TLS with a throwaway certificate and proxies to a real gateway's plain listener. A client
connects with ``wss://``, gets the ``connected`` frame and the echoed subprotocol through the
upgrade, and exchanges frames both ways (ping/pong, a room message published through the
API). (That only TLS 1.2 and 1.3 are offered is checked on the config in
tests/unit/test_deploy.py: this machine's OpenSSL will not even offer older versions.)"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.gateway import GatewayProcess, uniq
from support.nginx import NginxSetup
from support.wait import eventually_sync
from websockets.asyncio.client import connect

#: The first run may install Debian's nginx package.
pytestmark = pytest.mark.timeout(1900)


@pytest.fixture
def nginx(gw: GatewayProcess, tmp_path: Path) -> Iterator[NginxSetup]:
    setup = NginxSetup(tmp_path, upstream_port=gw.port)
    proc = subprocess.Popen(setup.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited with {proc.returncode}:\n{setup.log()}")
        try:
            socket.create_connection(("127.0.0.1", setup.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    try:
        eventually_sync(listening, 20, what=f"nginx on port {setup.port}")
        yield setup
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def client_tls(cert: Path) -> ssl.SSLContext:
    """A client context that trusts only the throwaway certificate."""
    return ssl.create_default_context(cafile=str(cert))


async def test_websocket_through_nginx(gw: GatewayProcess, nginx: NginxSetup) -> None:
    room = f"live:{uniq('nginx')}"
    url = f"wss://localhost:{nginx.port}/ws?user={uniq('u')}"
    async with connect(url, ssl=client_tls(nginx.cert), subprotocols=["gateway.v1"], open_timeout=10) as ws:  # type: ignore[list-item]
        tls = ws.transport.get_extra_info("ssl_object")
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert ws.subprotocol == "gateway.v1", "the upgrade response came through nginx"
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert first["op"] == "connected"
        await ws.send(json.dumps({"op": "ping"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["op"] == "pong"
        await ws.send(json.dumps({"op": "join", "id": 1, "room": room}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert ack["op"] == "ack" and ack["id"] == 1, ack
        await gw.publish(room, {"via": "nginx"})
        async with asyncio.timeout(10):
            while (msg := json.loads(await ws.recv()))["op"] != "msg":
                assert msg["op"] == "presence", msg
        assert msg["data"] == {"via": "nginx"}, msg



async def test_media_uploads_and_downloads_through_nginx(gw: GatewayProcess, nginx: NginxSetup) -> None:
    """A 3 MB file (over nginx's default client_max_body_size of 1 MB) uploads through the
    conf's /media/ pass-through and downloads through it byte for byte."""
    import aiohttp

    from gateway.client import GatewayClient

    tls = client_tls(nginx.cert)
    c = GatewayClient(f"wss://localhost:{nginx.port}/ws", user=uniq("u"), ssl=tls)
    pdf = b"%PDF-1.5\n" + bytes(range(256)) * (3 * 4096)
    up = await c.upload(pdf, kind="file", filename="big.pdf")
    assert up["size"] == len(pdf)
    async with aiohttp.ClientSession() as s, s.get(f"https://localhost:{nginx.port}{up['url']}", ssl=tls) as r:
        assert r.status == 200 and await r.read() == pdf
