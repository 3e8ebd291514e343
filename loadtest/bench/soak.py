"""Soak benchmark: connection churn at ~5,000 connections for a long time, watching the
gateway's memory. Not part of CI.

    python loadtest/bench/soak.py --minutes 30        # the real run
    python loadtest/bench/soak.py --minutes 3 --warmup-s 60   # a smoke run

One gateway (memory broker, ``loadtest/bench/gateway-bench.toml``) on free ports, and
two kinds of churning clients until the time is up:

- ``--lanes`` gw-load lanes (``--conns`` minus the Python churners, split evenly): each
  lane runs gw-load again and again; one run connects its share, joins a room
  (``bench:soak-<lane>-<k>``, rotating over ``--rooms-per-lane`` rooms), publishes chat at
  ``--lane-rate`` msgs/s for a random 15-45 s, then exits (all its connections close).
  Lanes desynchronise by their random durations, so the total stays near ``--conns``;
- ``--py-churners`` Python clients (``gateway.client.GatewayClient``) that loop: connect,
  join two rooms, publish one chat message in each, leave both explicitly, disconnect,
  pause 0.5-2 s.

Every ``--sample-s`` seconds (10) it samples the gateway's RSS (``/proc/PID/status``) and
``/v1/stats`` (connections, rooms). After ``--warmup-s`` (120 s: the first connect waves and
the allocator's growth to its working set), the **start** RSS is the mean of the first 3 samples, the
**end** RSS the mean of the last 3 samples; growth % = (end - start) / start x 100.
Pass: growth < ``--max-growth`` (5 %). Also reported: the single first/last samples and
the peak.

Writes ``loadtest/results/raw/soak-<stamp>.csv`` (every sample), ``.json`` (everything)
and ``loadtest/results/soak.md`` (the summary and the curve, one row per minute). Exits
1 when the run fails the growth check or the gateway dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import datetime
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
GW_LOAD = ROOT / "target" / "release" / "gw-load"
BENCH_TOML = ROOT / "loadtest" / "bench" / "gateway-bench.toml"
RESULTS = ROOT / "loadtest" / "results"
RAW = RESULTS / "raw"

sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import free_port  # noqa: E402  (the bench runner's helpers)
from run import rss_kib as _rss  # noqa: E402


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_kib(pid: int) -> int:
    """VmRSS in KiB, 0 when the process is gone."""
    return _rss(pid) or 0


def stats(api_port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v1/stats", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return {}


class Gateway:
    def __init__(self, sets: list[str], log_path: Path) -> None:
        self.port, self.api_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "gateway", "run", "-c", str(BENCH_TOML), "--host", "127.0.0.1", "--port",
               str(self.port), "--api-port", str(self.api_port)]
        for s in sets:
            cmd += ["--set", s]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "python"), os.environ.get("PYTHONPATH")])))
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.url = f"ws://127.0.0.1:{self.port}/ws"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("gateway not ready")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        return self.proc.returncode


#: gw-load processes running right now (killed when the soak stops early).
LOADS: set[asyncio.subprocess.Process] = set()


async def lane(i: int, gw: Gateway, conns: int, opts: argparse.Namespace, stop_at: float, counters: dict[str, int]) -> None:
    k = 0
    while time.monotonic() < stop_at - 5:
        dur = min(random.uniform(15, 45), max(1.0, stop_at - time.monotonic() - 3))
        room = f"bench:soak-{i}-{k % opts.rooms_per_lane}"
        k += 1
        args = [str(GW_LOAD), "--url", gw.url, "--conns", str(conns), "--publishers", "1", "--rate", str(opts.lane_rate),
                "--room", room, "--user-prefix", f"l{i}r{k}u", "--sources", "4", "--connect-rate", "1000",
                "--duration", f"{dur:.1f}", "--drain-wait", "0.5", "--ping-interval", "20", "--lat-sample", "50",
                "--quiet", "--timeout", str(dur + 40)]
        p = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        LOADS.add(p)
        try:
            out, err = await p.communicate()
        finally:
            LOADS.discard(p)
        counters["lane_runs"] += 1
        lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            counters["lane_failures"] += 1
            log(f"lane {i}: gw-load failed ({p.returncode}): {err.decode()[-300:]}")
            await asyncio.sleep(1)
            continue
        r = json.loads(lines[-1])
        counters["lane_connects"] += r["conns_ok"]
        counters["lane_conn_failures"] += r["conns_failed"]
        counters["lane_lost"] += r["conns_lost"]
        counters["lane_published"] += r["published"]
        counters["lane_received"] += r["received"]
        counters["lane_expected"] += r["expected_deliveries"]


async def py_churner(i: int, gw: Gateway, stop_at: float, counters: dict[str, int]) -> None:
    from gateway.client import GatewayClient

    n = 0
    while time.monotonic() < stop_at - 2:
        n += 1
        c = GatewayClient(gw.url, user=f"py{i}x{n}", heartbeat=0, compression=None, request_timeout=10)
        try:
            await c.connect()
            rooms = [f"bench:soak-py-{random.randrange(20)}", f"bench:soak-py-{random.randrange(20)}"]
            for r in dict.fromkeys(rooms):
                await c.join(r)
                await c.publish(r, {"text": "soak", "i": n})
            for r in dict.fromkeys(rooms):
                await c.leave(r)
            counters["py_cycles"] += 1
        except Exception as e:  # noqa: BLE001 (counted; the soak goes on)
            counters["py_failures"] += 1
            if counters["py_failures"] <= 5:
                log(f"python churner {i}: {e!r}")
        finally:
            await c.close()
        await asyncio.sleep(random.uniform(0.5, 2.0))


async def run(opts: argparse.Namespace) -> int:
    if not GW_LOAD.exists():
        log("gw-load is not built: cargo build --release -p gw-load")
        return 2
    RAW.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    gw = Gateway(opts.set, RAW / f"soak-{stamp}-server.log")
    samples: list[dict[str, Any]] = []
    counters: dict[str, int] = dict.fromkeys(
        ("lane_runs", "lane_failures", "lane_connects", "lane_conn_failures", "lane_lost", "lane_published", "lane_received",
         "lane_expected", "py_cycles", "py_failures"), 0)
    t_start = time.monotonic()
    total_s = opts.minutes * 60
    stop_at = t_start + total_s
    died = False
    try:
        gw.wait_ready()
        rss0 = rss_kib(gw.proc.pid)
        log(f"gateway pid {gw.proc.pid} on {gw.url}, idle RSS {rss0} KiB; churn for {opts.minutes} min")
        per_lane = (opts.conns - opts.py_churners) // opts.lanes
        tasks = [asyncio.ensure_future(lane(i, gw, per_lane, opts, stop_at, counters)) for i in range(opts.lanes)]
        tasks += [asyncio.ensure_future(py_churner(i, gw, stop_at, counters)) for i in range(opts.py_churners)]
        next_sample = t_start
        while time.monotonic() < stop_at:
            if gw.proc.poll() is not None:
                died = True
                log(f"gateway died with {gw.proc.returncode}")
                break
            now = time.monotonic()
            if now >= next_sample:
                st = await asyncio.to_thread(stats, gw.api_port)
                eng = st.get("engine", {})
                s = {"t": round(now - t_start, 1), "rss_kib": rss_kib(gw.proc.pid), "connections": st.get("connections"),
                     "rooms": st.get("rooms"), "connects": eng.get("connects"), "disconnects": eng.get("disconnects"),
                     "deliveries": eng.get("deliveries")}
                samples.append(s)
                log(f"t={s['t']:7.1f}s rss={s['rss_kib']:,} KiB conns={s['connections']} rooms={s['rooms']} "
                    f"connects={s['connects']} lanes={counters['lane_runs']} py_cycles={counters['py_cycles']}")
                next_sample += opts.sample_s
            await asyncio.sleep(min(1.0, max(0.0, next_sample - time.monotonic())))
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(3)  # let the last gw-load processes' connections close
        samples.append({"t": round(time.monotonic() - t_start, 1), "rss_kib": rss_kib(gw.proc.pid), "phase": "after churn",
                        "connections": (await asyncio.to_thread(stats, gw.api_port)).get("connections")})
    finally:
        for p in list(LOADS):
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        code = gw.stop()

    under_load = [s for s in samples if "phase" not in s and s["t"] >= opts.warmup_s]
    if len(under_load) < 6:
        log(f"too few samples after the warm-up ({len(under_load)}): run longer or shorten --warmup-s")
        return 2
    start = statistics.fmean(s["rss_kib"] for s in under_load[:3])
    end = statistics.fmean(s["rss_kib"] for s in under_load[-3:])
    growth = (end - start) / start * 100
    ok = growth < opts.max_growth and not died
    summary = {
        "stamp": stamp, "minutes": opts.minutes, "conns": opts.conns, "lanes": opts.lanes, "py_churners": opts.py_churners,
        "lane_rate": opts.lane_rate, "sets": opts.set, "warmup_s": opts.warmup_s, "sample_s": opts.sample_s,
        "rss_idle_kib": rss0, "rss_start_kib": round(start), "rss_end_kib": round(end),
        "rss_first_kib": under_load[0]["rss_kib"], "rss_last_kib": under_load[-1]["rss_kib"],
        "rss_peak_kib": max(s["rss_kib"] for s in samples), "growth_pct": round(growth, 2), "max_growth_pct": opts.max_growth,
        "pass": ok, "gateway_died": died, "gateway_exit": code, "counters": counters,
        "connections_mean": round(statistics.fmean(s["connections"] or 0 for s in under_load)), "samples": samples,
    }
    write_raw(stamp, samples, summary)
    md = render(summary)
    (RESULTS / "soak.md").write_text(md)
    print(md)
    log(f"{'PASS' if ok else 'FAIL'}: RSS {start:,.0f} -> {end:,.0f} KiB ({growth:+.2f} %); raw: {RAW / f'soak-{stamp}.csv'}")
    return 0 if ok else 1


def write_raw(stamp: str, samples: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    with open(RAW / f"soak-{stamp}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["t", "rss_kib", "connections", "rooms", "connects", "disconnects", "deliveries", "phase"])
        w.writeheader()
        w.writerows(samples)
    (RAW / f"soak-{stamp}.json").write_text(json.dumps(summary, indent=1))


def render(s: dict[str, Any]) -> str:
    c = s["counters"]
    lines = [
        f"# Soak: {s['minutes']} min of churn at ~{s['conns']:,} connections ({s['stamp']})",
        "",
        f"`python loadtest/bench/soak.py --minutes {s['minutes']:g} --warmup-s {s['warmup_s']:g}`"
        + (" " + " ".join(f"--set {x}" for x in s["sets"]) if s["sets"] else ""),
        "",
        "| RSS idle | start (mean of first 3 samples after warm-up) | end (mean of last 3) | growth | peak | verdict |",
        "|--:|--:|--:|--:|--:|---|",
        (f"| {s['rss_idle_kib']:,} KiB | {s['rss_start_kib']:,} KiB | {s['rss_end_kib']:,} KiB | {s['growth_pct']:+.2f} % | "
         f"{s['rss_peak_kib']:,} KiB | {'**pass**' if s['pass'] else '**FAIL**'} (< {s['max_growth_pct']:g} %) |"),
        "",
        (f"Connections under load: {s['connections_mean']:,} on average. gw-load runs: {c['lane_runs']:,} "
         f"({c['lane_failures']} failed), {c['lane_connects']:,} connects ({c['lane_conn_failures']} failed, "
         f"{c['lane_lost']} lost), {c['lane_published']:,} messages published, {c['lane_received']:,} of "
         f"{c['lane_expected']:,} measured deliveries; Python churn cycles (connect, join 2, publish, leave 2, "
         f"disconnect): {c['py_cycles']:,} ({c['py_failures']} failed). Gateway exit code {s['gateway_exit']}."),
        "",
        "| t (s) | RSS KiB | connections | rooms |",
        "|--:|--:|--:|--:|",
    ]
    step = max(1, round(60 / s["sample_s"])) if s["minutes"] > 5 else 1
    rows = s["samples"][::step]
    if rows[-1] is not s["samples"][-1]:
        rows.append(s["samples"][-1])
    for x in rows:
        lines.append(f"| {x['t']:g}{' (' + x['phase'] + ')' if 'phase' in x else ''} | {x['rss_kib']:,} | {x.get('connections')} | {x.get('rooms', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--lanes", type=int, default=5)
    ap.add_argument("--py-churners", type=int, default=100)
    ap.add_argument("--lane-rate", type=float, default=10.0, help="chat msgs/s per lane (into its room)")
    ap.add_argument("--rooms-per-lane", type=int, default=4)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--warmup-s", type=float, default=120.0)
    ap.add_argument("--max-growth", type=float, default=5.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="gateway setting (repeatable)")
    opts = ap.parse_args(argv)
    return asyncio.run(run(opts))


if __name__ == "__main__":
    sys.exit(main())
