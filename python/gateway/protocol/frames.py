"""Server frames of client protocol v1 (docs/protocol.md).

Every frame Python sends is built here; the engine builds only its own (``pong``, the
``batch`` envelope and its shed/rate-limit errors, in ``rust/gateway-core/src/protocol/
frames.rs``). Encoders return ``bytes`` ready for the engine; nothing here touches a socket.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

PROTOCOL_VERSION = 1
SUBPROTOCOLS = ("gateway.v1",)

_dumps = orjson.dumps


def now_ms() -> int:
    """Server wall-clock time in milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def connected(session: str, user: str, heartbeat: int, node: str, idle_timeout: float | None = None) -> bytes:
    """The first frame. ``idle_timeout``: seconds of client silence before the server
    closes with 4000 (sent as an integer when it is one)."""
    frame: dict[str, Any] = {"op": "connected", "session": session, "user": user, "heartbeat": heartbeat, "ts": now_ms(), "node": node}
    if idle_timeout is not None:
        frame["idle_timeout"] = int(idle_timeout) if float(idle_timeout).is_integer() else idle_timeout
    return _dumps(frame)


def ack(req_id: Any, **fields: Any) -> bytes:
    return _dumps({"op": "ack", "id": req_id, **fields})


def error(req_id: Any, code: int, message: str) -> bytes:
    return _dumps({"op": "error", "id": req_id, "code": int(code), "message": message})


def join_ack(
    req_id: Any, room: str, seq: int, epoch: str, msgs: list[bytes], conns: int, users: int,
    recovered: bool | None = None, degraded: bool = False,
) -> bytes:
    """The ``ack`` of a ``join``: the room's position, history (complete ``msg`` frames,
    spliced in without re-encoding) and counts."""
    reply: dict[str, Any] = {
        "op": "ack", "id": req_id, "room": room, "seq": seq, "epoch": epoch,
        "msgs": [orjson.Fragment(m) for m in msgs], "conns": conns, "users": users,
    }
    if recovered is not None:
        reply["recovered"] = recovered
    if degraded:
        reply["degraded"] = True
    return _dumps(reply)


def history_ack(req_id: Any, room: str, epoch: str, msgs: list[bytes], more: bool) -> bytes:
    """The ``ack`` of a ``history`` request: a page of ``msg`` frames (oldest first,
    spliced in without re-encoding) and whether older ones remain (``more``)."""
    return _dumps({"op": "ack", "id": req_id, "room": room, "epoch": epoch, "msgs": [orjson.Fragment(m) for m in msgs], "more": more})


def push(msg_type: str, data: Any, **extra: Any) -> bytes:
    """A ``push`` to one user; ``extra``: ``room``/``seq`` when it is also stored as a
    notice (clients that sync conversations get that ``msg`` and skip this push)."""
    return _dumps({"op": "push", "type": msg_type, "data": data, "ts": now_ms(), **extra})


def presence_counts(room: str, conns: int, users: int) -> bytes:
    return _dumps({"op": "presence", "room": room, "conns": conns, "users": users})


def presence_event(room: str, event: str, user: str) -> bytes:
    return _dumps({"op": "presence", "room": room, "event": event, "user": user})


def drain(retry_ms: int) -> bytes:
    return _dumps({"op": "drain", "retry_ms": retry_ms})


def message_parts(room: str, msg_type: str, prio: int, sender: str | None, data: Any, ts: int) -> tuple[bytes, bytes]:
    """A room message envelope split around its sequence number and epoch.

    The full frame is ``head + seq + b',"epoch":' + json(epoch) + tail``. Brokers splice
    in the sequence number they assign (the Redis broker does it inside Lua), so a message
    is encoded once, whatever the number of nodes and members.
    """
    head = b'{"op":"msg","room":' + _dumps(room) + b',"seq":'
    tail = (
        b',"type":' + _dumps(msg_type) + b',"prio":' + str(prio).encode() + b',"from":' + _dumps(sender)
        + b',"data":' + _dumps(data) + b',"ts":' + str(ts).encode() + b"}"
    )
    return head, tail


def seq_of(frame: bytes) -> int:
    """The ``seq`` of a ``msg`` frame built by :func:`message_parts` (it follows
    ``"seq":`` near the start)."""
    i = frame.index(b'"seq":') + 6
    return int(frame[i:frame.index(b",", i)])


def splice(head: bytes, seq: int, epoch: str, tail: bytes) -> bytes:
    """Join :func:`message_parts` with the assigned ``seq`` and ``epoch``."""
    return head + str(seq).encode() + b',"epoch":' + _dumps(epoch) + tail


# ---- conversations (protocol 1.1) ---------------------------------------------------------


def read_event(room: str, user: str, seq: int) -> bytes:
    """``user`` has read ``room`` up to ``seq`` (their other devices; a dm's peer)."""
    return _dumps({"op": "read", "room": room, "user": user, "seq": seq})


def recall_event(room: str, seq: int, by: str, ts: int) -> bytes:
    return _dumps({"op": "recall", "room": room, "seq": seq, "by": by, "ts": ts})


def typing_event(room: str, user: str) -> bytes:
    return _dumps({"op": "typing", "room": room, "user": user})


def conv_event(room: str, event: str, role: str | None = None) -> bytes:
    """The connection's user was ``added`` to or ``removed`` from ``room`` (or their
    membership was ``updated``)."""
    frame: dict[str, Any] = {"op": "conv", "room": room, "event": event}
    if role:
        frame["role"] = role
    return _dumps(frame)
