"""The desk's HTTP API (API key): the company's own admin and systems
(docs/customer-service.md, "HTTP API"). Added with :meth:`Gateway.http_route`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from .desk import Actor, session_json

if TYPE_CHECKING:
    from ..app.node import Gateway
    from .desk import Desk

__all__ = ["add_routes"]

_STATES = ("bot", "queued", "assigned", "closed", "offline")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def _body(req: web.Request) -> dict[str, Any]:
    """The JSON object body (none: ``{}``), by the API's read deadline like every route's."""
    from ..api import read_json

    return await read_json(req, empty=True)


def _user(d: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    from ..api import BadRequest

    v = d.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v) > 128:
        raise BadRequest(f"field {key!r} must be a user id")
    return v


def _range(q: Mapping[str, str]) -> tuple[int, int]:
    """``from``/``to``: ms since the Unix epoch, ``to`` exclusive (by default: up to and
    including this ms), ``from`` a day before ``to`` by default."""
    from ..api import BadRequest

    now = int(time.time() * 1000) + 1
    try:
        until = int(q.get("to", now))
        since = int(q.get("from", until - 86_400_000))
    except ValueError:
        raise BadRequest("from and to must be integers (ms since the Unix epoch)") from None
    if since < 0 or until <= since:
        raise BadRequest("from must be >= 0 and before to")
    return since, until


def _int(q: Mapping[str, str], key: str, default: int, lo: int, hi: int) -> int:
    from ..api import BadRequest

    try:
        v = int(q.get(key, default))
    except ValueError:
        raise BadRequest(f"{key} must be an integer") from None
    if not lo <= v <= hi:
        raise BadRequest(f"{key} must be in {lo}..{hi}")
    return v


class _Agg:
    __slots__ = ("abandoned", "answered", "handle", "handled", "offline", "rated", "score", "sessions", "wait", "wait_max", "waited")

    def __init__(self) -> None:
        self.sessions = self.answered = self.abandoned = self.offline = self.waited = self.handled = self.rated = 0
        self.wait = self.handle = self.score = 0.0
        self.wait_max = 0.0

    def add(self, s: Any) -> None:
        self.sessions += 1
        if s.state == "offline":
            self.offline += 1
            return
        if s.first_response_at is not None:
            self.answered += 1
            w = max(0.0, (s.first_response_at - (s.queued_at or s.assigned_at or s.opened_at)) / 1000)
            self.waited += 1
            self.wait += w
            self.wait_max = max(self.wait_max, w)
        elif s.state == "closed" and s.agent is None and s.queued_at is not None:
            self.abandoned += 1
        if s.state == "closed" and s.assigned_at is not None and s.closed_at is not None:
            self.handled += 1
            self.handle += max(0.0, (s.closed_at - s.assigned_at) / 1000)
        if s.rating is not None:
            self.rated += 1
            self.score += s.rating

    def json(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions, "answered": self.answered, "abandoned": self.abandoned, "offline": self.offline,
            "wait_first_response_avg_s": round(self.wait / self.waited, 3) if self.waited else None,
            "wait_first_response_max_s": round(self.wait_max, 3) if self.waited else None,
            "handle_avg_s": round(self.handle / self.handled, 3) if self.handled else None,
            "ratings": self.rated, "rating_avg": round(self.score / self.rated, 3) if self.rated else None,
        }


def add_routes(desk: Desk, gw: Gateway) -> None:
    from ..api import BadRequest

    async def session_of(req: web.Request) -> Any:
        return await desk._session(req.match_info["id"])

    async def open_session(req: web.Request) -> web.StreamResponse:
        d = await _body(req)
        shopper = _user(d, "shopper")
        assert shopper is not None
        dept = d.get("department")
        if dept is not None and not isinstance(dept, str):
            raise BadRequest("department must be a string")
        s, resumed, offline = await desk.open(shopper, dept, d.get("card"), via="api")
        out = session_json(s)
        out["resumed"] = resumed
        if offline is not None:
            out["offline"] = offline
        return _json(out, 200 if resumed else 201)

    async def list_sessions(req: web.Request) -> web.StreamResponse:
        q = req.query
        state = q.get("state")
        states = None
        if state:
            states = tuple(state.split(","))
            if any(x not in _STATES for x in states):
                raise BadRequest(f"state must be among {', '.join(_STATES)}")
        rows = await desk.store.cs_sessions(states=states, department=q.get("department") or None, agent=q.get("agent") or None,
                                            limit=_int(q, "limit", 100, 1, 1000), offset=_int(q, "offset", 0, 0, 10_000_000))
        return _json({"sessions": [session_json(s) for s in rows]})

    async def get_session(req: web.Request) -> web.StreamResponse:
        s = await session_of(req)
        out = session_json(s)
        out["context"] = await desk.context(s)
        return _json(out)

    async def accept(req: web.Request) -> web.StreamResponse:
        d = await _body(req)
        agent = _user(d, "agent")
        assert agent is not None
        s = await desk.accept(Actor(agent, "agent"), req.match_info["id"], force=bool(d.get("force", False)))
        return _json(session_json(s))

    async def transfer(req: web.Request) -> web.StreamResponse:
        d = await _body(req)
        to_agent, to_dept, note = _user(d, "agent", required=False), d.get("department"), d.get("note")
        if to_dept is not None and not isinstance(to_dept, str):
            raise BadRequest("department must be a string")
        if note is not None and (not isinstance(note, str) or len(note) > 4000):
            raise BadRequest("note must be a string of at most 4000 characters")
        s = await desk.transfer(Actor("api", "api"), req.match_info["id"], to_agent, to_dept, note)
        return _json(session_json(s))

    async def close(req: web.Request) -> web.StreamResponse:
        d = await _body(req)
        by = d.get("by", "api")
        if not isinstance(by, str) or not by:
            raise BadRequest("by must be a string")
        s = await desk.close(Actor("api", "api"), req.match_info["id"], reason=by)
        return _json(session_json(s))

    async def notes(req: web.Request) -> web.StreamResponse:
        d = await _body(req)
        text = d.get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > 4000:
            raise BadRequest("text must be a non-empty string of at most 4000 characters")
        agent = _user(d, "agent", required=False)
        seq = await desk.note(Actor(agent, "agent") if agent else Actor("api", "api"), req.match_info["id"], text)
        return _json({"seq": seq})

    async def rate(req: web.Request) -> web.StreamResponse:
        d = await _body(req)
        s = await desk.rate(Actor("api", "api"), req.match_info["id"], d.get("score"), d.get("comment"))
        return _json(session_json(s))

    async def agents(req: web.Request) -> web.StreamResponse:
        return _json({"agents": [a.json() for a in await desk.eng.agents()]})

    async def put_agent(req: web.Request) -> web.StreamResponse:
        d = await _body(req)
        a = await desk.set_status(req.match_info["user"], d.get("status"), d.get("capacity"))
        return _json(a.json())

    async def report(req: web.Request) -> web.StreamResponse:
        since, until = _range(req.query)
        depts: dict[str, _Agg] = {}
        agents: dict[str, _Agg] = {}
        total = _Agg()
        async for s in desk.store.cs_between(since, until):
            total.add(s)
            depts.setdefault(s.department, _Agg()).add(s)
            who = s.agent or s.last_agent
            if who:
                agents.setdefault(who, _Agg()).add(s)
        return _json({"from": since, "to": until, "total": total.json(),
                      "departments": {k: v.json() for k, v in sorted(depts.items())},
                      "agents": {k: v.json() for k, v in sorted(agents.items())}})

    async def ratings(req: web.Request) -> web.StreamResponse:
        since, until = _range(req.query)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(req)
        async for s in desk.store.cs_between(since, until, by="rated_at"):
            line = {"session": s.id, "shopper": s.shopper, "agent": s.agent or s.last_agent, "department": s.department,
                    "score": s.rating, "comment": s.rating_comment, "rated_at": s.rated_at, "closed_at": s.closed_at}
            await resp.write(orjson.dumps(line) + b"\n")
        await resp.write_eof()
        return resp

    async def tickets(req: web.Request) -> web.StreamResponse:
        since, until = _range(req.query)
        rows = await desk.store.cs_tickets(since, until, limit=_int(req.query, "limit", 1000, 1, 10_000))
        return _json({"tickets": [{"ticket": t.id, "shopper": t.shopper, "department": t.department, "session": t.session,
                                   "fields": orjson.Fragment(t.fields), "created_at": t.created_at} for t in rows]})

    for method, path, fn in (
        ("POST", "/v1/cs/sessions", open_session),
        ("GET", "/v1/cs/sessions", list_sessions),
        ("GET", "/v1/cs/sessions/{id}", get_session),
        ("POST", "/v1/cs/sessions/{id}/accept", accept),
        ("POST", "/v1/cs/sessions/{id}/transfer", transfer),
        ("POST", "/v1/cs/sessions/{id}/close", close),
        ("POST", "/v1/cs/sessions/{id}/notes", notes),
        ("POST", "/v1/cs/sessions/{id}/rate", rate),
        ("GET", "/v1/cs/agents", agents),
        ("PUT", "/v1/cs/agents/{user}", put_agent),
        ("GET", "/v1/cs/report", report),
        ("GET", "/v1/cs/ratings", ratings),
        ("GET", "/v1/cs/tickets", tickets),
    ):
        gw.http_route(method, path, fn)
