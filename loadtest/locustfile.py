# ruff: noqa: RUF001  (Chinese text with its own punctuation)
"""Locust scenarios for the live-chat gateway (WebSocket users, docs/protocol.md).

Start a gateway with the load-test config, then run locust headless:

    gateway run -c loadtest/locust.toml --port 8080 --api-port 8081 &
    locust -f loadtest/locustfile.py --headless -u 200 -r 50 -t 1m --host ws://127.0.0.1:8080/ws

User classes (pick some by naming them after the options, e.g. `locust ... ChatterUser`):

* ``ViewerUser``       joins a live room, receives, sends heartbeats, and now and then drops
                       the socket (app backgrounded) and comes back with ``resume: {seq, epoch}``;
* ``ChatterUser``      publishes chat messages at ``--chat-rate`` msgs/s into a live room;
* ``GiftUser``         sends gifts (high priority) at ``--gift-rate`` msgs/s;
* ``ReconnectStormUser`` connects, joins and disconnects in a tight loop;
* ``CustomerServiceUser`` a customer and an agent in a one-to-one ``cs:`` room: the customer
                       asks, the agent answers what it received;
* ``ChatUser``         conversations (protocol 1.1): ``sync`` on connect, dms to the others of
                       its circle (``--chat-circle`` users) and posts in the circle's group,
                       reads what arrived, and now and then goes offline (socket dropped) and
                       comes back with ``sync`` from its cursor.

What appears in locust's statistics (request type / name):

* ``WS connect``            TCP + upgrade + the ``connected`` frame;
* ``WS join`` / ``WS resume`` join ack time (resume: ``recovered`` true or false in the name);
* ``WS publish-ack chat|gift|cs`` publish to ack time (errors such as 4029 are failures);
* ``WS ping``               app-level ping to pong;
* ``RECV msg chat|gift|cs`` receive latency: now minus the publisher's timestamp ``t``
                            (ms) embedded in the message data (same machine clock);
* ``WS disconnect``         unexpected closes (failures, with the close code);
* ``WS sync`` / ``WS sync (since cursor)`` / ``WS create`` / ``WS read`` / ``WS publish-ack dm|group``
                            the conversation ops (ChatUser); ``RECV msg dm|group`` their receive
                            latency (live messages only, not the ones a sync brings back).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import random
import socket
import struct
import time
from typing import Any
from urllib.parse import urlsplit

import gevent
import gevent.event
import gevent.lock
import gevent.queue
from gevent.event import AsyncResult
from locust import User, between, constant_throughput, events, task

_ids = itertools.count(1)
ACK_TIMEOUT = 10.0


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--live-rooms", type=int, default=2, env_var="LOCUST_LIVE_ROOMS",
                        help="number of live rooms (live:lt-0 ..) users spread over")
    parser.add_argument("--chat-rate", type=float, default=1.0, env_var="LOCUST_CHAT_RATE",
                        help="chat messages per second per ChatterUser")
    parser.add_argument("--gift-rate", type=float, default=0.5, env_var="LOCUST_GIFT_RATE",
                        help="gifts per second per GiftUser")
    parser.add_argument("--heartbeat", type=float, default=5.0, env_var="LOCUST_HEARTBEAT",
                        help="seconds between app-level pings of a viewer")
    parser.add_argument("--drop-chance", type=float, default=0.1, env_var="LOCUST_DROP_CHANCE",
                        help="chance per viewer heartbeat that the app is backgrounded (socket dropped)")
    parser.add_argument("--recv-sample", type=int, default=1, env_var="LOCUST_RECV_SAMPLE",
                        help="report the receive latency of every K-th message (big rooms)")
    parser.add_argument("--chat-circle", type=int, default=5, env_var="LOCUST_CHAT_CIRCLE",
                        help="ChatUser: users per circle (a group, and the dm peers of each)")
    parser.add_argument("--offline-chance", type=float, default=0.1, env_var="LOCUST_OFFLINE_CHANCE",
                        help="ChatUser: chance per task that the user goes offline for 0.5-2 s")
    # The customer-service desk (ShopperUser, DeskAgentUser; gateway config loadtest/desk.toml).
    parser.add_argument("--desk-agents", type=int, default=50, env_var="LOCUST_DESK_AGENTS",
                        help="DeskAgentUser: how many of the users are agents (fixed count, spawned first)")
    parser.add_argument("--desk-capacity", type=int, default=20, env_var="LOCUST_DESK_CAPACITY",
                        help="DeskAgentUser: sessions an agent holds at once (cs.status capacity)")
    parser.add_argument("--desk-msgs", default="2-6", env_var="LOCUST_DESK_MSGS",
                        help="ShopperUser: chat messages per session, a range lo-hi")
    parser.add_argument("--desk-think", default="1-3", env_var="LOCUST_DESK_THINK",
                        help="ShopperUser: seconds of think time before each message, a range lo-hi")
    parser.add_argument("--desk-offline-chance", type=float, default=0.1, env_var="LOCUST_DESK_OFFLINE_CHANCE",
                        help="ShopperUser: chance per message that the app goes offline right after sending it "
                             "(socket cut, 0.5-2 s away, back with sync: the answer comes with the sync)")
    parser.add_argument("--desk-close-after", type=int, default=4, env_var="LOCUST_DESK_CLOSE_AFTER",
                        help="DeskAgentUser: the agent closes a session after answering this many messages")
    parser.add_argument("--desk-answer-delay", default="0.5-2", env_var="LOCUST_DESK_ANSWER_DELAY",
                        help="DeskAgentUser: seconds the agent takes to answer (typing), a range lo-hi (0: at once)")
    parser.add_argument("--desk-start-delay", type=float, default=2.0, env_var="LOCUST_DESK_START_DELAY",
                        help="ShopperUser: seconds a shopper waits after its start (the agents come online first)")


def ws_url(host: str, user: str, extra: str = "") -> str:
    """``--host`` (ws://, wss:// or http://host:port[/path]) -> the endpoint for ``user``
    (``extra``: more query parameters, e.g. ``role=agent``)."""
    if host.startswith("http"):
        host = "ws" + host[4:]
    if "://" not in host:
        host = "ws://" + host
    scheme, rest = host.split("://", 1)
    if "/" not in rest:
        rest += "/ws"
    sep = "&" if "?" in rest else "?"
    return f"{scheme}://{rest}{sep}user={user}" + (f"&{extra}" if extra else "")


def now_ms() -> float:
    return time.time() * 1000.0


class WebSocket:
    """A minimal RFC 6455 client on a plain socket (cooperative under locust's gevent
    monkey-patching; no extra dependency). Text frames, fragmentation, ping/pong, close."""

    OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
    GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, subprotocol: str = "gateway.v1", timeout: float = 10.0) -> None:
        u = urlsplit(url)
        if u.scheme != "ws":
            raise ValueError(f"only ws:// URLs are supported (got {url})")
        port = u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        self.sock = socket.create_connection((u.hostname, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lock = gevent.lock.Semaphore()
        self.buf = b""
        key = base64.b64encode(os.urandom(16))
        req = (f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
               + (f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else "") + "\r\n")
        self.sock.sendall(req.encode())
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("connection closed during the upgrade")
            self.buf += chunk
            if len(self.buf) > 16384:
                raise ConnectionError("upgrade response too large")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if len(lines[0].split()) < 2 or lines[0].split()[1] != "101":
            raise ConnectionError(f"upgrade refused: {lines[0]}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        accept = base64.b64encode(hashlib.sha1(key + self.GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise ConnectionError("bad Sec-WebSocket-Accept")

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = os.urandom(4)
        if n:
            m = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
            payload = (int.from_bytes(payload, "big") ^ m).to_bytes(n, "big")
        with self.lock:
            self.sock.sendall(head + mask + payload)

    def send(self, text: str) -> None:
        self._send_frame(self.OP_TEXT, text.encode())

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_data(self) -> tuple[int, bytes]:
        """The next message: (opcode, payload). Pings are answered here."""
        parts: list[bytes] = []
        first_op = None
        while True:
            b0, b1 = self._read(2)
            fin, op, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            payload = self._read(n)
            if mask:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            if op == self.OP_PING:
                self._send_frame(self.OP_PONG, payload)
                continue
            if op == self.OP_PONG:
                continue
            if op == self.OP_CLOSE:
                return op, payload
            if op != self.OP_CONT:
                first_op = op
            parts.append(payload)
            if fin:
                return first_op or self.OP_TEXT, b"".join(parts)

    def recv(self) -> str:
        op, payload = self.recv_data()
        if op == self.OP_CLOSE:
            raise ConnectionError("closed by server")
        return payload.decode()

    def close(self, code: int = 1000) -> None:
        try:
            self._send_frame(self.OP_CLOSE, struct.pack("!H", code))
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class GatewayClient:
    """One WebSocket of a locust user: request/ack bookkeeping, a receiver greenlet that
    reports receive latency, and room positions (seq, epoch) for resume."""

    def __init__(self, user: User, uid: str, query: str = "") -> None:
        self.user = user
        self.env = user.environment
        self.uid = uid
        self.query = query  # more query parameters of the endpoint (``role=agent``)
        #: Callbacks (run in the reader greenlet: must not block): room messages and pushes.
        self.on_msg: Any = None
        self.on_push: Any = None
        #: Request id -> error codes that are an expected answer (reported as a success
        #: named ``<name> (<code>)``, e.g. a chat that crossed the session's close: 4092).
        self.ok_codes: dict[int, tuple[int, ...]] = {}
        self.ws: WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        self.pending: dict[int, tuple[float, str, str, AsyncResult | None]] = {}
        self.next_id = 1
        self.rooms: dict[str, dict[str, Any]] = {}  # room -> {"seq": n, "epoch": e}
        self.closing = False
        self.sample_every = max(1, getattr(self.env.parsed_options, "recv_sample", 1) or 1)
        self._sample = 0
        self.inbox: list[dict] = []  # room messages, kept only when ``keep_inbox``
        self.keep_inbox = False
        self.inbox_event = gevent.event.Event()

    # -- reporting
    def fire(self, rtype: str, name: str, ms: float, exc: Exception | None = None, length: int = 0) -> None:
        self.env.events.request.fire(request_type=rtype, name=name, response_time=ms, response_length=length,
                                     exception=exc, context={"user": self.uid})

    # -- connection
    def connect(self) -> bool:
        self.closing = False
        t0 = time.perf_counter()
        try:
            ws = WebSocket(ws_url(self.user.host, self.uid, self.query), timeout=10)
            first = json.loads(ws.recv())
            if first.get("op") != "connected":
                raise RuntimeError(f"expected connected, got {first.get('op')}")
        except Exception as e:  # noqa: BLE001 (any failure is a failed connect)
            self.fire("WS", "connect", (time.perf_counter() - t0) * 1000, e)
            return False
        self.fire("WS", "connect", (time.perf_counter() - t0) * 1000)
        ws.settimeout(None)
        self.ws = ws
        self.reader = gevent.spawn(self._read_loop, ws)
        return True

    def close(self, abrupt: bool = False) -> None:
        """Close (``abrupt``: drop the TCP connection without a close frame, like a killed app)."""
        self.closing = True
        ws, self.ws = self.ws, None
        if ws is not None:
            try:
                if abrupt:
                    ws.shutdown()
                else:
                    ws.close()
            except OSError:
                pass  # already gone: that is what closing wants
        if self.reader is not None:
            self.reader.join(timeout=2)
            self.reader.kill(block=False)
            self.reader = None
        for _t0, _kind, _name, res in self.pending.values():
            if res is not None:
                res.set(None)
        self.pending.clear()
        self.ok_codes.clear()

    # -- requests
    def request(self, frame: dict, kind: str, name: str, wait: bool = False, ok_codes: tuple[int, ...] = ()) -> dict | None:
        """Send ``frame`` with a fresh id; its ack/error is reported as (kind, name).
        With ``wait`` the ack (or None on error/timeout/close) is returned; an error
        whose code is in ``ok_codes`` is reported as a success ``<name> (<code>)`` and
        returned as the error frame."""
        if self.ws is None:
            return None
        rid = self.next_id
        self.next_id += 1
        frame["id"] = rid
        res = AsyncResult() if wait else None
        if ok_codes:
            self.ok_codes[rid] = ok_codes
        self.pending[rid] = (time.perf_counter(), kind, name, res)
        try:
            self.ws.send(json.dumps(frame))
        except Exception as e:  # noqa: BLE001
            self.pending.pop(rid, None)
            self.fire(kind, name, 0, e)
            return None
        if res is None:
            return None
        try:
            return res.get(timeout=ACK_TIMEOUT)
        except gevent.Timeout:
            self.ok_codes.pop(rid, None)
            if self.pending.pop(rid, None) is not None:
                self.fire(kind, name, ACK_TIMEOUT * 1000, TimeoutError(f"no ack within {ACK_TIMEOUT} s"))
            return None

    def join(self, room: str, resume: bool = False) -> dict | None:
        frame: dict[str, Any] = {"op": "join", "room": room}
        pos = self.rooms.get(room)
        name = "join"
        if resume and pos and pos.get("epoch") is not None:
            frame["resume"] = {"seq": pos["seq"], "epoch": pos["epoch"]}
            name = "resume"
        ack = self.request(frame, "WS", name, wait=True)
        if ack is not None:
            seq = max(ack.get("seq", 0), *(m.get("seq", 0) for m in ack.get("msgs", [])), 0)
            self.rooms[room] = {"seq": seq, "epoch": ack.get("epoch")}
        return ack

    def publish(self, room: str, mtype: str, payload: dict | None = None, name: str | None = None) -> None:
        data = {"t": now_ms(), **(payload or {})}
        self.request({"op": "publish", "room": room, "type": mtype, "data": data}, "WS", f"publish-ack {name or mtype}")

    def ping(self) -> None:
        self.request({"op": "ping"}, "WS", "ping")

    def check_timeouts(self) -> None:
        limit = time.perf_counter() - ACK_TIMEOUT
        for rid, (t0, kind, name, res) in list(self.pending.items()):
            if t0 < limit and res is None:
                del self.pending[rid]
                self.ok_codes.pop(rid, None)
                self.fire(kind, name, ACK_TIMEOUT * 1000, TimeoutError(f"no reply within {ACK_TIMEOUT} s"))

    # -- receiving
    def _read_loop(self, ws: WebSocket) -> None:
        while True:
            try:
                opcode, payload = ws.recv_data()
            except Exception as e:  # noqa: BLE001
                if not self.closing:
                    self.fire("WS", "disconnect", 0, e)
                    self.ws = None
                return
            if opcode == WebSocket.OP_CLOSE:
                if not self.closing:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    self.fire("WS", "disconnect", 0, ConnectionError(f"closed by server: {code}"))
                    self.ws = None
                return
            if opcode != WebSocket.OP_TEXT:
                continue
            try:
                self._on_frame(json.loads(payload))
            except Exception as e:  # noqa: BLE001 (report, keep reading)
                self.fire("WS", "bad frame", 0, e)

    def _on_frame(self, f: dict) -> None:
        op = f.get("op")
        if op == "msg":
            self._on_msg(f)
        elif op == "batch":
            for m in f.get("msgs", []):
                self._on_msg(m)
        elif op == "push":
            if self.on_push is not None:
                self.on_push(f)
        elif op in ("ack", "pong", "error"):
            rid = f.get("id")
            if op == "pong" and rid is None:
                # pongs carry no id: match the oldest pending ping
                rid = next((k for k, v in self.pending.items() if v[2] == "ping"), None)
            entry = self.pending.pop(rid, None) if rid is not None else None
            if entry is None:
                if op == "error":
                    self.fire("WS", "error (no request)", 0, RuntimeError(f"{f.get('code')}: {f.get('message')}"))
                return
            t0, kind, name, res = entry
            ms = (time.perf_counter() - t0) * 1000
            expected = self.ok_codes.pop(rid, ())
            if op == "error" and f.get("code") in expected:
                self.fire(kind, f"{name} ({f.get('code')})", ms)
                if res is not None:
                    res.set(f)
            elif op == "error":
                self.fire(kind, name, ms, RuntimeError(f"{f.get('code')}: {f.get('message')}"))
                if res is not None:
                    res.set(None)
            else:
                if name == "resume":
                    name = f"resume (recovered={str(f.get('recovered')).lower()})"
                self.fire(kind, name, ms)
                if res is not None:
                    res.set(f)

    def _on_msg(self, m: dict) -> None:
        room = str(m.get("room"))
        seq = m.get("seq") or 0
        pos = self.rooms.get(room)
        if pos is None and seq and room.startswith(("dm:", "group:")):
            pos = self.rooms[room] = {"seq": 0, "epoch": None}  # a conversation that came to us
        if pos is not None and seq:
            if m.get("epoch") is not None:
                pos["epoch"] = m["epoch"]
            pos["seq"] = max(pos["seq"], seq)
        data = m.get("data")
        own = m.get("from") == self.uid and room.startswith(("dm:", "group:"))  # a conversation's copy to its sender
        if not own and isinstance(data, dict) and isinstance(data.get("t"), (int, float)):
            self._sample += 1
            if self._sample >= self.sample_every:
                self._sample = 0
                label = next((k for k in ("cs", "dm", "group") if room.startswith(k + ":")), m.get("type", "?"))
                self.fire("RECV", f"msg {label}", max(0.0, now_ms() - data["t"]))
        if self.on_msg is not None:
            self.on_msg(m)
        if self.keep_inbox:
            self.inbox.append(m)
            self.inbox_event.set()


def live_room(user: User) -> str:
    n = max(1, getattr(user.environment.parsed_options, "live_rooms", 2) or 1)
    return f"live:lt-{random.randrange(n)}"


class _GatewayUser(User):
    abstract = True
    kind = "user"

    def on_start(self) -> None:
        self.uid = f"{self.kind}-{os.getpid()}-{next(_ids)}"
        self.client = GatewayClient(self, self.uid)
        self.room = live_room(self)
        self._connect_and_join()

    def _connect_and_join(self, resume: bool = False) -> bool:
        if not self.client.connect():
            return False
        return self.client.join(self.room, resume=resume) is not None

    def _ensure(self) -> bool:
        if self.client.ws is None:
            return self._connect_and_join(resume=True)
        return True

    def on_stop(self) -> None:
        self.client.close()


class ViewerUser(_GatewayUser):
    """Joins a live room, receives, heartbeats; sometimes backgrounded and resumed."""

    weight = 4
    kind = "viewer"

    def wait_time(self) -> float:
        return getattr(self.environment.parsed_options, "heartbeat", 5.0)

    @task
    def heartbeat(self) -> None:
        if not self._ensure():
            return
        opts = self.environment.parsed_options
        if random.random() < getattr(opts, "drop_chance", 0.1):
            # App backgrounded: the OS kills the socket; messages keep flowing meanwhile.
            self.client.close(abrupt=True)
            gevent.sleep(random.uniform(0.5, 2.0))
            self._connect_and_join(resume=True)
        else:
            self.client.ping()
            self.client.check_timeouts()


class ChatterUser(_GatewayUser):
    """Publishes chat at --chat-rate msgs/s (and receives the room)."""

    weight = 2
    kind = "chatter"

    def wait_time(self) -> float:
        return constant_throughput(getattr(self.environment.parsed_options, "chat_rate", 1.0))(self)

    @task
    def chat(self) -> None:
        if self._ensure():
            self.client.publish(self.room, "chat", {"text": "hello from " + self.uid})
            self.client.check_timeouts()


class GiftUser(_GatewayUser):
    """Sends high-priority gifts at --gift-rate msgs/s."""

    weight = 1
    kind = "gifter"

    def wait_time(self) -> float:
        return constant_throughput(getattr(self.environment.parsed_options, "gift_rate", 0.5))(self)

    @task
    def gift(self) -> None:
        if self._ensure():
            self.client.publish(self.room, "gift", {"gift": random.choice(["rose", "rocket", "car"]), "n": 1})
            self.client.check_timeouts()


class ReconnectStormUser(User):
    """Connect, join, leave abruptly, again: a reconnect storm (e.g. after a network blip)."""

    weight = 1
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        self.uid = f"storm-{os.getpid()}-{next(_ids)}"
        self.client = GatewayClient(self, self.uid)
        self.room = live_room(self)

    @task
    def reconnect(self) -> None:
        if self.client.connect():
            self.client.join(self.room, resume=True)
            self.client.close(abrupt=random.random() < 0.5)

    def on_stop(self) -> None:
        self.client.close()


class CustomerServiceUser(User):
    """A customer and an agent in a one-to-one ``cs:{session}`` room: the customer asks,
    the agent replies to each question it receives."""

    weight = 1
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        n = next(_ids)
        self.session = f"cs:lt-{os.getpid()}-{n}"
        self.customer = GatewayClient(self, f"cust-{os.getpid()}-{n}")
        self.agent = GatewayClient(self, f"agent-{os.getpid()}-{n}")
        self.agent.keep_inbox = True
        for c in (self.customer, self.agent):
            if c.connect():
                c.join(self.session)

    @task
    def ask_and_answer(self) -> None:
        for c in (self.customer, self.agent):
            if c.ws is None and c.connect():
                c.join(self.session, resume=True)
        if self.customer.ws is None or self.agent.ws is None:
            return
        self.agent.inbox_event.clear()
        self.customer.publish(self.session, "chat", {"text": "where is my order?", "from": "customer"}, "cs")
        if self.agent.inbox_event.wait(timeout=5):
            asked = [m for m in self.agent.inbox if m.get("from") == self.customer.uid]
            self.agent.inbox.clear()
            if asked:
                self.agent.publish(self.session, "chat", {"text": "on its way", "from": "agent"}, "cs")
        self.customer.check_timeouts()
        self.agent.check_timeouts()

    def on_stop(self) -> None:
        self.customer.close()
        self.agent.close()


_chat_ids = itertools.count()


def dm_room(a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"dm:{lo}:{hi}"


class ChatUser(User):
    """Conversations (protocol 1.1): users in circles of ``--chat-circle``. Each syncs on
    connect (that attaches it to its conversations: no join), sends dms to the others of
    its circle and posts in the circle's group (``group:lt-<pid>-<k>``, created with the
    ``create`` op (``room`` given) by the circle's first user, with every member named up front), reads
    what arrived, and with ``--offline-chance`` per task goes offline (socket dropped,
    0.5-2 s away) and comes back with ``sync`` from its cursor."""

    weight = 1
    wait_time = between(0.3, 1.0)

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        size = max(2, getattr(opts, "chat_circle", 5) or 5)
        j = next(_chat_ids)
        pid = os.getpid()
        first = j - j % size
        self.circle = [f"chat-{pid}-{i}" for i in range(first, first + size)]
        self.uid = self.circle[j % size]
        self.peers = [u for u in self.circle if u != self.uid]
        self.circle_group = f"group:lt-{pid}-{first // size}"
        self.circle_ready = False
        self.cursor: int | None = None
        self.read_seq: dict[str, int] = {}
        self.client = GatewayClient(self, self.uid)
        if self._online() and j % size == 0:
            ack = self.client.request({"op": "create", "kind": "group", "room": self.circle_group, "members": self.peers,
                                       "meta": {"name": f"circle {first // size}"}}, "WS", "create", wait=True)
            if ack is not None:
                self.circle_ready = True
                self.client.rooms.setdefault(self.circle_group, {"seq": 0, "epoch": None})

    def _online(self) -> bool:
        """Connect if needed, then sync (from the cursor when there is one)."""
        if self.client.ws is not None:
            return True
        if not self.client.connect():
            return False
        frame: dict[str, Any] = {"op": "sync", "limit": 100, "msgs": 20}
        if self.cursor is not None:
            frame["since"] = self.cursor
        ack = self.client.request(frame, "WS", "sync" if self.cursor is None else "sync (since cursor)", wait=True)
        if ack is None:
            return False
        self.cursor = ack.get("cursor", self.cursor)
        for c in ack.get("convs", []):
            room = c["room"]
            self.client.rooms[room] = {"seq": c.get("last_seq", 0), "epoch": None}
            self.read_seq[room] = c.get("read_seq", 0)
            if room == self.circle_group and c.get("member"):
                self.circle_ready = True
        return True

    @task(3)
    def dm(self) -> None:
        if self._online():
            peer = random.choice(self.peers)
            self.client.publish(dm_room(self.uid, peer), "chat", {"text": f"hi {peer}"}, "dm")
            self.client.check_timeouts()

    @task(2)
    def post_in_group(self) -> None:
        if not self._online():
            return
        if not self.circle_ready:
            # Created by the circle's first user: it shows up in a sync or a live message.
            self.circle_ready = self.circle_group in self.client.rooms
            if not self.circle_ready:
                return
        self.client.publish(self.circle_group, "chat", {"text": f"hello {self.circle_group}"}, "group")

    @task(2)
    def read(self) -> None:
        if not self._online():
            return
        for room, pos in list(self.client.rooms.items()):
            seq = pos.get("seq", 0)
            if seq > self.read_seq.get(room, 0) and room.startswith(("dm:", "group:")):
                if self.client.request({"op": "read", "room": room, "seq": seq}, "WS", "read", wait=True) is not None:
                    self.read_seq[room] = seq
                break

    @task(1)
    def go_offline(self) -> None:
        opts = self.environment.parsed_options
        if self.client.ws is not None and random.random() < getattr(opts, "offline_chance", 0.1):
            self.client.close(abrupt=True)
            gevent.sleep(random.uniform(0.5, 2.0))
        self._online()

    def on_stop(self) -> None:
        self.client.close()


# ---------------------------------------------------------------- customer-service desk

def _span(text: str, default: tuple[float, float]) -> tuple[float, float]:
    """``"lo-hi"`` or ``"x"`` -> (lo, hi)."""
    try:
        parts = [float(x) for x in str(text).split("-", 1)]
    except ValueError:
        return default
    return (parts[0], parts[-1]) if parts else default


_desk_ids = itertools.count(1)
_CARDS = [
    {"kind": "product", "id": "p1001", "title": "保温杯 500ml", "price": "¥99", "image": "https://img.example.com/p1001.jpg",
     "url": "/pages/item/item?id=p1001"},
    {"kind": "product", "id": "p2002", "title": "Running shoes 42", "price": "¥399", "image": "https://img.example.com/p2002.jpg",
     "url": "/pages/item/item?id=p2002"},
    {"kind": "order", "id": "o-88231", "title": "订单 88231", "price": "¥1288", "url": "/pages/order/order?id=o-88231"},
]
_QUESTIONS = ["这个有货吗？", "什么时候能到？", "can I change the size?", "有优惠券吗？", "颜色和图片一样吗？", "is it waterproof?"]
#: Seconds a shopper waits for an agent / for an answer / for the rating card.
ASSIGN_TIMEOUT = 60.0
ANSWER_TIMEOUT = 15.0


class _DeskSide:
    """Bookkeeping of one side of desk sessions: messages of ``cs:`` rooms handled once
    (a sync after a reconnect brings back what was missed; live copies may overlap it)."""

    def __init__(self) -> None:
        self.seen: dict[str, set[int]] = {}
        self.changed = gevent.event.Event()

    def first_time(self, m: dict) -> bool:
        room, seq = str(m.get("room")), m.get("seq") or 0
        if not seq:
            return True
        s = self.seen.setdefault(room, set())
        if seq in s:
            return False
        s.add(seq)
        return True

    def wait(self, pred: Any, timeout: float) -> bool:
        """Until ``pred()`` (re-checked on every change) or ``timeout`` s."""
        deadline = time.perf_counter() + timeout
        while not pred():
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            self.changed.clear()
            if pred():
                return True
            self.changed.wait(min(left, 1.0))
        return True


class ShopperUser(User):
    """A shopper of the customer-service desk (docs/customer-service.md), one session
    after the other: connect and ``sync`` (attached to its conversations), ``cs.open``
    with a product or order card, wait for the agent (the ``cs.state`` ``assigned``
    message of the session's conversation), then ``--desk-msgs`` chat messages, each after
    ``--desk-think`` seconds, each waiting for the agent's answer (and ``read``-ing it);
    with ``--desk-offline-chance`` right after a message the app goes offline (socket cut,
    0.5-2 s) and comes back with ``sync`` from its cursor, which brings the answer given
    meanwhile. Then ``cs.close`` (unless the agent closed it), the rating card, ``cs.rate``,
    a pause (``wait_time``), the next session. Needs the desk (loadtest/desk.toml)."""

    weight = 20
    wait_time = between(0.5, 2.0)  # between sessions

    def on_start(self) -> None:
        self.uid = f"shopper-{os.getpid()}-{next(_desk_ids)}"
        self.client = GatewayClient(self, self.uid)
        self.client.on_msg = self._on_msg
        self.side = _DeskSide()
        self.cursor: int | None = None
        self.states: dict[str, dict[str, float]] = {}  # room -> state (or "rating") -> perf_counter when seen
        self.waiting: dict[int, float] = {}  # chat key -> perf_counter when sent
        self.keys = itertools.count(1)
        self.last_seq: dict[str, int] = {}
        gevent.sleep(getattr(self.environment.parsed_options, "desk_start_delay", 2.0))

    def _online(self) -> bool:
        if self.client.ws is not None:
            return True
        if not self.client.connect():
            return False
        frame: dict[str, Any] = {"op": "sync", "limit": 20, "msgs": 20}
        if self.cursor is not None:
            frame["since"] = self.cursor
        ack = self.client.request(frame, "WS", "sync" if self.cursor is None else "sync (since cursor)", wait=True)
        if ack is None:
            return False
        self.cursor = ack.get("cursor", self.cursor)
        for c in ack.get("convs", []):
            if str(c.get("room", "")).startswith("cs:"):
                for m in c.get("msgs", []):
                    self._handle(m, via_sync=True)
        return True

    def _on_msg(self, m: dict) -> None:
        if str(m.get("room", "")).startswith("cs:"):
            self._handle(m, via_sync=False)

    def _handle(self, m: dict, via_sync: bool) -> None:
        if not self.side.first_time(m):
            return
        room = str(m.get("room"))
        seq = m.get("seq") or 0
        self.last_seq[room] = max(self.last_seq.get(room, 0), seq)
        typ, data = m.get("type"), m.get("data")
        data = data if isinstance(data, dict) else {}
        now = time.perf_counter()
        if typ == "cs.state":
            self.states.setdefault(room, {}).setdefault(str(data.get("state")), now)
        elif typ == "cs.rating":
            self.states.setdefault(room, {}).setdefault("rating", now)
        elif typ == "chat" and m.get("from") not in (None, self.uid):
            t0 = self.waiting.pop(data.get("re"), None) if isinstance(data.get("re"), int) else None
            if t0 is not None:
                name = "answer after offline (sync)" if via_sync else "answer (chat -> agent reply)"
                self.client.fire("DESK", name, (now - t0) * 1000)
        self.side.changed.set()

    def _seen_state(self, room: str, state: str) -> float | None:
        return self.states.get(room, {}).get(state)

    @task
    def consult(self) -> None:
        if not self._online():
            return
        opts = self.environment.parsed_options
        t_open = time.perf_counter()
        ack = self.client.request({"op": "cs.open", "card": random.choice(_CARDS)}, "WS", "cs.open", wait=True)
        if ack is None or "room" not in ack:
            return
        sid, room = ack["session"], ack["room"]
        if ack.get("state") == "bot":
            self._talk_to_bot(room)
        if ack.get("resumed"):
            self.client.fire("DESK", "session resumed", 0)
        assigned = self.side.wait(lambda: self._seen_state(room, "assigned") is not None or self._seen_state(room, "closed") is not None,
                                  ASSIGN_TIMEOUT)
        t_assigned = self._seen_state(room, "assigned")
        if t_assigned is not None:
            start = self._seen_state(room, "queued") if ack.get("state") == "bot" else t_open
            self.client.fire("DESK", "assign (open -> assigned)" if ack.get("state") != "bot" else "assign (queued -> assigned)",
                             max(0.0, (t_assigned - (start or t_open)) * 1000))
        elif not assigned:
            self.client.fire("DESK", "assign (open -> assigned)", ASSIGN_TIMEOUT * 1000,
                             TimeoutError(f"no agent within {ASSIGN_TIMEOUT:g} s"))
        if t_assigned is not None:
            self._chat(room, opts)
        if self._online() and self._seen_state(room, "closed") is None:
            self.client.request({"op": "cs.close", "session": sid}, "WS", "cs.close", wait=True)
        if self.side.wait(lambda: self._seen_state(room, "rating") is not None, 10.0):
            score = random.choice([3, 4, 5, 5, 5])
            if self._online():
                self.client.request({"op": "cs.rate", "session": sid, "score": score, "comment": "谢谢" if score > 3 else None},
                                    "WS", "cs.rate", wait=True)
        else:
            self.client.fire("DESK", "rating card", 10_000, TimeoutError("no cs.rating message within 10 s of the close"))
        self.states.pop(room, None)
        self.side.seen.pop(room, None)
        self.waiting.clear()

    def _talk_to_bot(self, room: str) -> None:
        """The bot variant: one FAQ question (answered), then one it cannot answer (the
        fallback hands off)."""
        for text in ("什么时候发货？", "我要改地址"):
            if self._seen_state(room, "queued") is not None or not self._online():
                return
            self.client.request({"op": "publish", "room": room, "type": "chat", "data": {"text": text}}, "WS",
                                "publish-ack cs shopper", wait=True)
            self.side.wait(lambda: self._seen_state(room, "queued") is not None, 2.0)

    def _chat(self, room: str, opts: Any) -> None:
        lo, hi = _span(getattr(opts, "desk_msgs", "2-6"), (2, 6))
        think = _span(getattr(opts, "desk_think", "1-3"), (1, 3))
        offline = getattr(opts, "desk_offline_chance", 0.1)
        for _ in range(random.randint(int(lo), int(hi))):
            gevent.sleep(random.uniform(*think))
            if self._seen_state(room, "closed") is not None or not self._online():
                return
            k = next(self.keys)
            self.waiting[k] = time.perf_counter()
            ack = self.client.request({"op": "publish", "room": room, "type": "chat",
                                       "data": {"text": random.choice(_QUESTIONS), "k": k}},
                                      "WS", "publish-ack cs shopper", wait=True, ok_codes=(4092,))
            if ack is None or ack.get("op") == "error":
                self.waiting.pop(k, None)
                return  # closed by the agent meanwhile (4092), or the connection went
            if random.random() < offline:
                self.client.close(abrupt=True)  # backgrounded: the answer arrives while away
                gevent.sleep(random.uniform(0.5, 2.0))
                if not self._online():
                    return
            if not self.side.wait(lambda k=k: k not in self.waiting or self._seen_state(room, "closed") is not None, ANSWER_TIMEOUT):
                self.waiting.pop(k, None)
                self.client.fire("DESK", "answer (chat -> agent reply)", ANSWER_TIMEOUT * 1000,
                                 TimeoutError(f"no answer within {ANSWER_TIMEOUT:g} s"))
                return
            if self.client.ws is not None and self.last_seq.get(room):
                self.client.request({"op": "read", "room": room, "seq": self.last_seq[room]}, "WS", "read")

    def on_stop(self) -> None:
        self.client.close()


class DeskAgentUser(User):
    """An agent of the desk: connects with ``role=agent`` (dev auth), ``sync`` (attached
    to its conversations: new sessions' messages arrive live), ``cs.status online`` with
    ``--desk-capacity``; answers every chat message of its sessions (after
    ``--desk-answer-delay``), and closes a session after ``--desk-close-after`` answers.
    ``--desk-agents`` of them (a fixed count, spawned before the shoppers)."""

    weight = 1
    fixed_count = 50  # from --desk-agents (init listener below)
    wait_time = between(0, 0)

    def on_start(self) -> None:
        self.uid = f"agent-{os.getpid()}-{next(_desk_ids)}"
        self.client = GatewayClient(self, self.uid, "role=agent")
        self.client.on_msg = self._on_msg
        self.client.on_push = self._on_push
        self.side = _DeskSide()
        self.sessions: dict[str, dict[str, Any]] = {}  # room -> {"session", "answers"}
        self.closed: set[str] = set()
        self.jobs: gevent.queue.Queue = gevent.queue.Queue()
        opts = self.environment.parsed_options
        self.delay = _span(getattr(opts, "desk_answer_delay", "0.5-2"), (0.5, 2))
        self.close_after = getattr(opts, "desk_close_after", 4)
        self._online()

    def _online(self) -> bool:
        if self.client.ws is not None:
            return True
        if not self.client.connect():
            return False
        if self.client.request({"op": "sync", "limit": 1, "msgs": 0}, "WS", "sync", wait=True) is None:
            return False
        cap = getattr(self.environment.parsed_options, "desk_capacity", 20)
        return self.client.request({"op": "cs.status", "status": "online", "capacity": cap}, "WS", "cs.status", wait=True) is not None

    def _on_push(self, f: dict) -> None:
        data = f.get("data") if isinstance(f.get("data"), dict) else {}
        if f.get("type") == "cs.assigned":
            self.sessions[str(data.get("room"))] = {"session": data.get("session"), "answers": 0}
            since = data.get("queued_at") or data.get("opened_at")
            if isinstance(since, (int, float)):
                self.client.fire("DESK", "assigned push (queued -> agent)", max(0.0, now_ms() - since))
        elif f.get("type") == "cs.unassigned":
            self.sessions.pop(f"cs:{data.get('session')}", None)

    def _on_msg(self, m: dict) -> None:
        room = str(m.get("room", ""))
        if not room.startswith("cs:") or not self.side.first_time(m):
            return
        data = m.get("data") if isinstance(m.get("data"), dict) else {}
        if m.get("type") == "chat" and m.get("from") not in (None, self.uid):
            self.jobs.put((room, data.get("k")))
        elif m.get("type") == "cs.state" and data.get("state") == "closed":
            self.sessions.pop(room, None)
            self.closed.add(room)
            self.side.seen.pop(room, None)

    @task
    def work(self) -> None:
        if not self._online():
            gevent.sleep(1)
            return
        try:
            room, k = self.jobs.get(timeout=1.0)
        except gevent.queue.Empty:
            self.client.check_timeouts()
            return
        if self.delay[1] > 0:
            gevent.spawn_later(random.uniform(*self.delay), self._answer, room, k)
        else:
            self._answer(room, k)

    def _answer(self, room: str, k: Any) -> None:
        if room in self.closed or self.client.ws is None:
            return  # closed meanwhile
        # (a chat may come before the cs.assigned push: the session is known by its room)
        s = self.sessions.setdefault(room, {"session": room[3:], "answers": 0})
        self.client.request({"op": "publish", "room": room, "type": "chat", "data": {"text": "您好，已为您查询：有货，48 小时内发货。", "re": k}},
                            "WS", "publish-ack cs agent", ok_codes=(4092,))
        s["answers"] += 1
        if s["answers"] >= self.close_after:
            self.sessions.pop(room, None)
            self.closed.add(room)
            self.client.request({"op": "cs.close", "session": s["session"]}, "WS", "cs.close (agent)")

    def on_stop(self) -> None:
        self.client.close()


@events.init.add_listener
def _desk_agents(environment: Any, **_kw: Any) -> None:
    opts = environment.parsed_options
    if opts is not None and getattr(opts, "desk_agents", None) is not None:
        DeskAgentUser.fixed_count = max(0, int(opts.desk_agents))
