"""Redis fails under two streaming gateway nodes (docs/scaling.md, Guarantees and
Failures): nothing the docs promise to keep may be lost.

Both tests run one room with a publisher and two subscribers on each node (the
publishers are members too), publishing 40 msgs/s each without waiting for acks, and end
with ``chaoslib.check_delivery``: every publish acked with ``seq`` > 0 reached every
subscriber live or comes back through ``resume``; degraded acks are counted and must
have been handled as documented (seq 0, this node's members only, at most once, not in
history).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from chaoslib import (
    ChaosNode,
    Peer,
    RedisServer,
    Stream,
    check_delivery,
    readyz,
    wait_ready,
)

RATE = 40.0  # msgs/s per publisher


async def _cluster(redis_server: RedisServer, chaos_nodes: Any, room: str) -> tuple[dict[str, ChaosNode], list[Stream], list[Peer]]:
    a, b = await asyncio.gather(asyncio.to_thread(chaos_nodes, redis_server.url, "A"),
                                asyncio.to_thread(chaos_nodes, redis_server.url, "B"))
    nodes = {"A": a, "B": b}
    subs = [Peer(f"sub{n}{i}") for n in "AB" for i in (1, 2)]
    pubs = [Peer("pubA"), Peer("pubB")]
    for p in subs + pubs:
        await p.connect(nodes[p.name[3]])
        await p.join(room)
    return nodes, [Stream(p, room, RATE).start() for p in pubs], subs


async def _serves_again(nodes: dict[str, ChaosNode], room: str, subs: list[Peer]) -> None:
    """After the outage: a fresh publisher on each node gets seq > 0 acks and every
    subscriber (on both nodes) receives both messages live."""
    for name, node in nodes.items():
        p = Peer(f"probe{name}")
        await p.connect(node)
        await p.join(room)
        ack = await p.request("publish", room=room, data={"p": p.name, "n": 0})
        assert ack["op"] == "ack" and ack["seq"] > 0 and not ack.get("degraded"), f"node {name} after the outage: {ack}"
        await p.close()
    deadline = time.monotonic() + 5
    want = {("probeA", 0), ("probeB", 0)}
    while time.monotonic() < deadline:
        if all(want <= {(m["data"].get("p"), m["data"].get("n")) for m in s.msgs if isinstance(m.get("data"), dict)} for s in subs):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("after the outage, a message published on each node did not reach every subscriber live")


async def test_redis_sigstop_5s_under_two_streaming_nodes(redis_server: RedisServer, chaos_nodes: Any) -> None:
    """Redis hangs (SIGSTOP) for 5 s, then continues (SIGCONT). Its state survives, so
    every acked recoverable message must reach every subscriber or be recoverable in the
    same epoch; publishes during the hang are acked degraded (seq 0, local only, not in
    history); the nodes become ready again and serve."""
    room = "chaos:stop"
    nodes, streams, subs = await _cluster(redis_server, chaos_nodes, room)
    try:
        await asyncio.sleep(2.0)
        t_stop = time.monotonic()
        redis_server.pause()  # SIGSTOP
        await asyncio.sleep(2.5)
        # Hung Redis, noticed within socket_timeout + PING timeout (2 s): not ready.
        codes = await asyncio.gather(*(asyncio.to_thread(readyz, n) for n in nodes.values()))
        assert codes == [503, 503], f"/readyz while Redis is stopped: {codes}"
        await asyncio.sleep(max(0.0, t_stop + 5.0 - time.monotonic()))
        redis_server.resume()  # SIGCONT
        back = await wait_ready(nodes.values(), 10.0)
        await asyncio.sleep(2.0)
    finally:
        for st in streams:
            await st.stop()
    await asyncio.sleep(0.5)  # the last deliveries
    assert all(n.running() for n in nodes.values()), "a node died"
    assert all(p.is_open for p in subs + [st.peer for st in streams]), "clients stay connected through a Redis outage"
    await _serves_again(nodes, room, subs)
    rep = await check_delivery(room, streams, subs, nodes)
    print(f"\nSIGSTOP 5 s: ready again {back:.2f} s after SIGCONT; {rep.line()}\n" + "\n".join(rep.problems))
    assert not rep.problems, "\n".join(rep.problems[:30])
    assert len(rep.epochs) == 1, f"Redis kept its data: one epoch expected, got {rep.epochs}"
    assert rep.acked >= 200, f"too few acked messages to mean anything ({rep.acked})"
    assert rep.degraded >= 50, f"publishes during the hang must be acked degraded ({rep.degraded})"
    assert rep.errors == 0 and rep.seq0 == 0, "a Redis outage gives degraded acks, not errors"
    for n in nodes.values():
        assert "Traceback" not in n.log_text(), n.log_tail()


async def test_redis_sigkill_and_restart_empty_under_two_streaming_nodes(redis_server: RedisServer, chaos_nodes: Any) -> None:
    """Redis is killed (SIGKILL) and restarted empty on the same port after 2 s. The docs
    promise a new epoch, ``recovered: false`` for resumes across the outage, degraded acks
    while it is down, and (back to normal) every acked message of the new epoch delivered
    or recoverable."""
    room = "chaos:kill"
    nodes, streams, subs = await _cluster(redis_server, chaos_nodes, room)
    try:
        await asyncio.sleep(2.0)
        redis_server.kill()
        await asyncio.sleep(1.0)
        codes = await asyncio.gather(*(asyncio.to_thread(readyz, n) for n in nodes.values()))
        assert codes == [503, 503], f"/readyz while Redis is down: {codes}"
        await asyncio.sleep(1.0)
        old_epoch = next(m["epoch"] for m in reversed(subs[0].msgs) if m.get("seq"))
        positions = {p.name: p.position(room) for p in subs}
        redis_server.start()
        back = await wait_ready(nodes.values(), 10.0)
        await asyncio.sleep(2.5)
    finally:
        for st in streams:
            await st.stop()
    await asyncio.sleep(0.5)
    assert all(n.running() for n in nodes.values()), "a node died"
    assert all(p.is_open for p in subs + [st.peer for st in streams]), "clients stay connected through a Redis outage"
    await _serves_again(nodes, room, subs)

    # A resume across the outage, from each subscriber's last position before the
    # restart, on its own node: recovered false (the client must reload), and the ack
    # names the new epoch.
    for p in subs:
        pos = positions[p.name]
        assert pos is not None and pos[1] == old_epoch, (p.name, pos, old_epoch)
        q = Peer(f"{p.name}-across")
        await q.connect(nodes[p.name[3]])
        ack = await q.join(room, resume=pos)
        await q.close()
        assert ack.get("recovered") is False, f"resume {pos} across a Redis restart answered {ack} (docs: recovered false)"
        assert ack["epoch"] != old_epoch and ack["seq"] > 0, ack

    rep = await check_delivery(room, streams, subs, nodes, lost_epochs=[old_epoch])
    print(f"\nSIGKILL + restart: ready again {back:.2f} s after the restart; {rep.line()}\n" + "\n".join(rep.problems))
    assert not rep.problems, "\n".join(rep.problems[:30])
    assert len(rep.epochs) == 2 and rep.epochs[0] == old_epoch, f"a Redis that restarted empty starts a new epoch: {rep.epochs}"
    assert rep.acked >= 200, f"too few acked messages to mean anything ({rep.acked})"
    assert rep.degraded >= 50, f"publishes while Redis is down must be acked degraded ({rep.degraded})"
    assert rep.errors == 0 and rep.seq0 == 0, "a Redis outage gives degraded acks, not errors"
    for n in nodes.values():
        assert "Traceback" not in n.log_text(), n.log_tail()
