"""What both peers share: the slice of docs/protocol.md that gw-load and the bench need.

A peer answers ``join`` with an ack, ``ping`` with a pong, and turns ``publish`` into a
``msg`` envelope broadcast to the room (then acks the publisher). Messages are parsed and
encoded with the standard ``json`` module, as a plain Python server would.
"""

from __future__ import annotations

import json
import resource
import time
from itertools import count

_session = count(1)


def raise_nofile() -> int:
    """Raise the soft fd limit to the hard one; return it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def connected_frame(user: str = "u") -> str:
    return json.dumps({"op": "connected", "session": f"peer-{next(_session)}", "user": user,
                       "heartbeat": 30, "ts": int(time.time() * 1000), "node": "peer"})


class Room:
    __slots__ = ("name", "seq")

    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = 0

    def envelope(self, msg: dict) -> str:
        """The ``msg`` frame for a publish request (advances the room's seq)."""
        self.seq += 1
        return json.dumps({"op": "msg", "room": self.name, "seq": self.seq, "type": msg.get("type", "chat"),
                           "prio": 1, "from": "u", "data": msg.get("data"), "ts": int(time.time() * 1000)},
                          separators=(",", ":"))


def ack(req: dict, **extra) -> str:
    return json.dumps({"op": "ack", "id": req.get("id"), **extra}, separators=(",", ":"))


def pong() -> str:
    return json.dumps({"op": "pong", "ts": int(time.time() * 1000)})


def error(req: dict, code: int, message: str) -> str:
    return json.dumps({"op": "error", "id": req.get("id"), "code": code, "message": message})
