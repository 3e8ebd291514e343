"""Client requests of protocol v1, parsed and shape-checked in one place.

:func:`parse` turns the bytes of one client message into a typed request, or raises
:class:`BadRequest` with the error code and a client-safe message. Every check of a
request's *shape* happens here, before any policy, rate limit or hook runs; policy
(may this user join that room?) is decided later, by the app.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from .codes import ErrorCode

__all__ = [
    "BUILTIN_OPS", "MAX_CID_LEN", "MAX_HISTORY", "MAX_PAGE", "MAX_PAGE_FORWARD", "BadRequest", "Create", "Custom", "History", "Invite", "Join", "Leave",
    "Ping", "Publish", "Read", "Recall", "Remove", "Request", "Resume", "Sync", "Typing", "is_op_name", "parse", "request_id",
]

#: The most history messages a join may ask for (``history``); larger asks are capped.
MAX_HISTORY = 50
#: Most messages in one `history` page (paging forward with ``after_seq``: more).
MAX_PAGE = 100
MAX_PAGE_FORWARD = 200
#: ``sync``: most conversations per page, most unread messages per conversation.
MAX_SYNC_CONVS, MAX_SYNC_MSGS = 200, 50
#: ``create``/``invite``: most users in one request; largest ``meta`` (bytes of JSON).
MAX_USERS, MAX_META_BYTES = 500, 4096
#: Longest client message id (``cid``) accepted for idempotent publishes.
MAX_CID_LEN = 64
_MAX_TYPE_LEN = 64

#: The ops of the protocol itself; a plugin's op (``on_request``) may not take these names.
BUILTIN_OPS = frozenset({"join", "leave", "publish", "ping", "history", "sync", "read", "recall", "typing", "create", "invite", "remove"})
_OP_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}(\.[a-z][a-z0-9_]{0,31}){0,3}")


def is_op_name(op: str) -> bool:
    """Whether ``op`` may name a plugin's op: lower-case words joined by dots
    (``cs.open``), at most 4 parts of 32 characters."""
    return _OP_NAME.fullmatch(op) is not None


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
    """A page of a room's messages before ``before_seq`` (None: the newest), or after
    ``after_seq`` (paging forward), at most ``limit``."""

    id: Any
    room: str
    before_seq: int | None = None
    limit: int = 50
    after_seq: int | None = None


@dataclass(slots=True)
class Sync:
    """Conversations changed since ``since`` (a previous ``cursor``; 0: all), ``limit``
    per page, ``msgs`` newest unread messages each, ``before`` = the previous page's
    ``next`` (activity, room)."""

    id: Any
    since: int = 0
    limit: int = 100
    msgs: int = 20
    before: tuple[int, str] | None = None


@dataclass(slots=True)
class Read:
    id: Any
    room: str
    seq: int


@dataclass(slots=True)
class Recall:
    id: Any
    room: str
    seq: int


@dataclass(slots=True)
class Typing:
    id: Any
    room: str


@dataclass(slots=True)
class Create:
    """A new group: ``room`` given or None (the server picks an id), ``members`` besides
    the creator, ``meta`` the JSON text of an object."""

    id: Any
    kind: str
    room: str | None
    members: list[str]
    meta: bytes


@dataclass(slots=True)
class Invite:
    id: Any
    room: str
    users: list[str]


@dataclass(slots=True)
class Remove:
    id: Any
    room: str
    user: str


@dataclass(slots=True)
class Custom:
    """An op the protocol does not define, for a plugin's ``on_request`` to answer:
    ``msg`` is the whole request object (``op`` and ``id`` included), ``size`` its bytes.
    Whether a plugin answers ``op`` is decided by the app (4001 when none does)."""

    id: Any
    op: str
    msg: dict[str, Any]
    size: int


Request = Join | Leave | Publish | Ping | History | Sync | Read | Recall | Typing | Create | Invite | Remove | Custom


def _room(msg: dict[str, Any], rid: Any) -> str:
    room = msg.get("room")
    if not isinstance(room, str) or not room:
        raise BadRequest(ErrorCode.BAD_REQUEST, "missing field: room", rid)
    return room


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(msg: dict[str, Any], key: str, low: int, rid: Any) -> int | None:
    v = msg.get(key)
    if v is None:
        return None
    if not _is_int(v) or v < low or v > 2**62:
        raise BadRequest(ErrorCode.BAD_REQUEST, f"{key} must be an integer >= {low}", rid)
    return int(v)


def _users(msg: dict[str, Any], key: str, rid: Any, allow_empty: bool = False) -> list[str]:
    users = msg.get(key, [] if allow_empty else None)
    if not isinstance(users, list) or not all(isinstance(u, str) and 0 < len(u) <= 128 for u in users) or len(users) > MAX_USERS:
        raise BadRequest(ErrorCode.BAD_REQUEST, f"{key} must be a list of at most {MAX_USERS} user ids", rid)
    if not users and not allow_empty:
        raise BadRequest(ErrorCode.BAD_REQUEST, f"{key} must name at least one user", rid)
    return list(dict.fromkeys(users))


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
        before = _opt_int(msg, "before_seq", 1, rid)
        after = _opt_int(msg, "after_seq", 0, rid)
        if before is not None and after is not None and after >= before:
            raise BadRequest(ErrorCode.BAD_REQUEST, "after_seq must be below before_seq", rid)
        top = MAX_PAGE_FORWARD if after is not None else MAX_PAGE
        limit = msg.get("limit", 50)
        if not _is_int(limit) or not 1 <= limit <= top:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"limit must be 1..{top}", rid)
        return History(rid, room, before, limit, after)
    if op == "ping":
        return Ping(rid)
    if op == "sync":
        since = _opt_int(msg, "since", 0, rid) or 0
        limit = _opt_int(msg, "limit", 1, rid) or 100
        msgs = _opt_int(msg, "msgs", 0, rid)
        if limit > MAX_SYNC_CONVS or (msgs is not None and msgs > MAX_SYNC_MSGS):
            raise BadRequest(ErrorCode.BAD_REQUEST, f"limit must be 1..{MAX_SYNC_CONVS} and msgs 0..{MAX_SYNC_MSGS}", rid)
        before = msg.get("before")
        if before is not None and not (
            isinstance(before, list) and len(before) == 2 and _is_int(before[0]) and isinstance(before[1], str) and len(before[1]) <= 128
        ):
            raise BadRequest(ErrorCode.BAD_REQUEST, "before must be the next of the previous page ([activity, room])", rid)
        return Sync(rid, since, limit, 20 if msgs is None else msgs, (before[0], before[1]) if before is not None else None)
    if op in ("read", "recall"):
        room = _room(msg, rid)
        seq = _opt_int(msg, "seq", 1 if op == "recall" else 0, rid)
        if seq is None:
            raise BadRequest(ErrorCode.BAD_REQUEST, "missing field: seq", rid)
        return Read(rid, room, seq) if op == "read" else Recall(rid, room, seq)
    if op == "typing":
        return Typing(rid, _room(msg, rid))
    if op == "create":
        kind = msg.get("kind", "group")
        if kind != "group":
            raise BadRequest(ErrorCode.BAD_REQUEST, "kind must be 'group' (a dm is created by its first message)", rid)
        new_room = msg.get("room")
        if new_room is not None and (not isinstance(new_room, str) or not new_room):
            raise BadRequest(ErrorCode.BAD_REQUEST, "room must be a conversation id", rid)
        meta = msg.get("meta", {})
        if not isinstance(meta, dict):
            raise BadRequest(ErrorCode.BAD_REQUEST, "meta must be a JSON object", rid)
        meta_json = orjson.dumps(meta)
        if len(meta_json) > MAX_META_BYTES:
            raise BadRequest(ErrorCode.BAD_REQUEST, f"meta must be at most {MAX_META_BYTES} bytes of JSON", rid)
        return Create(rid, kind, new_room, _users(msg, "members", rid, allow_empty=True), meta_json)
    if op == "invite":
        return Invite(rid, _room(msg, rid), _users(msg, "users", rid))
    if op == "remove":
        room = _room(msg, rid)
        user = msg.get("user")
        if not isinstance(user, str) or not user or len(user) > 128:
            raise BadRequest(ErrorCode.BAD_REQUEST, "user must be a user id", rid)
        return Remove(rid, room, user)
    if not isinstance(op, str):
        raise BadRequest(ErrorCode.BAD_REQUEST, "missing field: op", rid)
    if is_op_name(op):
        return Custom(rid, op, msg, len(data))
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
