#!/usr/bin/env python
"""The message store through the gateway (issue 14): real WebSocket clients, real routes.

    python loadtest/bench/store_gateway.py SCENARIO [SCENARIO ...] [options]

Scenarios:
  durable  durable publishes acknowledged per second (the ack leaves after the commit):
           ``--publishers`` connections (default 64,256,1000), each in its own
           ``dur:<k>`` room (route ``store = "durable"``), each publishing one chat message
           with a ``cid``, waiting for its ack, publishing the next (closed loop: at most
           one publish in flight per connection, which is all the gateway allows since it
           handles a connection's requests in order); acks/s, ack p50/p99, error frames,
           messages per transaction, CPU of the gateway (per thread), of PostgreSQL and
           of the client. Per ``--kind`` (sqlite, postgres), interleaved per round.
  latency  ack latency at a fixed rate (``--rate``, 1,000/s) spread over ``--conns``
           (100) connections in as many durable rooms, open loop: each publish is sent at
           its scheduled time whatever the earlier ones are doing, and its latency counts
           from that time (no coordinated omission); p50/p90/p99/p99.9/max.
  archive  live-room fan-out with and without archiving, in one run: one ``live:`` room
           of ``--members`` (5,000) receivers fed by gw-load, route ``store = "none"``
           (A) vs ``store = "archive"`` (B), a fresh gateway per side and round, the order
           alternating, ``--rounds`` (6) rounds at ``--rate max`` and at 200 msgs/s (the
           live-room rate); deliveries/s, server CPU per delivery, the B/A ratio per round
           and its median, and the archive's messages written/s, backlog and drops
           (``gateway_store_*`` from /metrics).
  all      the three

Each measurement starts a fresh gateway (``gateway-bench.toml`` plus the routes above and a
``[store]`` section) with a fresh store: a SQLite file in a temporary directory, or a new
database in a private PostgreSQL cluster that the benchmark starts once per run from the
Debian binaries the way the tests do (``tests/support/postgres.py``: initdb as an
unprivileged user, fsync and synchronous_commit on) and removes at the end.

The durable client is this script run as a subprocess (``_client``, uvloop, a minimal
WebSocket client over ``asyncio.Protocol``: frames masked with a zero key, one
``orjson.loads`` per ack); ``--client-procs`` splits the connections over several such
processes. Client and gateway (and PostgreSQL) share the 2 cores; the client's CPU is
reported beside every figure (``client cores``), so read the gateway's CPU per ack too.
``--server-cpus``/``--client-cpus`` pin them (``taskset -c``).

Output: markdown tables on stdout and in ``loadtest/results/raw/store-gw-<stamp>.{json,md}``;
every row records the machine's 1-min load average before it.
"""

# ruff: noqa: RUF001, RUF002 (typographic signs in the tables)
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT / "tests")]
from run import BENCH_TOML, GW_LOAD, RAW, fmt_f, fmt_int, free_port, http_json, log, machine, table  # noqa: E402

CLK = os.sysconf("SC_CLK_TCK")

#: The live room of the archive A/B: bench:{id}'s settings, but a history ring (a route
#: numbers messages only when history_size > 0, and only numbered messages are stored).
LIVE_ROUTE = """
[[routes]]
pattern = "live:{{id}}"
join = "authenticated"
publish = "authenticated"
room_rate = 0
user_rate = 0
history_size = {history}
max_message_bytes = 65536
store = "{store}"
"""

DURABLE_ROUTE = """
[[routes]]
pattern = "dur:{id}"
join = "authenticated"
publish = "authenticated"
room_rate = 0
user_rate = 0
store = "durable"
"""

# ------------------------------------------------------------------ the client

WORDS = ("您好", "请问", "我的订单", "什么时候", "发货", "已发货", "物流", "快递", "到了吗", "退款", "申请", "客服", "谢谢", "地址", "修改",
         "优惠券", "会员", "积分", "价格", "颜色", "尺码", "好的", "明白", "稍等", "帮您", "查询", "一下", "hello", "order",
         "shipped", "refund", "please", "thanks", "ok", "tracking")


def payloads(n: int = 512, seed: int = 1) -> list[bytes]:
    """Chat message ``data`` objects of 100-200 bytes of JSON (as store.py's)."""
    import orjson

    rng = random.Random(seed)
    out: list[bytes] = []
    while len(out) < n:
        data = orjson.dumps({"text": "".join(rng.choice(WORDS) for _ in range(rng.randint(8, 22))), "mid": rng.getrandbits(40)})
        if 100 <= len(data) <= 200:
            out.append(data)
    return out


def ws_frame(payload: bytes) -> bytes:
    """A masked client text frame (zero masking key: the payload goes out as is)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, 0x80 | n)) + b"\0\0\0\0" + payload
    if n < 65536:
        return bytes((0x81, 0xFE)) + n.to_bytes(2, "big") + b"\0\0\0\0" + payload
    return bytes((0x81, 0xFF)) + n.to_bytes(8, "big") + b"\0\0\0\0" + payload


class Conn(asyncio.Protocol):
    """One client connection: upgrade, ``connected``, join, then publishes and acks."""

    def __init__(self, run: ClientRun, k: int) -> None:
        self.run, self.k = run, k
        self.room = f"{run.prefix}{k}".encode()
        self.buf = b""
        self.upgraded = False
        self.state = "connect"  # connect -> join -> ready
        self.ready = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.next_id = 1
        self.sent: dict[int, float] = {}  # id -> send (or scheduled) time, perf_counter
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transport is no asyncio.Transport subclass: no isinstance check)
        self.transport = t = transport  # type: ignore[assignment]
        t.write(  # type: ignore[attr-defined]
            f"GET /ws?user={self.run.user_prefix}{self.k} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: gateway.v1\r\n\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed during setup: {exc}"))
        elif self.run.running:
            self.run.lost += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(ConnectionError(buf[:200].decode(errors="replace")))
                return
            self.upgraded = True
            buf = buf[end + 4:]
        i, n = 0, len(buf)
        while n - i >= 2:
            b1 = buf[i + 1] & 0x7F
            h = 2
            if b1 == 126:
                if n - i < 4:
                    break
                b1, h = int.from_bytes(buf[i + 2:i + 4], "big"), 4
            elif b1 == 127:
                if n - i < 10:
                    break
                b1, h = int.from_bytes(buf[i + 2:i + 10], "big"), 10
            if n - i < h + b1:
                break
            op = buf[i] & 0x0F
            if op == 1:
                self.on_text(buf[i + h:i + h + b1])
            elif op == 9:  # ping -> pong (same payload)
                assert self.transport is not None
                p = buf[i + h:i + h + b1]
                self.transport.write(bytes((0x8A, 0x80 | len(p))) + b"\0\0\0\0" + p)
            i += h + b1
        self.buf = buf[i:]

    def on_text(self, p: bytes) -> None:
        run = self.run
        if p.startswith(b'{"op":"msg"'):
            run.msgs += 1
            return
        if self.state == "ready":
            if p.startswith(b'{"op":"ack"') or p.startswith(b'{"op":"error"'):
                f = run.loads(p)
                t0 = self.sent.pop(f.get("id"), None)
                now = time.perf_counter()
                if f["op"] == "error":
                    code = str(f.get("code"))
                    if run.t0 <= now < run.t1:
                        run.errors[code] = run.errors.get(code, 0) + 1
                elif t0 is not None:
                    if run.t0 <= now < run.t1:
                        run.acks += 1
                    if run.t0 <= t0 < run.t1:
                        run.lat.append(now - t0)
                if run.closed_loop and run.running:
                    self.publish(time.perf_counter())
            return
        if self.state == "connect" and p.startswith(b'{"op":"connected"'):
            self.state = "join"
            assert self.transport is not None
            self.transport.write(ws_frame(b'{"op":"join","id":0,"room":"' + self.room + b'","history":0}'))
        elif self.state == "join":
            if p.startswith(b'{"op":"ack"'):
                self.state = "ready"
                self.ready.set_result(None)
            elif p.startswith(b'{"op":"error"'):
                self.ready.set_exception(ConnectionError(p.decode(errors="replace")))

    def publish(self, at: float) -> None:
        """Send the next publish; its latency counts from ``at``."""
        if self.closed:
            return
        run = self.run
        i = self.next_id
        self.next_id += 1
        self.sent[i] = at
        run.published += 1
        assert self.transport is not None
        self.transport.write(ws_frame(b'{"op":"publish","id":%d,"room":"%s","type":"chat","cid":"%s-%d","data":%s}' % (
            i, self.room, run.cid_prefix, i, run.data[i % len(run.data)])))


class ClientRun:
    def __init__(self, a: argparse.Namespace) -> None:
        import orjson

        self.loads = orjson.loads
        self.a = a
        self.prefix = a.room_prefix
        self.user_prefix = a.user_prefix
        self.cid_prefix = f"{os.getpid()}".encode()
        self.data = payloads()
        self.closed_loop = a.rate <= 0
        self.running = False
        self.t0 = self.t1 = float("inf")
        self.published = self.acks = self.msgs = self.lost = 0
        self.errors: dict[str, int] = {}
        self.lat: list[float] = []

    async def main(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        a = self.a
        sem = asyncio.Semaphore(200)

        async def connect(k: int) -> Conn:
            async with sem:
                _, c = await loop.create_connection(lambda: Conn(self, k), a.host, a.port)
                await asyncio.wait_for(c.ready, 30)
                return c

        conns = await asyncio.gather(*(connect(k) for k in range(a.first, a.first + a.conns)))
        print("READY", flush=True)
        go = await loop.run_in_executor(None, sys.stdin.readline)  # "GO <warmup s> <seconds>"
        _, warmup, seconds = go.split()
        now = time.perf_counter()
        self.t0, self.t1 = now + float(warmup), now + float(warmup) + float(seconds)
        self.running = True
        r0 = None
        if self.closed_loop:
            for c in conns:
                c.publish(time.perf_counter())
            await asyncio.sleep(max(0.0, self.t0 - time.perf_counter()))
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            await asyncio.sleep(max(0.0, self.t1 - time.perf_counter()))
        else:
            # Open loop: message j is due at start + j / rate, on connection j mod conns.
            start, interval, j, late = now, 1.0 / a.rate, 0, 0.0
            while True:
                t = time.perf_counter()
                if r0 is None and t >= self.t0:
                    r0 = resource.getrusage(resource.RUSAGE_SELF)
                if t >= self.t1:
                    break
                due = int((t - start) / interval) + 1
                while j < due:
                    at = start + j * interval
                    late = max(late, t - at)
                    conns[j % len(conns)].publish(at)
                    j += 1
                await asyncio.sleep(max(0.0, start + j * interval - time.perf_counter()))
        self.running = False
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        assert r0 is not None
        cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        # Wait for what is still in flight (counted only for latency of in-window sends).
        deadline = time.perf_counter() + a.drain
        while any(c.sent for c in conns) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        unacked = sum(len(c.sent) for c in conns)
        for c in conns:
            if c.transport is not None:
                c.transport.close()
        lat_us = [round(x * 1e6) for x in self.lat]
        return {"conns": len(conns), "published": self.published, "acks": self.acks, "msgs": self.msgs, "errors": self.errors,
                "lost": self.lost, "unacked_at_end": unacked, "cpu_s": cpu, "seconds": float(seconds), "lat_us": lat_us}


def client_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="store_gateway.py _client")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.0, help="0: closed loop; else total msgs/s of this process")
    p.add_argument("--room-prefix", default="dur:r")
    p.add_argument("--user-prefix", default="p")
    p.add_argument("--drain", type=float, default=3.0)
    p.add_argument("--out", required=True, help="file for the JSON result")
    a = p.parse_args(argv)
    import uvloop

    res = uvloop.run(ClientRun(a).main())
    # To a file, not stdout: a result larger than the pipe (64 KiB) came out cut there when
    # the parent was still reading another client's.
    Path(a.out).write_text(json.dumps(res))
    return 0


# ------------------------------------------------------------------ the servers

def proc_cpu(pid: int) -> float:
    """CPU seconds of a process (all threads)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / CLK
    except OSError:
        return 0.0


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``: ``main`` (the Python loop), else ``<comm>/<tid>``."""
    out: dict[str, float] = {}
    for t in Path(f"/proc/{pid}/task").glob("*"):
        try:
            head, rest = t.joinpath("stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        f = rest.split()
        name = "main" if t.name == str(pid) else f"{head.split('(', 1)[1]}/{t.name}"
        out[name] = (int(f[11]) + int(f[12])) / CLK
    return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    total = sum(f[:8])
    return (total - f[3] - f[4]) / CLK, total / CLK


def wait_idle(a: argparse.Namespace) -> float:
    """Wait (up to ``--idle-wait`` s) until the machine's busy cores over a second are below
    ``--idle-below``: other people's work on the shared machine. Returns the seconds waited."""
    t = time.monotonic()
    while time.monotonic() - t < a.idle_wait:
        b0 = machine_busy()
        time.sleep(1.0)
        b1 = machine_busy()
        if (b1[0] - b0[0]) / ((b1[1] - b0[1]) / (os.cpu_count() or 1)) < a.idle_below:
            break
    return time.monotonic() - t


class PgCluster:
    """A private PostgreSQL cluster for the run (tests/support/postgres.py) and fresh databases on it."""

    def __init__(self) -> None:
        from support.postgres import PostgresServer, install_postgres  # type: ignore[import-not-found,unused-ignore]

        bindir, out = install_postgres()
        if not bindir:
            raise RuntimeError(f"no PostgreSQL here and apt-get could not install it:\n{out}")
        self.server = PostgresServer(bindir).start()
        self.n = 0
        self.version = subprocess.run([f"{bindir}/postgres", "--version"], capture_output=True, text=True, check=False).stdout.strip()

    def fresh(self) -> str:
        """A new empty UTF-8 database, migrated with ``gateway migrate``; its DSN."""
        import asyncpg

        self.n += 1
        name = f"gwbench_{os.getpid()}_{self.n}"

        async def create() -> None:
            c = await asyncpg.connect(self.server.dsn())
            try:
                await c.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8' LC_CTYPE 'C.UTF-8' LC_COLLATE 'C.UTF-8'")
            finally:
                await c.close()

        asyncio.run(create())
        dsn: str = self.server.dsn(name)
        subprocess.run([sys.executable, "-m", "gateway", "migrate", "--dsn", dsn], env=gw_env(), cwd=ROOT, check=True,
                       capture_output=True, timeout=120)
        return dsn

    def drop(self, dsn: str) -> None:
        import asyncpg

        name = dsn.rsplit("/", 1)[1]

        async def go() -> None:
            c = await asyncpg.connect(self.server.dsn())
            try:
                await c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await c.close()

        asyncio.run(go())

    def cpu(self) -> float:
        return sum(proc_cpu(p) for p in self.server._processes())

    def remove(self) -> None:
        self.server.remove()


def gw_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("STORE_GW_EXTRA_PATH")]))
    return env


class Gateway:
    """A fresh gateway with the bench config, extra TOML and a fresh store."""

    def __init__(self, extra_toml: str, sets: list[str], kind: str, pg: PgCluster | None, cpus: str | None, tag: str,
                 ) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="store-gw-"))
        self.port, self.api = free_port(), free_port()
        self.pg, self.dsn = pg, None
        text = BENCH_TOML.read_text()
        store = f'[store]\nkind = "{kind}"\npath = "{self.tmp}/store.db"\n'
        if kind == "postgres":
            assert pg is not None
            self.dsn = pg.fresh()
            store += f'dsn = "{self.dsn}"\n'
        cfg = self.tmp / "gateway.toml"
        cfg.write_text(text + extra_toml + "\n" + store)
        cmd = [sys.executable, "-m", "gateway", "run", "-c", str(cfg), "--host", "127.0.0.1", "--port", str(self.port),
               "--api-port", str(self.api)]
        for s in sets:
            cmd += ["--set", s]
        if cpus:
            cmd = ["taskset", "-c", cpus, *cmd]
        RAW.mkdir(parents=True, exist_ok=True)
        self.log_path = RAW / f"server-store-gw{tag}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=self.tmp, env=gw_env(), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if http_json(f"http://127.0.0.1:{self.api}/readyz", 1.0).get("ready"):
                    return
            except (OSError, ValueError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gateway not ready: {self.log_path}")

    def metrics(self) -> dict[str, float]:
        """The ``gateway_store_*`` samples of /metrics (histogram buckets left out)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("gateway_store_") and "_bucket" not in line:
                k, v = line.rsplit(" ", 1)
                out[k] = float(v)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.pg is not None and self.dsn is not None:
            self.pg.drop(self.dsn)


def mdelta(m0: dict[str, float], m1: dict[str, float], key: str) -> float:
    return m1.get(key, 0.0) - m0.get(key, 0.0)


def pct(sorted_values: list[int], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))] / 1000.0  # µs -> ms


# ------------------------------------------------------------------ durable / latency

def client_run(gw: Gateway, conns: int, rate: float, a: argparse.Namespace) -> dict[str, Any]:
    """Clients in ``a.client_procs`` processes -> connect -> GO -> warmup, window -> merged result
    plus the server's CPU over the window."""
    procs = max(1, min(a.client_procs, conns))
    per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    children = []
    first = 0
    for i, n in enumerate(per):
        cmd = [sys.executable, str(Path(__file__).resolve()), "_client", "--port", str(gw.port), "--conns", str(n), "--first", str(first),
               "--rate", str(rate / procs if rate > 0 else 0), "--user-prefix", f"p{i}x", "--out", str(gw.tmp / f"client-{i}.json")]
        if a.client_cpus:
            cmd = ["taskset", "-c", a.client_cpus, *cmd]
        children.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         env=gw_env()))
        first += n
    try:
        for c in children:
            assert c.stdout is not None
            line = c.stdout.readline()
            if line.strip() != "READY":
                raise RuntimeError(f"client did not connect: {line} {c.stderr.read()[-2000:] if c.stderr else ''}")
        time.sleep(0.5)
        go = time.monotonic()
        for c in children:
            assert c.stdin is not None
            c.stdin.write(f"GO {a.warmup} {a.seconds}\n")
            c.stdin.flush()
        time.sleep(a.warmup)
        s0, t0, pg0, m0, b0 = thread_cpu(gw.pid), time.monotonic(), gw.pg.cpu() if gw.pg else 0.0, gw.metrics(), machine_busy()
        time.sleep(max(0.0, go + a.warmup + a.seconds - time.monotonic()))
        s1, t1, pg1, m1, b1 = thread_cpu(gw.pid), time.monotonic(), gw.pg.cpu() if gw.pg else 0.0, gw.metrics(), machine_busy()
        outs = []
        for c in children:
            assert c.stdin is not None and c.stdout is not None and c.stderr is not None
            c.stdin.close()
            c.stdout.read()
            err = c.stderr.read()  # (small: no deadlock)
            c.wait(a.drain + 60)
            if c.returncode != 0:
                raise RuntimeError(f"client failed ({c.returncode}): {err[-2000:]}")
            outs.append(json.loads((gw.tmp / f"client-{children.index(c)}.json").read_text()))
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
    wall = t1 - t0
    lat = sorted(x for o in outs for x in o["lat_us"])
    errors: dict[str, int] = {}
    for o in outs:
        for k, v in o["errors"].items():
            errors[k] = errors.get(k, 0) + v
    threads = {k: (s1.get(k, 0.0) - s0.get(k, 0.0)) / wall for k in s1}
    others = sorted(((v, k) for k, v in threads.items() if k != "main"), reverse=True)
    acks = sum(o["acks"] for o in outs)
    batches = mdelta(m0, m1, "gateway_store_batches_total")
    server_cpu = sum(threads.values())
    return {
        "conns": conns, "rate": rate or "closed loop", "acks": acks, "acks_per_s": acks / a.seconds,
        "published": sum(o["published"] for o in outs), "msgs_received": sum(o["msgs"] for o in outs), "errors": errors,
        "lost": sum(o["lost"] for o in outs), "unacked_at_end": sum(o["unacked_at_end"] for o in outs),
        "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99), "p999_ms": pct(lat, 99.9),
        "max_ms": lat[-1] / 1000 if lat else float("nan"), "samples": len(lat),
        "committed_per_s": mdelta(m0, m1, "gateway_store_committed_total") / wall,
        # The store's own view: commit() queued -> committed, mean over the window (the
        # rest of the ack latency is the client, the sockets and the gateway's loop).
        "commit_ms_mean": (mdelta(m0, m1, "gateway_store_commit_seconds_sum") / n * 1e3
                           if (n := mdelta(m0, m1, "gateway_store_commit_seconds_count")) else float("nan")),
        "batch": mdelta(m0, m1, "gateway_store_batched_messages_total") / batches if batches else 0.0,
        "server_cores": server_cpu, "server_main_thread": threads.get("main", 0.0),
        "server_busiest_other_threads": [(k, round(v, 3)) for v, k in others[:4]],
        "server_us_per_ack": server_cpu * wall / acks * 1e6 if acks else float("nan"),
        "pg_cores": (pg1 - pg0) / wall if gw.pg else None,
        "pg_us_per_ack": (pg1 - pg0) / acks * 1e6 if gw.pg and acks else None,
        # The whole machine over the window (every process, other people's work included):
        # 2.0 = both cores busy.
        "machine_busy_cores": (b1[0] - b0[0]) / wall,
        # What nobody of this run used: other people's processes (and unattributed kernel time).
        "others_cores": (b1[0] - b0[0]) / wall - server_cpu - ((pg1 - pg0) / wall if gw.pg else 0.0) - sum(o["cpu_s"] for o in outs) / a.seconds,
        "client_procs": len(children), "client_cores": sum(o["cpu_s"] for o in outs) / a.seconds,
        "client_us_per_ack": sum(o["cpu_s"] for o in outs) / acks * 1e6 if acks else float("nan"),
    }


def measure_durable(kind: str, conns: int, rate: float, a: argparse.Namespace, pg: PgCluster | None, tag: str) -> dict[str, Any]:
    waited = wait_idle(a)
    load = os.getloadavg()[0]
    gw = Gateway(DURABLE_ROUTE, a.set, kind, pg if kind == "postgres" else None, a.server_cpus, tag)
    try:
        r = client_run(gw, conns, rate, a)
    finally:
        gw.stop()
    r.update(kind=kind, load_before=load, idle_waited_s=waited)
    log(f"{kind} conns={conns} rate={rate or 'closed'}: {r['acks_per_s']:,.0f} acks/s p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms, "
        f"server {r['server_cores']:.2f} cores (main {r['server_main_thread']:.2f}), pg {r['pg_cores'] or 0:.2f}, "
        f"client {r['client_cores']:.2f}, machine {r['machine_busy_cores']:.2f} (others {r['others_cores']:.2f}), batch {r['batch']:.1f}, commit mean {r['commit_ms_mean']:.1f} ms, errors {r['errors']}, load {load:.2f}")
    return r


def kinds_in_order(kinds: list[str], r: int) -> list[str]:
    return kinds if r % 2 == 0 else list(reversed(kinds))


DURABLE_COLS = ["store", "publishers", "round", "acks/s", "ack p50 ms", "ack p99 ms", "commit mean ms", "msgs / txn", "errors",
                "gateway cores (main thread)", "gateway µs/ack", "PostgreSQL cores", "client cores", "others' cores", "load before"]


def durable_row(r: dict[str, Any], rnd: Any) -> list[Any]:
    return [r["kind"], fmt_int(r["conns"]), rnd, fmt_int(r["acks_per_s"]), fmt_f(r["p50_ms"]), fmt_f(r["p99_ms"]), fmt_f(r["commit_ms_mean"]),
            fmt_f(r["batch"]), sum(r["errors"].values()) or "0", f"{r['server_cores']:.2f} ({r['server_main_thread']:.2f})",
            fmt_int(r["server_us_per_ack"]), fmt_f(r["pg_cores"], 2) if r["pg_cores"] is not None else "–", fmt_f(r["client_cores"], 2),
            fmt_f(r["others_cores"], 2), fmt_f(r["load_before"], 2)]


#: A run during which other processes used more than this many cores counts as disturbed.
DISTURBED = 0.3


def quiet(rs: list[dict[str, Any]], key: str, nd: int = 0) -> str:
    """The median of ``key`` over the undisturbed runs of ``rs``, with their count."""
    q = [r[key] for r in rs if r["others_cores"] <= DISTURBED]
    return f"{spread(q, nd)} (n={len(q)})" if q else "none"


def spread(values: list[float], nd: int = 0) -> str:
    """median (min–max) of the rounds."""
    def f(x: float) -> str:
        return f"{x:,.{nd}f}"

    return f"{f(statistics.median(values))} ({f(min(values))}–{f(max(values))})" if len(values) > 1 else f(values[0])


def sc_durable(a: argparse.Namespace, pg: PgCluster | None) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    rows = []
    for rnd in range(a.rounds or 3):
        for kind in kinds_in_order(a.kinds, rnd):
            for n in a.publishers:
                r = measure_durable(kind, n, 0.0, a, pg, f"-durable-{kind}-{n}")
                r["round"] = rnd + 1
                runs.append(r)
                rows.append(durable_row(r, rnd + 1))
    summary = []
    for kind in a.kinds:
        for n in a.publishers:
            rs = [r for r in runs if r["kind"] == kind and r["conns"] == n]
            summary.append([kind, fmt_int(n), spread([r["acks_per_s"] for r in rs]), quiet(rs, "acks_per_s"), spread([r["p99_ms"] for r in rs], 1),
                            spread([r["server_us_per_ack"] for r in rs]), spread([r["client_cores"] for r in rs], 2)])
    md = ("Every round, per store: a fresh gateway per publisher count; closed loop, one publish in flight per connection, "
          f"each connection in its own durable room; {a.warmup:g} s warmup, {a.seconds:g} s measured.\n\n"
          + table(DURABLE_COLS, rows) + "\n\nMedian (min–max) over the rounds:\n\n"
          + table(["store", "publishers", "acks/s", f"acks/s, rounds with others' cores ≤ {DISTURBED}", "ack p99 ms", "gateway µs/ack",
                   "client cores"], summary))
    return {"runs": runs, "markdown": md}


LAT_COLS = ["store", "rate", "conns", "round", "acks/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "msgs / txn", "errors",
            "gateway cores", "PostgreSQL cores", "client cores", "others' cores", "load before"]


def sc_latency(a: argparse.Namespace, pg: PgCluster | None) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    rows = []
    for rnd in range(a.rounds or 5):
        for kind in kinds_in_order(a.kinds, rnd):
            r = measure_durable(kind, a.conns, a.rate, a, pg, f"-latency-{kind}")
            r["round"] = rnd + 1
            runs.append(r)
            rows.append([kind, fmt_int(a.rate), fmt_int(a.conns), rnd + 1, fmt_int(r["acks_per_s"]), fmt_f(r["p50_ms"]), fmt_f(r["p90_ms"]),
                         fmt_f(r["p99_ms"]), fmt_f(r["p999_ms"]), fmt_f(r["max_ms"]), fmt_f(r["batch"]), sum(r["errors"].values()) or "0",
                         fmt_f(r["server_cores"], 2), fmt_f(r["pg_cores"], 2) if r["pg_cores"] is not None else "–",
                         fmt_f(r["client_cores"], 2), fmt_f(r["others_cores"], 2), fmt_f(r["load_before"], 2)])
    summary = [[kind, spread([r["p50_ms"] for r in runs if r["kind"] == kind], 1), spread([r["p99_ms"] for r in runs if r["kind"] == kind], 1),
                quiet([r for r in runs if r["kind"] == kind], "p99_ms", 1)] for kind in a.kinds]
    md = (f"Open loop: {a.rate:,.0f} publishes/s over {a.conns} connections (each its own durable room), latency from each "
          f"publish's scheduled send time to its ack; {a.warmup:g} s warmup, {a.seconds:g} s measured.\n\n" + table(LAT_COLS, rows)
          + "\n\nMedian (min–max) over the rounds:\n\n" + table(["store", "ack p50 ms", "ack p99 ms", f"ack p99 ms, rounds with others' cores ≤ {DISTURBED}"], summary))
    return {"runs": runs, "markdown": md}


# ------------------------------------------------------------------ archive A/B

def fanout_once(route_store: str, rate: str, a: argparse.Namespace, tag: str) -> dict[str, Any]:
    waited = wait_idle(a)
    load = os.getloadavg()[0]
    gw = Gateway(LIVE_ROUTE.format(history=a.history, store=route_store), a.set, "sqlite", None, a.server_cpus, tag)
    try:
        m0 = gw.metrics()
        args = [str(GW_LOAD), "--url", f"ws://127.0.0.1:{gw.port}/ws", "--conns", str(a.members), "--room", "live:arch", "--sources", "8",
                "--connect-inflight", "256", "--publishers", "2", "--rate", rate, "--warmup", "1", "--duration", str(a.fan_seconds),
                "--drain-wait", "1", "--lat-sample", "4", "--ping-interval", "20", "--window", "32", "--server-pid", str(gw.pid),
                "--quiet", "--timeout", "120"]
        if a.client_cpus:
            args = ["taskset", "-c", a.client_cpus, *args]
        b0, g0, c0, th0 = machine_busy(), proc_cpu(gw.pid), resource.getrusage(resource.RUSAGE_CHILDREN), thread_cpu(gw.pid)
        p = subprocess.run(args, capture_output=True, text=True, timeout=180, check=False)
        b1, g1, c1, th1 = machine_busy(), proc_cpu(gw.pid), resource.getrusage(resource.RUSAGE_CHILDREN), thread_cpu(gw.pid)
        # Other people's CPU over the gw-load run: the machine's minus the gateway's and gw-load's.
        span = (b1[1] - b0[1]) / (os.cpu_count() or 1)
        others = ((b1[0] - b0[0]) - (g1 - g0) - ((c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime))) / span if span else 0.0
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"gw-load failed ({p.returncode}): {p.stderr[-2000:]}")
        d = json.loads(lines[-1])
        backlog_end = gw.metrics().get("gateway_store_backlog", 0.0)
        # The writer catches up after the load: how long until the backlog is empty.
        t = time.monotonic()
        while gw.metrics().get("gateway_store_backlog", 0.0) > 0 and time.monotonic() - t < 30:
            time.sleep(0.05)
        m1 = gw.metrics()
        drain_s = time.monotonic() - t
    finally:
        gw.stop()
    total = d["published_total"]
    r = {"store": route_store, "rate": rate, "load_before": load, "deliveries_per_s": d["deliveries_per_s"], "ratio": d["delivery_ratio"],
         "msgs_per_s": d["published"] / d["duration_s"] if d["duration_s"] else 0.0, "p50_ms": d["latency_ms"]["p50"],
         "p99_ms": d["latency_ms"]["p99"], "server_ns": d.get("server_cpu_ns_per_delivery"), "server_util": d.get("server_cpu_util"),
         "client_util": d.get("client_cpu_util"), "published_total": total,
         "archived": mdelta(m0, m1, "gateway_store_archived_total"), "archive_dropped": mdelta(m0, m1, "gateway_store_archive_dropped_total"),
         "store_errors": mdelta(m0, m1, "gateway_store_errors_total"), "batches": mdelta(m0, m1, "gateway_store_batches_total"),
         "backlog_at_end": backlog_end, "backlog_drain_s": drain_s if route_store != "none" else 0.0, "others_cores": others,
         "idle_waited_s": waited,
         # CPU seconds per gateway thread over the whole gw-load run (connects included):
         # "main" is the Python loop, "python/<tid>" the store's threads, "gateway-io/<tid>" the engine's.
         "thread_cpu_s": {k: round(th1.get(k, 0.0) - th0.get(k, 0.0), 3) for k in th1 if th1.get(k, 0.0) - th0.get(k, 0.0) >= 0.01}}
    log(f"archive A/B store={route_store} rate={rate}: {r['deliveries_per_s']:,.0f} dlv/s ratio {r['ratio']}, {r['msgs_per_s']:,.0f} msgs/s, "
        f"server {r['server_ns']} ns/dlv, archived {r['archived']:.0f}/{total} dropped {r['archive_dropped']:.0f}, "
        f"backlog at end {backlog_end:.0f}, others {others:.2f} cores, load {load:.2f}")
    return r


def sc_archive(a: argparse.Namespace, pg: PgCluster | None) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    rows = []
    rounds = a.rounds or 6
    for rnd in range(rounds):
        for rate in a.fan_rates:
            order = ["none", "archive"] if rnd % 2 == 0 else ["archive", "none"]
            pair = {}
            for side in order:
                r = fanout_once(side, rate, a, f"-archive-{side}-{rate}")
                r["round"] = rnd + 1
                runs.append(r)
                pair[side] = r
            ratio = pair["archive"]["deliveries_per_s"] / pair["none"]["deliveries_per_s"]
            ns = (pair["archive"]["server_ns"] or 0) / (pair["none"]["server_ns"] or 1)
            for side in order:
                r = pair[side]
                rows.append([rnd + 1, rate, side, fmt_int(r["msgs_per_s"]), fmt_int(r["deliveries_per_s"]), fmt_f(r["ratio"], 4),
                             fmt_f(r["p99_ms"]), fmt_int(r["server_ns"]),
                             f"{r['archived']:,.0f} / {r['published_total']:,}" if side == "archive" else "–",
                             fmt_int(r["archive_dropped"]) if side == "archive" else "–",
                             fmt_int(r["backlog_at_end"]) if side == "archive" else "–",
                             f"{ratio:.3f}" if side == "archive" else "", f"{ns:.3f}" if side == "archive" else "", fmt_f(r["others_cores"], 2),
                             fmt_f(r["load_before"], 2)])
    summary = []
    for rate in a.fan_rates:
        ratios, nss, dn, da, qr, qn = [], [], [], [], [], []
        for rnd in range(1, rounds + 1):
            p = {r["store"]: r for r in runs if r["round"] == rnd and r["rate"] == rate}
            ratios.append(p["archive"]["deliveries_per_s"] / p["none"]["deliveries_per_s"])
            nss.append((p["archive"]["server_ns"] or 0) / (p["none"]["server_ns"] or 1))
            if max(p["archive"]["others_cores"], p["none"]["others_cores"]) <= DISTURBED:
                qr.append(ratios[-1])
                qn.append(nss[-1])
            dn.append(p["none"]["deliveries_per_s"])
            da.append(p["archive"]["deliveries_per_s"])
        arch = [r for r in runs if r["rate"] == rate and r["store"] == "archive"]
        summary.append([rate, spread(dn), spread(da), spread(ratios, 3), f"{spread(qr, 3)} (n={len(qr)})" if qr else "none", spread(nss, 3),
                        f"{spread(qn, 3)} (n={len(qn)})" if qn else "none",
                        spread([r["msgs_per_s"] for r in arch]), f"{sum(r['archived'] for r in arch):,.0f} / {sum(r['published_total'] for r in arch):,}",
                        fmt_int(sum(r["archive_dropped"] for r in arch)), fmt_int(max(r["backlog_at_end"] for r in arch))])
    md = (f"One `live:` room (`history_size = {a.history}` on both sides), {a.members:,} receivers + 2 publishers (gw-load, window 32), memory broker, SQLite; route "
          f"`store = \"none\"` vs `\"archive\"`, a fresh gateway per side, order alternating per round; {a.fan_seconds:g} s measured "
          "after 1 s warmup. `archived` counts every message the writer stored during the gateway's life (warmup included) "
          "against every message published.\n\n"
          + table(["round", "rate", "store", "msgs/s in", "deliveries/s", "delivery ratio", "p99 ms", "server ns/dlv", "archived / published",
                   "dropped", "backlog at end", "dlv/s archive / none", "ns/dlv archive / none", "others' cores", "load before"], rows)
          + "\n\nMedian (min–max) over the rounds:\n\n"
          + table(["rate", "dlv/s none", "dlv/s archive", "archive / none", "archive / none, undisturbed rounds", "server ns/dlv archive / none",
                   "the same, undisturbed rounds", "archive writes/s",
                   "archived / published (all rounds)", "dropped", "largest backlog at end"], summary)
          + f"\n\nUndisturbed: both sides of the round ran while other processes used at most {DISTURBED} cores.")
    return {"runs": runs, "markdown": md}


# ------------------------------------------------------------------ main

RUNNERS = {"durable": sc_durable, "latency": sc_latency, "archive": sc_archive}
TITLES = {"durable": "Durable publishes through the gateway: acks/s (closed loop)",
          "latency": "Durable ack latency through the gateway at a fixed rate",
          "archive": "Live-room fan-out with and without archiving (A/B in one run)"}


def main(argv: list[str]) -> int:
    if argv[:1] == ["_client"]:
        return client_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="+", choices=[*RUNNERS, "all"])
    ap.add_argument("--kind", default="sqlite,postgres", help="stores for durable and latency, comma-separated")
    ap.add_argument("--publishers", default="64,256,1000", help="durable: connections (closed loop), comma-separated")
    ap.add_argument("--rate", type=float, default=1000.0, help="latency: publishes/s")
    ap.add_argument("--conns", type=int, default=100, help="latency: connections (rooms)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of every scenario (default: durable 3, latency 5, archive 6)")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--drain", type=float, default=3.0)
    ap.add_argument("--client-procs", type=int, default=1)
    ap.add_argument("--members", type=int, default=5000, help="archive: receivers in the room")
    ap.add_argument("--fan-rates", default="max,200", help="archive: gw-load --rate values")
    ap.add_argument("--fan-seconds", type=float, default=5.0)
    ap.add_argument("--history", type=int, default=50, help="archive: the live route's history_size (both sides)")
    ap.add_argument("--server-cpus", default=None, help="taskset -c for the gateway")
    ap.add_argument("--client-cpus", default=None, help="taskset -c for the clients")
    ap.add_argument("--idle-below", type=float, default=0.5, help="start a measurement once the machine's busy cores are below this")
    ap.add_argument("--idle-wait", type=float, default=60.0, help="... waiting at most this many seconds (0: don't wait)")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="gateway --set (repeatable), e.g. store.batch_ms=2")
    a = ap.parse_args(argv)
    a.kinds = a.kind.split(",")
    a.publishers = [int(x) for x in a.publishers.split(",")]
    a.fan_rates = a.fan_rates.split(",")
    names = list(RUNNERS) if "all" in a.scenarios else list(dict.fromkeys(a.scenarios))
    if "archive" in names and not GW_LOAD.exists():
        raise SystemExit(f"no gw-load at {GW_LOAD} (cargo build --release -p gw-load, or GW_LOAD=...)")
    started = dt.datetime.now(dt.UTC)
    info: dict[str, Any] = {"date": started.isoformat(timespec="seconds"), "machine": machine(), "args": {k: v for k, v in vars(a).items()},
                            "loadavg_start": os.getloadavg()}
    pg = None
    if "postgres" in a.kinds and {"durable", "latency"} & set(names):
        pg = PgCluster()
        info["postgres"] = pg.version
        log(f"{pg.version} on port {pg.server.port} ({pg.server.root})")
    results: dict[str, Any] = {}
    try:
        for name in names:
            log(f"scenario {name}")
            results[name] = RUNNERS[name](a, pg)
    finally:
        if pg is not None:
            pg.remove()
    info["loadavg_end"] = os.getloadavg()
    m = info["machine"]
    md = [f"Date: {info['date']} · commit `{m['commit']}` · {m['nproc']} × {m['cpu_model']} · kernel {m['kernel']} · Python {m['python']}"
          + (f" · {info['postgres']}" if pg else "") + f" · load average at start {info['loadavg_start'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}"]
    for name in names:
        md.append(f"### {TITLES[name]}\n\n{results[name]['markdown']}")
    text = "\n\n".join(md) + "\n"
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    RAW.mkdir(parents=True, exist_ok=True)
    out = RAW / f"store-gw-{stamp}.json"
    out.write_text(json.dumps({**info, "results": results}, indent=1, default=str))
    out.with_suffix(".md").write_text(text)
    print(text)
    log(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
