"""The internal HTTP API for backend systems, on its own port (default 127.0.0.1:8081).

JSON in and out; see docs/operations.md for each endpoint and every limit. In short:

- With ``api.api_key``, every ``/v1`` endpoint needs it (``Authorization: Bearer <key>``
  or ``X-API-Key: <key>``), and ``/metrics`` too with ``api.metrics_need_key``.
- Without a key (loopback only), a browser must not be able to drive the API: a request
  whose ``Host`` is not a loopback name, ``api.host`` or one of ``api.allowed_hosts`` gets
  421 (DNS rebinding), one carrying an ``Origin`` not in ``api.allowed_hosts`` gets 403.
- Always: a POST with a body must say ``Content-Type: application/json`` (415), so no
  CORS "simple request" body (text/plain, forms) is ever read.
- A request must arrive whole (head and body) within ``api.read_timeout`` of its first
  byte (408); a connection must start a request within it of opening or of its previous
  response (closed). At most ``api.max_connections`` connections are open: a new one
  beyond the cap closes the longest-idle one (no request in progress), or, when every
  connection is busy, gets 503 and is closed.
- ``/healthz`` and ``/readyz`` are always open.

Every refusal is counted in ``gateway_api_refused_total{reason}``. Bad input gets a 4xx
with ``{"error": "..."}``.
"""

from __future__ import annotations

import asyncio
import heapq
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler
from yarl import URL

from .broker import BrokerError
from .errors import NotRunning, Reject
from .media.objects import ObjectsError
from .protocol import frames
from .protocol.codes import ErrorCode
from .routing import valid_room_name
from .store import Store, StoreUnavailable

log = logging.getLogger("gateway")

if TYPE_CHECKING:
    from prometheus_client import Counter

    from .app import Gateway

#: Longest idempotency key (``Idempotency-Key`` header or ``idempotency_key`` field).
MAX_IDEMPOTENCY_KEY = 128
#: Largest request body (bytes); larger ones get 413.
MAX_BODY = 1 << 20
#: Refusal reasons of ``gateway_api_refused_total`` (each exported from 0).
REFUSAL_REASONS = ("auth", "host", "origin", "content_type", "timeout", "conn_cap", "evicted", "too_large", "bad_request")
#: Paths no guard applies to (load balancer and orchestrator probes).
PROBES = frozenset({"/healthz", "/readyz"})
_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]"})


class BadRequest(Exception):
    """A 4xx answer ``{"error": message}``, counted under ``reason``."""

    def __init__(self, message: str, status: int = 400, reason: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


#: HTTP status of a refusal by the conversation rules (the error code goes in the body).
_REJECT_STATUS: dict[int, int] = {
    ErrorCode.NOT_MEMBER: 403, ErrorCode.FORBIDDEN: 403, ErrorCode.MUTED: 403, ErrorCode.RECALL_DENIED: 403,
    ErrorCode.NO_CONVERSATION: 404, ErrorCode.NO_ROUTE: 404, ErrorCode.TOO_MANY_MEMBERS: 409, ErrorCode.TOO_LARGE: 413,
    ErrorCode.MEDIA_NOT_FOUND: 404, ErrorCode.MEDIA_NOT_YOURS: 403, ErrorCode.MEDIA_KIND: 422, ErrorCode.MEDIA_USED: 409,
    # The desk's codes (docs/customer-service.md): not an agent, no session, taken, at capacity, closed.
    4004: 404, 4090: 409, 4091: 409, 4092: 409,
}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _canned(status: str, error: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for answers written
    straight to the socket (no request was parsed)."""
    body = orjson.dumps({"error": error})
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    return head.encode() + body


_CONN_CAP_RESPONSE = _canned("503 Service Unavailable", "too many API connections (api.max_connections)")
_HEAD_TIMEOUT_RESPONSE = _canned("408 Request Timeout", "request not received within api.read_timeout")


# ---- connections: the cap and the read deadline ---------------------------------------------------


class _Conn(asyncio.Protocol):
    """One API connection: wraps aiohttp's protocol (created only once the connection is
    admitted) and keeps its deadline. ``busy`` while a request is in the handlers."""

    __slots__ = ("busy", "closed", "got_bytes", "guard", "inner", "requests", "started", "timer", "transport")

    def __init__(self, guard: _Guard) -> None:
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.inner: asyncio.Protocol | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False
        #: Bytes of a request not yet in the handlers arrived (its deadline runs).
        self.got_bytes = False
        self.requests = 0
        #: loop.time() of the current request's first byte (or of the connection).
        self.started = 0.0
        self.closed = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        g = self.guard
        if not g.admit(self):
            self.closed = True
            g.refused("conn_cap")
            transport.write(_CONN_CAP_RESPONSE)
            transport.close()
            return
        self.inner = g.make_inner()
        self.inner.connection_made(transport)
        self.started = g.loop.time()
        self._arm(self.started + g.timeout)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if not self.busy and not self.got_bytes and data:
            self.got_bytes = True
            self.started = self.guard.loop.time()
            self._arm(self.started + self.guard.timeout)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self.guard.drop(self)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # the request cycle (called by the middleware)

    def begin(self) -> None:
        self.busy = True
        self.got_bytes = False
        self._disarm()
        self.guard.idle.pop(self, None)

    def end(self) -> None:
        self.busy = False
        self.requests += 1
        if self.closed:
            return
        self.guard.idle[self] = None  # newest idle last
        self.started = self.guard.loop.time()
        self._arm(self.started + self.guard.timeout)

    @property
    def deadline(self) -> float:
        """loop.time() by which the current request must have been read."""
        return self.started + self.guard.timeout

    # the deadline

    def _arm(self, when: float) -> None:
        self._disarm()
        self.timer = self.guard.loop.call_at(when, self._expire)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        """No complete request head within the deadline: 408 to a client that sent part
        of one (slowloris), a plain close to one that sent nothing."""
        self.timer = None
        t = self.transport
        if self.busy or self.closed or t is None:
            return
        if self.got_bytes or self.requests == 0:
            self.guard.refused("timeout")
        if self.got_bytes:
            t.write(_HEAD_TIMEOUT_RESPONSE)
        self.close(abort=t.get_write_buffer_size() > 0 and not self.got_bytes)

    def close(self, abort: bool = False) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if abort:
            t.abort()
        else:
            t.close()


class _Guard:
    """The open connections of the API listener (insertion order) and the idle ones
    (longest idle first), the cap and the read deadline."""

    def __init__(self, make_inner: Callable[[], asyncio.Protocol], cap: int, timeout: float, refused: Counter) -> None:
        self.make_inner = make_inner
        self.cap = cap
        self.timeout = timeout
        self.counter = refused
        self.loop = asyncio.get_running_loop()
        self.conns: dict[_Conn, None] = {}
        self.idle: dict[_Conn, None] = {}

    def __call__(self) -> _Conn:
        return _Conn(self)

    def refused(self, reason: str) -> None:
        self.counter.labels(reason).inc()

    def admit(self, conn: _Conn) -> bool:
        if len(self.conns) >= self.cap:
            victim = next(iter(self.idle), None)
            if victim is None:
                return False
            self.drop(victim)
            victim.closed = True
            victim._disarm()
            victim.close(abort=True)
            self.refused("evicted")
        self.conns[conn] = None
        self.idle[conn] = None
        return True

    def drop(self, conn: _Conn) -> None:
        self.conns.pop(conn, None)
        self.idle.pop(conn, None)


class _Site(web.BaseSite):
    """``web.TCPSite`` with the connection guard in front of aiohttp's protocol."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: Callable[[], _Guard], backlog: int = 1024) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._make_guard = host, port, guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        guard = self._make_guard()
        self._server = await guard.loop.create_server(guard, self._host, self._port, backlog=self._backlog, reuse_address=True)


# ---- request helpers -------------------------------------------------------------------------------


def _str(d: Mapping[str, Any], key: str, *, required: bool = True, default: str | None = None) -> str:
    v = d.get(key, default)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or not v:
        raise BadRequest(f"field {key!r} must be a non-empty string")
    return v


def _room(d: Mapping[str, Any], key: str = "room", star: bool = False) -> str:
    """A valid room name from ``d[key]``; with ``star``, ``"*"`` (every room) too."""
    room = _str(d, key)
    if not (star and room == "*") and not valid_room_name(room):
        raise BadRequest(f"invalid room name {room!r}")
    return room


def _num(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise BadRequest(f"field {key!r} must be a positive number")
    return float(v)


def _prio(d: dict[str, Any]) -> int | None:
    v = d.get("priority")
    if v is None:
        return None
    names = {"low": 0, "normal": 1, "high": 2}
    if isinstance(v, str) and v in names:
        return names[v]
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2:
        return v
    raise BadRequest("field 'priority' must be 0, 1, 2 or low/normal/high")


def _idempotency_key(req: web.Request, d: Mapping[str, Any]) -> str | None:
    """The ``Idempotency-Key`` header or the ``idempotency_key`` field (the same value
    when both are given): 1..128 printable characters."""
    header = req.headers.get("Idempotency-Key")
    field = d.get("idempotency_key")
    if field is not None and not isinstance(field, str):
        raise BadRequest("field 'idempotency_key' must be a string")
    if header is not None and field is not None and header != field:
        raise BadRequest("the Idempotency-Key header and the 'idempotency_key' field differ")
    k = header if header is not None else field
    if k is None:
        return None
    if not 1 <= len(k) <= MAX_IDEMPOTENCY_KEY or not k.isprintable():
        raise BadRequest(f"the idempotency key must be 1..{MAX_IDEMPOTENCY_KEY} printable characters")
    return k


def _idem_kw(req: web.Request, d: Mapping[str, Any]) -> dict[str, str]:
    """``idempotency_key=`` for ``Gateway.publish``/``send_user``, only when one was given."""
    k = _idempotency_key(req, d)
    return {} if k is None else {"idempotency_key": k}


def _host_name(value: str) -> str:
    """``Host`` header value without its port, lower case (``[::1]:8081`` -> ``[::1]``)."""
    v = value.strip().lower()
    if v.startswith("["):
        end = v.find("]")
        return v[: end + 1] if end > 0 else v
    name, sep, port = v.rpartition(":")
    return name if sep and port.isdigit() else v


def _host_allowed(value: str | None, allowed: frozenset[str]) -> bool:
    if not value:
        return False
    v = value.strip().lower()
    return v in allowed or _host_name(v).rstrip(".") in allowed


def _origin_allowed(value: str, allowed: frozenset[str]) -> bool:
    """``Origin`` (``scheme://host[:port]``) listed in ``api.allowed_hosts`` as the whole
    origin, ``host:port`` or ``host``. Loopback origins are not implied: a page served
    from localhost is a browser too."""
    v = value.strip().lower()
    if v in allowed:
        return True
    try:
        u = URL(v)
    except ValueError:
        return False
    if not u.host or not u.is_absolute():
        return False
    host = f"[{u.host}]" if ":" in u.host else u.host
    return host in allowed or f"{host}:{u.port}" in allowed


def _counter(gw: Gateway, name: str, doc: str, label: str) -> Counter:
    """A counter on ``gw.metrics_registry`` (the same one on every call); a private one for
    a stand-in gateway without metrics (unit tests' fakes)."""
    if hasattr(gw, "counter"):
        return gw.counter(name, doc, [label])
    from prometheus_client import CollectorRegistry, Counter

    return Counter(name, doc, [label], registry=CollectorRegistry())


def _refused_counter(gw: Gateway) -> Counter:
    """``gateway_api_refused_total{reason}``."""
    return _counter(gw, "gateway_api_refused", "Internal API requests and connections refused, by reason", "reason")


class _QuietParseErrors(logging.Filter):
    """aiohttp logs every unparsable request (garbage, an over-long line) with a traceback
    at ERROR: anyone who can reach the port could fill the log. They are answered 400 and
    counted as ``bad_request`` instead."""

    def __init__(self, refused: Counter) -> None:
        super().__init__()
        self.refused = refused

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            self.refused.labels("bad_request").inc()
            return False
        # The logger lets DEBUG through so that parse errors aiohttp logs at DEBUG are
        # counted too; everything else keeps the gateway's level.
        return record.levelno >= logging.getLogger("gateway").getEffectiveLevel()


def _http_logger(refused: Counter) -> logging.Logger:
    lg = logging.getLogger("gateway.api.http")
    lg.setLevel(logging.DEBUG)
    lg.filters = [_QuietParseErrors(refused)]
    return lg


def _allowed_hosts(host: str, extra: list[str]) -> frozenset[str]:
    h = host.strip().lower()
    if ":" in h and not h.startswith("["):
        h = f"[{h}]"
    return frozenset({*_LOOPBACK_NAMES, h, *(e.strip().lower() for e in extra if e.strip())})


# ---- the application -------------------------------------------------------------------------------


#: The app's ``api.read_timeout`` (what :func:`read_json` gives a body without a connection deadline).
_READ_TIMEOUT = web.AppKey("read_timeout", float)


async def read_json(req: web.Request, *, empty: bool = False) -> dict[str, Any]:
    """The JSON object body, read by the request's deadline (408 after it); ``empty``:
    no body reads as ``{}`` (else 400). For plugins' routes too (``Gateway.http_route``)."""
    read_timeout = req.app[_READ_TIMEOUT]
    conn = req.transport.get_protocol() if req.transport is not None else None
    loop = asyncio.get_running_loop()
    deadline = conn.deadline if isinstance(conn, _Conn) else loop.time() + read_timeout
    try:
        async with asyncio.timeout_at(deadline):
            raw = await req.read()
    except TimeoutError:
        raise BadRequest(f"request body not received within api.read_timeout ({read_timeout:g} s)", 408, "timeout") from None
    if not raw:
        if empty:
            return {}
        raise BadRequest("request body must be a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def build_app(gw: Gateway) -> web.Application:
    cfg = gw.config.api
    key = cfg.api_key
    read_timeout = cfg.read_timeout
    hosts = _allowed_hosts(cfg.host, cfg.allowed_hosts)
    origins = frozenset(e.strip().lower() for e in cfg.allowed_hosts if e.strip())
    refused = _refused_counter(gw)
    for reason in REFUSAL_REASONS:
        refused.labels(reason)
    replays = _counter(gw, "gateway_api_idempotent_replays", "Internal API calls answered from an idempotency key (nothing sent again)", "endpoint")
    for ep in ("publish", "send"):
        replays.labels(ep)

    def has_key(req: web.Request) -> bool:
        given = req.headers.get("X-API-Key") or req.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        return bool(key) and hmac.compare_digest(given.encode(), key.encode())

    def check(req: web.Request) -> None:
        """The guards, in order: host and origin (no key), key, content type."""
        path = req.path
        if not key:
            if not _host_allowed(req.headers.get("Host"), hosts):
                raise BadRequest("Host not allowed (loopback, api.host or api.allowed_hosts)", 421, "host")
            origin = req.headers.get("Origin")
            if origin is not None and not _origin_allowed(origin, origins):
                raise BadRequest("cross-origin requests are not allowed (Origin not in api.allowed_hosts)", 403, "origin")
        if path.startswith("/v1/") and key and not has_key(req):
            raise BadRequest("missing or wrong API key", 401, "auth")
        if path == "/metrics" and cfg.metrics_need_key and not has_key(req):
            raise BadRequest("missing or wrong API key" if key else "api.metrics_need_key is set but api.api_key is empty", 401, "auth")
        if req.method == "POST" and req.body_exists and req.content_type != "application/json":
            raise BadRequest("Content-Type must be application/json", 415, "content_type")

    async def dispatch(req: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if req.path not in PROBES:
                check(req)
            return await handler(req)
        except BadRequest as e:
            refused.labels(e.reason).inc()
            resp = _json({"error": str(e)}, e.status)
            if e.status == 408:
                # The body is still arriving: answer, then close rather than read on.
                resp.force_close()
                await resp.prepare(req)
                await resp.write_eof()
                if req.transport is not None:
                    req.transport.close()
            return resp
        except NotRunning:
            return _json({"error": "the gateway is not running"}, 503)
        except BrokerError as e:
            # Applied on this node; other nodes could not be reached (Redis down).
            return _json({"error": f"broker unavailable: {e}", "local": True}, 503)
        except StoreUnavailable as e:
            return _json({"error": f"message store unavailable: {e}"}, 503)
        except ObjectsError as e:
            return _json({"error": f"media storage unavailable: {e}"}, 503)
        except Reject as e:
            refused.labels("rejected").inc()
            return _json({"error": e.message, "code": e.code}, _REJECT_STATUS.get(e.code, 400))
        except ValueError as e:
            refused.labels("bad_request").inc()
            return _json({"error": str(e)}, 400)
        except web.HTTPException as e:
            if e.status == 413:
                refused.labels("too_large").inc()
            return _json({"error": e.reason}, e.status)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = request.transport.get_protocol() if request.transport is not None else None
        if not isinstance(conn, _Conn):
            return await dispatch(request, handler)
        conn.begin()
        try:
            return await dispatch(request, handler)
        finally:
            conn.end()

    async def publish(req: web.Request) -> web.Response:
        d = await read_json(req)
        room = _room(d)
        if "data" not in d:
            raise BadRequest("field 'data' is required")
        idem = _idem_kw(req, d)
        res = await gw.publish(room, d["data"], type=_str(d, "type", default="chat"), priority=_prio(d), **idem)
        out: dict[str, Any] = {"room": room, "seq": res.seq, "epoch": res.epoch}
        if res.duplicate:
            replays.labels("publish").inc()
            out["duplicate"] = True
        return _json(out)

    async def send_user(req: web.Request) -> web.Response:
        d = await read_json(req)
        user = req.match_info.get("user") or _str(d, "user")
        if "data" not in d:
            raise BadRequest("field 'data' is required")
        prio = _prio(d)
        idem = _idem_kw(req, d)
        res = await gw.notify(user, d["data"], type=_str(d, "type", default="push"), priority=2 if prio is None else prio, **idem)
        out: dict[str, Any] = {"user": user, "sent": True, "room": res["room"], "seq": res["seq"], "delivered": res["delivered"]}
        if res["duplicate"]:
            replays.labels("send").inc()
            out["duplicate"] = True
        return _json(out)

    async def broadcast(req: web.Request) -> web.Response:
        d = await read_json(req)
        if "data" not in d:
            raise BadRequest("field 'data' is required")
        prio = _prio(d)
        await gw.broadcast(d["data"], type=_str(d, "type", default="broadcast"), priority=1 if prio is None else prio)
        return _json({"sent": True})

    async def kick(req: web.Request) -> web.Response:
        d = await read_json(req)
        user = _str(d, "user")
        await gw.kick(user, reason=_str(d, "reason", default="kicked")[:120])
        return _json({"user": user, "kicked": True})

    async def mute(req: web.Request) -> web.Response:
        d = await read_json(req)
        room = _room(d)
        user = _str(d, "user", required=False) or None
        wl = d.get("whitelist", [])
        if not isinstance(wl, list) or not all(isinstance(u, str) for u in wl):
            raise BadRequest("field 'whitelist' must be a list of user ids")
        await gw.mute(room, user, _num(d, "seconds"), wl)
        return _json({"room": room, "user": user, "muted": True})

    async def unmute(req: web.Request) -> web.Response:
        d = await read_json(req)
        room = _room(d)
        user = _str(d, "user", required=False) or None
        await gw.unmute(room, user)
        return _json({"room": room, "user": user, "muted": False})

    async def ban(req: web.Request) -> web.Response:
        d = await read_json(req)
        room = _room(d, star=True)
        user = _str(d, "user")
        await gw.ban(room, user, _num(d, "seconds"))
        return _json({"room": room, "user": user, "banned": True})

    async def unban(req: web.Request) -> web.Response:
        d = await read_json(req)
        room = _room(d, star=True)
        user = _str(d, "user")
        await gw.unban(room, user)
        return _json({"room": room, "user": user, "banned": False})

    async def close_room(req: web.Request) -> web.Response:
        room = _room(req.match_info)
        await gw.close_room(room)
        return _json({"room": room, "closed": True})

    async def presence(req: web.Request) -> web.Response:
        room = _room(req.match_info)
        conns, users = await gw.presence(room)
        return _json({"room": room, "conns": conns, "users": users})

    async def members(req: web.Request) -> web.Response:
        room = _room(req.match_info)
        try:
            offset = int(req.query.get("offset", "0"))
            limit = int(req.query.get("limit", "100"))
        except ValueError:
            raise BadRequest("offset and limit must be integers") from None
        if offset < 0 or not 1 <= limit <= 1000:
            raise BadRequest("offset must be >= 0 and limit 1..1000")
        members, scope = await gw.members_everywhere(room, offset, limit)
        return _json({"room": room, "offset": offset, "scope": scope, "members": members})

    def _store() -> Store:
        store = gw.storage.store
        if store is None:
            raise BadRequest("no route keeps messages (routes' store = 'archive' or 'durable')", 404, "no_store")
        return store

    def _int(query: Mapping[str, str], name: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int | None:
        raw = query.get(name)
        if raw is None or raw == "":
            return default
        try:
            v = int(raw)
        except ValueError:
            raise BadRequest(f"{name} must be an integer") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise BadRequest(f"{name} must be in {lo}..{hi}")
        return v

    async def room_messages(req: web.Request) -> web.Response:
        """A page of a room's stored messages, oldest first: ``before_seq`` pages back."""
        room = _room(req.match_info)
        _store()
        limit = _int(req.query, "limit", 50, 1, 100)
        before = _int(req.query, "before_seq", None, 1)
        assert limit is not None
        msgs, epoch, more = await gw.storage.page(room, before, limit)
        msgs = await gw.media.fresh(msgs)
        body = b'{"room":' + orjson.dumps(room) + b',"epoch":' + orjson.dumps(epoch) + b',"more":' + (b"true" if more else b"false")
        body += b',"messages":[' + b",".join(msgs) + b"]}"
        return web.Response(body=body, content_type="application/json")

    async def export(req: web.Request) -> web.StreamResponse:
        """Stored messages with ``since <= ts < until`` (ms), of one ``room``, one ``user``
        or all, streamed as NDJSON (one ``msg`` frame per line)."""
        store = _store()
        since = _int(req.query, "since", 0, 0)
        until = _int(req.query, "until", None, 0)
        assert since is not None
        until = until if until is not None else frames.now_ms() + 1
        room, user = req.query.get("room") or None, req.query.get("user") or None
        if room and user:
            raise BadRequest("give room or user, not both")
        # Media messages carry download links valid for ``url_ttl`` seconds (default a day).
        ttl = _int(req.query, "url_ttl", 86400, 60, 7 * 86400)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(req)
        batch: list[bytes] = []

        async def flush() -> None:
            out = await gw.media.fresh(batch, ttl)
            await resp.write(b"\n".join(out) + b"\n")
            batch.clear()

        async for m in store.export(since_ms=since, until_ms=until, room=room, sender=user):
            batch.append(m.frame(store.epoch))
            if len(batch) >= 500:
                await flush()
        if batch:
            await flush()
        await resp.write_eof()
        return resp

    async def search(req: web.Request) -> web.Response:
        """Stored messages containing ``q`` (3 characters or more; Chinese works), newest first."""
        store = _store()
        q = req.query.get("q", "")
        if len(q) < 3:
            raise BadRequest("q must have at least 3 characters")
        limit = _int(req.query, "limit", 50, 1, 500)
        assert limit is not None
        found = await store.search(q, room=req.query.get("room") or None, limit=limit)
        body = b'{"messages":[' + b",".join(m.frame(store.epoch) for m in found) + b"]}"
        return web.Response(body=body, content_type="application/json")

    async def delete_user_messages(req: web.Request) -> web.Response:
        """Erase every stored message a user sent (a personal-data deletion request)."""
        store = _store()
        user = req.match_info["user"]
        n = await store.delete_user(user)
        files = await gw.media.purge_user(user) if gw.media.enabled else 0
        log.info("deleted %d stored messages and %d files of user %s on request", n, files, user)
        return _json({"user": user, "deleted": n, "files": files})

    def _media_file_id(req: web.Request) -> str:
        if not gw.media.enabled:
            raise BadRequest("media is not enabled on this gateway ([media], and a route that keeps messages)", 404, "bad_request")
        return req.match_info["file_id"]

    async def media_file(req: web.Request) -> web.Response:
        """A file's record and fresh download URLs (``url_ttl`` seconds, default media.url_ttl)."""
        fid = _media_file_id(req)
        f = await _store().media_get(fid)
        if f is None:
            raise BadRequest(f"no file {fid}", 404)
        ttl = _int(req.query, "url_ttl", int(gw.config.media.url_ttl), 60, 7 * 86400)
        body: dict[str, Any] = {"owner": f.owner, "state": f.state, "verdict": f.verdict, "room": f.room, "created_at": f.created_at,
                                "sha256": f.sha256, "refs": [list(r) for r in await _store().media_refs(fid)]}
        data = gw.media.describe(f)
        body.update(gw.media.with_urls(f, data, ttl) if f.state != "removed" else data)
        return _json(body)

    async def media_verdict(req: web.Request) -> web.Response:
        """A moderation verdict from the company's checker (e.g. WeChat mediaCheckAsync's
        callback): ``{"verdict": "risky"}`` recalls the messages and deletes the file."""
        fid = _media_file_id(req)
        body = await read_json(req)
        verdict = body.get("verdict")
        if verdict not in ("pass", "risky"):
            raise BadRequest("verdict must be 'pass' or 'risky'")
        f = await gw.media.verdict(fid, verdict, by=str(body.get("by") or "moderation"))
        if f is None:
            raise BadRequest(f"no file {fid}", 404)
        return _json({"file_id": fid, "verdict": verdict})

    def _endpoint(req: web.Request) -> str:
        name = req.match_info["endpoint"]
        if not any(ep.name == name for ep in gw.outbox.endpoints):
            raise BadRequest(f"no outbox endpoint {name!r} (outbox.endpoints)", 404, "no_endpoint")
        return name

    async def outbox(req: web.Request) -> web.Response:
        """Each outbox endpoint's state: cursor, backlog and lag, and this node's counts."""
        store = _store()
        out = []
        for ep in gw.outbox.endpoints:
            st = ep.stats
            cursor = ep.cursor if gw.outbox.leader else await store.outbox_cursor(ep.name)
            backlog, first_ts = await store.outbox_backlog(cursor)
            out.append({
                "endpoint": ep.name, "url": ep.cfg.url, "events": ep.cfg.events, "cursor": cursor, "backlog": backlog,
                "lag_seconds": round(max(0.0, time.time() - first_ts / 1000), 3) if first_ts else 0.0,
                "delivered": st.delivered, "dead_letters": st.dead, "failures": st.failures, "last_error": st.last_error,
                "failing": st.failing_since is not None,
            })
        return _json({"node": gw.node_id, "leader": gw.outbox.leader, "endpoints": out})

    async def dead_letters(req: web.Request) -> web.Response:
        """An endpoint's dead letters, oldest first: ``after_id`` pages on."""
        store = _store()
        name = _endpoint(req)
        limit = _int(req.query, "limit", 100, 1, 1000)
        after = _int(req.query, "after_id", 0, 0)
        assert limit is not None and after is not None
        dead = await store.dead_letters(name, after_id=after, limit=limit)
        items = [
            b'{"id":%d,"event_id":%s,"room":%s,"error":%s,"failed_at":%d,"event":%s}'
            % (d.id, orjson.dumps(d.event_id), orjson.dumps(d.room), orjson.dumps(d.error), d.failed_at, d.event)
            for d in dead
        ]
        body = b'{"endpoint":' + orjson.dumps(name) + b',"dead_letters":[' + b",".join(items) + b"]}"
        return web.Response(body=body, content_type="application/json")

    async def replay(req: web.Request) -> web.Response:
        """Send dead letters again (``{"ids": [...]}``, or all of them without a body)."""
        store = _store()
        name = _endpoint(req)
        ids = None
        if req.body_exists:
            d = await read_json(req)
            raw = d.get("ids")
            if raw is not None and (not isinstance(raw, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw)):
                raise BadRequest("ids must be a list of dead-letter ids")
            ids = raw
        n = await store.replay_dead(name, ids)
        log.info("outbox %s: %d dead letter(s) queued again on request", name, n)
        return _json({"endpoint": name, "replayed": n})

    # ---- conversations ---------------------------------------------------------------

    def _conv(req: web.Request) -> str:
        cv = gw.conversations
        if not cv.enabled:
            raise BadRequest("conversations need a conversation route (kind dm, group or notice) and the store", 404, "no_store")
        room = req.match_info["room"]
        if not valid_room_name(room):
            raise BadRequest("invalid conversation id")
        cv.route(room)
        return room

    def _member_json(m: Any) -> dict[str, Any]:
        return {"user": m.user, "role": m.role, "joined_at": m.joined_at, "read_seq": m.read_seq, "muted_until": m.muted_until,
                "member": m.active, "left_seq": m.left_seq}

    async def create_conversation(req: web.Request) -> web.Response:
        """A group (``members``, ``creator`` its owner, ``meta``), or a dm (``members``:
        the two users); idempotent by ``room``."""
        cv = gw.conversations
        d = await read_json(req)
        kind = _str(d, "kind", default="group")
        members = d.get("members", [])
        if not isinstance(members, list) or not all(isinstance(u, str) and u for u in members) or len(members) > 2000:
            raise BadRequest("members must be a list of user ids")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise BadRequest("meta must be an object")
        creator = d.get("creator")
        if creator is not None and not isinstance(creator, str):
            raise BadRequest("creator must be a user id")
        if kind == "dm":
            if len(set(members)) != 2:
                raise BadRequest("a dm has two members")
            prefix = next((r.pattern.split(":", 1)[0] for r in gw.config.routes if r.kind == "dm"), None)
            if prefix is None or not cv.enabled:
                raise BadRequest("no dm route is configured", 404, "no_route")
            from .app.conversations import dm_room

            room = dm_room(prefix, members[0], members[1])
            route = cv.route(room)
            await cv.ensure_dm(route, room, creator)
            return _json({"room": room, "kind": "dm"})
        if kind != "group":
            raise BadRequest("kind must be 'group' or 'dm' (notices are created by /v1/send)")
        if not cv.enabled:
            raise BadRequest("conversations need a conversation route and the store", 404, "no_store")
        room = d.get("room") or f"{cv.group_prefix()}:{secrets.token_hex(8)}"
        if not isinstance(room, str) or not valid_room_name(room):
            raise BadRequest("room must be a valid conversation id")
        created = await cv.create_group(room, creator, orjson.dumps(meta), members)
        return _json({"room": room, "kind": "group", "created": created})

    async def get_conversation(req: web.Request) -> web.Response:
        room = _conv(req)
        store = _store()
        c = await store.conversation(room)
        if c is None:
            raise BadRequest(f"no conversation {room}", 404, "no_conversation")
        body = {"room": c.room, "kind": c.kind, "creator": c.creator, "created_at": c.created_at, "updated_at": c.updated_at,
                "members": await store.member_count(room), "last_seq": await store.last_seq(room), "meta": orjson.Fragment(c.meta)}
        return _json(body)

    async def conversation_members(req: web.Request) -> web.Response:
        room = _conv(req)
        offset = _int(req.query, "offset", 0, 0)
        limit = _int(req.query, "limit", 100, 1, 1000)
        assert offset is not None and limit is not None
        ms = await _store().members(room, offset=offset, limit=limit)
        return _json({"room": room, "offset": offset, "members": [_member_json(m) for m in ms]})

    async def add_conversation_members(req: web.Request) -> web.Response:
        room = _conv(req)
        d = await read_json(req)
        users = d.get("users")
        if not isinstance(users, list) or not users or not all(isinstance(u, str) and u for u in users):
            raise BadRequest("users must be a non-empty list of user ids")
        role = _str(d, "role", default="member")
        if role not in ("owner", "admin", "member"):
            raise BadRequest("role must be owner, admin or member")
        added = await gw.conversations.add_members(room, users, by=d.get("by") if isinstance(d.get("by"), str) else None, role=role)
        return _json({"room": room, "added": added})

    async def remove_conversation_member(req: web.Request) -> web.Response:
        room = _conv(req)
        user = req.match_info["user"]
        if not await gw.conversations.remove_member(room, user, by=None):
            raise BadRequest(f"{user} is not a member of {room}", 404, "not_member")
        return _json({"room": room, "removed": user})

    async def update_conversation_member(req: web.Request) -> web.Response:
        room = _conv(req)
        user = req.match_info["user"]
        d = await read_json(req)
        role = d.get("role")
        if role is not None and role not in ("owner", "admin", "member"):
            raise BadRequest("role must be owner, admin or member")
        muted: int | bool | None = False
        if "muted_until" in d:
            muted = d["muted_until"]
            if muted is not None and (not isinstance(muted, int) or isinstance(muted, bool) or muted < 0):
                raise BadRequest("muted_until must be a time in ms (0: for good) or null")
        m = await gw.conversations.update_member(room, user, role=role, muted_until=muted)
        if m is None:
            raise BadRequest(f"{user} is not a member of {room}", 404, "not_member")
        return _json({"room": room, **_member_json(m)})

    async def post_conversation_message(req: web.Request) -> web.Response:
        """Post as the system (no ``from``) or as a member (``from``)."""
        room = _conv(req)
        d = await read_json(req)
        if "data" not in d:
            raise BadRequest("field 'data' is required")
        sender = d.get("from")
        if sender is not None and (not isinstance(sender, str) or not sender):
            raise BadRequest("from must be a user id")
        seq, dup = await gw.conversations.post(room, _str(d, "type", default="chat"), d["data"], sender, _idempotency_key(req, d))
        out: dict[str, Any] = {"room": room, "seq": seq}
        if dup:
            replays.labels("publish").inc()
            out["duplicate"] = True
        return _json(out)

    async def recall_conversation_message(req: web.Request) -> web.Response:
        room = _conv(req)
        d = await read_json(req)
        seq = d.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise BadRequest("seq must be a positive integer")
        raw_by = d.get("by")
        by = raw_by if isinstance(raw_by, str) and raw_by else "system"
        ok = await gw.conversations.do_recall(room, seq, by)
        if not ok:
            raise BadRequest(f"no message {seq} to recall in {room} (or recalled already)", 404, "no_message")
        return _json({"room": room, "seq": seq, "recalled": True})

    async def read_conversation(req: web.Request) -> web.Response:
        """Mark read on a user's behalf (their devices get a ``read`` frame)."""
        room = _conv(req)
        d = await read_json(req)
        user = _str(d, "user")
        seq = d.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise BadRequest("seq must be an integer >= 0")
        m, last = await gw.conversations.mark_read(room, user, seq)
        return _json({"room": room, "user": user, "read_seq": m.read_seq, "unread": max(0, last - m.read_seq)})

    async def user_conversations(req: web.Request) -> web.Response:
        """A user's conversations, most recently active first, with unread counts."""
        store = _store()
        user = req.match_info["user"]
        since = _int(req.query, "since", 0, 0)
        limit = _int(req.query, "limit", 50, 1, 500)
        assert since is not None and limit is not None
        before = None
        if req.query.get("before_activity") is not None:
            act = _int(req.query, "before_activity", None, 0)
            assert act is not None
            before = (act, req.query.get("before_room", ""))
        states = await store.user_conversations(user, since_ms=since, limit=limit + 1, before=before)
        more = len(states) > limit
        states = states[:limit]
        epoch = store.epoch
        out = [{
            "room": st.conv.room, "kind": st.conv.kind, "meta": orjson.Fragment(st.conv.meta), "role": st.member.role,
            "member": st.member.active, "last_seq": st.last_seq, "read_seq": st.member.read_seq,
            "unread": max(0, st.last_seq - st.member.read_seq), "updated": st.activity,
            "last": orjson.Fragment(st.last.frame(epoch)) if st.last is not None else None,
        } for st in states]
        nxt = {"before_activity": states[-1].activity, "before_room": states[-1].conv.room} if more else None
        return _json({"user": user, "conversations": out, "more": more, "next": nxt})

    async def stats(req: web.Request) -> web.Response:
        eng = gw.engine_or_raise()
        all_rooms = eng.rooms()
        rooms = heapq.nlargest(20, all_rooms, key=lambda r: r[1])
        return _json({
            "node": gw.node_id,
            "connections": eng.connections,
            "rooms": len(all_rooms),
            "top_rooms": [{"room": r, "conns": c, "users": u} for r, c, u in rooms],
            "engine": eng.counters(),
            "auth_rejects": gw.stats.auth_rejects,
            "hook_timeouts": gw.stats.hook_timeouts,
            "hook_errors": gw.stats.hook_errors,
            "errors_sent": {str(k): v for k, v in gw.stats.errors_sent.items()},
            "dropped": gw.stats.dropped,
            "tokens_expired": gw.stats.tokens_expired,
            "broker": {
                "kind": gw.config.broker.kind,
                "connected": gw.broker.ready,
                "publish_errors": gw.broker.stats.publish_errors,
                "reconnects": gw.broker.stats.reconnects,
                **gw.broker.stats.extra,
            },
        })

    async def healthz(req: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(req: web.Request) -> web.Response:
        ok = gw.ready
        return _json({"ready": ok, "draining": bool(gw.engine and gw.engine.draining), "broker": gw.broker.ready}, 200 if ok else 503)

    async def metrics(req: web.Request) -> web.Response:
        from .metrics import render

        body, ctype = render(gw)
        return web.Response(body=body, headers={"Content-Type": ctype})

    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app[_READ_TIMEOUT] = read_timeout
    r = app.router
    r.add_post("/v1/publish", publish)
    r.add_post("/v1/send", send_user)
    r.add_post("/v1/users/{user}/send", send_user)
    r.add_post("/v1/broadcast", broadcast)
    r.add_post("/v1/kick", kick)
    r.add_post("/v1/mute", mute)
    r.add_post("/v1/unmute", unmute)
    r.add_post("/v1/ban", ban)
    r.add_post("/v1/unban", unban)
    r.add_post("/v1/rooms/{room}/close", close_room)
    r.add_get("/v1/rooms/{room}/presence", presence)
    r.add_get("/v1/rooms/{room}/members", members)
    r.add_get("/v1/rooms/{room}/messages", room_messages)
    r.add_get("/v1/export", export)
    r.add_get("/v1/search", search)
    r.add_delete("/v1/users/{user}/messages", delete_user_messages)
    r.add_get("/v1/media/{file_id}", media_file)
    r.add_post("/v1/media/{file_id}/verdict", media_verdict)
    r.add_post("/v1/conversations", create_conversation)
    r.add_get("/v1/conversations/{room}", get_conversation)
    r.add_get("/v1/conversations/{room}/members", conversation_members)
    r.add_post("/v1/conversations/{room}/members", add_conversation_members)
    r.add_delete("/v1/conversations/{room}/members/{user}", remove_conversation_member)
    r.add_patch("/v1/conversations/{room}/members/{user}", update_conversation_member)
    r.add_post("/v1/conversations/{room}/messages", post_conversation_message)
    r.add_get("/v1/conversations/{room}/messages", room_messages)
    r.add_post("/v1/conversations/{room}/recall", recall_conversation_message)
    r.add_post("/v1/conversations/{room}/read", read_conversation)
    r.add_get("/v1/users/{user}/conversations", user_conversations)
    r.add_get("/v1/outbox", outbox)
    r.add_get("/v1/outbox/{endpoint}/dead", dead_letters)
    r.add_post("/v1/outbox/{endpoint}/dead/replay", replay)
    for method, path, handler in getattr(gw, "http_routes", ()):
        r.add_route(method, path, handler)
    r.add_get("/v1/stats", stats)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    return app


async def start_api(gw: Gateway) -> web.AppRunner:
    cfg = gw.config.api
    app = build_app(gw)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=_http_logger(_refused_counter(gw)))
    await runner.setup()
    server = runner.server
    assert server is not None

    def make_guard() -> _Guard:
        return _Guard(server, cfg.max_connections, cfg.read_timeout, _refused_counter(gw))

    await _Site(runner, cfg.host, cfg.port, make_guard).start()
    return runner
