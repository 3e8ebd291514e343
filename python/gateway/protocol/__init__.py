"""Client protocol v1 (``docs/protocol.md``): codes, the request parser, server frames.

- :mod:`.codes`: :class:`ErrorCode`, :class:`CloseCode`, :class:`Priority` (defined once);
- :mod:`.requests`: :func:`parse` turns a client message into a typed request;
- :mod:`.frames`: every server frame Python sends.
"""

from .codes import CloseCode, ErrorCode, Priority
from .frames import (
    PROTOCOL_VERSION,
    SUBPROTOCOLS,
    ack,
    connected,
    drain,
    error,
    join_ack,
    message_parts,
    now_ms,
    presence_counts,
    presence_event,
    push,
    splice,
)
from .requests import BadRequest, Create, History, Invite, Join, Leave, Ping, Publish, Read, Recall, Remove, Request, Resume, Sync, Typing, parse, request_id

__all__ = [
    "PROTOCOL_VERSION",
    "SUBPROTOCOLS",
    "BadRequest",
    "CloseCode",
    "Create",
    "ErrorCode",
    "History",
    "Invite",
    "Join",
    "Leave",
    "Ping",
    "Priority",
    "Publish",
    "Read",
    "Recall",
    "Remove",
    "Request",
    "Resume",
    "Sync",
    "Typing",
    "ack",
    "connected",
    "drain",
    "error",
    "join_ack",
    "message_parts",
    "now_ms",
    "parse",
    "presence_counts",
    "presence_event",
    "push",
    "request_id",
    "splice",
]
