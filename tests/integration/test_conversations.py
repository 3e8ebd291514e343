"""Conversations through a real gateway (issue 15): dms, groups and notices on the embedded
store, real WebSocket clients. Offline delivery through sync and history, read positions
across devices, recall, removal, idempotent sends, /v1/send into the notice
conversation, and the errors of each op. Two nodes on Redis and PostgreSQL:
tests/integration/test_conversations_cluster.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from support.gateway import GatewayProcess, uniq
from support.wait import eventually

from gateway.client import GatewayClient, GatewayError


ROUTES = """
[[routes]]
pattern = "dm:{a}:{b}"
kind = "dm"
join = "none"
store = "durable"
members_max = 2
user_rate = 0
room_rate = 0

[[routes]]
pattern = "group:{group_id}"
kind = "group"
join = "none"
store = "durable"
members_max = 50
user_rate = 0
room_rate = 0
recall_seconds = 60

[[routes]]
pattern = "notice:{user_id}"
kind = "notice"
join = "none"
publish = "none"
store = "durable"
members_max = 1

[[routes]]
pattern = "*"
"""


def gateway(path: Path, *sets: str, config: str = ROUTES) -> GatewayProcess:
    return GatewayProcess(path, ["limits.client_rate=0", *sets], config=config)


async def api(g: GatewayProcess, method: str, path: str, json: Any = None, *, expect: int = 200, headers: dict[str, str] | None = None) -> Any:
    status, body = await g.api(method, path, json, headers=headers)
    assert status == expect, (status, body)
    return body


async def sync(c: GatewayClient, **kw: Any) -> dict[str, Any]:
    return await c.request("sync", **kw)


def conv(ack: dict[str, Any], room: str) -> dict[str, Any]:
    (found,) = [x for x in ack["convs"] if x["room"] == room]
    return found


def dm(a: str, b: str) -> str:
    lo, hi = sorted((a, b))
    return f"dm:{lo}:{hi}"


async def test_a_reconnect_while_messages_flow_misses_none_of_them(tmp_path: Path) -> None:
    """A sender posts every 5 ms; the reader drops its socket and comes back with a sync
    from its cursor, again and again. Every message after its read position arrives, in
    the sync's snapshot or live (a message fanned out before the attach and committed
    after the snapshot was in neither: bench/sync_gap.py found it)."""
    g = gateway(tmp_path).start()
    alice, bob = f"alice{uniq()}", f"bob{uniq()}"
    room = dm(alice, bob)
    seen: set[int] = set()

    def on_msg(m: dict[str, Any]) -> None:
        if m.get("room") == room and m.get("seq"):
            seen.add(m["seq"])

    a = await g.client(alice)
    await a.publish(room, {"text": "first"})
    b = await g.client(bob, on_message=on_msg)
    stop = False

    async def pump() -> None:
        while not stop:
            await a.publish(room, {"text": "x"})
            await asyncio.sleep(0.005)

    try:
        cursor = (await sync(b))["cursor"]
        p = asyncio.ensure_future(pump())
        lost: list[int] = []
        for _ in range(15):
            await asyncio.sleep(0.1)
            top = max(seen, default=0)
            if top:
                await b.read(room, top)
            b.abort()
            await asyncio.sleep(0.05)
            await b.connect()
            ack = await sync(b, since=cursor, msgs=50)
            cursor = ack["cursor"]
            for c in ack["convs"]:
                if c["room"] == room:
                    seen.update(m["seq"] for m in c["msgs"])
            await asyncio.sleep(0.2)
            lost += [x for x in range(top + 1, max(seen) + 1) if x not in seen]
        stop = True
        await p
        assert lost == [], "seqs neither in a sync nor delivered live"
    finally:
        stop = True
        await a.close()
        await b.close()
        assert not g.finish()


async def test_a_thousand_messages_to_an_offline_user_arrive_through_sync_and_history(tmp_path: Path) -> None:
    g = gateway(tmp_path).start()
    alice, bob = f"alice{uniq()}", f"bob{uniq()}"
    room = dm(alice, bob)
    try:
        a = await g.client(alice)
        await sync(a)
        for i in range(1000):
            ack = await a.publish(room, {"text": f"m{i}"}, cid=f"c{i}")
            assert ack["seq"] == i + 1
        b = await g.client(bob)
        s = await sync(b)
        c = conv(s, room)
        assert (c["kind"], c["unread"], c["last_seq"], c["read_seq"], c["member"]) == ("dm", 1000, 1000, 0, True)
        assert [m["seq"] for m in c["msgs"]] == list(range(981, 1001)) and c["more_msgs"] is True
        assert c["last"]["data"] == {"text": "m999"} and c["last"]["from"] == alice
        seqs: list[int] = []
        after = 0
        while True:
            page = await b.request("history", room=room, after_seq=after, limit=200)
            seqs += [m["seq"] for m in page["msgs"]]
            if not page["more"]:
                break
            after = page["msgs"][-1]["seq"]
        assert seqs == list(range(1, 1001)), "all 1,000, in order, in 5 round trips"
        # The sender's own messages count as read for her.
        await eventually(lambda: _unread(a, room, 0), timeout=10, what="alice's unread 0")
        # Reading clears the badge; a sync from the cursor then has nothing new.
        ack = await b.request("read", room=room, seq=1000)
        assert (ack["read_seq"], ack["unread"]) == (1000, 0)
        again = await sync(b, since=s["cursor"])
        assert [x["unread"] for x in again["convs"] if x["room"] == room] == [0]
        await a.close()
        await b.close()
    finally:
        assert not g.finish()


async def _unread(c: GatewayClient, room: str, want: int) -> bool:
    s = await sync(c)
    return bool(conv(s, room)["unread"] == want)


async def test_live_delivery_without_join_and_reading_on_one_device_clears_the_other(tmp_path: Path) -> None:
    g = gateway(tmp_path).start()
    alice, bob = f"alice{uniq()}", f"bob{uniq()}"
    room = dm(alice, bob)
    try:
        a = await g.client(alice)
        phone, pc = await g.client(bob), await g.client(bob)
        for c in (a, phone, pc):
            await sync(c)
        ack = await a.publish(room, {"text": "hi"})
        # Both of bob's devices get it live, without joining (a new dm attaches them).
        for dev in (phone, pc):
            m = await dev.recv(timeout=10)
            assert (m["room"], m["seq"], m["data"]) == (room, ack["seq"], {"text": "hi"})
        read = pc.wait_event(lambda f: f.get("op") == "read" and f.get("user") == bob, timeout=10)
        receipt = a.wait_event(lambda f: f.get("op") == "read" and f.get("user") == bob, timeout=10)
        await phone.request("read", room=room, seq=ack["seq"])
        assert (await read)["seq"] == ack["seq"], "the other device clears its badge"
        assert (await receipt)["room"] == room, "the peer gets a read receipt"
        assert conv(await sync(pc), room)["unread"] == 0
        # Typing: ephemeral, to the others.
        typing = a.wait_event(lambda f: f.get("op") == "typing", timeout=10)
        await phone.send({"op": "typing", "room": room})
        assert (await typing) == {"op": "typing", "room": room, "user": bob}
        for c in (a, phone, pc):
            await c.close()
    finally:
        assert not g.finish()


async def test_new_conversations_past_max_attached_push_out_the_oldest(tmp_path: Path) -> None:
    """A connection follows at most ``max_attached`` conversations; one it joins later (an
    agent's next desk session) is attached in place of the least recently attached one,
    not left silent."""
    g = gateway(tmp_path, "conversations.max_attached=3").start()
    owner, mem = f"own{uniq()}", f"mem{uniq()}"
    try:
        o, m = await g.client(owner), await g.client(mem)
        await sync(o)
        await sync(m)
        rooms = []
        for i in range(6):
            added = m.wait_event(lambda f: f.get("op") == "conv" and f.get("event") == "added", timeout=10)
            rooms.append((await o.request("create", members=[mem], meta={"name": f"g{i}"}))["room"])
            assert (await added)["room"] == rooms[-1], "told of each new one (attached)"
        while m.recv_nowait() is not None:
            pass  # the groups' "added" system messages
        await o.publish(rooms[-1], {"text": "newest"})
        got = await m.recv(timeout=10)
        assert (got["room"], got["data"]) == (rooms[-1], {"text": "newest"})
        # The oldest was detached: its messages wait for the next sync.
        cursor = (await sync(m))["cursor"]
        await o.publish(rooms[0], {"text": "to the oldest"})
        assert conv(await sync(m, since=cursor), rooms[0])["last"]["data"] == {"text": "to the oldest"}
        await o.close()
        await m.close()
    finally:
        assert not g.finish()


async def test_groups_recall_and_removal(tmp_path: Path) -> None:
    g = gateway(tmp_path).start()
    owner, mem, out = f"own{uniq()}", f"mem{uniq()}", f"out{uniq()}"
    try:
        o, m, x = await g.client(owner), await g.client(mem), await g.client(out)
        for c in (o, m, x):
            await sync(c)
        added = m.wait_event(lambda f: f.get("op") == "conv" and f.get("event") == "added", timeout=10)
        created = await o.request("create", members=[mem], meta={"name": "Study group"})
        room = created["room"]
        assert room.startswith("group:")
        assert (await added)["room"] == room
        # A non-member may not post, read, recall or page.
        for op, fields in (("publish", {"data": {}}), ("read", {"seq": 1}), ("recall", {"seq": 1}), ("history", {})):
            with pytest.raises(GatewayError) as e:
                await x.request(op, room=room, **fields)
            assert e.value.code == 4031, (op, e.value)
        with pytest.raises(GatewayError) as e:
            await x.request("history", room="group:nosuch")
        assert e.value.code == 4033
        # A plain member may not invite (the route's invite rule is "admin").
        with pytest.raises(GatewayError) as e:
            await m.request("invite", room=room, users=[out])
        assert e.value.code == 4003
        first = await m.publish(room, {"text": "oops, wrong group"})
        await o.recv(timeout=10)
        # The sender recalls within the limit: everyone online sees a tombstone event.
        seen = o.wait_event(lambda f: f.get("op") == "recall", timeout=10)
        await m.request("recall", room=room, seq=first["seq"])
        assert (await seen)["seq"] == first["seq"]
        with pytest.raises(GatewayError) as e:
            await m.request("recall", room=room, seq=first["seq"])
        assert e.value.code == 4032
        page = await o.request("history", room=room, limit=10)
        tomb = next(p for p in page["msgs"] if p["seq"] == first["seq"])
        assert tomb["type"] == "recalled" and tomb["data"]["by"] == mem and "text" not in tomb["data"]
        s = await sync(o, since=1)
        assert first["seq"] in conv(s, room)["recalled"]
        # The owner invites, then removes: the removed member gets nothing new and cannot
        # page past the removal.
        x_added = x.wait_event(lambda f: f.get("op") == "conv" and f.get("event") == "added", timeout=10)
        assert (await o.request("invite", room=room, users=[out]))["added"] == [out]
        await x_added
        m_removed = m.wait_event(lambda f: f.get("op") == "conv" and f.get("event") == "removed", timeout=10)
        await o.request("remove", room=room, user=mem)
        await m_removed
        last_for_mem = (await m.request("history", room=room, limit=100))["msgs"][-1]["seq"]
        after = await o.publish(room, {"text": "after the removal"})
        assert after["seq"] > last_for_mem
        got = await x.recv(timeout=10)
        while got["seq"] != after["seq"]:
            got = await x.recv(timeout=10)
        assert (await m.request("history", room=room, limit=100))["msgs"][-1]["seq"] == last_for_mem
        gone = conv(await sync(m), room)
        assert gone["member"] is False
        with pytest.raises(GatewayError) as e:
            await m.publish(room, {"text": "let me back"})
        assert e.value.code == 4031
        with pytest.raises(asyncio.TimeoutError):
            while True:
                f = await m.recv(timeout=1.0)
                assert f.get("seq") != after["seq"], "a removed member got a new message"
        for c in (o, m, x):
            await c.close()
    finally:
        assert not g.finish()


async def test_same_cid_across_a_reconnect_is_one_message(tmp_path: Path) -> None:
    # Past the broker's idempotency window too (a phone offline longer than it): the store
    # still knows the cid, and nothing is published again.
    g = gateway(tmp_path, "broker.idempotency_ttl=0.5").start()
    u, v = f"u{uniq()}", f"v{uniq()}"
    room = dm(u, v)
    try:
        c = await g.client(u)
        await sync(c)
        first = await c.publish(room, {"pay": 1}, cid="order-9")
        await c.close()
        await asyncio.sleep(1.0)
        c = await g.client(u)
        await sync(c)
        peer = await g.client(v)
        await sync(peer)
        again = await c.publish(room, {"pay": 1}, cid="order-9")
        assert again["seq"] == first["seq"] and again.get("dup") is True
        nxt = await c.publish(room, {"pay": 2}, cid="order-10")
        assert nxt["seq"] == first["seq"] + 1, "no seq was taken by the retry"
        got = await peer.recv(timeout=10)
        assert got["seq"] == nxt["seq"], "the retry was not published again"
        page = await c.request("history", room=room)
        assert [m["seq"] for m in page["msgs"]] == [first["seq"], nxt["seq"]]
        await peer.close()
        await c.close()
    finally:
        assert not g.finish()


async def test_send_to_an_offline_user_is_stored_and_delivered_on_reconnect(tmp_path: Path) -> None:
    g = gateway(tmp_path).start()
    user = f"shopper{uniq()}"
    try:
        r = await api(g, "POST", "/v1/send", {"user": user, "type": "order", "data": {"order": 42, "status": "shipped"}},
                      headers={"Idempotency-Key": "o42-shipped"})
        assert r["delivered"] == "stored" and r["room"] == f"notice:{user}" and r["seq"] == 1
        again = await api(g, "POST", "/v1/send", {"user": user, "type": "order", "data": {"order": 42, "status": "shipped"}},
                          headers={"Idempotency-Key": "o42-shipped"})
        assert again["seq"] == 1 and again.get("duplicate") is True
        c = await g.client(user)
        s = await sync(c)
        n = conv(s, f"notice:{user}")
        assert (n["kind"], n["unread"], n["msgs"][0]["type"], n["msgs"][0]["data"]) == ("notice", 1, "order", {"order": 42, "status": "shipped"})
        live = await api(g, "POST", "/v1/send", {"user": user, "type": "order", "data": {"order": 43}})
        assert live["delivered"] == "live"
        m = await c.recv(timeout=10)
        assert (m["room"], m["data"]) == (f"notice:{user}", {"order": 43})
        # A notice conversation takes no client posts.
        with pytest.raises(GatewayError) as e:
            await c.publish(f"notice:{user}", {"x": 1})
        assert e.value.code == 4003
        await c.close()
    finally:
        assert not g.finish()


async def test_bad_requests_get_clear_errors(tmp_path: Path) -> None:
    g = gateway(tmp_path, config=ROUTES.replace("members_max = 50", "members_max = 2")).start()
    u = f"u{uniq()}"
    try:
        c = await g.client(u)
        cases: list[tuple[dict[str, Any], int]] = [
            ({"op": "sync", "limit": 0}, 4000),
            ({"op": "sync", "msgs": 51}, 4000),
            ({"op": "sync", "before": "x"}, 4000),
            ({"op": "read", "room": "dm:a:b"}, 4000),
            ({"op": "recall", "room": "dm:a:b", "seq": 0}, 4000),
            ({"op": "history", "room": "dm:a:b", "after_seq": 5, "before_seq": 3}, 4000),
            ({"op": "history", "room": "dm:a:b", "after_seq": 0, "limit": 201}, 4000),
            ({"op": "create", "kind": "dm"}, 4000),
            ({"op": "create", "meta": "name"}, 4000),
            ({"op": "invite", "room": "group:1", "users": []}, 4000),
            ({"op": "join", "room": f"dm:{u}:zzz"}, 4003),
            ({"op": "publish", "room": f"dm:zzz:{u}", "data": {}}, 4033),
            ({"op": "publish", "room": "dm:x:y", "data": {}}, 4031),
            ({"op": "read", "room": "live:1", "seq": 1}, 4033),
            ({"op": "create", "members": ["a", "b"]}, 4034),
            ({"op": "remove", "room": f"dm:{u}:zzz", "user": u}, 4003),
        ]
        for i, (frame, code) in enumerate(cases):
            with pytest.raises(GatewayError) as e:
                await c.request(frame.pop("op"), **frame)
            assert e.value.code == code, (i, frame, e.value)
        # A dm nobody wrote in yet pages as empty for its users, reads as read.
        assert (await c.request("history", room=f"dm:{u}:zzz"))["msgs"] == []
        assert (await c.request("read", room=f"dm:{u}:zzz", seq=5))["unread"] == 0
        await c.typing(f"dm:{u}:zzz")
        # Still connected and working.
        assert "convs" in await sync(c)
        await c.close()
    finally:
        assert not g.finish()


async def test_the_python_client_pages_sync_and_speaks_every_op(tmp_path: Path) -> None:
    g = gateway(tmp_path).start()
    me = f"me{uniq()}"
    peers = [f"p{i}{uniq()}" for i in range(5)]
    try:
        c = await g.client(me)
        first = await c.sync()
        assert first["convs"] == []
        others = [await g.client(p) for p in peers]
        for i, o in enumerate(others):
            await o.sync()
            await o.publish(GatewayClient.dm_room(me, peers[i]), {"n": i})
        s = await c.sync(limit=2, msgs=1)  # three pages, one request each
        assert sorted(x["room"] for x in s["convs"]) == sorted(GatewayClient.dm_room(me, p) for p in peers)
        assert all(x["unread"] == 1 and len(x["msgs"]) == 1 for x in s["convs"])
        room = await c.create_group(peers[:2], {"name": "py"})
        assert await c.invite(room, [peers[2]]) == [peers[2]]
        ack = await c.publish(room, {"hello": "all"})
        assert (await c.read(room, ack["seq"]))["unread"] == 0
        await c.recall(room, ack["seq"])
        await c.typing(room)
        await c.remove(room, peers[2])
        page = await c.history(room, after_seq=0, limit=200)
        assert [m["type"] for m in page["msgs"]] == ["system", "recalled", "system"]
        again = await c.sync(since=s["cursor"])  # what changed since (and within sync_margin before it)
        assert again["convs"][0]["room"] == room and again["convs"][0]["recalled"] == [ack["seq"]]
        for x in (c, *others):
            await x.close()
    finally:
        assert not g.finish()


async def test_on_member_hooks_decide_who_may_create_invite_and_remove(tmp_path: Path) -> None:
    g = GatewayProcess(tmp_path, ["limits.client_rate=0"], config=ROUTES, app="tests.integration.feature_app:make_app").start()
    u = f"u{uniq()}"
    try:
        c = await g.client(u)
        await sync(c)
        with pytest.raises(GatewayError) as e:
            await c.request("create", members=["blocked1"])
        assert (e.value.code, e.value.message) == (4050, "that user cannot be added")
        with pytest.raises(GatewayError) as e:
            await c.request("create", members=["x"], meta={"tier": "vip"})
        assert e.value.code == 4003
        room = (await c.request("create", members=["x"], meta={"name": "ok"}))["room"]
        with pytest.raises(GatewayError) as e:
            await c.request("invite", room=room, users=["y", "blocked2"])
        assert e.value.code == 4050
        assert (await c.request("invite", room=room, users=["y"]))["added"] == ["y"]
        await c.close()
    finally:
        assert not g.finish()
