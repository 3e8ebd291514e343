"""The internal HTTP API for backend systems, on its own port (default 127.0.0.1:8081).

JSON in and out. Every ``/v1`` endpoint needs the API key (``Authorization: Bearer <key>``
or ``X-API-Key: <key>``) when one is configured. ``/metrics``, ``/healthz`` and ``/readyz``
are open (put the port behind your network policy). Bad input gets a 4xx with
``{"error": "..."}``; see docs/operations.md for each endpoint.
"""

from __future__ import annotations

import heapq
import hmac
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from .broker import BrokerError
from .errors import NotRunning
from .routing import valid_room_name

if TYPE_CHECKING:
    from .app import Gateway

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _body(req: web.Request) -> dict[str, Any]:
    raw = await req.read()
    if not raw:
        raise BadRequest("request body must be a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


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


def build_app(gw: Gateway) -> web.Application:
    key = gw.config.api.api_key

    @web.middleware
    async def guard(req: web.Request, handler: Handler) -> web.StreamResponse:
        if req.path.startswith("/v1/") and key:
            given = req.headers.get("X-API-Key") or req.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), key.encode()):
                return _json({"error": "missing or wrong API key"}, 401)
        try:
            return await handler(req)
        except BadRequest as e:
            return _json({"error": str(e)}, e.status)
        except NotRunning:
            return _json({"error": "the gateway is not running"}, 503)
        except BrokerError as e:
            # Applied on this node; other nodes could not be reached (Redis down).
            return _json({"error": f"broker unavailable: {e}", "local": True}, 503)
        except ValueError as e:
            return _json({"error": str(e)}, 400)
        except web.HTTPException as e:
            return _json({"error": e.reason}, e.status)

    async def publish(req: web.Request) -> web.Response:
        d = await _body(req)
        room = _room(d)
        if "data" not in d:
            raise BadRequest("field 'data' is required")
        res = await gw.publish(room, d["data"], type=_str(d, "type", default="chat"), priority=_prio(d))
        return _json({"room": room, "seq": res.seq, "epoch": res.epoch})

    async def send_user(req: web.Request) -> web.Response:
        d = await _body(req)
        user = req.match_info.get("user") or _str(d, "user")
        if "data" not in d:
            raise BadRequest("field 'data' is required")
        prio = _prio(d)
        await gw.send_user(user, d["data"], type=_str(d, "type", default="push"), priority=2 if prio is None else prio)
        return _json({"user": user, "sent": True})

    async def broadcast(req: web.Request) -> web.Response:
        d = await _body(req)
        if "data" not in d:
            raise BadRequest("field 'data' is required")
        prio = _prio(d)
        await gw.broadcast(d["data"], type=_str(d, "type", default="broadcast"), priority=1 if prio is None else prio)
        return _json({"sent": True})

    async def kick(req: web.Request) -> web.Response:
        d = await _body(req)
        user = _str(d, "user")
        await gw.kick(user, reason=_str(d, "reason", default="kicked")[:120])
        return _json({"user": user, "kicked": True})

    async def mute(req: web.Request) -> web.Response:
        d = await _body(req)
        room = _room(d)
        user = _str(d, "user", required=False) or None
        wl = d.get("whitelist", [])
        if not isinstance(wl, list) or not all(isinstance(u, str) for u in wl):
            raise BadRequest("field 'whitelist' must be a list of user ids")
        await gw.mute(room, user, _num(d, "seconds"), wl)
        return _json({"room": room, "user": user, "muted": True})

    async def unmute(req: web.Request) -> web.Response:
        d = await _body(req)
        room = _room(d)
        user = _str(d, "user", required=False) or None
        await gw.unmute(room, user)
        return _json({"room": room, "user": user, "muted": False})

    async def ban(req: web.Request) -> web.Response:
        d = await _body(req)
        room = _room(d, star=True)
        user = _str(d, "user")
        await gw.ban(room, user, _num(d, "seconds"))
        return _json({"room": room, "user": user, "banned": True})

    async def unban(req: web.Request) -> web.Response:
        d = await _body(req)
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

    app = web.Application(middlewares=[guard], client_max_size=1 << 20)
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
    r.add_get("/v1/stats", stats)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/metrics", metrics)
    return app


async def start_api(gw: Gateway) -> web.AppRunner:
    runner = web.AppRunner(build_app(gw), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, gw.config.api.host, gw.config.api.port, reuse_address=True)
    await site.start()
    return runner
