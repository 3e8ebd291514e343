#!/usr/bin/env python
"""Store micro-benchmarks (issue 14): the store alone, no gateway, on uvloop.

    python loadtest/bench/store.py [SCENARIO ...] [--kind sqlite] [--seconds 5] [--set k=v ...]

Scenarios (default: all of them):
  commits   durable commits/s with N committers in flight (--inflight, default 64,1000):
            each committer awaits commit() of one message after another, in its own room
            among --rooms rooms; ack = commit() returned, i.e. after the transaction
  latency   ack latency (p50/p99/max) of commits sent at a fixed --rate (default 1,000/s),
            each as its own task, whatever the previous ones are doing
  archive   archive() write-behind: messages written/s when archive() is called as fast
            as the backlog allows, and the event loop's CPU per archive() call
  size      bytes on disk per stored message: --messages messages (default 200,000) of a
            realistic chat payload (100-200 bytes of JSON, Chinese and English) archived,
            the full-text index caught up, the store closed (WAL checkpointed); file size / N

``--set batch_ms=2`` (repeatable) passes constructor options of the store; ``--sweep
batch_ms=0,1,2,5`` runs commits and latency once per value. A fresh database in a
temporary directory (--dir, default /tmp) for every run. Figures are printed as a
markdown table and written, with the raw numbers, to loadtest/results/raw/store-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

import orjson  # noqa: E402

from gateway.store import Store, StoredMessage  # noqa: E402

RAW = ROOT / "loadtest" / "results" / "raw"

WORDS = ("您好", "请问", "我的订单", "什么时候", "发货", "已发货", "物流", "快递", "到了吗", "退款", "申请", "客服", "谢谢", "地址", "修改",
         "优惠券", "会员", "积分", "价格", "颜色", "尺码", "好的", "明白", "稍等", "帮您", "查询", "一下", "hello", "order",
         "shipped", "refund", "please", "thanks", "ok", "tracking")


def payload(rng: random.Random) -> bytes:
    """A chat message's data: 100-200 bytes of JSON, like a customer-service exchange."""
    while True:
        text = "".join(rng.choice(WORDS) for _ in range(rng.randint(8, 22)))
        data = orjson.dumps({"text": text, "mid": rng.getrandbits(40)})
        if 100 <= len(data) <= 200:
            return data


class Rooms:
    """Seqs per room, assigned on the loop (as the broker would)."""

    def __init__(self, n: int, seed: int = 1) -> None:
        self.n = n
        self.seq = [0] * n
        self.rng = random.Random(seed)
        self.payloads = [payload(self.rng) for _ in range(4096)]
        self.i = 0

    def message(self, room: int, sender: str) -> StoredMessage:
        self.seq[room] += 1
        self.i += 1
        return StoredMessage(f"cs:{room}", self.seq[room], time.time_ns() // 1_000_000, "chat", 1, sender,
                             self.payloads[self.i % len(self.payloads)], f"c{self.i}", "cs:*")


def make_store(kind: str, directory: str, options: dict[str, Any]) -> Store:
    if kind == "sqlite":
        from gateway.store.sqlite import SqliteStore

        return SqliteStore(os.path.join(directory, "store.db"), **options)
    if kind == "postgres":
        from gateway.store.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]

        store: Store = PostgresStore(os.environ["STORE_BENCH_DSN"], **options)
        return store
    raise SystemExit(f"unknown store kind {kind!r}")


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def written() -> int:
    """Bytes this process passed to write() so far (WAL, checkpoints): /proc/self/io wchar."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("wchar"))
    except (OSError, StopIteration):
        return 0


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def scenario_commits(store: Store, a: argparse.Namespace, inflight: int) -> dict[str, Any]:
    rooms = Rooms(a.rooms)
    done = 0
    stop = False
    lat: list[float] = []

    async def committer(k: int) -> None:
        nonlocal done
        room = k % a.rooms
        while not stop:
            t0 = time.perf_counter()
            await store.commit(rooms.message(room, f"u{k}"))
            lat.append(time.perf_counter() - t0)
            done += 1

    tasks = [asyncio.create_task(committer(k)) for k in range(inflight)]
    await asyncio.sleep(a.warmup)
    done, lat[:] = 0, []
    b0, m0, c0, w0, t0 = store.stats.batches, store.stats.batched_messages, cpu(), written(), time.perf_counter()
    await asyncio.sleep(a.seconds)
    n, elapsed, cpu_used, wbytes = done, time.perf_counter() - t0, cpu() - c0, written() - w0
    batches, msgs = store.stats.batches - b0, store.stats.batched_messages - m0
    stop = True
    await asyncio.gather(*tasks)
    return {"inflight": inflight, "commits_per_s": n / elapsed, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "batch": msgs / batches if batches else 0, "cpu_cores": cpu_used / elapsed, "cpu_us_per_commit": cpu_used / n * 1e6,
            "written_kb_per_commit": wbytes / n / 1024}


async def scenario_latency(store: Store, a: argparse.Namespace) -> dict[str, Any]:
    rooms = Rooms(a.rooms)
    lat: list[float] = []
    pending: set[asyncio.Task[None]] = set()

    async def one(msg: StoredMessage) -> None:
        t0 = time.perf_counter()
        await store.commit(msg)
        lat.append(time.perf_counter() - t0)

    interval = 1.0 / a.rate
    b0 = m0 = c0 = w0 = 0.0
    total = int(a.rate * (a.seconds + a.warmup))
    warm = int(a.rate * a.warmup)
    start = time.perf_counter()
    late = 0.0
    for i in range(total):
        due = start + i * interval
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            late = max(late, -delay)
        if i == warm:
            lat.clear()
            b0, m0, c0, w0 = store.stats.batches, store.stats.batched_messages, cpu(), written()
        t = asyncio.create_task(one(rooms.message(i % a.rooms, f"u{i % 997}")))
        pending.add(t)
        t.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    n = len(lat)
    batches, msgs, cpu_used, wbytes = store.stats.batches - b0, store.stats.batched_messages - m0, cpu() - c0, written() - w0
    return {"rate": a.rate, "n": n, "batch": msgs / batches if batches else 0, "cpu_us_per_commit": cpu_used / n * 1e6,
            "written_kb_per_commit": wbytes / n / 1024, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "p999_ms": pct(lat, 99.9) * 1e3, "max_ms": max(lat) * 1e3, "mean_ms": statistics.fmean(lat) * 1e3,
            "sender_late_ms": late * 1e3}


async def scenario_archive(store: Store, a: argparse.Namespace) -> dict[str, Any]:
    rooms = Rooms(a.rooms)
    limit = getattr(store, "max_backlog", 100_000) // 2
    msgs = [rooms.message(i % a.rooms, f"u{i % 997}") for i in range(200_000)]
    calls = refused = 0
    call_time = 0.0
    a0, c0, t0 = store.stats.archived, cpu(), time.perf_counter()
    end = t0 + a.seconds
    i = 0
    while time.perf_counter() < end:
        if store.backlog >= limit:
            await asyncio.sleep(0.001)
            continue
        k0 = time.perf_counter()
        for _ in range(1000):
            m = msgs[i % len(msgs)]
            i += 1
            if not store.archive(StoredMessage(m.room, i, m.ts, m.type, m.prio, m.sender, m.data, None, m.route)):
                refused += 1
        call_time += time.perf_counter() - k0
        calls += 1000
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - t0
    written = store.stats.archived - a0
    cpu_used = cpu() - c0
    return {"archived_per_s": written / elapsed, "calls": calls, "refused": refused, "us_per_archive_call": call_time / calls * 1e6,
            "cpu_cores": cpu_used / elapsed, "backlog_at_end": store.backlog}


async def scenario_size(store: Store, a: argparse.Namespace, path: str) -> dict[str, Any]:
    rooms = Rooms(a.rooms)
    n = a.messages
    data_bytes = 0
    for i in range(n):
        m = rooms.message(i % a.rooms, f"u{i % 997}")
        data_bytes += len(m.data)
        while not store.archive(m):
            await asyncio.sleep(0.005)
        if i % 1000 == 999:
            await asyncio.sleep(0)
    while store.backlog:
        await asyncio.sleep(0.01)
    if store.kind == "sqlite":  # let the deferred full-text index catch up
        import sqlite3

        def lag() -> int:
            c = sqlite3.connect(path)
            try:
                hi = c.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()[0]
                mark = int(c.execute("SELECT value FROM meta WHERE key = 'fts_indexed'").fetchone()[0])
                return int(hi - mark)
            finally:
                c.close()

        while await asyncio.to_thread(lag):
            await asyncio.sleep(0.05)
    await store.close()
    size = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
    return {"messages": n, "avg_data_bytes": data_bytes / n, "file_bytes": size, "bytes_per_message": size / n}


async def run_one(name: str, a: argparse.Namespace, options: dict[str, Any], **kw: Any) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix="store-bench-", dir=a.dir)
    try:
        store = make_store(a.kind, directory, options)
        await store.start()
        try:
            if name == "commits":
                r = await scenario_commits(store, a, kw["inflight"])
            elif name == "latency":
                r = await scenario_latency(store, a)
            elif name == "archive":
                r = await scenario_archive(store, a)
            else:
                r = await scenario_size(store, a, os.path.join(directory, "store.db"))
        finally:
            await store.close()
        r["stats"] = {"batches": store.stats.batches, "batched_messages": store.stats.batched_messages, "errors": store.stats.errors}
        return r
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenarios", nargs="*", default=["commits", "latency", "archive", "size"])
    p.add_argument("--kind", default="sqlite")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--inflight", default="64,1000")
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--rooms", type=int, default=1000)
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--dir", default=None)
    p.add_argument("--set", action="append", default=[], metavar="K=V")
    p.add_argument("--sweep", default=None, metavar="K=V1,V2")
    p.add_argument("--no-uvloop", action="store_true")
    p.add_argument("--repeat", type=int, default=1, help="runs per point; the median run is reported (with every run's main figure)")
    a = p.parse_args()
    base = {k: parse_value(v) for k, v in (s.split("=", 1) for s in a.set)}
    variants: list[dict[str, Any]] = [base]
    if a.sweep:
        k, vs = a.sweep.split("=", 1)
        variants = [{**base, k: parse_value(v)} for v in vs.split(",")]
    if not a.no_uvloop:
        import uvloop

        uvloop.install()
    rows: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def go(name: str, options: dict[str, Any], **kw: Any) -> None:
        runs = []
        for _ in range(a.repeat):
            load = os.getloadavg()[0]
            r = asyncio.run(run_one(name, a, options, **kw))
            r["load_before"] = load
            runs.append(r)
        key = {"commits": "commits_per_s", "latency": "p99_ms", "archive": "archived_per_s", "size": "bytes_per_message"}[name]
        runs.sort(key=lambda r: r[key])
        r = runs[len(runs) // 2]  # the median run by the scenario's main figure
        if a.repeat > 1:
            r[key + "_all"] = ", ".join(f"{x[key]:,.1f}" for x in runs)
        rows.append((name, options, r))
        print(f"{name:8s} {options} {kw or ''}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k != "stats"), flush=True)

    for options in variants:
        if "commits" in a.scenarios:
            for n in (int(x) for x in a.inflight.split(",")):
                go("commits", options, inflight=n)
        if "latency" in a.scenarios:
            go("latency", options)
        if "archive" in a.scenarios and options is variants[0]:
            go("archive", options)
        if "size" in a.scenarios and options is variants[0]:
            if a.kind == "sqlite":
                go("size", options)
            else:
                print("size: measured for SQLite only (the file); for PostgreSQL use pg_total_relation_size", flush=True)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = [f"## store bench ({a.kind}), {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, {a.seconds:g} s per point, "
          f"{a.rooms} rooms, median of {a.repeat}; load_before: the machine's 1-min load average before the run", ""]
    for name in ("commits", "latency", "archive", "size"):
        these = [(o, r) for n, o, r in rows if n == name]
        if not these:
            continue
        keys = [k for k in these[0][1] if k != "stats"]
        md.append("| options | " + " | ".join(keys) + " |")
        md.append("|---|" + "---|" * len(keys))
        for o, r in these:
            md.append(f"| {o or 'defaults'} | " + " | ".join(f"{r.get(k, ''):,.1f}" if isinstance(r.get(k), float) else f"{r.get(k, '')}" for k in keys) + " |")
        md.append("")
    text = "\n".join(md)
    print("\n" + text)
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / f"store-{stamp}.json").write_text(json.dumps({"args": vars(a), "results": [{"scenario": n, "options": o, **r} for n, o, r in rows]}, indent=1))
    (RAW / f"store-{stamp}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


