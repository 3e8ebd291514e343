"""The outbox deliverer's decisions without sockets: which prefix of the log can go now
(the gap wait), a room's messages put back in seq order, event ids, Retry-After."""

from __future__ import annotations

import time
from email.utils import formatdate

import orjson
from gateway.app.outbox import Outbox, _Endpoint, _in_room_order, _retry_after
from gateway.config import OutboxConfig, OutboxEndpoint
from gateway.store import OutboxEntry, StoredMessage


def entry(pos: int, room: str, seq: int | None, *, age: float = 0.0, kind: str = "message", body: bytes | None = None) -> OutboxEntry:
    ts = int((time.time() - age) * 1000)
    msg = StoredMessage(room, seq, ts, "chat", 1, "u", b'{"t":1}') if kind == "message" and seq is not None else None
    return OutboxEntry(str(pos), room, kind, ts, seq, msg, body)


def outbox(gap_wait: float = 2.0, **ep: object) -> tuple[Outbox, _Endpoint]:
    cfg = OutboxConfig(endpoints=[OutboxEndpoint(name="crm", url="http://x", **ep)], gap_wait=gap_wait)  # type: ignore[arg-type]
    ob = Outbox(cfg, None, "n1")
    return ob, ob.endpoints[0]


def test_a_young_gap_holds_the_room_and_what_follows_an_old_one_does_not() -> None:
    ob, ep = outbox()
    ep.last_seq["r"] = 4
    # 5 is missing: 6 waits (and everything after it in the log), the entries before go.
    entries = [entry(1, "other", 1), entry(2, "r", 6), entry(3, "other", 2)]
    assert ob._ready(ep, entries) == 1
    # 5 turns up later in the same read: everything goes.
    assert ob._ready(ep, [*entries, entry(4, "r", 5)]) == 4
    # The gap is older than gap_wait: sent as it is.
    assert ob._ready(ep, [entry(1, "r", 6, age=3.0), entry(2, "other", 1)]) == 2
    # A late seq (at or below what was delivered) never holds anything.
    assert ob._ready(ep, [entry(1, "r", 3), entry(2, "r", 5)]) == 2
    # A room seen for the first time starts from its lowest seq in the read.
    assert ob._ready(ep, [entry(1, "new", 8), entry(2, "new", 10)]) == 1
    assert ob._ready(ep, [entry(1, "new", 8), entry(2, "new", 10), entry(3, "new", 9)]) == 3
    # Room events never wait.
    assert ob._ready(ep, [entry(1, "r", None, kind="join", body=b'{"id":"e"}')]) == 1


def test_room_messages_are_put_in_seq_order_in_their_slots() -> None:
    es = [entry(1, "a", 2), entry(2, "b", 1), entry(3, "a", 1), entry(4, "a", None, kind="join", body=b"{}"), entry(5, "a", 3)]
    out = _in_room_order(es)
    assert [(e.room, e.seq) for e in out] == [("a", 1), ("b", 1), ("a", 2), ("a", None), ("a", 3)]


def test_filters_and_event_ids() -> None:
    ob, ep = outbox(rooms=["cs:*"], types=["chat"], events=["message", "kick"])
    assert ep.wants(entry(1, "cs:1", 1)) and not ep.wants(entry(1, "live:1", 1))
    assert not ep.wants(entry(1, "cs:1", None, kind="join", body=b"{}"))
    assert ep.wants(entry(1, "", None, kind="kick", body=b"{}"))  # about a user everywhere
    deleted = OutboxEntry("9", "cs:1", "message", 1, 5, None)
    assert not ep.wants(deleted)
    replay = OutboxEntry("10", "cs:1", "replay", 1, None, None, b'{"id":"msg:cs:1:5"}', "crm")
    assert ep.wants(replay) and not ep.wants(OutboxEntry("11", "cs:1", "replay", 1, None, None, b"{}", "other"))
    eid, room, body = ob._event(entry(1, "cs:1", 7))
    assert (eid, room) == ("msg:cs:1:7", "cs:1")
    assert orjson.loads(body)["data"] == {"t": 1} and orjson.loads(body)["seq"] == 7
    assert ob._event(replay)[0] == "msg:cs:1:5"
    assert ob._event(OutboxEntry("12", "cs:1", "join", 1, None, None, b"not json"))[0] == "log:12"


def test_retry_after() -> None:
    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = _retry_after(formatdate(time.time() + 60, usegmt=True))
    assert later is not None and 55 <= later <= 61
    assert _retry_after(formatdate(time.time() - 60, usegmt=True)) == 0.0
