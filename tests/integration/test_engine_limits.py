"""The engine under abuse, driven directly (no Python app): every byte a client can make
the server hold is bounded. Real sockets against an ``Engine`` in this process, polled by
a thread that accepts every upgrade (user from ``?user=``) and records messages.

Covers: coalesced pongs for clients that never read, the per-connection rate limit, the
event queue's per-connection share (backpressure) and node-wide bound (shed with 4029
"overloaded"), stale connects, connection caps (node, IP, handshakes, user), room caps,
input caps (deflate bomb, endless fragments, huge declared length, slowloris headers)."""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from gateway._core import EV_CLOSED, EV_CONNECT, EV_MESSAGE, Engine, raise_fd_limit
from support.ws import OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, blocking_upgrade, encode_frame, parse_head, split_frames, upgrade_request

KIB, MIB = 1 << 10, 1 << 20


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Server:
    """An engine plus a polling thread. ``polling.clear()`` stops taking events."""

    def __init__(self, **kw: Any) -> None:
        kw.setdefault("server_host", "127.0.0.1")
        kw.setdefault("server_port", 0)
        kw.setdefault("server_io_threads", 2)
        self.eng = Engine(**kw)
        self.host, self.port = self.eng.start()
        self.polling = threading.Event()
        self.polling.set()
        self.messages: list[tuple[int, bytes]] = []
        self.connects: list[int] = []
        self.accepted: dict[int, bool] = {}
        self.closed: dict[int, tuple[int, str]] = {}
        self.users: dict[int, str] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.polling.is_set():
                time.sleep(0.01)
                continue
            select.select([self.eng.fd], [], [], 0.02)
            more = True
            while more and self.polling.is_set():
                evs, more = self.eng.poll(1024)
                for ev in evs:
                    if ev[0] == EV_CONNECT:
                        conn, query = ev[1], ev[4]
                        user = dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("user")
                        self.connects.append(conn)
                        self.accepted[conn] = self.eng.accept(conn, user=user, first=b'{"op":"connected"}')
                        if user:
                            self.users[conn] = user
                    elif ev[0] == EV_MESSAGE:
                        self.messages.append((ev[1], ev[2]))
                    elif ev[0] == EV_CLOSED:
                        self.closed[ev[1]] = (ev[2], ev[3])

    def counters(self) -> dict[str, int]:
        return self.eng.counters()

    def wait(self, cond: Any, timeout: float = 10.0) -> None:
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, "condition not met in time"
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(2)
        self.eng.stop(timeout=1.0)


@pytest.fixture
def server_factory() -> Iterator[Any]:
    raise_fd_limit()
    made: list[Server] = []

    def make(**kw: Any) -> Server:
        s = Server(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


def connect(srv: Server, user: str = "u", rcvbuf: int | None = None, extensions: str | None = None, timeout: float = 10.0) -> socket.socket:
    """Upgrade a blocking socket; returns it with the ``connected`` frame still unread."""
    hdrs = (("Sec-WebSocket-Extensions", extensions),) if extensions else ()
    return blocking_upgrade(srv.host, srv.port, f"/ws?user={user}", rcvbuf, timeout, hdrs)


def http_status(srv: Server, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str]]:
    s = socket.create_connection((srv.host, srv.port), timeout=timeout)
    try:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return parse_head(data.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    finally:
        s.close()


def read_frames(s: socket.socket, timeout: float = 5.0, until_close: bool = True) -> list[tuple[int, bytes]]:
    """Read server frames until a close frame (or EOF / timeout without one)."""
    s.settimeout(timeout)
    data = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            chunk = s.recv(1 << 16)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        data += chunk
        frames = split_frames(data, whole=False)
        if until_close and any(op == OP_CLOSE for op, _ in frames):
            break
        if not until_close and frames:
            pass
    return split_frames(data, whole=False)


def close_code(frames: list[tuple[int, bytes]]) -> int | None:
    for op, p in frames:
        if op == OP_CLOSE and len(p) >= 2:
            return int(struct.unpack("!H", p[:2])[0])
    return None


def send_until_blocked(s: socket.socket, frame: bytes, limit: int, stall: float = 1.0) -> int:
    """Send ``frame`` up to ``limit`` times; stop when the socket stays full for ``stall``
    seconds (the server stopped reading). Returns how many were sent whole."""
    s.setblocking(False)
    sent, buf, last = 0, b"", time.monotonic()
    try:
        while sent < limit:
            if not buf:
                buf = frame * 64
            try:
                n = s.send(buf)
            except BlockingIOError:
                if time.monotonic() - last > stall:
                    break
                select.select([], [s], [], 0.05)
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            last = time.monotonic()
            buf = buf[n:]
            if not buf:
                sent += 64
    finally:
        s.setblocking(True)
    return sent


# ---- outbound: replies of clients that never read are coalesced ----------------------------


def test_ping_flood_from_a_client_that_never_reads_holds_no_memory(server_factory: Any) -> None:
    # A small kernel send buffer, so the non-reading clients' sockets fill up soon.
    srv = server_factory(limits_client_rate=0, limits_socket_send_buffer=4096)
    socks = [connect(srv, f"pf{i}", rcvbuf=4096) for i in range(4)]
    before = rss_kib()
    ping = encode_frame(OP_PING, b"p" * 125)
    threads = [threading.Thread(target=send_until_blocked, args=(s, ping, 400_000)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    grown = rss_kib() - before
    c = srv.counters()
    # Before: every pong queued without bound (1.5 GiB in seconds). Now one pong waits
    # per connection, and a connection whose reply cannot be written is not read.
    assert grown < 40 * KIB, f"RSS grew {grown} KiB"
    assert c["pongs_coalesced"] > 0 and c["read_paused"] >= len(socks), c
    # The client reads again: it gets pongs (the latest ones), then the connection works.
    s = socks[0]
    s.settimeout(5)
    s.setblocking(True)
    got = b""
    s.settimeout(0.5)
    try:
        while chunk := s.recv(1 << 16):
            got += chunk
    except TimeoutError:
        pass
    frames = split_frames(got, whole=False)
    assert any(op == OP_PONG and p == b"p" * 125 for op, p in frames)
    for s in socks:
        s.close()


def test_app_ping_flood_is_coalesced_and_bounded(server_factory: Any) -> None:
    srv = server_factory(limits_client_rate=0)
    s = connect(srv, "apf", rcvbuf=4096)
    before = rss_kib()
    sent = send_until_blocked(s, encode_frame(OP_TEXT, b'{"op":"ping"}'), 2_000_000)
    assert sent > 1000
    assert rss_kib() - before < 40 * KIB
    c = srv.counters()
    assert c["pongs_coalesced"] > 0 and c["messages_to_app"] == 0, c
    s.close()


# ---- the per-connection rate limit ----------------------------------------------------------


def test_rate_limit_refuses_with_the_request_id_then_closes_with_4029(server_factory: Any) -> None:
    srv = server_factory(limits_client_rate=50, limits_client_burst=20)
    s = connect(srv, "rl")
    burst = b"".join(encode_frame(OP_TEXT, orjson.dumps({"op": "publish", "id": i, "room": "r"})) for i in range(20))
    # Over the bucket: refused with the id (numbers and short strings), not passed on.
    burst += encode_frame(OP_TEXT, b'{"op":"publish","id":"abc","room":"r"}')
    burst += encode_frame(OP_TEXT, b'{"op":"publish","id":{"x":1}}')
    s.sendall(burst)  # one read: no time for the bucket to refill
    srv.wait(lambda: len(srv.messages) == 20)
    frames = read_frames(s, 1.0, until_close=False)
    errors = [orjson.loads(p) for op, p in frames if op == OP_TEXT and b'"error"' in p]
    assert errors == [
        {"op": "error", "id": "abc", "code": 4029, "message": "rate limited"},
        {"op": "error", "id": None, "code": 4029, "message": "rate limited"},
    ]
    assert len(srv.messages) == 20
    # After a pause the bucket has refilled (50/s): accepted again.
    time.sleep(0.5)
    s.sendall(b"".join(encode_frame(OP_TEXT, b'{"op":"x"}') for _ in range(10)))
    srv.wait(lambda: len(srv.messages) == 30)
    # Going on without a pause: more than `burst` refusals in a row close with 4029.
    s.sendall(b"".join(encode_frame(OP_TEXT, b'{"op":"x"}') for _ in range(100)))
    frames = read_frames(s, 5.0)
    assert close_code(frames) == 4029
    c = srv.counters()
    assert c["rate_limited"] >= 21 and c["closed_abuse"] == 1, c
    assert len(srv.messages) <= 30 + 16  # what refilled meanwhile at most
    s.close()


# ---- the event queue: per-connection share and node-wide bound ------------------------------


def test_a_connection_over_its_event_share_is_not_read_until_python_polls(server_factory: Any) -> None:
    srv = server_factory(limits_client_rate=0, limits_conn_event_bytes=64 * KIB)
    greedy, other = connect(srv, "greedy"), connect(srv, "other")
    srv.polling.clear()
    msg = encode_frame(OP_TEXT, b'{"op":"publish","data":"' + b"x" * 1000 + b'"}')
    t = threading.Thread(target=send_until_blocked, args=(greedy, msg, 20_000, 1.5))
    t.start()
    t.join(30)
    c = srv.counters()
    assert c["read_paused"] >= 1, c
    # Held for Python: the share plus at most one read's worth of decoding.
    assert c["event_queue_bytes"] <= 64 * KIB + 70 * KIB, c
    # Another client is not behind a million of the greedy one's requests, nor shed.
    other.sendall(encode_frame(OP_TEXT, b'{"op":"hello"}'))
    time.sleep(0.2)
    srv.polling.set()
    srv.wait(lambda: any(m[1] == b'{"op":"hello"}' for m in srv.messages))
    # Python drains: the greedy connection is read again, nothing was lost or reordered.
    srv.wait(lambda: srv.counters()["messages_to_app"] >= 1000, 20)
    assert srv.counters()["messages_shed"] == 0
    greedy.close()
    other.close()


def test_a_full_node_queue_sheds_with_4029_overloaded(server_factory: Any) -> None:
    srv = server_factory(limits_client_rate=0, limits_event_queue_bytes=32 * KIB, limits_conn_event_bytes=1 * MIB)
    s = connect(srv, "shed")
    srv.polling.clear()
    payload = b"y" * 2000
    s.sendall(b"".join(encode_frame(OP_TEXT, orjson.dumps({"op": "publish", "id": i, "data": payload.decode()})) for i in range(40)))
    frames = read_frames(s, 2.0, until_close=False)
    errors = [orjson.loads(p) for op, p in frames if op == OP_TEXT and b'"error"' in p]
    assert errors and all(e["code"] == 4029 and e["message"] == "overloaded" for e in errors), errors
    assert isinstance(errors[0]["id"], int)
    c = srv.counters()
    assert c["messages_shed"] == len(errors) and c["event_queue_bytes"] <= 32 * KIB, c
    srv.polling.set()
    srv.wait(lambda: len(srv.messages) == 40 - len(errors))
    s.close()


def test_stale_connects_and_messages_of_gone_connections_never_reach_python(server_factory: Any) -> None:
    srv = server_factory(auth_deadline=0.3, limits_client_rate=0)
    # Messages of a connection that closed before Python polled are dropped at poll.
    s = connect(srv, "gone")
    srv.polling.clear()
    s.sendall(b"".join(encode_frame(OP_TEXT, b'{"op":"x"}') for _ in range(50)))
    time.sleep(0.2)
    s.close()
    # A connect Python sees only after the deadline: the client already got 503.
    status, headers = http_status(srv, upgrade_request(srv.host, srv.port, "/ws?user=late"))
    assert status == 503 and headers.get("retry-after") == "1"
    n = len(srv.connects)
    srv.polling.set()
    srv.wait(lambda: srv.counters()["connects_expired"] == 1 and srv.counters()["events_discarded"] == 50)
    assert len(srv.connects) == n and not srv.messages


# ---- connection caps --------------------------------------------------------------------------


def test_node_cap_answers_503_with_retry_after(server_factory: Any) -> None:
    srv = server_factory(limits_max_conns=3)
    socks = [connect(srv, f"n{i}") for i in range(3)]
    status, headers = http_status(srv, upgrade_request(srv.host, srv.port, "/ws?user=n4"))
    assert status == 503 and headers.get("retry-after") == "1"
    assert srv.counters()["conns_refused_node"] == 1
    socks.pop().close()
    srv.wait(lambda: srv.counters()["sockets_current"] == 2)
    socks.append(connect(srv, "n5"))
    for s in socks:
        s.close()


def test_per_ip_caps_answer_429(server_factory: Any) -> None:
    srv = server_factory(limits_max_conns_per_ip=3, limits_max_handshakes_per_ip=2)
    # Slowloris: sockets that never finish their request head hold handshake places.
    idle = [socket.create_connection((srv.host, srv.port)) for _ in range(2)]
    time.sleep(0.2)
    status, headers = http_status(srv, upgrade_request(srv.host, srv.port, "/ws?user=ip"))
    assert status == 429 and headers.get("retry-after") == "1"
    assert srv.counters()["handshakes_refused_ip"] == 1
    for s in idle:
        s.close()
    srv.wait(lambda: srv.counters()["sockets_current"] == 0)
    socks = [connect(srv, f"ip{i}") for i in range(3)]
    status, _ = http_status(srv, upgrade_request(srv.host, srv.port, "/ws?user=ip4"))
    assert status == 429
    assert srv.counters()["conns_refused_ip"] == 1
    for s in socks:
        s.close()


def test_per_user_cap_is_enforced_at_accept(server_factory: Any) -> None:
    srv = server_factory(limits_max_conns_per_user=2)
    a, b = connect(srv, "same"), connect(srv, "same")
    with pytest.raises(ConnectionError, match="429"):
        connect(srv, "same")
    assert list(srv.accepted.values()) == [True, True, False]
    assert srv.counters()["conns_refused_user"] == 1
    connect(srv, "someone-else").close()
    a.close()
    srv.wait(lambda: srv.eng.user_conns("same") == [srv.connects[1]])
    connect(srv, "same").close()
    b.close()


# ---- room caps --------------------------------------------------------------------------------


def test_room_caps_and_is_member(server_factory: Any) -> None:
    srv = server_factory(limits_max_rooms_per_conn=3, limits_max_rooms=4)
    a, b = connect(srv, "ra"), connect(srv, "rb")
    srv.wait(lambda: len(srv.connects) == 2)
    ca, cb = srv.connects
    eng = srv.eng
    # The 101 goes out just before the connection is registered.
    srv.wait(lambda: eng.conn_rooms(ca) is not None and eng.conn_rooms(cb) is not None)
    assert [eng.join(ca, f"r{i}") for i in range(4)] == [1, 1, 1, -2]
    assert eng.join(ca, "r0") == 0
    assert eng.is_member(ca, "r1") and not eng.is_member(ca, "r3") and not eng.is_member(999, "r1")
    assert [eng.join(cb, r) for r in ("r0", "r9", "r10")] == [1, 1, -3]
    assert eng.join(999, "r0") == -1
    assert eng.leave(cb, "r9")
    assert eng.join(cb, "r10") == 1
    c = srv.counters()
    assert (c["rooms_refused_conn"], c["rooms_refused_node"]) == (1, 1)
    a.close()
    b.close()


# ---- input caps -------------------------------------------------------------------------------


def test_deflate_bomb_is_closed_with_1009(server_factory: Any) -> None:
    srv = server_factory(limits_client_rate=0)
    s = connect(srv, "bomb", extensions="permessage-deflate; client_max_window_bits")
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = z.compress(b"\0" * (64 * MIB)) + z.flush(zlib.Z_SYNC_FLUSH)
    assert len(bomb) < 100 * KIB
    bomb = bomb[:-4]  # RFC 7692: without the 00 00 ff ff tail
    before = rss_kib()
    # Fragments of at most 16 KiB: each frame is under the frame cap.
    frags = [bomb[i : i + 16 * KIB] for i in range(0, len(bomb), 16 * KIB)]
    out = b""
    for i, f in enumerate(frags):
        op = OP_TEXT if i == 0 else OP_CONT
        out += encode_frame(op, f, fin=i == len(frags) - 1, rsv=4 if i == 0 else 0)
    try:
        s.sendall(out)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert close_code(read_frames(s)) == 1009
    assert rss_kib() - before < 20 * KIB
    s.close()


def test_endless_fragments_and_huge_declared_lengths_are_closed_with_1009(server_factory: Any) -> None:
    srv = server_factory(limits_client_rate=0, limits_max_message_bytes=64 * KIB)
    s = connect(srv, "frag")
    frags = encode_frame(OP_TEXT, b"a" * 1000, fin=False) + b"".join(encode_frame(OP_CONT, b"a" * 1000, fin=False) for _ in range(200))
    try:
        s.sendall(frags)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert close_code(read_frames(s)) == 1009
    s.close()
    # A header announcing 2^62 bytes is refused from the header alone.
    s = connect(srv, "huge")
    s.sendall(encode_frame(OP_TEXT, b"", length=1 << 62)[:10] + os.urandom(4))
    assert close_code(read_frames(s)) == 1009
    s.close()


def test_slowloris_headers_time_out_and_oversized_heads_are_refused(server_factory: Any) -> None:
    srv = server_factory(limits_handshake_timeout=0.5, limits_max_header_bytes=2048)
    s = socket.create_connection((srv.host, srv.port), timeout=5)
    t0 = time.monotonic()
    data = b""
    try:
        for b in upgrade_request(srv.host, srv.port, "/ws?user=slow")[:-2]:
            s.send(bytes([b]))
            time.sleep(0.05)
            if time.monotonic() - t0 > 2:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        data = s.recv(4096)
    except ConnectionResetError:
        pass
    assert data.startswith(b"HTTP/1.1 408"), data[:40]
    assert time.monotonic() - t0 < 2
    s.close()
    status, _ = http_status(srv, upgrade_request(srv.host, srv.port, "/ws", headers=(("X-Pad", "p" * 4000),)))
    assert status == 431
