"""Client requests of protocol v1, parsed and shape-checked in one place.

:func:`parse` turns the bytes of one client message into a typed request, or raises
:class:`BadRequest` with the error code and a client-safe message. Every check of a
request's *shape* happens here, before any policy, rate limit or hook runs; policy
(may this user join that room?) is decided later, by the app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .codes import ErrorCode

__all__ = ["MAX_CID_LEN", "MAX_HISTORY", "MAX_PAGE", "BadRequest", "History", "Join", "Leave", "Ping", "Publish", "Request", "Resume", "parse", "request_id"]

#: The most history messages a join may ask for (``history``); larger asks are capped.
MAX_HISTORY = 50
#: Most messages in one `history` page.
MAX_PAGE = 100
#: Longest client message id (``cid``) accepted for idempotent publishes.
MAX_CID_LEN = 64
_MAX_TYPE_LEN = 64


class BadRequest(Exception):
    """A request that is not well formed: answered with an error frame carrying ``code``
    and ``id`` (when the request had a usable one)."""

    def __init__(self, code: int, message: str, req_id: Any = None) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.id = req_id


@dataclass(slots=True, frozen=True)
class Resume:
    """``resume: {"seq": N, "epoch": "E"}``: the last message the client has."""

    seq: int
    epoch: str


@dataclass(slots=True)
class Join:
    id: Any
    room: str
    history: int = 0
    resume: Resume | None = None


@dataclass(slots=True)
class Leave:
    id: Any
    room: str


@dataclass(slots=True)
class Publish:
    """``size`` is the request's size in bytes (the route's ``max_message_bytes`` applies);
    ``cid`` the client's message id, which makes a retried publish idempotent."""

    id: Any
    room: str
    type: str
    data: Any
    size: int
    cid: str | None = None


@dataclass(slots=True)
class Ping:
    id: Any


@dataclass(slots=True)
class History:
    """A page of a room's messages before ``before_seq`` (None: the newest), at most
    ``limit`` (:data:`MAX_PAGE`)."""

    id: Any
    room: str
    before_seq: int | None = None
    limit: int = 50


Request = Join | Leave | Publish | Ping | History


def _room(msg: dict[str, Any], rid: Any) -> str:
    room = msg.get("room")
    if not isinstance(room, str) or not room:
        raise BadRequest(ErrorCode.BAD_REQUEST, "missing field: room", rid)
    return room


def _id(msg: dict[str, Any]) -> Any:
    rid = msg.get("id")
    # Echoed back verbatim: numbers and short strings only, so an error frame never
    # carries a client's megabyte-sized "id" back to it.
    if rid is None or (isinstance(rid, (int, float)) and not isinstance(rid, bool)) or (isinstance(rid, str) and len(rid) <= 64):
        return rid
    raise BadRequest(ErrorCode.BAD_REQUEST, "id must be a number or a string of at most 64 characters")


def parse(data: bytes, binary: bool = False) -> Request:
    """Parse one client message. Raises :class:`BadRequest` (4000 bad request, 4001
    unknown op)."""
    if binary:
        raise BadRequest(ErrorCode.BAD_REQUEST, "binary frames are not supported; send JSON text")
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BadRequest(ErrorCode.BAD_REQUEST, "invalid JSON") from None
    if not isinstance(msg, dict):
        raise BadRequest(ErrorCode.BAD_REQUEST, "a request must be a JSON object")
    rid = _id(msg)
    op = msg.get("op")
    if op == "publish":
        room = _room(msg, rid)
        mtype = msg.get("type", "chat")
        if not isinstance(mtype, str) or not mtype or len(mtype) > _MAX_TYPE_LEN:
            raise BadRequest(ErrorCode.BAD_REQUEST, "type must be a short string", rid)
        if "data" not in msg:
            raise BadRequest(ErrorCode.BAD_REQUEST, "missing field: data", rid)
        cid = msg.get("cid")
        if cid is not None and not (isinstance(cid, str) and 0 < len(cid) <= MAX_CID_LEN):
            raise BadRequest(ErrorCode.BAD_REQUEST, f"cid must be a string of 1..{MAX_CID_LEN} characters", rid)
        return Publish(rid, room, mtype, msg["data"], len(data), cid)
    if op == "join":
        room = _room(msg, rid)
        history = msg.get("history", 0)
        if not isinstance(history, int) or isinstance(history, bool) or history < 0:
            raise BadRequest(ErrorCode.BAD_REQUEST, "history must be a non-negative integer", rid)
        resume = msg.get("resume")
        res = None
        if resume is not None:
            seq = resume.get("seq") if isinstance(resume, dict) else None
            epoch = resume.get("epoch", "") if isinstance(resume, dict) else None
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or not isinstance(epoch, str) or len(epoch) > 64:
                raise BadRequest(ErrorCode.BAD_REQUEST, 'resume must be {"seq": int, "epoch": str}', rid)
            res = Resume(seq, epoch)
        return Join(rid, room, min(history, MAX_HISTORY), res)
    if op == "leave":
        return Leave(rid, _room(msg, rid))
    if op == "history":
        room = _room(msg, rid)
        before = msg.get("before_seq")
        if before is not None and (not isinstance(before, int) or isinstance(before, bool) or before < 1):
            raise BadRequest(ErrorCode.BAD_REQUEST, "before_seq must be a positive integer", rid)
        limit = msg.get("limit", 50)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"limit must be 1..{MAX_PAGE}", rid)
        return History(rid, room, before, limit)
    if op == "ping":
        return Ping(rid)
    if not isinstance(op, str):
        raise BadRequest(ErrorCode.BAD_REQUEST, "missing field: op", rid)
    raise BadRequest(ErrorCode.UNKNOWN_OP, f"unknown op {op[:32]!r}", rid)


def request_id(data: bytes) -> Any:
    """The ``id`` an error about ``data`` echoes, by the same rule as :func:`parse`, without
    checking the rest (for requests refused before they are handled)."""
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(msg, dict):
        return None
    try:
        return _id(msg)
    except BadRequest:
        return None
