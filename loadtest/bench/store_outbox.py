"""What the outbox log costs the store: durable commits/s with ``Store.outbox`` off and on,
in interleaved rounds (the machine's noise hits both sides alike), SQLite and PostgreSQL.

    python loadtest/bench/store_outbox.py                 # both kinds, 3 rounds each
    python loadtest/bench/store_outbox.py --kind sqlite --rounds 5 --messages 60000
    python loadtest/bench/store_outbox.py --kind postgres --dsn postgresql://...   # else a throw-away cluster

Each run: a fresh database, ``--inflight`` committers in as many rooms, ``--messages`` commits
in all; prints commits/s per run and the medians' ratio (on / off).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "python"), str(ROOT / "loadtest" / "bench"), str(ROOT / "tests")]

import orjson  # noqa: E402

from gateway.store import Store, StoredMessage  # noqa: E402

DATA = orjson.dumps({"text": "a chat message of an ordinary length, 你好，请问还有货吗？"})


async def run(store: Store, outbox: bool, messages: int, inflight: int) -> float:
    store.outbox = outbox
    await store.start()
    per = messages // inflight

    async def committer(w: int) -> None:
        room = f"cs:{w}"
        for seq in range(1, per + 1):
            await store.commit(StoredMessage(room, seq, int(time.time() * 1000), "chat", 1, f"u{w}", DATA, None, "cs:*"))

    t0 = time.perf_counter()
    await asyncio.gather(*(committer(w) for w in range(inflight)))
    rate = per * inflight / (time.perf_counter() - t0)
    await store.close()
    return rate


async def kind_rounds(kind: str, rounds: int, messages: int, inflight: int, dsn: str | None) -> None:
    results: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="outbox-bench-") as tmp:
        if kind == "sqlite":
            from gateway.store.sqlite import SqliteStore

            n = 0

            async def fresh() -> Store:
                nonlocal n
                n += 1
                return SqliteStore(os.path.join(tmp, f"s{n}.db"))

            for r in range(rounds):
                for ob in (False, True) if r % 2 == 0 else (True, False):
                    results[ob].append(await run(await fresh(), ob, messages, inflight))
                    print(f"{kind} outbox={'on ' if ob else 'off'} {results[ob][-1]:8.0f} commits/s", flush=True)
        else:
            from gateway.store.postgres import PostgresStore
            from store_pg import server

            async with server(dsn) as new_db:
                for r in range(rounds):
                    for ob in (False, True) if r % 2 == 0 else (True, False):
                        s = PostgresStore(await new_db())
                        await s.migrate()
                        results[ob].append(await run(s, ob, messages, inflight))
                        print(f"{kind} outbox={'on ' if ob else 'off'} {results[ob][-1]:8.0f} commits/s", flush=True)
    off, on = statistics.median(results[False]), statistics.median(results[True])
    print(f"{kind}: median off {off:.0f}/s, on {on:.0f}/s, on/off {on / off:.3f} (load average {os.getloadavg()[0]:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", choices=("sqlite", "postgres", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=40_000)
    ap.add_argument("--inflight", type=int, default=1000)
    ap.add_argument("--dsn", default=None, help="PostgreSQL server to create databases on (default: a throw-away cluster)")
    args = ap.parse_args()
    import uvloop

    for kind in ("sqlite", "postgres") if args.kind == "both" else (args.kind,):
        uvloop.run(kind_rounds(kind, args.rounds, args.messages, args.inflight, args.dsn))


if __name__ == "__main__":
    main()
