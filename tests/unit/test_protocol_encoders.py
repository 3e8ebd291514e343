"""Frame encoders of gateway.protocol: the spliced room message is byte-identical to
orjson's encoding of the equivalent dict, and every frame is valid JSON."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest
from gateway import protocol as P

DATA: list[Any] = [
    None,
    0,
    -1,
    2**63 - 1,
    -(2**63),
    1.5,
    1e-7,
    True,
    "",
    "plain",
    'quo"te \\ back\\slash',
    "ctl \x00\x01\x1f\n\t\r",
    "unicode ünïcødé 中文 😀 \u2028\u2029",
    [],
    {},
    [1, "a", None, {"k": [True, False]}],
    {"text": "hi", "nested": {"deep": [1, 2, {"x": "y"}]}, "emoji": "🎁"},
]


def _expected(room: str, seq: int, epoch: str, mtype: str, prio: int, sender: str | None, data: Any, ts: int) -> bytes:
    return orjson.dumps({"op": "msg", "room": room, "seq": seq, "epoch": epoch, "type": mtype, "prio": prio, "from": sender, "data": data, "ts": ts})


@pytest.mark.parametrize("data", DATA, ids=lambda d: repr(d)[:30])
@pytest.mark.parametrize("sender", ["u1", None, "名字\"x"])
def test_message_parts_splice_equals_orjson(data: Any, sender: str | None) -> None:
    room, mtype, prio, ts = "live:42", "chat", 1, 1732262400123
    head, tail = P.message_parts(room, mtype, prio, sender, data, ts)
    for seq, epoch in ((0, ""), (1, "k3j9"), (2**53, "e\"p")):
        frame = P.splice(head, seq, epoch, tail)
        assert frame == _expected(room, seq, epoch, mtype, prio, sender, data, ts)
        assert frame.startswith(b'{"op":"msg",')
        assert orjson.loads(frame)["data"] == data


def test_random_messages_equal_orjson() -> None:
    rng = random.Random(1234)
    alphabet = "abcXYZ019:_-.@ \"\\/\n\u00e9\u4e2d\U0001f600"

    def rstr(n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, n)))

    def rvalue(depth: int = 0) -> Any:
        kind = rng.randint(0, 6 if depth < 3 else 3)
        if kind == 0:
            return rng.randint(-(2**62), 2**62)
        if kind == 1:
            return rng.choice([None, True, False, rng.random() * 1e6])
        if kind in (2, 3):
            return rstr(20)
        if kind == 4:
            return [rvalue(depth + 1) for _ in range(rng.randint(0, 4))]
        return {rstr(8): rvalue(depth + 1) for _ in range(rng.randint(0, 4))}

    for _ in range(500):
        room, mtype, sender, epoch = rstr(30), rstr(10), rng.choice([None, rstr(12)]), rstr(8)
        prio, seq, ts, data = rng.randint(0, 2), rng.randint(0, 2**40), rng.randint(0, 2**45), rvalue()
        head, tail = P.message_parts(room, mtype, prio, sender, data, ts)
        assert P.splice(head, seq, epoch, tail) == _expected(room, seq, epoch, mtype, prio, sender, data, ts)


def test_other_frames() -> None:
    c = orjson.loads(P.connected("n1-42", "u1", 30, "n1"))
    assert list(c) == ["op", "session", "user", "heartbeat", "ts", "node"]
    assert (c["op"], c["session"], c["user"], c["heartbeat"], c["node"]) == ("connected", "n1-42", "u1", 30, "n1")
    assert abs(c["ts"] - P.now_ms()) < 60_000
    assert orjson.loads(P.ack(3, seq=121)) == {"op": "ack", "id": 3, "seq": 121}
    assert orjson.loads(P.ack("x", room="live:1")) == {"op": "ack", "id": "x", "room": "live:1"}
    assert orjson.loads(P.error(None, 4000, "invalid JSON")) == {"op": "error", "id": None, "code": 4000, "message": "invalid JSON"}
    push = orjson.loads(P.push("order", {"id": 7}))
    assert (push["op"], push["type"], push["data"]) == ("push", "order", {"id": 7}) and isinstance(push["ts"], int)
    assert orjson.loads(P.presence_counts("live:1", 10, 9)) == {"op": "presence", "room": "live:1", "conns": 10, "users": 9}
    assert orjson.loads(P.presence_event("cs:7", "join", "agent-3")) == {"op": "presence", "room": "cs:7", "event": "join", "user": "agent-3"}
    assert P.drain(1500) == b'{"op":"drain","retry_ms":1500}'


def test_unserialisable_data_is_refused() -> None:
    with pytest.raises(TypeError):
        P.message_parts("live:1", "chat", 1, "u", object(), 1)


def test_request_id_echoes_by_the_parsers_rule() -> None:
    """The id of a request refused before it is handled (shed behind a slow hook) follows
    the parser's rule: numbers and short strings only."""
    assert P.request_id(b'{"op":"publish","id":7}') == 7
    assert P.request_id(b'{"op":"join","id":"a1"}') == "a1"
    assert P.request_id(b'{"id":"' + b"x" * 65 + b'"}') is None
    assert P.request_id(b'{"id":true}') is None
    assert P.request_id(b"[1]") is None and P.request_id(b"{nope") is None
    with pytest.raises(P.BadRequest):
        P.parse(b'{"op":"join","id":"' + b"x" * 65 + b'","room":"a:b"}')
