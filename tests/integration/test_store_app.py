"""The message store through the gateway (issue 14): routes that keep messages, the
``history`` op, the join ack's fallback to the store, the HTTP API (paging, export,
search, erasure), retention, and what survives ``kill -9``. A real gateway process on the
embedded SQLite store, real WebSocket clients.

Routes used (``ROUTES``): ``cs:{id}`` durable (the default's rule), ``live:{id}`` with
durable gifts and archived chat, ``tmp:{id}`` archived with a retention of about a second.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from urllib.parse import quote

import pytest
from support.gateway import GatewayProcess, uniq
from support.http import Reply, arequest
from support.wait import eventually

from gateway.client import GatewayError

ROUTES = """
[[routes]]
pattern = "cs:{id}"
join = "all"
publish = "all"
user_rate = 0
room_rate = 0
store = "durable"
history_size = 5

[[routes]]
pattern = "live:{id}"
join = "all"
publish = "all"
user_rate = 0
room_rate = 0
store = "durable"
durable_types = ["gift"]
recoverable_types = ["chat", "gift"]

[[routes]]
pattern = "tmp:{id}"
join = "all"
publish = "all"
user_rate = 0
room_rate = 0
store = "archive"
retention_days = 0.00002

[[routes]]
pattern = "nohist:{id}"
join = "all"
publish = "all"
user_rate = 0
room_rate = 0
store = "durable"
history_size = 0

[[routes]]
pattern = "plain:{id}"
join = "all"
publish = "all"
user_rate = 0
room_rate = 0

[store]
retention_interval = 0.5
"""


async def call(g: GatewayProcess, method: str, path: str) -> Reply:
    """The raw reply of an API call (the export is NDJSON, not one JSON document)."""
    return await arequest(method, g.api_url + path, None, headers=g._key_headers(True, None), timeout=30.0)


def gateway(path: Path, *sets: str) -> GatewayProcess:
    """A gateway on ``path``/store.db (the same file across restarts of one test)."""
    return GatewayProcess(path, ["limits.client_rate=0", *sets], config=ROUTES)


async def test_durable_message_survives_kill_9_and_the_sequence_continues(tmp_path: Path) -> None:
    g = gateway(tmp_path).start()
    room = f"cs:{uniq()}"
    c = await g.client("alice")
    await c.join(room)
    acks = [await c.publish(room, {"text": f"m{i}"}) for i in range(3)]
    seqs = [a["seq"] for a in acks]
    assert seqs == [1, 2, 3]
    g.signal(signal.SIGKILL)
    g.wait(10)
    g.stopped_by_test = True
    await c.close()
    g.start()
    try:
        c2 = await g.client("bob")
        ack = await c2.join(room, history=10)
        assert [json.loads(json.dumps(m))["data"]["text"] for m in ack["msgs"]] == ["m0", "m1", "m2"]
        assert ack["seq"] == 3
        a4 = await c2.publish(room, {"text": "after restart"})
        assert a4["seq"] == 4, "the room's sequence continues from the store"
        page = await c2.history(room, limit=100)
        assert [m["seq"] for m in page["msgs"]] == [1, 2, 3, 4] and page["more"] is False
        await c2.close()
    finally:
        assert not g.finish()


async def test_cid_retry_across_a_reconnect_stores_once(tmp_path: Path) -> None:
    g = gateway(tmp_path).start()
    room = f"cs:{uniq()}"
    try:
        c = await g.client("carol")
        await c.join(room)
        first = await c.publish(room, {"text": "pay"}, cid="order-1")
        await c.close()
        c = await g.client("carol")
        await c.join(room)
        again = await c.publish(room, {"text": "pay"}, cid="order-1")
        assert again["seq"] == first["seq"] and again.get("dup") is True
        r = await call(g, "GET", f"/v1/rooms/{room}/messages")
        assert r.status == 200
        assert [m["seq"] for m in r.json()["messages"]] == [first["seq"]]
        await c.close()
    finally:
        assert not g.finish()


async def test_history_op_pages_back_beyond_the_ring_and_resume_falls_back_to_the_store(tmp_path: Path) -> None:
    g = gateway(tmp_path).start()
    room = f"cs:{uniq()}"
    try:
        a = await g.client("dora")
        await a.join(room)
        for i in range(30):
            await a.publish(room, {"text": f"n{i}"})
        b = await g.client("eve")
        # The ring holds 5 (history_size): a resume from seq 2 needs the store.
        ack = await b.join(room, resume={"seq": 2, "epoch": (await a.history(room, limit=1))["epoch"]})
        assert ack["recovered"] is True
        assert [m["seq"] for m in ack["msgs"]] == list(range(3, 31))
        pages, before = [], None
        while True:
            p = await b.history(room, before_seq=before, limit=7)
            pages.append([m["seq"] for m in p["msgs"]])
            if not p["more"]:
                break
            before = p["msgs"][0]["seq"]
        assert [s for page in reversed(pages) for s in page] == list(range(1, 31))
        # Not allowed to join: not allowed to read.
        with pytest.raises(GatewayError):
            await b.history("nosuchroute:1")
        await a.close()
        await b.close()
    finally:
        assert not g.finish()


async def test_live_room_keeps_durable_gifts_and_archives_chat(tmp_path: Path) -> None:
    g = gateway(tmp_path).start()
    room = f"live:{uniq()}"
    try:
        c = await g.client("fay")
        await c.join(room)
        await c.publish(room, {"n": 1}, type="chat")
        await c.publish(room, {"n": 2}, type="gift")
        await c.publish(room, {"n": 3}, type="like")  # not recoverable: not kept

        async def stored() -> list[tuple[int, str]]:
            r = await call(g, "GET", f"/v1/rooms/{room}/messages")
            return [(m["seq"], m["type"]) for m in r.json()["messages"]]

        await eventually(lambda: stored(), timeout=10)
        assert await eventually(lambda: _eq(stored(), [(1, "chat"), (2, "gift")]), timeout=10)
        await c.close()
    finally:
        assert not g.finish()


async def _eq(coro: object, want: object) -> bool:
    return await coro == want  # type: ignore[misc]


async def test_export_search_erasure_and_retention(tmp_path: Path) -> None:
    g = gateway(tmp_path).start()
    room, other = f"cs:{uniq()}", f"cs:{uniq()}"
    try:
        u = await g.client("grace")
        v = await g.client("heidi")
        for r in (room, other):
            await u.join(r)
            await v.join(r)
        await u.publish(room, {"text": "您的订单已发货"})
        await v.publish(room, {"text": "谢谢"})
        await u.publish(other, {"text": "order shipped"})
        # Export: NDJSON, one msg frame per line, by room and by user.
        r = await call(g, "GET", f"/v1/export?room={room}")
        lines = [json.loads(x) for x in r.text.splitlines() if x]
        assert [m["data"]["text"] for m in lines] == ["您的订单已发货", "谢谢"]
        r = await call(g, "GET", "/v1/export?user=grace")
        assert sorted(m["room"] for m in map(json.loads, r.text.splitlines())) == sorted([room, other])
        # Search finds Chinese substrings.
        r = await call(g, "GET", "/v1/search?q=" + quote("已发货"))
        assert [m["data"]["text"] for m in r.json()["messages"]] == ["您的订单已发货"]
        # Erasure: grace's messages go, heidi's stay.
        r = await call(g, "DELETE", "/v1/users/grace/messages")
        assert r.json()["deleted"] == 2
        r = await call(g, "GET", f"/v1/export?room={room}")
        assert [json.loads(x)["from"] for x in r.text.splitlines()] == ["heidi"]
        # Retention: tmp rooms keep messages about two seconds.
        tmp = f"tmp:{uniq()}"
        await u.join(tmp)
        await u.publish(tmp, {"text": "short-lived"})
        await eventually(lambda: _count(g, tmp, 1), timeout=10)
        await eventually(lambda: _count(g, tmp, 0), timeout=15)
        # No store for plain rooms: their messages are not kept.
        r = await call(g, "GET", f"/v1/export?room=plain:{uniq()}")
        assert r.text == ""
        await u.close()
        await v.close()
    finally:
        assert not g.finish()


async def _count(g: GatewayProcess, room: str, n: int) -> bool:
    r = await call(g, "GET", f"/v1/rooms/{room}/messages")
    return len(r.json()["messages"]) == n


@pytest.mark.parametrize("bad", ["store.kind=mysql", "store.max_batch=0", "store.synchronous=OFF"])
def test_bad_store_settings_fail_at_start(tmp_path: Path, bad: str) -> None:
    g = gateway(tmp_path, bad)
    with pytest.raises(RuntimeError):
        g.start(timeout=10)
    assert f"configuration error: {bad.split('=', maxsplit=1)[0]}" in g.log_text()
    g.stopped_by_test = True
    g.finish()


async def test_many_concurrent_durable_publishes_are_all_acked_in_order(tmp_path: Path) -> None:
    g = gateway(tmp_path).start()
    room = f"cs:{uniq()}"
    try:
        clients = [await g.client(f"p{i}") for i in range(10)]
        for c in clients:
            await c.join(room)
        acks = await asyncio.gather(*(c.publish(room, {"i": i, "k": k}) for k in range(20) for i, c in enumerate(clients)))
        seqs = sorted(a["seq"] for a in acks)
        assert seqs == list(range(1, 201))
        r = await call(g, "GET", f"/v1/rooms/{room}/messages?limit=100")
        assert [m["seq"] for m in r.json()["messages"]] == list(range(101, 201))
        for c in clients:
            await c.close()
    finally:
        assert not g.finish()


async def test_a_route_without_history_still_keeps_its_messages(tmp_path: Path) -> None:
    """history_size = 0 shows no history on join; the store keeps every message anyway."""
    g = gateway(tmp_path).start()
    room = f"nohist:{uniq()}"
    try:
        c = await g.client("ivan")
        ack = await c.join(room, history=10)
        assert ack["msgs"] == []
        acks = [await c.publish(room, {"n": i}) for i in range(3)]
        assert [a["seq"] for a in acks] == [1, 2, 3]
        page = await c.history(room, limit=10)
        assert [m["data"] for m in page["msgs"]] == [{"n": 0}, {"n": 1}, {"n": 2}]
        await c.close()
    finally:
        assert not g.finish()
