#!/usr/bin/env python
"""Conversation benchmarks (issue 15), through real gateways.

    python loadtest/bench/conversations.py sync [--convs 1000] [--unread 50] [--rounds 30]
    python loadtest/bench/conversations.py group [--members 2000] [--rate 20] [--duration 25] [--rounds 3]
    python loadtest/bench/conversations.py dm [--users 5000] [--window 1] [--stores sqlite,postgres] [--rounds 3]

Every scenario takes ``--idle-below L``: before each measured run, wait (up to
``--idle-wait`` s) for the 1-minute load average to drop below L (the machine is shared);
the load average before each run is reported with it.

``group``: two gateway nodes (Redis broker, PostgreSQL store, ``server.io_threads = 1``
each), a group of ``--members`` created through ``POST /v1/conversations``, half of the
members connected to each node (gw-load ``--sync``: the first sync attaches, no join),
one member of node A publishing into the group at ``--rate`` msgs/s. Per message, the
time from publish to the LAST member's receipt (both gw-load processes record each
message's latest receive time, ``--per-message``; merged here): p50/p90/p99/max, and
messages that missed a member. Also the per-delivery latency of each node's members.
Goal (issue 15): last-member p99 <= 30 ms at 20 msgs/s.

``dm``: one node, ``--users`` connections in pairs (gw-load ``--dm-pairs --sync``), each
publishing into the dm with its peer with ``--window`` publishes unacked (as fast as
acks come back), on the embedded SQLite store and/or PostgreSQL (``--stores``,
interleaved per round): acked messages/s, peer deliveries/s, publish->ack p50/p99,
delivery latency.

``sync``: connect plus the first ``sync`` of a user who is a member of ``--convs`` dms,
``--unread`` of them with 3 unread messages each (the rest read to the end). The store
file is filled through the store API before the gateway starts (5 messages per
conversation). Each round opens a new WebSocket, sends ``sync`` (``msgs`` 20) and waits
for its ack; reported: p50/p95/p99/max of connect-to-ack, and of the sync alone (request
to ack), and of a second full sync on the same connection (attached already). Goal (issue 15): <= 50 ms on this machine. Also checked: the ack lists every
conversation (paged by 200) and the unread counts add up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

from gateway.store import StoredMessage  # noqa: E402
from gateway.store.sqlite import SqliteStore  # noqa: E402

BENCH_TOML = ROOT / "loadtest" / "bench" / "gateway-bench.toml"


def _machine() -> dict[str, Any]:
    from run import machine

    return machine()


CONVERSATION_ROUTES = """
[[routes]]
pattern = "dm:{a}:{b}"
kind = "dm"
join = "none"
store = "durable"
members_max = 2
user_rate = 0
room_rate = 0
"""


async def fill(path: str, user: str, convs: int, unread: int) -> None:
    """``user`` in ``convs`` dms with peers p0..; ``unread`` of them 3 messages behind."""
    store = SqliteStore(path)
    await store.start()
    t0 = int(time.time() * 1000) - 86_400_000
    msgs: list[StoredMessage] = []
    reads: list[tuple[str, str, int]] = []
    for i in range(convs):
        peer = f"p{i:05d}"
        room = f"dm:{min(user, peer)}:{max(user, peer)}"
        await store.create_conversation(room, "dm", peer, b"{}", [(user, "member"), (peer, "member")], 2)
        for seq in range(1, 6):
            sender = peer if seq % 2 else user
            msgs.append(StoredMessage(room, seq, t0 + i * 1000 + seq, "chat", 1, sender, orjson.dumps({"text": f"message {seq} of {i}"}),
                                      None, "dm:{a}:{b}"))
        reads.append((room, user, 2 if i < unread else 5))
        reads.append((room, peer, 5))
    for k in range(0, len(msgs), 1000):
        await store.commit_many(msgs[k:k + 1000])
    await store.mark_read_many(reads)
    await store.close()


async def measure(url: str, rounds: int, convs: int, unread: int) -> dict[str, Any]:
    import websockets

    total: list[float] = []
    sync_only: list[float] = []
    resync: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        async with websockets.connect(url, max_size=None, compression=None) as ws:
            hello = orjson.loads(await ws.recv())
            assert hello["op"] == "connected", hello
            t1 = time.perf_counter()
            seen = await _sync(ws)
            t2 = time.perf_counter()
            await _sync(ws)  # again, attached already: the sync alone
            resync.append((time.perf_counter() - t2) * 1000)
        assert len(seen) == convs, len(seen)
        assert sum(c["unread"] for c in seen) == 3 * unread, sum(c["unread"] for c in seen)
        total.append((t2 - t0) * 1000)
        sync_only.append((t2 - t1) * 1000)

    def pct(xs: list[float]) -> dict[str, float]:
        xs = sorted(xs)
        return {"p50": round(statistics.median(xs), 1), "p95": round(xs[int(0.95 * (len(xs) - 1))], 1),
                "p99": round(xs[int(0.99 * (len(xs) - 1))], 1), "max": round(xs[-1], 1)}

    return {"connect_and_sync_ms": pct(total), "sync_ms": pct(sync_only), "second_sync_ms": pct(resync)}


async def _sync(ws: Any) -> list[dict[str, Any]]:
    """Every page of a full sync."""
    seen: list[dict[str, Any]] = []
    before = None
    while True:
        req: dict[str, Any] = {"op": "sync", "id": 1, "limit": 200, "msgs": 20}
        if before is not None:
            req["before"] = before
        await ws.send(orjson.dumps(req).decode())
        while True:
            ack = orjson.loads(await ws.recv())
            if ack.get("op") in ("ack", "error"):
                break
        assert ack["op"] == "ack", ack
        seen += ack["convs"]
        if not ack["more"]:
            return seen
        before = ack["next"]


GROUP_ROUTES = CONVERSATION_ROUTES + """
[[routes]]
pattern = "group:{group_id}"
kind = "group"
join = "none"
store = "durable"
room_rate = 0
user_rate = 0
"""


def wait_idle(below: float | None, max_wait: float) -> float:
    """Wait (up to ``max_wait`` s) for the 1-minute load average to drop below ``below``;
    returns the load average then."""
    if below is not None:
        deadline = time.monotonic() + max_wait
        while os.getloadavg()[0] >= below and time.monotonic() < deadline:
            time.sleep(5)
    return round(os.getloadavg()[0], 2)


def pct(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    xs = sorted(xs)

    def q(p: float) -> float:
        return round(xs[min(len(xs) - 1, max(0, math.ceil(p * len(xs)) - 1))], 2)  # nearest rank

    return {"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": round(xs[-1], 2), "n": len(xs)}


def _post(url: str, body: dict[str, Any], timeout: float = 60.0) -> Any:
    import urllib.request

    req = urllib.request.Request(url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return orjson.loads(r.read())


def _gw_load_cmd(url: str, args: list[str]) -> list[str]:
    from run import GW_LOAD

    return [str(GW_LOAD), "--url", url, "--quiet", *args]


def _start_load(url: str, args: list[str], wait_ready: bool, timeout: float = 120.0) -> subprocess.Popen[str]:
    """Start gw-load; with ``wait_ready`` return once it printed ``READY`` (all connected).
    Its stdin is a pipe: with ``--stop-on-stdin-eof``, :func:`_finish_load` (closing it)
    ends its measured phase."""
    import select

    from run import log

    log("gw-load " + " ".join(args))
    p = subprocess.Popen(_gw_load_cmd(url, args), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    if wait_ready:
        assert p.stderr is not None
        deadline = time.monotonic() + timeout
        buf = ""
        while "READY" not in buf:
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gw-load did not connect: {buf[-2000:]}")
            r, _, _ = select.select([p.stderr], [], [], 1.0)
            if r:
                line = p.stderr.readline()
                buf += line
    return p


def _finish_load(p: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = p.communicate(timeout=timeout)
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"gw-load failed ({p.returncode}): {err[-2000:]}")
    return json.loads(lines[-1])


def _brief(ld: dict[str, Any]) -> dict[str, Any]:
    """A gw-load summary without the per-message list."""
    return {k: v for k, v in ld.items() if k != "per_message"}


def sc_group(args: argparse.Namespace) -> dict[str, Any]:
    """Two nodes, a group of ``--members``, half on each node, all online: publish to the
    last member's receipt."""
    sys.path.insert(0, str(ROOT / "tests"))
    from run import Redis, Server, log
    from support.postgres import PostgresServer, install_postgres

    bindir, why = install_postgres()
    if not bindir:
        raise SystemExit(f"no PostgreSQL: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="conv-group-"))
    config = tmp / "gateway.toml"
    config.write_text(BENCH_TOML.read_text() + GROUP_ROUTES)
    redis = Redis()
    pg = PostgresServer(bindir).start()
    runs: list[dict[str, Any]] = []
    try:
        dsn = pg.create_database("conv_group")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
        mig = subprocess.run([sys.executable, "-m", "gateway", "migrate", "--dsn", dsn], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env=env)
        if mig.returncode != 0:
            raise SystemExit(f"migrate failed: {mig.stderr[-2000:]}")
        sets = ["broker.kind=redis", f"broker.url={redis.url}", "store.kind=postgres", f"store.dsn={dsn}",
                "server.io_threads=1"]
        half = args.members // 2
        for r in range(args.rounds):
            prefix = f"r{r}x{os.getpid() % 1000}u"
            users = [f"{prefix}{i}" for i in range(args.members)]
            publisher = users[half - 1]  # the last connection on node A
            room = f"group:bench-{prefix}"
            load = wait_idle(args.idle_below, args.idle_wait)
            with Server("livegate", sets, tag="-conv-a", config=config) as a, Server("livegate", sets, tag="-conv-b", config=config) as b:
                t0 = time.perf_counter()
                res = _post(f"http://127.0.0.1:{a.api_port}/v1/conversations",
                            {"kind": "group", "room": room, "creator": publisher, "members": users, "meta": {"name": "bench"}})
                create_s = time.perf_counter() - t0
                assert res.get("created"), res
                common = ["--sync", "--per-message", "--user-prefix", prefix, "--room", room, "--ping-interval", "20",
                          "--connect-timeout", "60"]
                warm, dur, drain = 3.0, args.duration, 3.0
                # B (receivers only) first, connected before A publishes; it outlives A's run.
                pb = _start_load(b.url, [*common, "--conns", str(args.members - half), "--user-offset", str(half),
                                         "--publishers", "0", "--duration", str(warm + dur + 3 * drain + 120), "--drain-wait", "0.5",
                                         "--stop-on-stdin-eof", "--server-pid", str(b.pid)], wait_ready=True)
                pa = _start_load(a.url, [*common, "--conns", str(half - 1), "--publishers", "1", "--rate", str(args.rate),
                                         "--warmup", str(warm), "--duration", str(dur), "--drain-wait", str(drain),
                                         "--server-pid", str(a.pid)], wait_ready=False)
                la = _finish_load(pa, warm + dur + 3 * drain + 120)
                lb = _finish_load(pb, 60)  # closes its stdin: A's drain is over, B stops too
            runs.append(_group_round(r, load, create_s, args.members, la, lb))
            log(f"group round {r}: {runs[-1]['summary']}")
    finally:
        redis.stop()
        pg.stop()
        pg.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"scenario": "group", "members": args.members, "rate": args.rate, "duration_s": args.duration, "runs": runs}
def _group_round(r: int, load: float, create_s: float, members: int, la: dict[str, Any], lb: dict[str, Any]) -> dict[str, Any]:
    """Merge the two processes' per-message records: the last member's receipt of each
    message A published in its measured phase."""
    lo, hi = la["measured_publish_t_us"]
    seen: dict[int, list[int]] = {}
    for ld in (la, lb):
        for t, last, n in ld.get("per_message") or []:
            if lo <= t <= hi:
                e = seen.setdefault(t, [0, 0])
                e[0] = max(e[0], last)
                e[1] += n
    receivers = la["receivers"] + lb["receivers"]
    last_ms = [(last - t) / 1000 for t, (last, _n) in seen.items()]
    short = sum(1 for _t, (_l, n) in seen.items() if n < receivers)
    missing = la["published"] * receivers - sum(n for _l, n in seen.values())
    summary = {
        "last_member_ms": pct(last_ms),
        "messages_published": la["published"], "messages_seen": len(seen), "messages_short_of_a_member": short,
        "deliveries_missing": missing, "receivers": receivers,
        "per_delivery_ms_node_a": la["latency_ms"], "per_delivery_ms_node_b": lb["latency_ms"],
        "publish_ack_ms": la["ack_ms"],
        "server_cpu_util": [la.get("server_cpu_util"), lb.get("server_cpu_util")],
        "client_cpu_util": [la.get("client_cpu_util"), lb.get("client_cpu_util")],
    }
    return {"round": r, "load_average": load, "create_group_s": round(create_s, 3), "summary": summary,
            "node_a": _brief(la), "node_b": _brief(lb)}


def sc_dm(args: argparse.Namespace) -> dict[str, Any]:
    """One node, ``--users`` connections in dm pairs, each sending to its peer with
    ``--window`` unacked; stores interleaved per round."""
    sys.path.insert(0, str(ROOT / "tests"))
    from run import Server, log

    stores = args.stores.split(",")
    pg = None
    tmp = Path(tempfile.mkdtemp(prefix="conv-dm-"))
    config = tmp / "gateway.toml"
    config.write_text(BENCH_TOML.read_text() + CONVERSATION_ROUTES)
    runs: list[dict[str, Any]] = []
    try:
        if "postgres" in stores:
            from support.postgres import PostgresServer, install_postgres

            bindir, why = install_postgres()
            if not bindir:
                raise SystemExit(f"no PostgreSQL: {why}")
            pg = PostgresServer(bindir).start()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
        for r in range(args.rounds):
            order = stores if r % 2 == 0 else stores[::-1]
            for store in order:
                if store == "sqlite":
                    sets = [f"store.path={tmp / f'dm-{r}.db'}"]
                else:
                    assert pg is not None
                    dsn = pg.create_database(f"conv_dm_{r}")
                    mig = subprocess.run([sys.executable, "-m", "gateway", "migrate", "--dsn", dsn], cwd=ROOT, capture_output=True,
                                         text=True, timeout=120, env=env)
                    if mig.returncode != 0:
                        raise SystemExit(f"migrate failed: {mig.stderr[-2000:]}")
                    sets = ["store.kind=postgres", f"store.dsn={dsn}"]
                load = wait_idle(args.idle_below, args.idle_wait)
                with Server("livegate", sets, tag=f"-conv-dm-{store}", config=config) as srv:
                    p = _start_load(srv.url, ["--sync", "--conns", "0", "--publishers", str(args.users), "--dm-pairs",
                                              "--rate", args.rate, "--window", str(args.window), "--user-prefix", f"d{r}u",
                                              "--warmup", str(args.warmup), "--duration", str(args.duration), "--drain-wait", "2",
                                              "--connect-timeout", "60", "--ping-interval", "20", "--server-pid", str(srv.pid)],
                                    wait_ready=False)
                    ld = _finish_load(p, args.warmup + args.duration + 200)
                    st = srv.stats() or {}
                row = {"round": r, "store": store, "load_average": load, "acks_per_s": ld["acks_per_s"],
                       "deliveries_per_s": ld["deliveries_per_s"], "ack_ms": ld["ack_ms"], "delivery_ms": ld["latency_ms"],
                       "published": ld["published"], "acks": ld["publish_acks"], "errors": ld["publish_errors"],
                       "received": ld["received"], "own_copies": ld["publisher_received"],
                       "conns_ok": ld["conns_ok"], "conns_failed": ld["conns_failed"],
                       "server_cpu_util": ld.get("server_cpu_util"), "client_cpu_util": ld.get("client_cpu_util"),
                       "store_stats": st.get("store"), "load": _brief(ld)}
                runs.append(row)
                log(f"dm round {r} {store}: acks/s {row['acks_per_s']:,.0f} delivered/s {row['deliveries_per_s']:,.0f} "
                    f"ack p50/p99 {row['ack_ms']['p50']}/{row['ack_ms']['p99']} ms, load {load}")
    finally:
        if pg is not None:
            pg.stop()
            pg.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"scenario": "dm", "users": args.users, "window": args.window, "rate": args.rate, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", choices=("sync", "group", "dm"))
    ap.add_argument("--convs", type=int, default=1000, help="sync: the user's conversations")
    ap.add_argument("--unread", type=int, default=50, help="sync: conversations with unread messages")
    ap.add_argument("--rounds", type=int, default=None, help="sync: 30 round trips; group, dm: 3 runs")
    ap.add_argument("--members", type=int, default=2000, help="group: members (half on each node)")
    ap.add_argument("--rate", default=None, help="group: msgs/s (20); dm: total msgs/s or max (max)")
    ap.add_argument("--duration", type=float, default=None, help="measured seconds (group 25, dm 15)")
    ap.add_argument("--warmup", type=float, default=3.0, help="dm: warm-up seconds (the dms are created then)")
    ap.add_argument("--users", type=int, default=5000, help="dm: connections (users), in pairs")
    ap.add_argument("--window", type=int, default=1, help="dm: unacked publishes per user")
    ap.add_argument("--stores", default="sqlite", help="dm: sqlite,postgres (interleaved per round)")
    ap.add_argument("--idle-below", type=float, default=None, help="wait for the 1-min load average to drop below this")
    ap.add_argument("--idle-wait", type=float, default=300.0, help="the longest wait for --idle-below (s)")
    ap.add_argument("--out", default=None, help="also write the JSON result here")
    args = ap.parse_args()
    if args.scenario in ("group", "dm"):
        args.rounds = args.rounds or 3
        if args.scenario == "group":
            args.rate = float(args.rate or 20)
            args.duration = args.duration or 25.0
            res = sc_group(args)
        else:
            args.rate = args.rate or "max"
            args.duration = args.duration or 15.0
            res = sc_dm(args)
        res.update({"machine": _machine(), "load_average_end": os.getloadavg()})
        text = orjson.dumps(res, option=orjson.OPT_INDENT_2).decode()
        if args.out:
            Path(args.out).write_text(text)
        print(text)
        return
    args.rounds = args.rounds or 30
    import uvloop
    from run import BENCH_TOML, free_port, http_json

    with tempfile.TemporaryDirectory(prefix="conv-bench-") as tmp:
        db = os.path.join(tmp, "store.db")
        user = "me"
        uvloop.run(fill(db, user, args.convs, args.unread))
        load_before = wait_idle(args.idle_below, args.idle_wait)
        config = Path(tmp) / "gateway.toml"
        config.write_text(BENCH_TOML.read_text() + CONVERSATION_ROUTES)
        port, api_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "gateway", "run", "-c", str(config), "--host", "127.0.0.1", "--port", str(port),
               "--api-port", str(api_port), "--set", f"store.path={db}", "--set", f"conversations.max_attached={args.convs}"]
        log = open(Path(tmp) / "gateway.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if http_json(f"http://127.0.0.1:{api_port}/readyz", 1.0).get("ready"):
                        break
                except (OSError, ValueError):
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the gateway did not start:\n{(Path(tmp) / 'gateway.log').read_text()[-2000:]}")
                time.sleep(0.1)
            res = uvloop.run(measure(f"ws://127.0.0.1:{port}/ws?user={user}", args.rounds, args.convs, args.unread))
        finally:
            proc.terminate()
            proc.wait(15)
            log.close()
    res.update({"convs": args.convs, "unread_convs": args.unread, "rounds": args.rounds, "load_average": os.getloadavg()[0],
                "load_average_before": load_before})
    print(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
