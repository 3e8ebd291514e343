"""Error, close and priority codes of client protocol v1, defined once for Python.

The same numbers are defined once in Rust (``rust/gateway-core/src/protocol/codes.rs``)
and once in JavaScript (``clients/js/src/codes.js``); ``tests/unit/test_codes.py`` checks
all three against the tables in ``docs/protocol.md``.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["CloseCode", "ErrorCode", "Priority"]


class ErrorCode(IntEnum):
    """``code`` of an ``error`` frame; the connection stays open."""

    BAD_REQUEST = 4000
    UNKNOWN_OP = 4001
    FORBIDDEN = 4003
    NOT_JOINED = 4004
    NO_ROUTE = 4005
    TOO_LARGE = 4009
    MUTED = 4010
    RATE_LIMITED = 4029
    LIMIT_REACHED = 4030
    #: Conversations: not a member / recall not allowed / unknown / too many members.
    NOT_MEMBER = 4031
    RECALL_DENIED = 4032
    NO_CONVERSATION = 4033
    TOO_MANY_MEMBERS = 4034
    #: Media messages: no such file (or removed) / uploaded by someone else / its kind is
    #: not the message type, or the route takes no such kind / already sent elsewhere.
    MEDIA_NOT_FOUND = 4035
    MEDIA_NOT_YOURS = 4036
    MEDIA_KIND = 4037
    MEDIA_USED = 4038
    REJECTED = 4050
    HOOK_TIMEOUT = 4080
    INTERNAL = 5000
    #: A durable message could not be committed: retry with the same ``cid``.
    STORE_UNAVAILABLE = 5030


class CloseCode(IntEnum):
    """WebSocket close codes the server sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    INVALID_PAYLOAD = 1007
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    RESTART = 1012
    TRY_AGAIN_LATER = 1013
    IDLE = 4000
    AUTH = 4001
    KICKED = 4003
    REPLACED = 4004
    SLOW = 4008
    ABUSE = 4029


class Priority(IntEnum):
    """Delivery priority: under backpressure ``LOW`` is dropped first, ``HIGH`` never
    (a client that cannot take high-priority traffic is closed with 4008)."""

    LOW = 0
    NORMAL = 1
    HIGH = 2
