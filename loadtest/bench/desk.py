#!/usr/bin/env python
# ruff: noqa: RUF001  (Chinese text with its own punctuation)
"""The customer-service desk under load (issue 16), through a real gateway.

    python loadtest/bench/desk.py [--shoppers 1000] [--agents 50] [--capacity 20] [--duration 60]
                                  [--warmup 20] [--bot] [--nodes 2] [--idle-below 1.5] [--out FILE.json]

Starts its own gateway (``loadtest/desk.toml``: dev auth, the desk's ``cs:``/``csi:``
group routes, ``[plugins.desk]`` with ``bot_turns = 0``; ``--bot`` sets ``bot_turns = 2``:
one FAQ answer, then a question the bot cannot answer hands off), with the embedded
SQLite store in a temporary directory, and drives it from this process (asyncio on
uvloop, ``gateway.client.GatewayClient`` without compression):

- ``--agents`` agents connect with ``?role=agent``, ``sync`` (attached to their
  conversations) and ``cs.status online`` with ``--capacity``; each answers every chat
  message of its sessions after ``--answer-delay`` seconds (typing) and closes a session
  after ``--close-after`` answers;
- ``--shoppers`` shoppers connect and ``sync``, then loop: ``cs.open`` with a product card,
  wait for the ``cs.state`` ``assigned`` message, ``--msgs`` chat messages each after
  ``--think`` seconds and each waiting for the agent's answer (``read`` it), with
  ``--offline-chance`` per message going offline right after sending (socket dropped,
  0.5-2 s, back with ``sync`` from the cursor: the answer comes with the sync), then
  ``cs.close`` (unless the agent closed it), the rating card, ``cs.rate``, a pause of
  ``--pause`` s, the next session. Shoppers start spread over ``--ramp`` seconds.

After ``--warmup`` s the measured window of ``--duration`` s begins; only what completes
inside it counts: sessions opened/assigned/closed/rated, assignment latency (shopper:
``cs.open`` sent -> its ``assigned`` message; agent: ``queued_at`` -> the ``cs.assigned``
push), answer latency (the shopper's chat sent -> the agent's answer received), ack
latencies, chat messages/s, and every message of the sessions' conversations per second
(chat and the desk's own: card, states, rating). CPU: the gateway's from
``/proc/<pid>/stat`` (utime + stime, every thread), this load generator's from
``os.times()``, the whole machine's from ``/proc/stat`` (the rest is ``others``: the
machine is shared); gateway CPU seconds per session opened and per chat message, cores;
RSS at the start of the window and at its end. The load average before the run is
reported with it.

``--nodes 2``: two gateways on one Redis (broker and the desk's Redis assignment
engine) and one PostgreSQL store (a private cluster, tests/support/postgres.py):
agents and shoppers alternate between the nodes.

Prints the JSON result (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "loadtest" / "bench")]

import orjson  # noqa: E402

from gateway.client import GatewayClient, GatewayClosed, GatewayError  # noqa: E402

DESK_TOML = ROOT / "loadtest" / "desk.toml"
CARDS = [
    {"kind": "product", "id": "p1001", "title": "保温杯 500ml", "price": "¥99", "image": "https://img.example.com/p1001.jpg",
     "url": "/pages/item/item?id=p1001"},
    {"kind": "product", "id": "p2002", "title": "Running shoes 42", "price": "¥399", "image": "https://img.example.com/p2002.jpg",
     "url": "/pages/item/item?id=p2002"},
    {"kind": "order", "id": "o-88231", "title": "订单 88231", "price": "¥1288", "url": "/pages/order/order?id=o-88231"},
]
QUESTIONS = ["这个有货吗？", "什么时候能到？", "can I change the size?", "有优惠券吗？", "颜色和图片一样吗？", "is it waterproof?"]
ANSWER = "您好，已为您查询：有货，48 小时内发货。"


def span(text: str) -> tuple[float, float]:
    parts = [float(x) for x in str(text).split("-", 1)]
    return parts[0], parts[-1]


def pct(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)

    def q(p: float) -> float:
        return round(xs[min(len(xs) - 1, max(0, int(p * len(xs) + 0.999999) - 1))], 1)  # nearest rank

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": round(xs[-1], 1), "mean": round(statistics.fmean(xs), 1), "n": len(xs)}


def proc_cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine was busy (all cores) since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


class Client(GatewayClient):
    """GatewayClient with a callback for ``push`` frames."""

    def __init__(self, url: str, user: str, role: str | None, on_msg: Any, on_push: Any = None) -> None:
        super().__init__(url, user=user, params={"role": role} if role else None, on_message=on_msg, compression=None,
                         request_timeout=30.0, open_timeout=30.0)
        self.on_push = on_push

    def _event(self, frame: dict[str, Any]) -> None:
        if frame.get("op") == "push" and self.on_push is not None:
            self.on_push(frame)
            return
        super()._event(frame)


class Stats:
    """Everything the actors record; only what completes inside [t0, t1) counts."""

    def __init__(self) -> None:
        self.t0 = float("inf")
        self.t1 = float("inf")
        self.lat: dict[str, list[float]] = {}
        self.count: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.details: list[Any] = []  # the first few failures, with what the actor saw

    def inside(self, t: float | None = None) -> bool:
        t = time.perf_counter() if t is None else t
        return self.t0 <= t < self.t1

    def add(self, name: str, ms: float | None = None) -> None:
        if not self.inside():
            return
        self.count[name] = self.count.get(name, 0) + 1
        if ms is not None:
            self.lat.setdefault(name, []).append(ms)

    def error(self, name: str, e: BaseException | str) -> None:
        if time.perf_counter() >= self.t1:
            return  # the end: clients are being closed
        key = f"{name}: {e if isinstance(e, str) else type(e).__name__ + ' ' + str(e)[:80]}"
        self.errors[key] = self.errors.get(key, 0) + 1


class Shopper:
    def __init__(self, url: str, uid: str, st: Stats, a: argparse.Namespace) -> None:
        self.uid, self.st, self.a = uid, st, a
        self.c = Client(url, uid, None, self._on_msg)
        self.cursor: int | None = None
        self.states: dict[str, dict[str, float]] = {}
        self.seen: dict[str, set[int]] = {}
        self.last_seq: dict[str, int] = {}
        self.waiting: dict[int, float] = {}
        self.keys = itertools.count(1)
        self.changed = asyncio.Event()
        self.offline_n = 0
        self.via_sync: set[tuple[str, int]] = set()
        self.reconnected_at: float | None = None

    async def online(self) -> None:
        if self.c.connected:
            return
        await self.c.connect()
        ack = await self.c.sync(since=self.cursor, limit=20, msgs=20)
        if self.cursor is not None:
            self.st.add("sync (since cursor)")
        self.cursor = ack["cursor"]
        self.reconnected_at = time.perf_counter()
        for conv in ack["convs"]:
            if str(conv.get("room", "")).startswith("cs:"):
                for m in conv.get("msgs", []):
                    self._handle(m, True)

    def _on_msg(self, m: dict[str, Any]) -> None:
        if str(m.get("room", "")).startswith("cs:"):
            self._handle(m, False)

    def _handle(self, m: dict[str, Any], via_sync: bool) -> None:
        room, seq = str(m.get("room")), m.get("seq") or 0
        if seq:
            s = self.seen.setdefault(room, set())
            if seq in s:
                return
            s.add(seq)
            self.last_seq[room] = max(self.last_seq.get(room, 0), seq)
        if room in self.states:  # a session of this run (every message of it counts once)
            self.st.add("conversation messages (seen by the shopper)")
        typ, data, now = m.get("type"), m.get("data") if isinstance(m.get("data"), dict) else {}, time.perf_counter()
        if via_sync and typ in ("cs.state", "cs.rating", "chat"):
            self.via_sync.add((room, seq))
        if typ == "cs.state":
            self.states.setdefault(room, {}).setdefault(str(data.get("state")), now)
        elif typ == "cs.rating":
            self.states.setdefault(room, {}).setdefault("rating", now)
        elif typ == "chat" and m.get("from") not in (None, self.uid):
            k = data.get("re")
            t0 = self.waiting.pop(k, None) if isinstance(k, int) else None
            if t0 is not None:
                ms = (now - t0) * 1000
                self.st.add("answer after offline (sync)" if via_sync else "answer (chat -> agent reply)", ms)
                if not via_sync and isinstance(data.get("typing_ms"), (int, float)):
                    # the gateway's part: both hops and the agent's handling, without its typing time
                    self.st.add("answer minus the agent's typing time", ms - data["typing_ms"])
        self.changed.set()

    async def until(self, pred: Any, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while not pred():
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            self.changed.clear()
            if pred():
                return True
            try:
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
            except TimeoutError:
                pass
        return True

    async def diagnose(self, what: str, sid: str, room: str) -> None:
        """What the shopper saw against what the conversation holds (history)."""
        if len(self.st.details) >= 10:
            return
        seen = self.seen.get(room, set())
        d: dict[str, Any] = {"what": what, "session": sid, "shopper": self.uid, "offline_in_session": self.offline_n,
                             "seqs_seen": sorted(seen), "via_sync": sorted(q for r, q in self.via_sync if r == room),
                             "s_since_last_reconnect": round(time.perf_counter() - self.reconnected_at, 2) if self.reconnected_at else None}
        try:
            await self.online()
            page = await self.c.request("history", room=room, after_seq=0, limit=100)
            d["history"] = [(m.get("seq"), m.get("type"), (m.get("data") or {}).get("state") if isinstance(m.get("data"), dict) else None)
                            for m in page.get("msgs", [])]
            d["missing"] = [x for x in d["history"] if x[0] not in seen]
        except (GatewayClosed, GatewayError, TimeoutError) as e:
            d["history_error"] = str(e)
        self.st.details.append(d)

    def state(self, room: str, s: str) -> float | None:
        return self.states.get(room, {}).get(s)

    async def run(self, stop: asyncio.Event, start_in: float) -> None:
        await asyncio.sleep(start_in)
        while not stop.is_set():
            try:
                await self.session()
            except (GatewayClosed, GatewayError, TimeoutError, OSError) as e:
                self.st.error("shopper", e)
                await asyncio.sleep(1.0)
            await asyncio.sleep(random.uniform(*span(self.a.pause)))

    async def session(self) -> None:
        await self.online()
        t_open = time.perf_counter()
        ack = await self.c.request("cs.open", card=random.choice(CARDS))
        self.st.add("cs.open ack", (time.perf_counter() - t_open) * 1000)
        if ack.get("resumed"):
            self.st.error("cs.open", "resumed an open session")
        sid, room = ack["session"], ack["room"]
        self.states.setdefault(room, {})
        self.offline_n = 0
        self.st.add("sessions opened")
        if ack["state"] == "bot":
            for text in ("什么时候发货？", "我要改地址"):  # an FAQ answer, then the fallback hands off
                if self.state(room, "queued") is not None:
                    break
                await self.c.publish(room, {"text": text})
                await self.until(lambda: self.state(room, "queued") is not None, 3.0)
        ok = await self.until(lambda: self.state(room, "assigned") is not None or self.state(room, "closed") is not None, 60.0)
        ta = self.state(room, "assigned")
        if ta is not None:
            start = self.state(room, "queued") if ack["state"] == "bot" else t_open
            self.st.add("assign (shopper: open -> assigned)" if ack["state"] != "bot" else "assign (shopper: queued -> assigned)",
                        (ta - (start or t_open)) * 1000)
            self.st.add("sessions assigned")
            await self.chat(room)
        elif not ok:
            self.st.error("assign", "no agent within 60 s")
        if self.state(room, "closed") is None:
            await self.online()
            t = time.perf_counter()
            await self.c.request("cs.close", session=sid)
            self.st.add("cs.close ack (shopper)", (time.perf_counter() - t) * 1000)
        if await self.until(lambda: self.state(room, "rating") is not None, 15.0):
            self.st.add("sessions closed")
            await self.online()
            await self.c.request("cs.rate", session=sid, score=random.choice([3, 4, 5, 5, 5]), comment="谢谢")
            self.st.add("sessions rated")
        else:
            self.st.error("rating card", "no cs.rating within 15 s of the close")
            await self.diagnose("no rating card", sid, room)
        self.states.pop(room, None)
        self.seen.pop(room, None)
        self.waiting.clear()

    async def chat(self, room: str) -> None:
        lo, hi = span(self.a.msgs)
        for _ in range(random.randint(int(lo), int(hi))):
            await asyncio.sleep(random.uniform(*span(self.a.think)))
            if self.state(room, "closed") is not None:
                return
            await self.online()
            k = next(self.keys)
            t = self.waiting[k] = time.perf_counter()
            try:
                await self.c.publish(room, {"text": random.choice(QUESTIONS), "k": k, "sent": time.time() * 1000})
            except GatewayError as e:
                self.waiting.pop(k, None)
                if e.code == 4092:  # closed by the agent meanwhile
                    self.st.add("chat after the close (4092)")
                    return
                raise
            self.st.add("publish ack (shopper)", (time.perf_counter() - t) * 1000)
            self.st.add("chat messages")
            if random.random() < self.a.offline_chance:
                self.c.abort()  # backgrounded: the answer arrives while away
                await asyncio.sleep(random.uniform(0.5, 2.0))
                self.st.add("went offline")
                self.offline_n += 1
                await self.online()
            if not await self.until(lambda k=k: k not in self.waiting or self.state(room, "closed") is not None, 20.0):
                self.waiting.pop(k, None)
                self.st.error("answer", "no answer within 20 s")
                await self.diagnose("no answer", room[3:], room)
                return
            if self.last_seq.get(room):
                await self.c.send({"op": "read", "room": room, "seq": self.last_seq[room]})


class Agent:
    def __init__(self, url: str, uid: str, st: Stats, a: argparse.Namespace) -> None:
        self.uid, self.st, self.a = uid, st, a
        self.c = Client(url, uid, "agent", self._on_msg, self._on_push)
        self.sessions: dict[str, dict[str, Any]] = {}
        self.closed: set[str] = set()
        self.seen: set[tuple[str, int]] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.c.connect()
        await self.c.sync(limit=1, msgs=0)
        await self.c.request("cs.status", status="online", capacity=self.a.capacity)
        self.watch = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """An agent whose connection closed (it should not) reports why and comes back
        (within the desk's grace: its sessions stay)."""
        while True:
            code, reason = await self.c.wait_closed()
            self.st.error("agent connection closed", f"{code} {reason} {self.c.dead_reason or ''}".strip())
            if len(self.st.details) < 10:
                self.st.details.append({"what": "agent connection closed", "agent": self.uid, "code": code, "reason": reason,
                                        "dead_reason": self.c.dead_reason, "at_s": round(time.perf_counter() - self.st.t0, 1),
                                        "sessions": len(self.sessions)})
            await asyncio.sleep(0.5)
            try:
                await self.start_again()
            except (GatewayClosed, GatewayError, TimeoutError, OSError) as e:
                self.st.error("agent reconnect", e)
                return

    async def start_again(self) -> None:
        await self.c.connect()
        await self.c.sync(limit=1, msgs=0)
        await self.c.request("cs.status", status="online", capacity=self.a.capacity)

    def _on_push(self, f: dict[str, Any]) -> None:
        data = f.get("data") if isinstance(f.get("data"), dict) else {}
        if f.get("type") == "cs.assigned":
            self.sessions.setdefault(str(data.get("room")), {"session": data.get("session"), "answers": 0})
            since = data.get("queued_at") or data.get("opened_at")
            if isinstance(since, (int, float)):
                self.st.add("assign (agent: queued_at -> cs.assigned push)", max(0.0, time.time() * 1000 - since))
        elif f.get("type") == "cs.unassigned":
            self.sessions.pop(f"cs:{data.get('session')}", None)
        elif f.get("type") == "cs.queue":
            self.st.add("cs.queue pushes")

    def _on_msg(self, m: dict[str, Any]) -> None:
        room = str(m.get("room", ""))
        if not room.startswith("cs:"):
            return
        key = (room, m.get("seq") or 0)
        if key[1] and key in self.seen:
            return
        self.seen.add(key)
        data = m.get("data") if isinstance(m.get("data"), dict) else {}
        if m.get("type") == "chat" and m.get("from") not in (None, self.uid):
            if isinstance(data.get("sent"), (int, float)):
                self.st.add("delivery (shopper chat -> agent)", max(0.0, time.time() * 1000 - data["sent"]))
            t = asyncio.ensure_future(self.answer(room, data.get("k")))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
        elif m.get("type") == "cs.state" and data.get("state") == "closed":
            self.sessions.pop(room, None)
            self.closed.add(room)
            self.seen = {x for x in self.seen if x[0] != room}

    async def answer(self, room: str, k: Any) -> None:
        t_typing = time.perf_counter()
        await asyncio.sleep(random.uniform(*span(self.a.answer_delay)))
        if room in self.closed or not self.c.connected:
            return
        s = self.sessions.setdefault(room, {"session": room[3:], "answers": 0})
        t = time.perf_counter()
        try:
            await self.c.publish(room, {"text": ANSWER, "re": k, "typing_ms": round((t - t_typing) * 1000, 2)})
        except GatewayError as e:
            if e.code == 4092:
                self.st.add("answer after the close (4092)")
                return
            self.st.error("agent publish", e)
            return
        except (GatewayClosed, TimeoutError) as e:
            self.st.error("agent publish", e)
            return
        self.st.add("publish ack (agent)", (time.perf_counter() - t) * 1000)
        self.st.add("chat messages")
        s["answers"] += 1
        if s["answers"] >= self.a.close_after and room not in self.closed:
            self.closed.add(room)
            self.sessions.pop(room, None)
            t = time.perf_counter()
            try:
                await self.c.request("cs.close", session=s["session"])
                self.st.add("cs.close ack (agent)", (time.perf_counter() - t) * 1000)
            except (GatewayError, GatewayClosed, TimeoutError) as e:
                self.st.error("agent close", e)


def metrics_text(api_port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in "{ "):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def drive(urls: list[str], pids: list[int], api_ports: list[int], a: argparse.Namespace) -> dict[str, Any]:
    st = Stats()
    tag = f"r{os.getpid() % 10000}x{int(time.time()) % 100000}"
    agents = [Agent(urls[i % len(urls)], f"ag-{tag}-{i}", st, a) for i in range(a.agents)]
    shoppers = [Shopper(urls[i % len(urls)], f"sh-{tag}-{i}", st, a) for i in range(a.shoppers)]
    t_setup = time.perf_counter()
    for i in range(0, len(agents), 50):
        await asyncio.gather(*(ag.start() for ag in agents[i:i + 50]))
    # Shoppers connect (and sync) before their first session, 100 at a time.
    for i in range(0, len(shoppers), 100):
        await asyncio.gather(*(sh.online() for sh in shoppers[i:i + 100]))
    connect_s = time.perf_counter() - t_setup
    rss_connected = [rss_mib(p) for p in pids]
    stop = asyncio.Event()
    tasks = [asyncio.ensure_future(sh.run(stop, random.uniform(0, a.ramp))) for sh in shoppers]
    await asyncio.sleep(a.warmup)
    # The measured window.
    cpu0 = [proc_cpu_s(p) for p in pids]
    me0 = sum(os.times()[:2])
    busy0 = machine_busy_s()
    m0 = [metrics_text(p) for p in api_ports]
    rss0 = [rss_mib(p) for p in pids]
    st.t0 = time.perf_counter()
    st.t1 = st.t0 + a.duration
    samples: list[dict[str, Any]] = []  # every 10 s: the gateway's RSS and CPU, sessions held
    while st.t1 - time.perf_counter() > 0.05:
        await asyncio.sleep(min(10.0, st.t1 - time.perf_counter()))
        samples.append({"t_s": round(time.perf_counter() - st.t0), "rss_mib": [rss_mib(p) for p in pids],
                        "gateway_cpu_s": round(sum(proc_cpu_s(p) for p in pids) - sum(cpu0), 2),
                        "sessions_opened": st.count.get("sessions opened", 0), "held": sum(len(ag.sessions) for ag in agents)})
    wall = time.perf_counter() - st.t0
    cpu1 = [proc_cpu_s(p) for p in pids]
    me1 = sum(os.times()[:2])
    busy1 = machine_busy_s()
    m1 = [metrics_text(p) for p in api_ports]
    rss1 = [rss_mib(p) for p in pids]
    held = sum(len(ag.sessions) for ag in agents)
    stop.set()
    await asyncio.sleep(0.1)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ag in agents:
        ag.watch.cancel()
    for c in [*(x.c for x in shoppers), *(x.c for x in agents)]:
        c.abort()
    await asyncio.sleep(10.0)  # does the memory go with the connections?
    rss_closed = [rss_mib(p) for p in pids]
    from run import http_json

    stats_closed = [http_json(f"http://127.0.0.1:{p}/v1/stats") for p in api_ports]

    gw_cpu = sum(cpu1) - sum(cpu0)
    me_cpu = me1 - me0
    busy = busy1 - busy0
    n = st.count
    opened, chats = n.get("sessions opened", 0), n.get("chat messages", 0)

    def delta(name: str) -> float:
        return sum(metric_sum(y, name) - metric_sum(x, name) for x, y in zip(m0, m1, strict=True))

    return {
        "window_s": round(wall, 1),
        "setup": {"connect_and_sync_s": round(connect_s, 1), "rss_mib_connected": rss_connected},
        "sessions": {k: n.get(k, 0) for k in ("sessions opened", "sessions assigned", "sessions closed", "sessions rated")},
        "sessions_held_by_agents_at_end": held,
        "sessions_opened_per_s": round(opened / wall, 1),
        "chat_messages_per_s": round(chats / wall, 1),
        "conversation_messages_per_s (seen by shoppers)": round(n.get("conversation messages (seen by the shopper)", 0) / wall, 1),
        "counts": dict(sorted(n.items())),
        "latency_ms": {k: pct(v) for k, v in sorted(st.lat.items())},
        "errors": st.errors,
        "error_details": st.details,
        "gateway": {
            "cpu_s": round(gw_cpu, 2), "cores": round(gw_cpu / wall, 2),
            # All of the gateway's CPU in the window divided by sessions opened / chat messages /
            # every message published (chat and the desk's own): each is an upper bound of its part.
            "cpu_ms_per_session": round(gw_cpu / opened * 1000, 2) if opened else None,
            "cpu_ms_per_chat_message": round(gw_cpu / chats * 1000, 3) if chats else None,
            "cpu_ms_per_published_message": round(gw_cpu / delta("gateway_messages_published_total") * 1000, 3)
            if delta("gateway_messages_published_total") else None,
            "cores_per_1000_sessions_held": round(gw_cpu / wall / held * 1000, 3) if held else None,
            "rss_mib_window_start": rss0, "rss_mib_window_end": rss1, "rss_mib_10s_after_every_client_left": rss_closed,
            "stats_10s_after_every_client_left": stats_closed,
            "store_commits_per_s": round(delta("gateway_store_commit_seconds_count") / wall, 1),
            "messages_published_per_s": round(delta("gateway_messages_published_total") / wall, 1),
        },
        "samples": samples,
        "load_generator": {"cpu_s": round(me_cpu, 2), "cores": round(me_cpu / wall, 2)},
        "machine": {"busy_cores": round(busy / wall, 2), "others_cores": round((busy - gw_cpu - me_cpu) / wall, 2)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shoppers", type=int, default=1000)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--capacity", type=int, default=20, help="sessions per agent (cs.status capacity)")
    ap.add_argument("--duration", type=float, default=60.0, help="the measured window (s)")
    ap.add_argument("--warmup", type=float, default=20.0, help="s after the shoppers start, before the window")
    ap.add_argument("--ramp", type=float, default=10.0, help="shoppers start their first session spread over this many s")
    ap.add_argument("--msgs", default="2-6", help="chat messages per session (lo-hi)")
    ap.add_argument("--think", default="1-3", help="shopper think time before each message (s, lo-hi)")
    ap.add_argument("--answer-delay", default="0.5-2", help="agent typing time before each answer (s, lo-hi)")
    ap.add_argument("--pause", default="0.5-2", help="shopper pause between sessions (s, lo-hi)")
    ap.add_argument("--close-after", type=int, default=4, help="the agent closes a session after this many answers")
    ap.add_argument("--offline-chance", type=float, default=0.05, help="chance per chat message that the shopper goes offline")
    ap.add_argument("--bot", action="store_true", help="bot_turns = 2 (the FAQ bot answers first)")
    ap.add_argument("--nodes", type=int, default=1, choices=(1, 2), help="2: two nodes, Redis broker and engine, PostgreSQL store")
    ap.add_argument("--set", action="append", default=[], help="more gateway settings (KEY=VALUE)")
    ap.add_argument("--idle-below", type=float, default=None, help="wait for the 1-min load average to drop below this")
    ap.add_argument("--idle-wait", type=float, default=300.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import uvloop
    from run import Redis, Server, log, machine

    if a.idle_below is not None:
        deadline = time.monotonic() + a.idle_wait
        while os.getloadavg()[0] >= a.idle_below and time.monotonic() < deadline:
            time.sleep(5)
    load_before = [round(x, 2) for x in os.getloadavg()]
    tmp = Path(tempfile.mkdtemp(prefix="desk-bench-"))
    config = tmp / "desk.toml"
    text = DESK_TOML.read_text()
    text = re.sub(r"(?m)^host = .*$", "", text)  # Server passes --host
    config.write_text(text)
    sets = ["limits.max_conns_per_ip=100000", *a.set]
    if a.bot:
        sets.append("plugins.desk.bot_turns=2")
    redis = pg = None
    servers: list[Any] = []
    try:
        if a.nodes == 2:
            from support.postgres import PostgresServer, install_postgres

            bindir, why = install_postgres()
            if not bindir:
                raise SystemExit(f"no PostgreSQL: {why}")
            redis = Redis()
            pg = PostgresServer(bindir).start()
            dsn = pg.create_database("desk_bench")
            env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
            mig = subprocess.run([sys.executable, "-m", "gateway", "migrate", "--dsn", dsn], cwd=ROOT, capture_output=True, text=True,
                                 timeout=120, env=env)
            if mig.returncode != 0:
                raise SystemExit(f"migrate failed: {mig.stderr[-2000:]}")
            sets += ["broker.kind=redis", f"broker.url={redis.url}", "store.kind=postgres", f"store.dsn={dsn}"]
            servers = [Server("livegate", sets, tag="-desk-a", config=config), Server("livegate", sets, tag="-desk-b", config=config)]
        else:
            servers = [Server("livegate", [*sets, f"store.path={tmp / 'store.db'}"], tag="-desk", config=config)]
        for s in servers:
            s.wait_ready(60)
        log(f"desk: {a.shoppers} shoppers, {a.agents} agents x {a.capacity}, {a.nodes} node(s), load {load_before}")
        res = uvloop.run(drive([s.url for s in servers], [s.pid for s in servers], [s.api_port for s in servers], a))
        if redis is not None:
            res["redis_cpu_s_total"] = round(redis.cpu_s(), 2)
    finally:
        for s in servers:
            s.stop()
        if redis is not None:
            redis.stop()
        if pg is not None:
            pg.stop()
            pg.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    out = {"scenario": "desk", "shoppers": a.shoppers, "agents": a.agents, "capacity": a.capacity, "nodes": a.nodes, "bot": a.bot,
           "msgs": a.msgs, "think_s": a.think, "answer_delay_s": a.answer_delay, "offline_chance": a.offline_chance,
           "load_average_before": load_before, "load_average_after": [round(x, 2) for x in os.getloadavg()],
           **res, "machine_info": machine()}
    text = orjson.dumps(out, option=orjson.OPT_INDENT_2).decode()
    if a.out:
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
