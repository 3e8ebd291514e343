#!/usr/bin/env python
"""PostgreSQL store benchmarks (issue 14): durable commits through
:class:`gateway.store.postgres.PostgresStore` on this machine, PostgreSQL on the same one.

    python loadtest/bench/store_pg.py SCENARIO [--dsn DSN] [--quick] [--rounds N] [--writers 1,2]

Scenarios:
  throughput  durable commits/s with 64 and with 1,000 commits in flight (closed loop:
              each of N tasks commits, waits for the ack, commits again), 100 rooms,
              every message with a cid; per writer count (--writers)
  latency     ack latency (commit() call to return) at 1,000 commits/s, open loop: each
              commit is started at its scheduled time, and its latency counts from that
              time (no coordinated omission); p50/p90/p99/max per round (goal p99 <= 20 ms)
  size        bytes per stored message on disk: N messages, then VACUUM (the trigram
              index's pending list merged), pg_total_relation_size / N, by relation
  insert      the batch statement alone (no store, no Python per commit): unnest arrays
              vs copy_records_to_table into a temporary table + INSERT ... SELECT, batches
              of 64 and 1,000, rounds interleaved
  all         the four

Without ``--dsn`` a private cluster is started from Debian's binaries the way the tests
do (tests/support/postgres.py: initdb as an unprivileged user, a free port, fsync and
synchronous_commit on) and removed at the end; with it, each scenario uses a database
created on that server (the role needs CREATEDB). Messages look like chat: a JSON object
with 12-60 characters of Chinese or English text (about 90 bytes of ``data``), a cid and
a sender. Results print as markdown; ``--json FILE`` also writes them raw.

The client (Python, uvloop) and PostgreSQL share the machine's 2 cores: the figures are
what one gateway process gets from a database beside it. Other work on the machine moves
them (compare rounds of one run; repeat a run that looks disturbed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "tests")]

import asyncpg  # noqa: E402

from gateway.store.base import StoredMessage  # noqa: E402
from gateway.store.postgres import PostgresStore  # noqa: E402

TEXTS = ["今天的直播太精彩了，主播加油！", "请问我的订单什么时候发货？订单号", "hello everyone, nice stream tonight", "送出了一个火箭",  # noqa: RUF001
         "客服您好，我想退货，衣服尺码不对", "thanks, the refund arrived", "这个优惠券怎么用不了？", "好的，谢谢"]  # noqa: RUF001


class Messages:
    """Chat-like messages, numbered per room."""

    def __init__(self, rooms: int = 100, seed: int = 1) -> None:
        self.rooms = rooms
        self.seqs = [0] * rooms
        self.rnd = random.Random(seed)
        self.n = 0

    def next(self) -> StoredMessage:
        r = self.rnd.randrange(self.rooms)
        self.seqs[r] += 1
        self.n += 1
        text = self.rnd.choice(TEXTS) + " " + str(self.rnd.getrandbits(40))
        data = json.dumps({"text": text, "at": self.n}, ensure_ascii=False).encode()
        return StoredMessage(f"cs:{r}", self.seqs[r], int(time.time() * 1000), "chat", 1, f"user{self.rnd.randrange(5000)}", data,
                             f"c{self.n:x}-{self.rnd.getrandbits(32):x}", "cs:*")


# ---------------------------------------------------------------- the database

@asynccontextmanager
async def server(dsn: str | None) -> AsyncIterator[Callable[[], Any]]:
    """Yields ``fresh()``: an awaitable factory of new empty databases (their DSNs)."""
    cluster = None
    if dsn is None:
        from support.postgres import PostgresServer, install_postgres

        bindir, log = install_postgres()
        if not bindir:
            raise SystemExit(f"no PostgreSQL here and apt-get could not install it:\n{log}")
        cluster = PostgresServer(bindir).start()
        dsn = cluster.dsn()
    admin = dsn
    made: list[str] = []

    async def fresh() -> str:
        name = f"bench_{os.getpid()}_{len(made)}"
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0 ENCODING \'UTF8\' LC_CTYPE \'C.UTF-8\' LC_COLLATE \'C.UTF-8\'')
        finally:
            await conn.close()
        made.append(name)
        return f"{admin.rsplit('/', 1)[0]}/{name}"

    try:
        yield fresh
    finally:
        conn = await asyncpg.connect(admin)
        try:
            for name in made:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        if cluster is not None:
            cluster.remove()


async def open_store(dsn: str, **kw: Any) -> PostgresStore:
    store = PostgresStore(dsn, **kw)
    await store.migrate()
    await store.start()
    return store


def pct(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


def machine() -> str:
    return f"load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs"


# ---------------------------------------------------------------- scenarios

async def closed_loop(store: PostgresStore, gen: Messages, inflight: int, total: int) -> float:
    """``inflight`` tasks commit ``total`` messages between them; commits/s."""
    per = total // inflight

    async def worker() -> None:
        for _ in range(per):
            await store.commit(gen.next())

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return per * inflight / (time.perf_counter() - t)


async def throughput(fresh: Callable[[], Any], a: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    total = 20_000 if a.quick else 60_000
    for rnd in range(a.rounds):
        for writers in a.writers:
            for inflight in (64, 1000):
                store = await open_store(await fresh(), writers=writers)
                gen = Messages()
                try:
                    await closed_loop(store, gen, inflight, 2_000)  # warm-up: connections, prepared statements
                    b0, m0 = store.stats.batches, store.stats.batched_messages
                    rate = await closed_loop(store, gen, inflight, total)
                    batch = (store.stats.batched_messages - m0) / max(1, store.stats.batches - b0)
                finally:
                    await store.close()
                row = {"round": rnd + 1, "writers": writers, "in_flight": inflight, "commits_per_s": round(rate), "avg_batch": round(batch, 1),
                       "machine": machine()}
                print(f"  throughput {row}", flush=True)
                out.append(row)
    return out


def time_statements(store: PostgresStore) -> list[float]:
    """Record how long each batch's INSERT (and its commit's WAL flush) takes, to tell a
    slow database or disk from a slow client in the latency figures."""
    spans: list[float] = []
    insert = store._insert

    async def timed(conn: Any, msgs: list[StoredMessage]) -> list[StoredMessage]:
        t = time.perf_counter()
        try:
            return await insert(conn, msgs)
        finally:
            spans.append(time.perf_counter() - t)

    store._insert = timed
    return spans


async def open_loop(store: PostgresStore, gen: Messages, rate: int, seconds: float) -> list[float]:
    """Start a commit every 1/rate s for ``seconds``; each one's latency from its
    scheduled start (so a stall counts for every commit it delays)."""
    now = time.perf_counter  # not loop.time(): uvloop's clock has 1 ms steps
    lat: list[float] = []
    pending: set[asyncio.Task[None]] = set()

    async def one(due: float) -> None:
        await store.commit(gen.next())
        lat.append(now() - due)

    start = now() + 0.05
    for i in range(int(rate * seconds)):
        due = start + i / rate
        delay = due - now()
        if delay > 0:
            await asyncio.sleep(delay)
        t = asyncio.create_task(one(due))
        pending.add(t)
        t.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    return lat


async def latency(fresh: Callable[[], Any], a: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    rate, seconds = 1000, (5 if a.quick else 20)
    for rnd in range(a.rounds):
        for writers in a.writers:
            store = await open_store(await fresh(), writers=writers)
            gen = Messages()
            statements = time_statements(store)
            try:
                await closed_loop(store, gen, 64, 2_000)
                statements.clear()
                lat = await open_loop(store, gen, rate, seconds)
            finally:
                await store.close()
            ms = [x * 1000 for x in lat]
            st = [x * 1000 for x in statements]
            row = {"round": rnd + 1, "writers": writers, "rate": rate, "seconds": seconds, "n": len(ms), "p50_ms": round(pct(ms, 0.5), 2),
                   "p90_ms": round(pct(ms, 0.9), 2), "p99_ms": round(pct(ms, 0.99), 2), "max_ms": round(max(ms), 2),
                   "mean_ms": round(statistics.fmean(ms), 2), "batches": len(st), "insert_p50_ms": round(pct(st, 0.5), 2),
                   "insert_p99_ms": round(pct(st, 0.99), 2), "inserts_over_20ms": sum(x > 20 for x in st), "machine": machine()}
            print(f"  latency {row}", flush=True)
            out.append(row)
    return out


async def size(fresh: Callable[[], Any], a: argparse.Namespace) -> list[dict[str, Any]]:
    n = 100_000 if a.quick else 500_000
    dsn = await fresh()
    store = await open_store(dsn)
    gen = Messages(rooms=1000)
    data_bytes = 0
    try:
        for _ in range(n // 1000):
            msgs = [gen.next() for _ in range(1000)]
            data_bytes += sum(len(m.data) for m in msgs)
            await store.commit_many(msgs)
    finally:
        await store.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("VACUUM ANALYZE livegate.messages")
        total = await conn.fetchval("SELECT pg_total_relation_size('livegate.messages')")
        heap = await conn.fetchval("SELECT pg_table_size('livegate.messages')")
        idx = await conn.fetch("SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes WHERE relname = 'messages' ORDER BY 2 DESC")
    finally:
        await conn.close()
    row = {"messages": n, "data_bytes_per_message": round(data_bytes / n, 1), "total_bytes_per_message": round(total / n, 1),
           "heap_and_toast": round(heap / n, 1), **{name: round(b / n, 1) for name, b in idx}}
    print(f"  size {row}", flush=True)
    return [row]


async def insert(fresh: Callable[[], Any], a: argparse.Namespace) -> list[dict[str, Any]]:
    """The batch statement alone, both ways, interleaved."""
    cols = ["room", "seq", "ts", "type", "prio", "sender", "cid", "data", "route"]
    out = []
    dsn = await fresh()
    await PostgresStore(dsn).migrate()
    conn = await asyncpg.connect(dsn)
    await conn.execute("CREATE TEMP TABLE staging (LIKE livegate.messages) ON COMMIT DELETE ROWS")
    unnest = ("INSERT INTO livegate.messages (room, seq, ts, type, prio, sender, cid, data, route) SELECT * FROM unnest($1::text[], "
              "$2::int8[], $3::int8[], $4::text[], $5::int2[], $6::text[], $7::text[], $8::text[], $9::text[]) ON CONFLICT DO NOTHING")
    gen = Messages(rooms=1000)
    total = 20_000 if a.quick else 100_000

    async def by_unnest(rows: list[tuple[Any, ...]]) -> None:
        await conn.execute(unnest, *map(list, zip(*rows, strict=True)))

    async def by_copy(rows: list[tuple[Any, ...]]) -> None:
        async with conn.transaction():
            await conn.copy_records_to_table("staging", records=rows, columns=cols)
            await conn.execute("INSERT INTO livegate.messages SELECT * FROM staging ON CONFLICT DO NOTHING")

    try:
        for rnd in range(a.rounds):
            for batch in (64, 1000):
                for name, fn in (("unnest", by_unnest), ("copy", by_copy)) if rnd % 2 == 0 else (("copy", by_copy), ("unnest", by_unnest)):
                    batches = [[(m.room, m.seq, m.ts, m.type, m.prio, m.sender, m.cid, m.data.decode(), m.route)
                                for m in (gen.next() for _ in range(batch))] for _ in range(total // batch)]
                    t = time.perf_counter()
                    for rows in batches:
                        await fn(rows)
                    rate = len(batches) * batch / (time.perf_counter() - t)
                    row = {"round": rnd + 1, "method": name, "batch": batch, "rows_per_s": round(rate), "machine": machine()}
                    print(f"  insert {row}", flush=True)
                    out.append(row)
    finally:
        await conn.close()
    return out


SCENARIOS: dict[str, Callable[[Callable[[], Any], argparse.Namespace], Any]] = {
    "throughput": throughput, "latency": latency, "size": size, "insert": insert,
}


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = [k for k in rows[0] if k != "machine"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(f"{r[k]:,}" if isinstance(r[k], int) else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


async def main(a: argparse.Namespace) -> dict[str, Any]:
    names = list(SCENARIOS) if a.scenario == "all" else [a.scenario]
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine()}
    async with server(a.dsn) as fresh:
        for name in names:
            print(f"## {name}", flush=True)
            results[name] = await SCENARIOS[name](fresh, a)
    for name in names:
        print(f"\n### {name}\n\n{table(results[name])}")
    return results


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=[*SCENARIOS, "all"])
    p.add_argument("--dsn", help="use this server (a role that may CREATE DATABASE) instead of a private cluster")
    p.add_argument("--quick", action="store_true", help="fewer messages, shorter runs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--writers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2], help="writer connections to compare, e.g. 1,2,4")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args()
    try:
        import uvloop
    except ImportError:
        res = asyncio.run(main(args))
    else:
        res = uvloop.run(main(args))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
