"""The first request over TLS 1.3 in the same TCP segment as the client's Finished message.

Node (undici), Chromium and Twisted (Autobahn's fuzzingclient) all write the HTTP upgrade
request at once when the handshake completes, so it usually reaches the server in one
read with the client's Finished. The gateway must answer it at once; it must not wait
for more bytes (the client sends none before the answer) until its handshake timeout
answers 408. Python's ``ssl`` sockets send Finished and the request in two writes, which
is why tests with Python clients do not show this: here the client runs on memory BIOs,
and the test decides what goes into each TCP write.
"""

from __future__ import annotations

import base64
import os
import socket
import ssl
import time

import pytest
from support.certs import TestCA
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess

#: The engine's handshake timeout is 5 s; a reply that waited for it came too late.
PROMPT = 2.0


@pytest.fixture(scope="module")
def tls_gw(module_gateway_factory: GatewayFactory, tmp_path_factory: pytest.TempPathFactory) -> tuple[GatewayProcess, TestCA]:
    ca = TestCA(tmp_path_factory.mktemp("pki"))
    leaf = ca.issue("server")
    return module_gateway_factory("auth.mode=dev", tls=(leaf.cert_file, leaf.key_file)), ca


def exchange(gw: GatewayProcess, ca: TestCA, request: bytes, *, coalesce: bool) -> tuple[bytes, float, str]:
    """TLS 1.3 handshake with the gateway, then ``request``: in the same TCP write as the
    client's Finished (``coalesce``) or in a write of its own 50 ms later. Returns the
    reply's first line, the seconds it took, and the TLS version."""
    ctx = ca.client_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", gw.tls_port), timeout=10) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "the gateway closed the connection during the handshake"
                incoming.write(data)
        finished = outgoing.read()
        assert finished, "the client's Finished is waiting to be sent"
        if not coalesce:
            sock.sendall(finished)
            time.sleep(0.05)
        tls.write(request)
        t0 = time.monotonic()
        sock.sendall((finished if coalesce else b"") + outgoing.read())
        reply = b""
        while b"\r\n" not in reply:
            try:
                reply += tls.read(65536)
            except ssl.SSLWantReadError:
                data = sock.recv(65536)
                assert data, f"the gateway closed the connection without a reply (after {time.monotonic() - t0:.2f} s)"
                incoming.write(data)
        return reply.split(b"\r\n", 1)[0], time.monotonic() - t0, str(tls.version())


def upgrade_request() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /ws?user=first-flight HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("coalesce", [False, True], ids=["own-write", "with-finished"])
def test_upgrade_request_is_answered_at_once(tls_gw: tuple[GatewayProcess, TestCA], coalesce: bool) -> None:
    gw, ca = tls_gw
    line, took, version = exchange(gw, ca, upgrade_request(), coalesce=coalesce)
    assert version == "TLSv1.3"
    assert line == b"HTTP/1.1 101 Switching Protocols" and took < PROMPT, f"answered {line!r} after {took:.2f} s"


@pytest.mark.parametrize("coalesce", [False, True], ids=["own-write", "with-finished"])
def test_health_request_is_answered_at_once(tls_gw: tuple[GatewayProcess, TestCA], coalesce: bool) -> None:
    gw, ca = tls_gw
    line, took, _ = exchange(gw, ca, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n", coalesce=coalesce)
    assert line == b"HTTP/1.1 200 OK" and took < PROMPT, f"answered {line!r} after {took:.2f} s"
