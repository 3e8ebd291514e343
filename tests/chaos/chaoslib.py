"""Helpers of the chaos tests (fixtures are in conftest.py): the configuration of the
gateway nodes they start (with ``support.gateway.GatewayProcess``, through the
``gateway_factory`` fixture), a recording WebSocket peer, a publish stream with
per-message bookkeeping, the delivery check every Redis/node-failure test ends with, and
gw-load / RSS helpers for the single-node tests.

A module with its own name (not ``conftest``): ``from conftest import ...`` is ambiguous
once several directories have a conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import resource
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from support.gateway import GatewayProcess
from support.redis import REDIS_NODE_SETTINGS, RedisServer, redis_node_config  # noqa: F401  (RedisServer: re-exported for the tests)
from websockets.asyncio.client import ClientConnection, connect

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

#: A gateway node of the chaos tests (a plain ``support.gateway.GatewayProcess``).
ChaosNode = GatewayProcess

#: The room route of the chaos tests: unlimited rates, a history longer than any test
#: publishes (so "recoverable" never depends on trimming), presence events off.
CHAOS_ROUTE = """
[[routes]]
pattern = "chaos:{room_id}"
room_rate = 0.0
user_rate = 0.0
history_size = 20000
history_ttl = 600.0
presence_events_max_members = 0
"""


def chaos_node_config(redis_url: str) -> str:
    """The TOML of a chaos node on ``redis_url``: ``support.redis.redis_node_config`` (redis
    broker, no rate limits, fast presence) with the ``chaos:{id}`` route in front of the
    others. Started with ``REDIS_NODE_SETTINGS`` (dev auth, ``server.io_threads=2``,
    ``drain.timeout=1.0``) and node id = its name (conftest.py's ``chaos_nodes``)."""
    return redis_node_config(redis_url, presence_interval=0.2).replace("[[routes]]", CHAOS_ROUTE.lstrip() + "\n[[routes]]", 1)


def readyz(node: GatewayProcess) -> int:
    return node.ready_status()


async def wait_ready(nodes: Iterable[GatewayProcess], timeout: float) -> float:
    """Wait until every node answers ``/readyz`` 200; returns the seconds it took."""
    t0 = time.monotonic()
    nodes = list(nodes)
    while True:
        codes = await asyncio.gather(*(asyncio.to_thread(readyz, n) for n in nodes))
        if all(c == 200 for c in codes):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"nodes not ready within {timeout}s: {dict(zip([n.node_id for n in nodes], codes, strict=True))}")
        await asyncio.sleep(0.05)


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def raise_nofile(want: int = 20000) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(want, hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


# ---- a recording peer -------------------------------------------------------------------------

#: The peers with a connection that :meth:`Peer.close` has not closed yet (closed by the
#: fixtures at the end of each test, see :func:`close_peers`).
_OPEN: set[Peer] = set()


async def close_peers() -> None:
    """Close every peer still connected: connections the tests leave open must not end
    as unclosed transports when the test's event loop closes."""
    while _OPEN:
        await _OPEN.pop().close()


class Peer:
    """One protocol-v1 client that records everything: every ``msg`` (batches unpacked),
    every reply by request id, its close code. It can reconnect (to any node) keeping its
    record and its request ids (ids are unique over the peer's life)."""

    _ids = itertools.count(1)

    def __init__(self, name: str) -> None:
        self.name = name
        self.ws: ClientConnection | None = None
        self.node: str | None = None
        #: Connection number (1 for the first connect).
        self.gen = 0
        #: Every room message received live, in arrival order (across reconnects).
        self.msgs: list[dict[str, Any]] = []
        #: Messages that came in join acks (resume or history), per reconnect.
        self.recovered_msgs: list[dict[str, Any]] = []
        self.replies: dict[int, dict[str, Any]] = {}
        self._waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.close_codes: list[int | None] = []
        self.closed = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        self.read_error: BaseException | None = None

    @property
    def is_open(self) -> bool:
        return self.ws is not None and not self.closed.is_set()

    async def connect(self, node: GatewayProcess, local_addr: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
        kw: dict[str, Any] = {"local_addr": (local_addr, 0)} if local_addr else {}
        ws = await connect(node.ws_url(user=self.name), subprotocols=["gateway.v1"],  # type: ignore[list-item]
                           max_size=1 << 24, open_timeout=timeout, ping_interval=None, compression=None,
                           max_queue=None, close_timeout=1.0, **kw)
        hello = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        assert hello["op"] == "connected", hello
        self.ws, self.node = ws, hello.get("node")
        self.gen += 1
        self.closed = asyncio.Event()
        self.reader = asyncio.ensure_future(self._read(ws))
        _OPEN.add(self)
        return hello

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                f = orjson.loads(raw)
                op = f.get("op")
                if op == "msg":
                    f["_node"] = self.node
                    f["_t"] = time.perf_counter()
                    self.msgs.append(f)
                elif op == "batch":
                    for m in f.get("msgs") or ():
                        if m.get("op") == "msg":
                            m["_node"] = self.node
                            self.msgs.append(m)
                elif op in ("ack", "error") and isinstance(f.get("id"), int):
                    self.replies[f["id"]] = f
                    fut = self._waiters.pop(f["id"], None)
                    if fut is not None and not fut.done():
                        fut.set_result(f)
        except Exception as e:  # (any end of the connection: recorded below)
            self.read_error = e
        finally:
            self.close_codes.append(ws.close_code)
            err = ConnectionError(f"{self.name}: connection closed ({ws.close_code})")
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(err)
            self._waiters.clear()
            self.closed.set()

    async def send(self, op: str, **fields: Any) -> int:
        assert self.ws is not None
        rid = next(self._ids)
        await self.ws.send(orjson.dumps({"op": op, "id": rid, **fields}).decode())
        return rid

    async def request(self, op: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        assert self.ws is not None
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        await self.ws.send(orjson.dumps({"op": op, "id": rid, **fields}).decode())
        return await asyncio.wait_for(fut, timeout)

    async def join(self, room: str, resume: tuple[int, str] | None = None, **fields: Any) -> dict[str, Any]:
        if resume is not None:
            fields["resume"] = {"seq": resume[0], "epoch": resume[1]}
        ack = await self.request("join", room=room, **fields)
        assert ack["op"] == "ack", f"{self.name}: join {room} answered {ack}"
        self.recovered_msgs.extend(ack.get("msgs") or ())
        return ack

    def position(self, room: str) -> tuple[int, str] | None:
        """The last recoverable ``(seq, epoch)`` this peer saw in ``room`` (live or in a
        join ack): what a client resumes from."""
        for m in reversed(self.msgs):
            if m.get("room") == room and m.get("seq"):
                return int(m["seq"]), m["epoch"]
        return None

    def abort(self) -> None:
        if self.ws is not None and self.ws.transport is not None:
            self.ws.transport.abort()

    async def close(self) -> None:
        _OPEN.discard(self)
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 2)
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(BaseException):
                await self.reader


# ---- publish streams --------------------------------------------------------------------------


@dataclass
class Sent:
    tag: str
    n: int
    rid: int
    t: float
    node: str | None
    gen: int


@dataclass
class Stream:
    """A publisher sending ``{"p": tag, "n": n}`` into ``room`` at ``rate`` msgs/s
    without waiting for acks (acks are matched by id later). ``reconnect`` (a coroutine
    function) is awaited when the connection drops; publishing goes on afterwards."""

    peer: Peer
    room: str
    rate: float
    reconnect: Any = None
    sent: list[Sent] = field(default_factory=list)
    send_failures: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> Stream:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> None:
        n = 0
        period = 1.0 / self.rate
        nxt = time.monotonic()
        while not self._stop.is_set():
            if not self.peer.is_open:
                if self.reconnect is None:
                    return
                await self.reconnect()
                continue
            try:
                rid = await self.peer.send("publish", room=self.room, type="chat", data={"p": self.peer.name, "n": n})
                self.sent.append(Sent(self.peer.name, n, rid, time.monotonic(), self.peer.node, self.peer.gen))
                n += 1
            except Exception:  # (the connection broke: reconnect above)
                self.send_failures += 1
                await asyncio.sleep(0.05)
            nxt += period
            await asyncio.sleep(max(0.0, nxt - time.monotonic()))

    async def stop(self, settle: float = 6.0) -> None:
        """Stop publishing and wait (up to ``settle`` s) for the replies still due on
        open connections."""
        self._stop.set()
        if self._task is not None:
            await self._task
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline and self.peer.is_open and any(s.rid not in self.peer.replies for s in self.sent):
            await asyncio.sleep(0.05)

    def outcome(self) -> dict[str, list[tuple[Sent, dict[str, Any]]]]:
        """The publishes by outcome: ``acked`` (seq > 0), ``degraded`` (ack with
        ``degraded``), ``seq0`` (ack seq 0, not degraded), ``error``, ``unanswered``."""
        out: dict[str, list[tuple[Sent, dict[str, Any]]]] = {k: [] for k in ("acked", "degraded", "seq0", "error", "unanswered")}
        for s in self.sent:
            r = self.peer.replies.get(s.rid)
            if r is None:
                out["unanswered"].append((s, {}))
            elif r["op"] == "error":
                out["error"].append((s, r))
            elif r.get("degraded"):
                out["degraded"].append((s, r))
            elif r.get("seq", 0) > 0:
                out["acked"].append((s, r))
            else:
                out["seq0"].append((s, r))
        return out


def key(m: dict[str, Any]) -> tuple[str, int] | None:
    d = m.get("data")
    if isinstance(d, dict) and "p" in d and "n" in d:
        return d["p"], int(d["n"])
    return None


# ---- the delivery check -----------------------------------------------------------------------


@dataclass
class Report:
    """What a chaos run delivered, for the assertions and the printed summary."""

    acked: int = 0
    degraded: int = 0
    errors: int = 0
    seq0: int = 0
    unanswered: int = 0
    epochs: list[str] = field(default_factory=list)
    #: Per subscriber: acked messages it missed live (then recovered by resume or not).
    missed_live: dict[str, int] = field(default_factory=dict)
    #: Of those, received in the ack of the subscriber's own rejoin with resume.
    in_rejoin: dict[str, int] = field(default_factory=dict)
    #: Of those, recovered by a resume from the first missed one at the end.
    recovered_by_resume: dict[str, int] = field(default_factory=dict)
    #: Missed messages of a lost epoch, for which a resume correctly said recovered: false.
    lost_with_epoch: dict[str, int] = field(default_factory=dict)
    out_of_order: dict[str, int] = field(default_factory=dict)
    #: Degraded publishes that nevertheless got a seq (in history or live elsewhere).
    degraded_with_seq: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"acked(seq>0)={self.acked} degraded={self.degraded} errors={self.errors} seq0={self.seq0} "
                f"unanswered={self.unanswered} epochs={self.epochs} missed_live={self.missed_live} in_rejoin={self.in_rejoin} "
                f"recovered_by_resume={self.recovered_by_resume} lost_with_epoch={self.lost_with_epoch} "
                f"out_of_order={self.out_of_order} degraded_with_seq={self.degraded_with_seq}")


async def full_history(node: GatewayProcess, room: str, epoch: str) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    """The room's whole stream of ``epoch`` (a resume from seq 0) through a fresh client."""
    p = Peer(f"hist-{os.urandom(3).hex()}")
    await p.connect(node)
    try:
        ack = await p.join(room, resume=(0, epoch))
        return ack, {int(m["seq"]): m for m in ack.get("msgs") or ()}
    finally:
        await p.close()


async def check_delivery(room: str, streams: list[Stream], subscribers: list[Peer], nodes: dict[str, GatewayProcess],
                         lost_epochs: Iterable[str] = ()) -> Report:
    """The promise of docs/scaling.md, checked per subscriber:

    - every publish acked with ``seq`` > 0 was received live (same seq, same content, once)
      or is recoverable: a resume ``{seq: first missed - 1, epoch}`` on the subscriber's
      node answers ``recovered: true`` with the missed messages (right seq and content);
    - except messages of an epoch in ``lost_epochs`` (Redis restarted empty): for those
      the same resume must answer ``recovered: false`` (the client is told to reload);
    - degraded acks (Redis unreachable) have ``seq`` 0 and reached at most this node's
      members, once, with ``seq`` 0, and are not in history;
    - every publish sent on a connection that stayed open got a reply.

    Returns the report; its ``problems`` list the violations (empty = kept).
    """
    rep = Report()
    lost = set(lost_epochs)
    acked: list[tuple[Sent, int]] = []
    degraded: list[Sent] = []
    for st in streams:
        o = st.outcome()
        acked += [(s, int(r["seq"])) for s, r in o["acked"]]
        degraded += [s for s, _ in o["degraded"]]
        rep.acked += len(o["acked"])
        rep.degraded += len(o["degraded"])
        rep.errors += len(o["error"])
        rep.seq0 += len(o["seq0"])
        rep.unanswered += len(o["unanswered"])
        for _s, r in o["degraded"]:
            if r.get("seq") != 0:
                rep.problems.append(f"degraded ack with seq {r.get('seq')} (docs: seq 0): {r}")
        for _s, r in o["seq0"]:
            rep.problems.append(f"ack with seq 0 for a recoverable chat message, not degraded: {r}")

    # Where each acked message lives: (seq, epoch) as seen by anyone (live or recovered).
    seen_at: dict[tuple[str, int], tuple[int, str]] = {}
    everyone = subscribers + [st.peer for st in streams]
    for p in everyone:
        for m in p.msgs + p.recovered_msgs:
            k = key(m)
            if k is not None and m.get("seq"):
                seen_at.setdefault(k, (int(m["seq"]), m["epoch"]))
    first_sent: dict[str, float] = {}
    for s, _ in acked:
        ep = seen_at.get((s.tag, s.n), (0, ""))[1]
        if ep:
            first_sent[ep] = min(first_sent.get(ep, s.t), s.t)
    epochs = sorted(first_sent, key=first_sent.__getitem__)
    rep.epochs = epochs
    live_epochs = [e for e in epochs if e not in lost]
    if not live_epochs:
        rep.problems.append(f"no epoch left to check (epochs {epochs}, lost {sorted(lost)})")
        return rep
    current = live_epochs[-1]
    any_node = next(n for n in nodes.values() if n.running())
    hist_ack, history = await full_history(any_node, room, current)
    if hist_ack.get("recovered") is not True:
        rep.problems.append(f"resume from seq 0 of the current epoch {current} answered {hist_ack.get('recovered')}")

    expect: dict[tuple[str, int], tuple[int, str]] = {}
    for s, seq in acked:
        k = (s.tag, s.n)
        where = seen_at.get(k)
        if where is None:
            hm = history.get(seq)
            if hm is not None and key(hm) == k:
                where = (seq, current)
            else:
                rep.problems.append(f"publish {k} acked with seq {seq} was seen by nobody and is not in history")
                continue
        if where[0] != seq:
            rep.problems.append(f"publish {k} acked with seq {seq} arrived with seq {where[0]}")
        expect[k] = where
        if where[1] == current:
            hm = history.get(where[0])
            if hm is None or key(hm) != k:
                rep.problems.append(f"publish {k} (seq {where[0]}, epoch {current}) is not in the room's history: {hm}")

    deg_keys = {(s.tag, s.n): s for s in degraded}
    for seq, hm in history.items():
        if key(hm) in deg_keys:
            rep.degraded_with_seq += 1
            rep.problems.append(f"degraded publish {key(hm)} is in history with seq {seq} (docs: not in history)")

    for p in subscribers:
        for m in p.msgs:
            k = key(m)
            if k in deg_keys and m.get("seq"):
                rep.problems.append(f"{p.name} on {m.get('_node')}: degraded publish {k} of node {deg_keys[k].node} arrived with "
                                    f"seq {m['seq']} (docs: seq 0, that node's members only)")
    for p in subscribers:
        got: dict[tuple[int, str], dict[str, Any]] = {}
        dup = 0
        disorder = 0
        last: dict[str, int] = {}
        for m in p.msgs:
            if m.get("room") != room:
                continue
            if not m.get("seq"):
                k = key(m)
                s = deg_keys.get(k) if k else None
                if s is None:
                    rep.problems.append(f"{p.name}: live message with seq 0 that was not a degraded publish: {m}")
                elif s.node != m.get("_node"):
                    rep.problems.append(f"{p.name} on {m.get('_node')}: got degraded publish {k} of node {s.node} (docs: that node's members only)")
                continue
            sk = (int(m["seq"]), m["epoch"])
            if sk in got:
                dup += 1
            got[sk] = m
            if sk[0] < last.get(sk[1], 0):
                disorder += 1
            last[sk[1]] = max(last.get(sk[1], 0), sk[0])
        if dup:
            rep.problems.append(f"{p.name}: {dup} messages received twice live")
        rep.out_of_order[p.name] = disorder
        deg_seen: dict[tuple[str, int], int] = {}
        for m in p.msgs:
            k = key(m)
            if k in deg_keys and not m.get("seq"):
                deg_seen[k] = deg_seen.get(k, 0) + 1
        if any(v > 1 for v in deg_seen.values()):
            rep.problems.append(f"{p.name}: a degraded publish arrived more than once")

        rejoined = {(int(m["seq"]), m["epoch"]): m for m in p.recovered_msgs if m.get("room", room) == room and m.get("seq")}
        missed: dict[str, list[tuple[int, tuple[str, int]]]] = {}
        n_missed_live = 0
        for k, (seq, ep) in expect.items():
            m = got.get((seq, ep))
            if m is None:
                n_missed_live += 1
                m = rejoined.get((seq, ep))
                if m is not None:
                    rep.in_rejoin[p.name] = rep.in_rejoin.get(p.name, 0) + 1
            if m is None:
                missed.setdefault(ep, []).append((seq, k))
            elif key(m) != k:
                rep.problems.append(f"{p.name}: seq {seq} of {ep} carries {key(m)}, acked for {k}")
        rep.missed_live[p.name] = n_missed_live
        for ep, items in missed.items():
            items.sort()
            first = items[0][0]
            node = nodes.get(p.node or "", any_node)
            if not node.running():
                node = next(n for n in nodes.values() if n.running())
            q = Peer(f"{p.name}-check-{os.urandom(2).hex()}")
            await q.connect(node)
            try:
                ack = await q.join(room, resume=(first - 1, ep))
            finally:
                await q.close()
            if ep in lost:
                if ack.get("recovered") is not False:
                    rep.problems.append(f"{p.name}: resume into lost epoch {ep} answered recovered={ack.get('recovered')} (docs: false)")
                rep.lost_with_epoch[p.name] = rep.lost_with_epoch.get(p.name, 0) + len(items)
                continue
            if ack.get("recovered") is not True:
                rep.problems.append(f"{p.name}: missed {len(items)} acked messages of {ep} (seqs {[s for s, _ in items][:10]}...), "
                                    f"resume from {first - 1} answered recovered={ack.get('recovered')}")
                continue
            back = {int(m["seq"]): m for m in ack.get("msgs") or ()}
            bad = [s for s, k in items if s not in back or key(back[s]) != k or back[s]["epoch"] != ep]
            if bad:
                rep.problems.append(f"{p.name}: resume did not return missed seqs {bad[:10]}")
            rep.recovered_by_resume[p.name] = rep.recovered_by_resume.get(p.name, 0) + len(items) - len(bad)

    for st in streams:
        # Publishes on a connection that is still open must all have been answered.
        if st.peer.is_open:
            pending = [s for s in st.sent if s.rid not in st.peer.replies and s.gen == st.peer.gen]
            if pending:
                rep.problems.append(f"{st.peer.name}: {len(pending)} publishes on an open connection were never answered")
    return rep



# ---- one node on the memory broker, gw-load, RSS ------------------------------------------------

#: The configuration of a single node (memory broker): unlimited ``chaos:{id}`` rooms
#: without history. Its ``--set``\ s are ``SINGLE_SETTINGS`` and then the test's own.
SINGLE_TOML = """
[auth]
mode = "dev"
[log]
level = "warning"
json = false
[presence]
interval = 10.0
[drain]
timeout = 1.0
[server]
demo = false
[[routes]]
pattern = "chaos:{room_id}"
room_rate = 0.0
user_rate = 0.0
history_size = 0
presence_events_max_members = 0
[[routes]]
pattern = "*"
room_rate = 0.0
user_rate = 0.0
"""

#: ``--set`` beats the TOML, and ``support.gateway.BASE_SETTINGS`` sets ``log.level=info``
#: and ``drain.timeout=5``: these put back the single node's own (a log line per
#: connection of 5,000 would cost the engine's CPU).
SINGLE_SETTINGS = ("log.level=warning", "drain.timeout=1.0")


def gw_load_binary() -> Path | None:
    """``target/release/gw-load`` of this tree (``cargo build --release -p gw-load``)."""
    p = ROOT / "target" / "release" / "gw-load"
    return p if p.exists() else None


async def run_gw_load(args: list[str], budget: float) -> dict[str, Any]:
    """Run gw-load (``--quiet``) and return its JSON summary."""
    exe = gw_load_binary()
    assert exe is not None, "gw-load is not built: cargo build --release -p gw-load"
    proc = await asyncio.create_subprocess_exec(str(exe), "--quiet", "--timeout", str(budget), *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), budget + 20)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, f"gw-load failed ({proc.returncode}): {err.decode()[-2000:]}"
    return json.loads(lines[-1])  # type: ignore[no-any-return]


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a background task."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.samples.append((time.monotonic(), rss_kib(self.pid)))

    async def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), rss_kib(self.pid)))
            await asyncio.sleep(self.interval)

    @property
    def peak(self) -> int:
        return max(v for _, v in self.samples)
