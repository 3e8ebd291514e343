#!/usr/bin/env python
"""Media uploads under load (issue 17): upload throughput, and what uploads cost the fan-out.

    python loadtest/bench/media.py throughput [--clients 1,4,20] [--seconds 20] [--kind file|image]
    python loadtest/bench/media.py ab [--rounds 4] [--members 5000] [--uploaders 20] [--uplinks 0,1]

Scenarios:
  throughput  ``--clients`` concurrent uploaders (one fresh gateway per count), each POSTing
              ``--size-mb`` (10) MB files to ``/media/upload`` on the plain client port one
              after the other (``?user=<id>&kind=<kind>``, multipart, the file in part
              ``file``, Content-Length) for ``--warmup`` + ``--seconds``: MB/s, uploads/s,
              p50/p99 upload latency (first byte sent -> answer read), refusals, the node's
              CPU (process CPU time / wall, and per thread group), the uploaders' CPU, the
              machine's busy cores.
  ab          fan-out into ONE live room of ``--members`` (5,000) gw-load receivers, 2
              publishers at ``--rate max`` (window 32), without uploads (A) and with
              ``--uploaders`` (20) clients continuously uploading 10 MB files (B), one B per
              ``--uplinks`` value (MB/s per uploader, 0 = as fast as the node takes them),
              a fresh gateway per condition, the order rotating per round, ``--rounds`` (4):
              deliveries/s per condition and round, B/A per round and the medians, upload
              MB/s during B's measured window, node and client CPU.

Files: ``kind=file`` is a PDF header + random bytes (no probing on the node: receive, hash,
write, move); ``kind=image`` is a real JPEG of noise (~``--size-mb``) so the node decodes
it for the thumbnail (in its thread pool). Uploaders are this script run as a subprocess
(``_upload``: uvloop, raw asyncio streams, a new connection per upload, pacing per
client with ``--uplink``).

Gateways: run.py's ``Server`` with ``gateway-bench.toml`` plus a durable route (the media
records live in the store, which opens only when a route keeps messages), store and
``media.dir`` in a temporary directory removed after each run, and the limits raised
(``media.daily_quota``, ``media.per_user_uploads``, ``media.max_inflight``; ``--set`` adds
more). Before each measured run the script waits (poll 30 s, up to 20 min) while a test
suite or a build runs on the machine (``pgrep -f "pytest|node --test|cargo"``).

Output: markdown on stdout and ``loadtest/results/raw/media-<scenario>-<stamp>.{json,md}``.
"""

# ruff: noqa: RUF001 (typographic signs in the tables)
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import itertools
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import BENCH_TOML, GW_LOAD, RAW, ROOT, Server, fmt_f, fmt_int, gw_load, http_json, log, machine, table  # noqa: E402
from store_gateway import machine_busy, thread_cpu  # noqa: E402

MB = 1 << 20
KEEP_ROUTE = '\n[[routes]]\npattern = "keep:{id}"\nstore = "durable"\n'  # opens the store: media needs it
MEDIA_SETS = ["media.daily_quota=1125899906842624", "media.per_user_uploads=16", "media.max_inflight=256"]
BOUNDARY = "----livegate-bench-7MA4YWxkTrZu0gW"

# ------------------------------------------------------------------ the uploader (subprocess)


def make_file(kind: str, size: int) -> bytes:
    """``size`` bytes of a PDF (header + random bytes), or a JPEG of noise of about that size."""
    if kind == "file":
        head = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
        return head + os.urandom(size - len(head))
    from PIL import Image

    side = int((size / 0.93) ** 0.5)  # noise at quality 92: ~0.93 bytes per pixel (10 MB: ~3,300 x 3,300)
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


class Uploads:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        data = make_file(a.kind, a.size_mb * MB)
        ctype = "application/pdf" if a.kind == "file" else "image/jpeg"
        name = "doc.pdf" if a.kind == "file" else "photo.jpg"
        self.pre = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                    f"Content-Type: {ctype}\r\n\r\n").encode()
        self.post = f"\r\n--{BOUNDARY}--\r\n".encode()
        self.data = memoryview(data)
        self.length = len(self.pre) + len(data) + len(self.post)
        self.sent = 0  # file bytes written to the sockets, all clients
        self.samples: list[tuple[float, int]] = []  # (unix time, self.sent)
        self.done: list[tuple[float, float, int, int]] = []  # (start, end unix, status, bytes) of finished uploads
        self.errors: dict[str, int] = {}
        self.running = True

    async def one(self, k: int) -> None:
        a = self.a
        t0 = time.time()
        r, w = await asyncio.open_connection(a.host, a.port)
        try:
            w.write(f"POST /media/upload?user={a.user_prefix}{k}&kind={a.kind} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {self.length}\r\n"
                    f"Connection: close\r\n\r\n".encode() + self.pre)
            step = 65536 if a.uplink else 262144
            rate = a.uplink * MB
            start = time.monotonic()
            for off in range(0, len(self.data), step):
                if not self.running:
                    return
                chunk = self.data[off:off + step]
                w.write(chunk)
                await w.drain()
                self.sent += len(chunk)
                if rate:
                    ahead = start + (off + len(chunk)) / rate - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            w.write(self.post)
            await w.drain()
            status_line = await r.readline()
            status = int(status_line.split()[1]) if status_line.startswith(b"HTTP/1.1 ") else 0
            body = await r.read()  # Connection: close
            if status != 200:
                try:
                    key = f"{status} {json.loads(body).get('code')}"
                except ValueError:
                    key = f"{status} {body[:40]!r}"
                self.errors[key] = self.errors.get(key, 0) + 1
            self.done.append((t0, time.time(), status, len(self.data)))
        finally:
            w.close()

    async def client(self, k: int) -> None:
        while self.running:
            try:
                await self.one(k)
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                if self.running:
                    key = type(e).__name__
                    self.errors[key] = self.errors.get(key, 0) + 1
                    await asyncio.sleep(0.1)

    async def main(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(self.client(k)) for k in range(self.a.clients)]
        print("READY", flush=True)
        stop = loop.run_in_executor(None, sys.stdin.read)  # EOF: stop
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        end = time.monotonic() + self.a.seconds if self.a.seconds else float("inf")
        while not stop.done() and time.monotonic() < end:
            self.samples.append((time.time(), self.sent))
            await asyncio.wait([stop], timeout=0.1)
        self.samples.append((time.time(), self.sent))
        self.running = False
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return {"samples": self.samples, "done": self.done, "errors": self.errors, "file_bytes": len(self.data),
                "cpu_s": (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime),
                "wall_s": self.samples[-1][0] - self.samples[0][0]}


def upload_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="media.py _upload")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--kind", default="file")
    p.add_argument("--size-mb", type=int, default=10)
    p.add_argument("--uplink", type=float, default=0.0, help="MB/s per client (0: unthrottled)")
    p.add_argument("--user-prefix", default="up")
    p.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: at EOF on stdin)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import uvloop

    Path(a.out).write_text(json.dumps(uvloop.run(Uploads(a).main())))
    return 0


class Uploader:
    """The ``_upload`` subprocess: started, READY, then :meth:`finish` (EOF on stdin) -> its JSON."""

    def __init__(self, port: int, clients: int, kind: str, size_mb: int, uplink: float, out: Path) -> None:
        self.out = out
        cmd = [sys.executable, str(Path(__file__).resolve()), "_upload", "--port", str(port), "--clients", str(clients),
               "--kind", kind, "--size-mb", str(size_mb), "--uplink", str(uplink), "--out", str(out)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            self.proc.kill()
            raise RuntimeError(f"uploader did not start: {line!r}")

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        if self.proc.wait(60) != 0:
            raise RuntimeError(f"uploader failed ({self.proc.returncode})")
        return json.loads(self.out.read_text())  # type: ignore[no-any-return]


def window(up: dict[str, Any], t0: float, t1: float) -> dict[str, Any]:
    """The uploads seen in the window [t0, t1] (unix s): file bytes sent per second
    (interpolated from the samples), uploads finished in it, their latency and refusals."""
    s = up["samples"]

    def sent_at(t: float) -> float:
        for (ta, a), (tb, b) in itertools.pairwise(s):
            if ta <= t <= tb:
                return a + (b - a) * (t - ta) / (tb - ta) if tb > ta else a
        return float(s[0][1] if t < s[0][0] else s[-1][1])

    fin = [d for d in up["done"] if t0 <= d[1] <= t1]
    ok = sorted(d[1] - d[0] for d in fin if d[2] == 200)
    secs = t1 - t0
    return {"mb_per_s": (sent_at(t1) - sent_at(t0)) / MB / secs, "uploads": len(fin), "ok": len(ok), "uploads_per_s": len(ok) / secs,
            "stored_mb_per_s": len(ok) * up["file_bytes"] / MB / secs, "refused": len(fin) - len(ok),
            "p50_s": pick(ok, 50), "p99_s": pick(ok, 99), "max_s": ok[-1] if ok else None}


def pick(xs: list[float], p: float) -> float | None:
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else None


# ------------------------------------------------------------------ gateways and the machine


def busy_pids() -> list[int]:
    """Processes of a test suite or a build (what ``pgrep -f "pytest|node --test|cargo"``
    looks for), matched on whole arguments: an environment or a path that merely contains
    ``.cargo`` or ``pytest-of-<user>`` does not count (the suite's own children do not
    matter: pytest itself is there while it runs)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = d.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        names = [x.rsplit("/", 1)[-1] for x in argv[:3]]
        if ("pytest" in names or any(n == "cargo" or n.startswith("cargo-") for n in names)
                or any(argv[i:i + 2] == ["-m", "pytest"] for i in range(len(argv)))
                or (names and names[0] == "node" and "--test" in argv)):
            out.append(int(d.name))
    return out


def wait_quiet(limit: float) -> float:
    """Wait (poll every 30 s, at most ``limit``) while a test suite or a build runs here."""
    t = time.monotonic()
    while time.monotonic() - t < limit:
        busy = busy_pids()
        if not busy:
            break
        log(f"a test suite or build is running (pids {' '.join(map(str, busy[:5]))}): waiting")
        time.sleep(30)
    return time.monotonic() - t


def start_gateway(tmp: Path, sets: list[str], tag: str) -> Server:
    cfg = tmp / "gateway.toml"
    cfg.write_text(BENCH_TOML.read_text() + KEEP_ROUTE)
    allsets = [f"store.path={tmp}/store.db", f"media.dir={tmp}/media", *MEDIA_SETS, *sets]
    return Server("livegate", allsets, tag=f"-media{tag}", config=cfg)


def thread_groups(before: dict[str, float], after: dict[str, float], secs: float) -> dict[str, float]:
    """Cores used per thread group (``main``, else the thread's name without its id)."""
    out: dict[str, float] = {}
    for name, v in after.items():
        g = name.rsplit("/", 1)[0]
        out[g] = out.get(g, 0.0) + (v - before.get(name, 0.0)) / secs
    return dict(sorted(((k, round(v, 3)) for k, v in out.items() if v >= 0.005), key=lambda kv: -kv[1]))


def busy_cores(b0: tuple[float, float], b1: tuple[float, float]) -> float:
    return (b1[0] - b0[0]) / ((b1[1] - b0[1]) / (os.cpu_count() or 1))


def groups_md(g: dict[str, float], n: int = 4) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in list(g.items())[:n])


# ------------------------------------------------------------------ scenarios


def sc_throughput(a: argparse.Namespace) -> dict[str, Any]:
    runs, rows = [], []
    for n in a.clients:
        waited = wait_quiet(a.wait_limit)
        tmp = Path(tempfile.mkdtemp(prefix="media-bench-"))
        try:
            with start_gateway(tmp, a.set, f"-tp{n}") as srv:
                up = Uploader(srv.port, n, a.kind, a.size_mb, a.uplink, tmp / "up.json")
                time.sleep(a.warmup)
                t0, c0, b0 = time.time(), thread_cpu(srv.pid), machine_busy()
                time.sleep(a.seconds)
                t1, c1, b1 = time.time(), thread_cpu(srv.pid), machine_busy()
                res = up.finish()
                stats = http_json(f"http://127.0.0.1:{srv.api_port}/v1/stats")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        secs = t1 - t0
        w = window(res, t0, t1)
        node = (sum(c1.values()) - sum(c0.values())) / secs
        rec = {"clients": n, "kind": a.kind, "uplink": a.uplink, "window": w, "node_cores": node,
               "node_threads": thread_groups(c0, c1, secs), "uploader_cores": res["cpu_s"] / res["wall_s"],
               "machine_busy_cores": busy_cores(b0, b1), "errors": res["errors"], "waited_s": waited,
               "engine": stats.get("engine", {}) if isinstance(stats, dict) else {}}
        runs.append(rec)
        log(f"{n} clients: {w['mb_per_s']:.1f} MB/s, {w['uploads_per_s']:.2f} uploads/s, node {node:.2f} cores")
        rows.append([n, fmt_f(w["mb_per_s"]), fmt_f(w["stored_mb_per_s"]), fmt_f(w["uploads_per_s"], 2), fmt_f(w["p50_s"], 2),
                     fmt_f(w["p99_s"], 2), f"{w['refused']} / {sum(res['errors'].values())}", fmt_f(node, 2),
                     groups_md(rec["node_threads"]), fmt_f(rec["uploader_cores"], 2), fmt_f(rec["machine_busy_cores"], 2)])
    md = (f"`kind={a.kind}`, {a.size_mb} MB per upload, a new connection per upload, plain `ws` port (http); {a.warmup:g} s warm-up, "
          f"{a.seconds:g} s measured; uplink per client: {'unthrottled' if not a.uplink else f'{a.uplink:g} MB/s'}. "
          "`MB/s sent`: file bytes written into the node's port per second (sampled every 0.1 s); `MB/s stored`: "
          "uploads answered 200 in the window × size / window; latency: first byte sent -> answer read, uploads answered 200 in the window. "
          "Node cores: the gateway process's CPU time / wall (1.00 = one core), top thread groups beside it.\n\n"
          + table(["clients", "MB/s sent", "MB/s stored", "uploads/s", "p50 s", "p99 s", "refused in window / errors in run", "node cores",
                   "node threads (cores)", "uploader cores", "machine busy cores"], rows))
    return {"runs": runs, "markdown": md}


def fan_args(a: argparse.Namespace) -> list[str]:
    return ["--conns", str(a.members), "--room", "bench:media", "--sources", "8", "--connect-inflight", "256", "--publishers", "2",
            "--rate", "max", "--window", "32", "--warmup", "1", "--duration", str(a.fan_seconds), "--drain-wait", "1",
            "--lat-sample", "4", "--ping-interval", "20"]


def ab_run(a: argparse.Namespace, cond: str, uplink: float | None, r: int) -> dict[str, Any]:
    waited = wait_quiet(a.wait_limit)
    tmp = Path(tempfile.mkdtemp(prefix="media-ab-"))
    try:
        with start_gateway(tmp, a.set, f"-ab-{cond}") as srv:
            up = None
            if uplink is not None:
                up = Uploader(srv.port, a.uploaders, a.kind, a.size_mb, uplink, tmp / "up.json")
                time.sleep(a.ramp)
            b0, c0, m0 = machine_busy(), thread_cpu(srv.pid), time.monotonic()
            ld = gw_load(srv, fan_args(a), budget=a.fan_seconds + 90)
            b1, c1, m1 = machine_busy(), thread_cpu(srv.pid), time.monotonic()
            res = up.finish() if up else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t0, t1 = (x / 1e6 for x in ld["measured_publish_t_us"])
    rec: dict[str, Any] = {"round": r, "cond": cond, "uplink": uplink, "waited_s": waited, "deliveries_per_s": ld["deliveries_per_s"],
                           "delivery_ratio": ld["delivery_ratio"], "p99_ms": ld["latency_ms"]["p99"], "publish_acks_per_s": ld["acks_per_s"],
                           "ack_p99_ms": (ld.get("ack_ms") or {}).get("p99"),
                           "server_cores": ld.get("server_cpu_util"), "server_ns_per_delivery": ld.get("server_cpu_ns_per_delivery"),
                           "client_cores": ld.get("client_cpu_util"), "conns_ok": ld["conns_ok"], "conns_lost": ld["conns_lost"],
                           # the whole gw-load run (connect included): the thread split, the machine
                           "node_threads": thread_groups(c0, c1, m1 - m0),
                           "machine_busy_cores": busy_cores(b0, b1)}
    if res is not None:
        rec["uploads"] = window(res, t0, t1)
        rec["uploader_cores"] = res["cpu_s"] / res["wall_s"]
        rec["upload_errors"] = res["errors"]
    log(f"round {r} {cond}: {rec['deliveries_per_s']:,.0f} deliveries/s"
        + (f", uploads {rec['uploads']['mb_per_s']:.1f} MB/s" if res else "") + f", node {rec['server_cores']:.2f} cores")
    return rec


def sc_ab(a: argparse.Namespace) -> dict[str, Any]:
    conds: list[tuple[str, float | None]] = [("A", None)] + [(f"B{u:g}" if u else "B", u) for u in a.uplinks]
    runs = []
    for r in range(a.rounds):
        k = r % len(conds)
        for cond, uplink in conds[k:] + conds[:k]:
            runs.append(ab_run(a, cond, uplink, r))
    rows = []
    for x in runs:
        u = x.get("uploads") or {}
        base = next(y for y in runs if y["round"] == x["round"] and y["cond"] == "A")
        rows.append([x["round"], x["cond"], fmt_int(x["deliveries_per_s"]), fmt_f(x["deliveries_per_s"] / base["deliveries_per_s"], 3),
                     fmt_f(x["delivery_ratio"], 4), fmt_f(x["p99_ms"]), fmt_int(x["publish_acks_per_s"]), fmt_f(x["ack_p99_ms"]), fmt_f(u.get("mb_per_s")), fmt_f(u.get("uploads_per_s"), 2),
                     u.get("refused", "–"), fmt_f(x["server_cores"], 2), fmt_int(x["server_ns_per_delivery"]), fmt_f(x["client_cores"], 2),
                     fmt_f(x.get("uploader_cores"), 2), fmt_f(x["machine_busy_cores"], 2), groups_md(x["node_threads"], 5)])
    summary = []
    for cond, _ in conds:
        xs = [x for x in runs if x["cond"] == cond]
        ratios = [x["deliveries_per_s"] / next(y for y in runs if y["round"] == x["round"] and y["cond"] == "A")["deliveries_per_s"] for x in xs]
        dl = [x["deliveries_per_s"] for x in xs]
        mbs = [x["uploads"]["mb_per_s"] for x in xs if "uploads" in x]
        summary.append([cond, fmt_int(statistics.median(dl)), f"{fmt_int(min(dl))}–{fmt_int(max(dl))}", fmt_f(statistics.median(ratios), 3),
                        f"{fmt_f(min(ratios), 3)}–{fmt_f(max(ratios), 3)}", fmt_f(statistics.median(mbs)) if mbs else "–",
                        fmt_f(statistics.median(x["server_cores"] for x in xs), 2), fmt_int(statistics.median(x["server_ns_per_delivery"] for x in xs)),
                        fmt_f(statistics.median(x["client_cores"] for x in xs), 2)])
    md = (f"One `bench:` room, {a.members:,} gw-load receivers + 2 publishers at max (window 32), {a.fan_seconds:g} s measured after 1 s warm-up; "
          f"B: {a.uploaders} clients uploading {a.size_mb} MB `kind={a.kind}` files without pause, started {a.ramp:g} s before gw-load "
          "(`B` unthrottled, `B<n>` paced to n MB/s per client); a fresh gateway per condition, order rotating per round. "
          "Upload MB/s: file bytes sent in gw-load's measured window. Node cores / ns per delivery: gw-load's `--server-pid` over the "
          "measured window; node threads: the whole gw-load run (connects included).\n\n"
          + table(["round", "cond", "deliveries/s", "/ A", "delivery ratio", "p99 ms", "publishes/s", "publish->ack p99 ms", "upload MB/s", "uploads/s", "refused", "node cores",
                   "node ns/dlv", "gw-load cores", "uploader cores", "machine busy", "node threads (cores)"], rows)
          + f"\n\nMedian and range over {a.rounds} rounds:\n\n"
          + table(["cond", "deliveries/s", "range", "B/A (per round)", "range", "upload MB/s", "node cores", "node ns/dlv", "gw-load cores"], summary))
    return {"runs": runs, "markdown": md}


# ------------------------------------------------------------------ main

RUNNERS = {"throughput": sc_throughput, "ab": sc_ab}


def main(argv: list[str]) -> int:
    if argv[:1] == ["_upload"]:
        return upload_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=list(RUNNERS))
    ap.add_argument("--clients", default="1,4,20", help="throughput: concurrent uploaders, comma-separated")
    ap.add_argument("--seconds", type=float, default=20.0, help="throughput: measured seconds")
    ap.add_argument("--warmup", type=float, default=3.0, help="throughput: seconds before the measurement")
    ap.add_argument("--kind", default="file", choices=["file", "image"])
    ap.add_argument("--size-mb", type=int, default=10)
    ap.add_argument("--uplink", type=float, default=0.0, help="throughput: MB/s per client (0: unthrottled)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--uploaders", type=int, default=20)
    ap.add_argument("--uplinks", default="0", help="ab: one B condition per value, MB/s per uploader (0: unthrottled)")
    ap.add_argument("--fan-seconds", type=float, default=8.0)
    ap.add_argument("--ramp", type=float, default=2.0, help="ab: seconds the uploads run before gw-load starts")
    ap.add_argument("--wait-limit", type=float, default=1200.0, help="seconds to wait for a running test suite or build (0: don't)")
    ap.add_argument("--set", action="append", default=[], metavar="K=V", help="gateway --set (repeatable)")
    a = ap.parse_args(argv)
    a.clients = [int(x) for x in a.clients.split(",")]
    a.uplinks = [float(x) for x in a.uplinks.split(",")]
    if a.scenario == "ab" and not GW_LOAD.exists():
        raise SystemExit(f"no gw-load at {GW_LOAD} (cargo build --release -p gw-load, or GW_LOAD=...)")
    started = dt.datetime.now(dt.UTC)
    info = {"date": started.isoformat(timespec="seconds"), "machine": machine(), "args": vars(a), "loadavg_start": os.getloadavg()}
    res = RUNNERS[a.scenario](a)
    info["loadavg_end"] = os.getloadavg()
    m = info["machine"]
    text = (f"Date: {info['date']} · commit `{m['commit']}` · {m['nproc']} × {m['cpu_model']} · load average at start "
            f"{info['loadavg_start'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}\n\n{res['markdown']}\n")
    RAW.mkdir(parents=True, exist_ok=True)
    out = RAW / f"media-{a.scenario}-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({**info, "results": res}, indent=1, default=str))
    out.with_suffix(".md").write_text(text)
    print(text)
    log(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
