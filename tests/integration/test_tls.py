"""``wss://`` served by the engine (issue 13), through real sockets against a real gateway
process, with certificates made at test time (tests/support/certs.py: root, intermediate,
leaf; clients trust the root only, so the full chain must be served).

Covers: connect/join/publish/receive over TLS with ECDSA and RSA keys; a fan-out to many
TLS members with small and large (multi-record) messages; TLS 1.2 and 1.3, ALPN,
resumption; certificate rotation (SIGHUP and a file change: new connections see the new
serial, open ones keep working; a bad reload keeps the old certificate); start-up errors
that name the key; bad input on the TLS port (plain HTTP, a TLS 1.0-only hello, a
stalled handshake, garbage), each with its metric while the node keeps serving; the
real client IP from the PROXY protocol and from X-Forwarded-For of trusted proxies only.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ROOT
from support.certs import Issued, TestCA, peer_serial
from support.gateway import GatewayProcess, uniq
from support.wait import eventually
from support.ws import upgrade_request


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_gw(ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway with a TLS listener (ECDSA certificate) and the test hooks app, a short
    handshake deadline, no file watching (the rotation tests start their own)."""
    issued = ca.issue("shared")
    g = GatewayProcess(
        tmp_path_factory.mktemp("tlsgw"),
        ["limits.handshake_timeout=1", "server.tls.watch_interval=0"],
        app="tests.apps:make_app",
        tls=(issued.cert_file, issued.key_file),
    )
    g.start()
    yield g
    assert not g.finish()


def handshake(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost", session=session)


async def roundtrip(gw: GatewayProcess, ctx: ssl.SSLContext, text: str = "hello") -> None:
    """Connect, join, publish and receive over wss://."""
    room = f"live:{uniq('tls')}"
    a = await gw.client(ssl=ctx)
    b = await gw.client(ssl=ctx)
    try:
        await a.join(room)
        await b.join(room)
        await a.publish(room, {"text": text})
        for c in (a, b):
            m = await c.recv(timeout=10)
            assert m["room"] == room and m["data"] == {"text": text}
    finally:
        await a.close()
        await b.close()


async def test_wss_connect_join_publish_receive(tls_gw: GatewayProcess, ca: TestCA) -> None:
    await roundtrip(tls_gw, ca.client_context())
    # The plain listener stays (for a proxy that terminates TLS).
    c = await tls_gw.client()
    await c.close()
    assert tls_gw.metric("gateway_tls_handshakes_total") is not None


@pytest.mark.parametrize("key", ["rsa", "ec"])
async def test_rsa_and_ecdsa_keys(key: str, ca: TestCA, tmp_path: Path) -> None:
    issued = ca.issue(f"k-{key}", key=key)
    g = GatewayProcess(tmp_path, ["server.tls.watch_interval=0"], tls=(issued.cert_file, issued.key_file)).start()
    try:
        await roundtrip(g, ca.client_context())
        with handshake(g.tls_port, ca.client_context()) as s:
            assert peer_serial(s) == issued.serial
            assert s.selected_alpn_protocol() == "http/1.1"
    finally:
        assert not g.finish()


async def test_fanout_to_many_tls_members_small_and_multi_record_messages(tls_gw: GatewayProcess, ca: TestCA) -> None:
    """60 members, 40 messages of 100 B to 40 KiB (several 16 KiB records each), published
    back to back: every member gets every message, in order (direct writes, queued
    writes and partial writes of encrypted data all keep the stream intact)."""
    ctx = ca.client_context()
    room = f"live:{uniq('fan')}"
    members = await asyncio.gather(*(tls_gw.client(ssl=ctx, compression=None) for _ in range(60)))
    try:
        await asyncio.gather(*(m.join(room) for m in members))
        sizes = [100, 3000, 20_000, 40_000] * 10
        for i, n in enumerate(sizes):
            await tls_gw.publish(room, {"i": i, "pad": "x" * n})

        async def drain(m: object) -> list[int]:
            got = []
            for _ in sizes:
                msg = await m.recv(timeout=20)  # type: ignore[attr-defined]
                got.append(msg["data"]["i"])
            return got

        results = await asyncio.gather(*(drain(m) for m in members))
        assert all(r == list(range(len(sizes))) for r in results)
    finally:
        await asyncio.gather(*(m.close() for m in members))


def test_tls_versions_alpn_and_resumption(tls_gw: GatewayProcess, ca: TestCA) -> None:
    before = tls_gw.metric('gateway_tls_handshakes_total{kind="resumed"}') or 0
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = ca.client_context()
        ctx.minimum_version = ctx.maximum_version = version
        with handshake(tls_gw.tls_port, ctx) as s:
            assert s.version() == ("TLSv1.2" if version == ssl.TLSVersion.TLSv1_2 else "TLSv1.3")
            assert s.selected_alpn_protocol() == "http/1.1"
            # TLS 1.3 tickets arrive after the handshake: read the HTTP answer first.
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            session = s.session
        with handshake(tls_gw.tls_port, ctx, session=session) as s2:
            assert s2.session_reused, f"{version.name}: session not resumed"
    assert (tls_gw.metric('gateway_tls_handshakes_total{kind="resumed"}') or 0) >= before + 2


def test_certificate_expiry_metric(tls_gw: GatewayProcess, ca: TestCA) -> None:
    with handshake(tls_gw.tls_port, ca.client_context()) as s:
        cert = s.getpeercert()
    assert cert is not None
    not_after = ssl.cert_time_to_seconds(str(cert["notAfter"]))
    assert tls_gw.metric("gateway_tls_cert_expiry_timestamp_seconds") == pytest.approx(not_after, abs=1)


# ---- rotation ------------------------------------------------------------------------------


def install(issued: Issued, cert_file: Path, key_file: Path) -> None:
    """Replace the served files the way certbot and kubelet do: write aside, rename over."""
    for src, dst in ((issued.cert_file, cert_file), (issued.key_file, key_file)):
        tmp = dst.with_suffix(".new")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)


def serial_of(g: GatewayProcess, ca: TestCA) -> int:
    with handshake(g.tls_port, ca.client_context()) as s:
        return peer_serial(s)


async def test_rotation_on_sighup_and_on_file_change(ca: TestCA, tmp_path: Path) -> None:
    first, second, third = ca.issue("r1"), ca.issue("r2"), ca.issue("r3")
    cert_file, key_file = tmp_path / "live.pem", tmp_path / "live.key"
    install(first, cert_file, key_file)
    g = GatewayProcess(tmp_path / "gw", ["server.tls.watch_interval=0.2"], tls=(cert_file, key_file)).start()
    ctx = ca.client_context()
    try:
        room = f"live:{uniq('rot')}"
        old = await g.client(ssl=ctx)
        await old.join(room)
        assert serial_of(g, ca) == first.serial

        # SIGHUP: new connections get the new certificate, the open one keeps working.
        install(second, cert_file, key_file)
        g.signal(signal.SIGHUP)
        await eventually(lambda: serial_of(g, ca) == second.serial, timeout=10)
        await g.publish(room, {"after": "sighup"})
        assert (await old.recv(timeout=10))["data"] == {"after": "sighup"}
        await roundtrip(g, ctx)

        # A change of the files alone (the watcher), as a Kubernetes Secret update.
        install(third, cert_file, key_file)
        await eventually(lambda: serial_of(g, ca) == third.serial, timeout=10)
        await g.publish(room, {"after": "watch"})
        assert (await old.recv(timeout=10))["data"] == {"after": "watch"}
        assert (g.metric('gateway_tls_reloads_total{result="ok"}') or 0) >= 2
        assert g.metric("gateway_tls_cert_expiry_timestamp_seconds") == pytest.approx(third.not_after.timestamp(), abs=1)
        await old.close()
    finally:
        assert not g.finish()


async def test_a_failed_reload_keeps_the_old_certificate(ca: TestCA, tmp_path: Path) -> None:
    good, other = ca.issue("good"), ca.issue("other")
    cert_file, key_file = tmp_path / "live.pem", tmp_path / "live.key"
    install(good, cert_file, key_file)
    g = GatewayProcess(tmp_path / "gw", ["server.tls.watch_interval=0"], tls=(cert_file, key_file)).start()
    ctx = ca.client_context()
    try:
        c = await g.client(ssl=ctx)
        # A bad PEM, then a key of another certificate: each refused, the old one stays.
        for broken, why in ((b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n", "bad PEM"),
                            (None, "does not match")):
            if broken is None:
                shutil.copyfile(good.cert_file, cert_file)
                shutil.copyfile(other.key_file, key_file)
            else:
                cert_file.write_bytes(broken)
            errors = g.metric('gateway_tls_reloads_total{result="error"}') or 0
            g.signal(signal.SIGHUP)
            await eventually(lambda e=errors: (g.metric('gateway_tls_reloads_total{result="error"}') or 0) == e + 1, timeout=10)
            assert why in g.log_text()
            assert serial_of(g, ca) == good.serial
            await roundtrip(g, ctx)
        assert c.connected
        await c.close()
    finally:
        assert not g.finish()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "--dev", "--port", "0", "--set", "api.enabled=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def test_bad_certificates_fail_at_start_naming_the_key(ca: TestCA, tmp_path: Path) -> None:
    good, other = ca.issue("cli-good"), ca.issue("cli-other", key="rsa")
    expired = ca.issue("cli-expired", days=-1, not_before_days=-10)
    soon = ca.issue("cli-soon", days=5)
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not PEM\n")
    cases = [
        ((tmp_path / "missing.pem", good.key_file), "server.tls.cert_file: cannot read"),
        ((good.cert_file, tmp_path / "missing.key"), "server.tls.key_file: cannot read"),
        ((junk, good.key_file), "server.tls.cert_file: no PEM certificate"),
        ((good.cert_file, junk), "server.tls.key_file: no usable PEM private key"),
        ((good.cert_file, other.key_file), "server.tls.key_file:"),
        ((expired.cert_file, expired.key_file), "server.tls.cert_file: the certificate in"),
    ]
    for (cert, key), message in cases:
        for cmd in ("check-config", "run"):
            r = run_cli(cmd, "--tls-cert", str(cert), "--tls-key", str(key))
            assert r.returncode == 2, (cmd, message, r.stdout, r.stderr)
            assert f"configuration error: {message}" in r.stderr, (cmd, r.stderr)
    assert "does not match" in run_cli("check-config", "--tls-cert", str(good.cert_file), "--tls-key", str(other.key_file)).stderr
    assert "expired" in run_cli("check-config", "--tls-cert", str(expired.cert_file), "--tls-key", str(expired.key_file)).stderr
    r = run_cli("check-config", "--tls-cert", str(soon.cert_file), "--tls-key", str(soon.key_file))
    assert r.returncode == 0, r.stderr
    assert "warning: the TLS certificate" in r.stdout and "expires in 5.0 days" in r.stdout


# ---- bad input on the TLS port ------------------------------------------------------------


def failures(g: GatewayProcess, reason: str) -> float:
    return g.metric(f'gateway_tls_handshake_failures_total{{reason="{reason}"}}') or 0


async def test_bad_input_on_the_tls_port(tls_gw: GatewayProcess, ca: TestCA) -> None:
    """Each gets a clear answer (an HTTP 400, a TLS alert, a close) and is counted; an
    open TLS client is untouched and new ones still connect."""
    g, ctx = tls_gw, ca.client_context()
    room = f"live:{uniq('bad')}"
    bystander = await g.client(ssl=ctx)
    await bystander.join(room)
    counts = {r: failures(g, r) for r in ("plain_http", "protocol_version", "timeout", "not_tls")}

    # Plain HTTP to the TLS port: an HTTP 400 that says what to do.
    with socket.create_connection(("127.0.0.1", g.tls_port), timeout=10) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and b"speaks TLS" in answer

    # A client hello offering TLS 1.0 only (OpenSSL here refuses to send one, so it is
    # written by hand): a fatal protocol_version alert (70).
    body = b"\x03\x01" + bytes(32) + b"\x00" + b"\x00\x02\xc0\x2b" + b"\x01\x00"
    hello = b"\x01" + len(body).to_bytes(3, "big") + body
    with socket.create_connection(("127.0.0.1", g.tls_port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01" + len(hello).to_bytes(2, "big") + hello)
        alert = s.recv(4096)
    assert alert[:1] == b"\x15" and alert[5:7] == b"\x02\x46", alert.hex()

    # A handshake that stalls (half a hello): closed at limits.handshake_timeout (1 s).
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", g.tls_port), timeout=10) as s:
        s.sendall(bytes.fromhex("160301020001"))
        assert s.recv(4096) == b""
    assert 0.8 < time.monotonic() - t0 < 5

    # Garbage: a decode_error alert, then the close.
    with socket.create_connection(("127.0.0.1", g.tls_port), timeout=10) as s:
        s.sendall(bytes(range(256)) * 4)
        data = s.recv(4096)
        assert data[:1] in (b"\x15", b"")  # an alert record, or just the close

    await eventually(lambda: all(failures(g, r) >= counts[r] + 1 for r in counts), timeout=10)
    await g.publish(room, {"still": "here"})
    assert (await bystander.recv(timeout=10))["data"] == {"still": "here"}
    await roundtrip(g, ctx)
    await bystander.close()


# ---- the real client IP --------------------------------------------------------------------


def whoami(port: int, *, prefix: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> str:
    """Upgrade as user ``whoami`` (the test app rejects it with ``peer=<address>``) and
    return the address the hooks saw."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(prefix + upgrade_request("127.0.0.1", port, "/ws?user=whoami", headers=headers))
        data = b""
        while b"peer=" not in data or not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    assert data.startswith(b"HTTP/1.1 403"), data
    return data.split(b"peer=", 1)[1].split(b"\n", 1)[0].decode()


def test_forwarded_headers_only_from_trusted_proxies(tmp_path: Path) -> None:
    spoof = (("X-Forwarded-For", "203.0.113.9"), ("X-Real-IP", "203.0.113.10"))
    untrusting = GatewayProcess(tmp_path / "a", app="tests.apps:make_app").start()
    trusting = GatewayProcess(tmp_path / "b", ["server.trusted_proxies=['127.0.0.0/8']", "limits.max_conns_per_ip=1"],
                              app="tests.apps:make_app").start()
    try:
        # An untrusted peer's headers are ignored: the hooks see the socket's address.
        assert whoami(untrusting.port, headers=spoof).startswith("127.0.0.1:")
        # From a trusted proxy, the rightmost untrusted X-Forwarded-For entry.
        assert whoami(trusting.port, headers=(("X-Forwarded-For", "198.51.100.7, 203.0.113.9"),)) == "203.0.113.9:0"
        assert whoami(trusting.port, headers=(("X-Real-IP", "203.0.113.10"),)) == "203.0.113.10:0"
    finally:
        assert not untrusting.finish()
        assert not trusting.finish()


async def test_proxy_protocol_gives_the_client_address_to_hooks_and_per_ip_limits(tmp_path: Path) -> None:
    g = GatewayProcess(tmp_path, ["server.proxy_protocol=true", "limits.max_conns_per_ip=2"], app="tests.apps:make_app").start()
    try:
        v1 = b"PROXY TCP4 198.51.100.20 10.0.0.1 40000 443\r\n"
        assert whoami(g.port, prefix=v1) == "198.51.100.20:40000"
        v2 = (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11, 0, 12]) + socket.inet_aton("198.51.100.21")
              + socket.inet_aton("10.0.0.1") + (40001).to_bytes(2, "big") + (443).to_bytes(2, "big"))
        assert whoami(g.port, prefix=v2) == "198.51.100.21:40001"
        # A connection without the header is dropped (counted), the node goes on.
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
            s.sendall(upgrade_request("127.0.0.1", g.port, "/ws?user=x"))
            assert s.recv(4096) == b""
        assert await eventually(lambda: (g.metric('gateway_proxy_protocol_refused_total{reason="bad_header"}') or 0) >= 1)
        # Per-IP limits count the client's address, not the proxy's: two held from one
        # client, the third refused; another client still gets in.
        held = []
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", g.port), timeout=10)
            s.sendall(b"PROXY TCP4 198.51.100.30 10.0.0.1 1 443\r\n" + upgrade_request("127.0.0.1", g.port, "/ws?user=held"))
            assert s.recv(4096).startswith(b"HTTP/1.1 101")
            held.append(s)
        with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
            s.sendall(b"PROXY TCP4 198.51.100.30 10.0.0.1 2 443\r\n" + upgrade_request("127.0.0.1", g.port, "/ws?user=held"))
            assert s.recv(4096).startswith(b"HTTP/1.1 429")
        assert whoami(g.port, prefix=b"PROXY TCP4 198.51.100.31 10.0.0.1 3 443\r\n") == "198.51.100.31:3"
        for s in held:
            s.close()
    finally:
        assert not g.finish()
