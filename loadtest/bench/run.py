#!/usr/bin/env python
"""Benchmark runner: one command per scenario of issue 6.

    python loadtest/bench/run.py SCENARIO [--quick] [--target livegate|websockets|socketify|all]

Scenarios:
  idle     a. idle joined connections at 10k and 19k: RSS per connection
  fanout   b. one room, one message per frame, 1k/5k/10k members, publish-rate sweep
             (with peers among the targets, also `compare`)
  compare  b'. the peer comparison alone: 5k/10k members, targets interleaved, ratios
  latency  b''. the latency target: 5k members at 50 msgs/s, 10 s runs repeated, targets
             interleaved (livegate and, when importable, socketify), p99 per run and median
  mixed    b'''. a small room (50 members, 20 msgs/s) beside a big one (5k, 50 msgs/s) on
             one node: does the big room's fan-out delay the small room? (3 runs)
  merge    c. the same with a 50 ms merge window (merge:{id} rooms): logical deliveries/s
  storm    d. connect storm with JWT auth (and dev auth for contrast): connections/s
  redis    e. two nodes + Redis vs one node (same run), and 50k connections over 3 workers
  slow     f. one slow consumer among 5k members, chat and gift traffic
  all      every scenario above but compare and scrape, then the targets check

Every measurement starts a fresh server process, waits until it is ready, runs the
compiled load client (target/release/gw-load) with --server-pid, collects its JSON
summary (plus the gateway's /v1/stats deltas), stops the server and writes
loadtest/results/raw/<scenario>-<timestamp>.json and a .md next to it, and prints the
markdown tables. Peers (--target) are the plain `websockets` baseline and socketify in
loadtest/peers/; they take part in `idle`, `fanout` and `compare` (the others depend on
gateway features the peers don't have).

Run one benchmark at a time on an otherwise quiet machine: the load client and the
server share its 2 cores.
"""

# ruff: noqa: RUF001 (the tables use typographic dashes and signs)
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
#: The load client; the GW_LOAD environment variable picks another build (e.g. to compare two).
GW_LOAD = Path(os.environ.get("GW_LOAD") or ROOT / "target" / "release" / "gw-load")
BENCH_TOML = ROOT / "loadtest" / "bench" / "gateway-bench.toml"
PEERS = ROOT / "loadtest" / "peers"
RAW = ROOT / "loadtest" / "results" / "raw"
JWT_SECRET = "bench-secret-0123456789abcdef-0123456789"  # >= 32 chars, bench only
FD_CAP = 20_000  # hard RLIMIT_NOFILE per process on this machine
TARGETS = ("livegate", "websockets", "socketify")
SCENARIOS = ("idle", "fanout", "merge", "storm", "redis", "slow")
EXTRA = ("compare", "latency", "mixed", "scrape")  # fanout's peer comparison alone; latency target; scrape cost


# ----------------------------------------------------------------- utilities

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


_used_ports: set[int] = set()


def free_port() -> int:
    """A free port below the ephemeral range: the load client's tens of thousands of
    outgoing connections (and their TIME_WAIT leftovers) take ports from that range, and
    a server port picked from it could collide with them."""
    import random
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    lo, hi = (10_000, low - 1) if low > 12_000 else (low // 2, low - 1)
    for _ in range(200):
        port = random.randint(lo, hi)
        if port in _used_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _used_ports.add(port)
        return port
    raise RuntimeError("no free port")


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def http_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "commit": commit}


def fmt_int(x: Any) -> str:
    if x is None:
        return "–"
    return f"{x:,.0f}"


def fmt_f(x: Any, nd: int = 1) -> str:
    if x is None:
        return "–"
    return f"{x:.{nd}f}"


def table(cols: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------- servers

class Server:
    """One fresh server process (the gateway or a peer) on free ports.

    ``tls`` (a dict with ``cert``, ``key``, ``ca`` paths: see ``tls.py``) serves wss://
    too: the gateway gets a ``[server.tls]`` section on a second port (its plain
    listener stays), socketify serves only wss://. ``url`` is then the wss:// one,
    ``plain_url`` the ws:// one (None when there is none). ``cpus`` pins the process
    (``taskset -c``). ``config``: the gateway's config file instead of
    ``gateway-bench.toml`` (without ``tls``)."""

    def __init__(self, target: str, sets: list[str] | None = None, tag: str = "",
                 tls: dict[str, str] | None = None, cpus: str | None = None, config: Path | None = None) -> None:
        self.target = target
        self.port = free_port()
        self.api_port = free_port() if target == "livegate" else None
        self.tls_port: int | None = None
        self.ca = tls["ca"] if tls else None
        py = sys.executable
        RAW.mkdir(parents=True, exist_ok=True)
        if target == "livegate":
            config = config or BENCH_TOML
            if tls:
                # Until the CLI has --tls-port, TLS comes from the config file.
                self.tls_port = free_port()
                config = RAW / f"gateway-tls{tag}.toml"
                config.write_text(BENCH_TOML.read_text() + (
                    f'\n[server.tls]\ncert_file = "{tls["cert"]}"\nkey_file = "{tls["key"]}"\n'
                    f'port = {self.tls_port}\nhost = "127.0.0.1"\n'))
            cmd = [py, "-m", "gateway", "run", "-c", str(config), "--host", "127.0.0.1", "--port", str(self.port),
                   "--api-port", str(self.api_port)]
            for s in sets or []:
                cmd += ["--set", s]
        elif target == "websockets":
            cmd = [py, str(PEERS / "websockets_peer.py"), "--port", str(self.port)]
        elif target == "socketify":
            cmd = [py, str(PEERS / "socketify_peer.py"), "--port", str(self.port)]
            if tls:
                cmd += ["--tls-cert", tls["cert"], "--tls-key", tls["key"]]
        else:
            raise ValueError(target)
        if cpus:
            cmd = ["taskset", "-c", cpus, *cmd]
        self.log_path = RAW / f"server-{target}{tag}.log"
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.plain_url: str | None = f"ws://127.0.0.1:{self.port}/ws"
        if tls and target != "livegate":
            self.tls_port, self.plain_url = self.port, None
        self.url = f"wss://127.0.0.1:{self.tls_port}/ws" if self.tls_port else self.plain_url

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.target} exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                for port in {self.port, self.tls_port} - {None}:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        pass
                if self.api_port is None:
                    return
                if http_json(f"http://127.0.0.1:{self.api_port}/readyz", 1.0).get("ready"):
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.target} not ready within {timeout} s")

    def stats(self) -> dict | None:
        if self.api_port is None:
            return None
        try:
            return http_json(f"http://127.0.0.1:{self.api_port}/v1/stats")
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log_file.close()

    def __enter__(self) -> Server:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def gw_load(server: Server, args: list[str], budget: float, plain: bool = False, cpus: str | None = None) -> dict:
    """Run gw-load against ``server`` (its ws:// listener if ``plain``, else its main URL,
    wss:// with ``--ca`` when it serves TLS), pinned to ``cpus`` if given; return its JSON
    summary."""
    url = server.plain_url if plain else server.url
    if url is None:
        raise RuntimeError(f"{server.target} has no ws:// listener")
    tls = ["--ca", server.ca] if url.startswith("wss:") and server.ca else []
    cmd = [str(GW_LOAD), "--url", url, "--server-pid", str(server.pid), "--quiet",
           "--timeout", str(budget), *tls, *args]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    log(f"gw-load {url.split(':')[0]} " + " ".join(args))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=budget + 30, check=False)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"gw-load failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(lines[-1])


def engine_delta(before: dict | None, after: dict | None) -> dict:
    if not before or not after:
        return {}
    b, a = before.get("engine", {}), after.get("engine", {})
    return {k: a[k] - b.get(k, 0) for k in a if isinstance(a[k], int) and k in b}


def measure(target: str, load_args: list[str], budget: float, sets: list[str] | None = None,
            tag: str = "", settle: float = 0.0, tls: dict[str, str] | None = None, plain: bool = False,
            server_cpus: str | None = None, client_cpus: str | None = None) -> dict:
    """Fresh server -> (optional settle) -> gw-load -> stop. Returns the run record.
    ``tls``: the server also serves wss:// and the load goes there, unless ``plain``."""
    srv = Server(target, sets, tag, tls=tls, cpus=server_cpus)
    with srv:
        if settle:
            time.sleep(settle)
        rss0 = rss_kib(srv.pid)
        s0 = srv.stats()
        res = gw_load(srv, load_args, budget, plain=plain, cpus=client_cpus)
        s1 = srv.stats()
    res_engine = engine_delta(s0, s1)
    rec = {"target": target, "args": load_args, "sets": sets or [], "server_rss_kib_start": rss0,
           "load": res, "engine_delta": res_engine}
    return rec


# ----------------------------------------------------------------- scenarios

IDLE_COLS = ["target", "conns", "joined", "failed", "RSS start MiB", "RSS joined MiB", "KiB / conn", "connects/s"]


def idle_run(target: str, n: int, hold: float, tls: dict[str, str] | None = None, label: str = "") -> tuple[dict, list]:
    """One idle measurement: ``n`` joined connections held ``hold`` s on a fresh server
    (wss:// with ``tls``). Returns the run record and its IDLE_COLS row."""
    args = ["--conns", str(n), "--room", "bench:idle", "--hold", str(hold), "--sources", "4",
            "--connect-inflight", "1024", "--ping-interval", "20"]
    # Settle so "RSS right after start" is the idle server, not start-up churn.
    rec = measure(target, args, budget=180 if tls else 120, tag=f"-idle-{n}{'-tls' if tls else ''}", settle=1.0, tls=tls)
    ld = rec["load"]
    end = ld.get("server_rss_kib_end")
    per = (end - rec["server_rss_kib_start"]) * 1024 / ld["conns_ok"] if end and ld["conns_ok"] else None
    rec["rss_bytes_per_conn"] = per
    row = [label or target, fmt_int(n), fmt_int(ld["conns_ok"]), fmt_int(ld["conns_failed"]),
           fmt_f(rec["server_rss_kib_start"] / 1024), fmt_f(end / 1024 if end else None),
           fmt_f(per / 1024 if per else None, 2), fmt_int(ld["connect_rate"])]
    return rec, row


def sc_idle(opts: argparse.Namespace) -> dict:
    ns = [10_000] if opts.quick else [10_000, 19_000]
    hold = 2.0 if opts.quick else 4.0
    runs, rows = [], []
    for target in opts.targets:
        for n in ns:
            rec, row = idle_run(target, n, hold)
            runs.append(rec)
            rows.append(row)
    md = table(IDLE_COLS, rows)
    md += (f"\n\nOne process can hold at most {FD_CAP:,} descriptors here (hard limit), so 19k is the "
           "single-process maximum; the 50k / 3-worker variant belongs to the Redis scale-out issue.")
    return {"runs": runs, "markdown": md}


def _pub_args(rate: str, quick: bool) -> list[str]:
    dur = "3" if quick else "5"
    return ["--rate", rate, "--warmup", "1", "--duration", dur, "--drain-wait", "1",
            "--lat-sample", "1", "--ping-interval", "20", "--window", "32"]


def _fanout_row(target: str, n: int, rate: str, ld: dict, extra: list[Any] | None = None) -> list[Any]:
    lat = ld["latency_ms"]
    return [target, fmt_int(n), rate, fmt_int(ld["published"] / ld["duration_s"] if ld["duration_s"] else 0),
            fmt_int(ld["deliveries_per_s"]), fmt_f(ld["delivery_ratio"], 4), fmt_f(lat["p50"]),
            fmt_f(lat["p99"]), fmt_int(ld.get("server_cpu_ns_per_delivery")),
            fmt_int(ld["client_cpu_ns_per_delivery"]), *(extra or [])]


FANOUT_COLS = ["target", "members", "rate", "msgs/s in", "deliveries/s", "ratio", "p50 ms", "p99 ms",
               "server ns/dlv", "client ns/dlv"]


def sc_fanout(opts: argparse.Namespace) -> dict:
    """The livegate rate sweep; with peers among the targets, also the comparison."""
    runs, rows = [], []
    if "livegate" in opts.targets:
        sizes = [1000, 5000] if opts.quick else [1000, 5000, 10_000]
        rates = ["50", "max"] if opts.quick else ["10", "50", "200", "400", "max"]
        for n in sizes:
            for rate in rates:
                # The latency target point (50 msgs/s into 5k) is noisy on 2 shared cores: 3 runs.
                reps = 3 if (n == 5000 and rate == "50" and not opts.quick) else 1
                for _ in range(reps):
                    rec = _fanout_run("livegate", n, rate, opts.quick)
                    runs.append(rec)
                    rows.append(_fanout_row("livegate", n, rate, rec["load"]))
    md = table(FANOUT_COLS, rows)
    if set(opts.targets) - {"livegate"}:
        cmp = sc_compare(opts)
        runs += cmp["runs"]
        md += "\n\n" + cmp["markdown"]
    return {"runs": runs, "markdown": md}


def _fanout_run(target: str, n: int, rate: str, quick: bool, compare: bool = False) -> dict:
    args = ["--conns", str(n), "--room", f"bench:fan{n}", "--sources", "2", "--connect-inflight", "1024",
            *_pub_args(rate, quick)]
    rec = measure(target, args, budget=120, tag=f"-fanout-{n}-{rate}")
    rec.update(members=n, rate=rate, compare=compare)
    return rec


def sc_compare(opts: argparse.Namespace) -> dict:
    """Peers: the same fan-out at 5k and 10k members, targets interleaved (A B C A B C)
    so that a disturbance on the shared machine hits all of them alike."""
    targets = opts.targets if "livegate" in opts.targets else ["livegate", *opts.targets]
    sizes = [5000] if opts.quick else [5000, 10_000]
    runs, rows = [], []
    for n in sizes:
        for rate, reps in (("50", 1), ("max", 1 if opts.quick else 2)):
            for _ in range(reps):
                for target in targets:
                    rec = _fanout_run(target, n, rate, opts.quick, compare=True)
                    runs.append(rec)
                    rows.append(_fanout_row(target, n, rate, rec["load"]))
    md = ("Peer comparison (targets interleaved, same run):\n\n" + table(FANOUT_COLS, rows)
          + "\n\n" + fanout_ratios(runs))
    return {"runs": runs, "markdown": md}


def sc_latency(opts: argparse.Namespace) -> dict:
    """The latency target point, repeated: one 5k-member room at 50 msgs/s (250k
    deliveries/s offered), 10 s measured per run. Peers are interleaved run by run
    (A B A B ...) so that a disturbance on the shared machine hits both alike."""
    targets = ["livegate"]
    if "socketify" in opts.peers_available:
        targets.append("socketify")
    reps = 2 if opts.quick else 5
    runs, rows = [], []
    for _ in range(reps):
        for target in targets:
            args = ["--conns", "5000", "--room", "bench:lat", "--sources", "2", "--connect-inflight", "1024",
                    "--rate", "50", "--warmup", "1", "--duration", "3" if opts.quick else "10",
                    "--drain-wait", "1", "--lat-sample", "1"]
            rec = measure(target, args, budget=120, tag="-latency")
            rec.update(members=5000, rate="50")
            runs.append(rec)
            ld = rec["load"]
            lat = ld["latency_ms"]
            rows.append([target, fmt_f(ld["delivery_ratio"], 4), fmt_f(lat["p50"]), fmt_f(lat["p90"]),
                         fmt_f(lat["p99"]), fmt_f(lat["max"]), fmt_int(ld.get("server_cpu_ns_per_delivery")),
                         fmt_int(ld["client_cpu_ns_per_delivery"])])
    summary = []
    for target in targets:
        p99 = sorted(r["load"]["latency_ms"]["p99"] for r in runs if r["target"] == target)
        summary.append([target, fmt_f(p99[len(p99) // 2]), ", ".join(f"{x:.0f}" for x in p99)])
    md = (table(["target", "ratio", "p50 ms", "p90 ms", "p99 ms", "max ms", "server ns/dlv", "client ns/dlv"], rows)
          + "\n\n" + table(["target", "median p99 ms", "p99 of each run (sorted)"], summary))
    return {"runs": runs, "markdown": md}


def sc_mixed(opts: argparse.Namespace) -> dict:
    """A small room next to a big one on the same node, both loaded at once (two gw-load
    processes): the small room's latency shows how long the big room's fan-out holds the
    engine's threads."""
    reps = 1 if opts.quick else 3
    dur = 4 if opts.quick else 10
    runs, rows = [], []
    for _ in range(reps):
        srv = Server("livegate", tag="-mixed")
        with srv:
            big = ["--conns", "5000", "--room", "bench:mixbig", "--sources", "2", "--user-prefix", "big",
                   "--rate", "50", "--warmup", "1", "--duration", str(dur + 2), "--drain-wait", "1",
                   "--lat-sample", "1", "--server-pid", str(srv.pid)]
            small = ["--conns", "50", "--room", "bench:mixsmall", "--user-prefix", "small", "--rate", "20",
                     "--warmup", "1", "--duration", str(dur), "--drain-wait", "1", "--lat-sample", "1"]
            lb, ls = _parallel_loads([(srv, big), (srv, small)], budget=120)
        runs.append({"target": "livegate", "big": lb, "small": ls})
        for name, ld in (("big: 5,000 members, 50 msgs/s", lb), ("small: 50 members, 20 msgs/s", ls)):
            lat = ld["latency_ms"]
            rows.append([name, fmt_f(ld["delivery_ratio"], 4), fmt_f(lat["p50"]), fmt_f(lat["p99"]),
                         fmt_f(lat["max"])])
    md = table(["room", "ratio", "p50 ms", "p99 ms", "max ms"], rows)
    return {"runs": runs, "markdown": md}


def complete(r: dict) -> bool:
    """Delivery ratio ~1 (every publish reached every member). A ratio above 1 means a
    backlog from the warmup was still arriving: the server was past saturation."""
    return 0.99 <= r["load"]["delivery_ratio"] <= 1.01


def best_max(runs: list[dict], target: str, n: int) -> float | None:
    """Saturation deliveries/s (rate max) of ``target`` at ``n`` members: the best of the
    interleaved comparison runs if there are any, else of all runs."""
    sel = [r for r in runs if r["target"] == target and r.get("members") == n and r.get("rate") == "max"]
    if any(r.get("compare") for r in sel):
        sel = [r for r in sel if r.get("compare")]
    vals = [r["load"]["deliveries_per_s"] for r in sel]
    return max(vals) if vals else None


def fanout_ratios(runs: list[dict]) -> str:
    rows = []
    for n in (5000, 10_000):
        lg = best_max(runs, "livegate", n)
        sk = best_max(runs, "socketify", n)
        wsb = best_max(runs, "websockets", n)
        if lg is None or (sk is None and wsb is None):
            continue
        rows.append([fmt_int(n), fmt_int(lg), fmt_int(sk), fmt_int(wsb),
                     fmt_f(lg / sk, 2) + "×" if sk else "–", fmt_f(lg / wsb, 1) + "×" if wsb else "–"])
    if not rows:
        return ""
    return ("Saturation (rate max, best of the interleaved runs) ratios:\n\n"
            + table(["members", "livegate dlv/s", "socketify dlv/s", "websockets dlv/s",
                     "livegate / socketify", "livegate / websockets"], rows))


def sc_merge(opts: argparse.Namespace) -> dict:
    sizes = [5000] if opts.quick else [5000, 10_000]
    rates = ["1000", "max"] if opts.quick else ["200", "1000", "2000", "max"]
    runs, rows = [], []
    for n in sizes:
        for rate in rates:
            args = ["--conns", str(n), "--room", f"merge:{n}", "--sources", "2", "--connect-inflight", "1024",
                    *_pub_args(rate, opts.quick)]
            rec = measure("livegate", args, budget=120, tag=f"-merge-{n}-{rate}")
            rec.update(members=n, rate=rate)
            runs.append(rec)
            ed = rec["engine_delta"]
            frames = ed.get("deliveries") or 0
            logical = ed.get("deliveries_logical") or 0
            per_frame = logical / frames if frames else None
            rows.append(_fanout_row("livegate", n, rate, rec["load"], [fmt_f(per_frame, 1)]))
    cols = FANOUT_COLS[:]
    cols[4] = "logical dlv/s"
    md = table([*cols, "msgs / frame"], rows)
    md += "\n\nmerge:{id} rooms: 50 ms window, at most 64 messages per batch frame; " \
          "msgs / frame = engine deliveries_logical / deliveries over the whole run."
    return {"runs": runs, "markdown": md}


def sc_storm(opts: argparse.Namespace) -> dict:
    n = 5000 if opts.quick else 19_000
    runs, rows = [], []
    for mode in ("jwt", "dev"):
        sets = ["auth.mode=jwt", f"auth.secret={JWT_SECRET}"] if mode == "jwt" else []
        args = ["--conns", str(n), "--room", "bench:storm", "--hold", "0.5", "--threads", "2", "--sources", "8",
                "--connect-inflight", "2048", "--connect-timeout", "30", "--ping-interval", "0"]
        if mode == "jwt":
            args += ["--jwt-secret", JWT_SECRET]
        rec = measure("livegate", args, budget=90, sets=sets, tag=f"-storm-{mode}", settle=0.5)
        rec.update(auth=mode, conns=n)
        runs.append(rec)
        ld = rec["load"]
        rows.append([mode, fmt_int(n), fmt_int(ld["conns_ok"]), fmt_int(ld["conns_failed"]),
                     fmt_f(ld["connect_s"], 2), fmt_int(ld["connect_rate"]), fmt_f(ld["connect_ms"]["p50"]),
                     fmt_f(ld["connect_ms"]["p99"]), json.dumps(ld["closes_by_code"]) if ld["closes_by_code"] else ""])
    md = table(["auth", "clients", "joined", "failed", "all joined in s", "connects/s", "p50 ms", "p99 ms",
                "failures by cause"], rows)
    md += (f"\n\nEach client: TCP connect, upgrade with a token (`?token=<HS256 JWT>`, checked in Python), "
           "`connected`, join, ack. One gw-load process (2 threads, 8 source addresses) against one gateway. "
           f"20,000 clients cannot be held by one gateway process here ({FD_CAP:,} descriptors per process), "
           f"so the storm uses {n:,}; 20,000 within 2 s needs 10,000 connects/s.")
    return {"runs": runs, "markdown": md}


class Redis:
    """A private redis-server on a free port (installed from Debian when missing)."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, capture_output=True)
            exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.port = free_port()
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--save", "", "--appendonly", "no",
                                      "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def cpu_s(self) -> float:
        f = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _parallel_loads(loads: list[tuple[Server, list[str]]], budget: float) -> list[dict]:
    """Run several gw-load processes at once (one per node or per 20k descriptors)."""
    procs = []
    for srv, args in loads:
        cmd = [str(GW_LOAD), "--url", srv.url, "--quiet", "--timeout", str(budget), *args]
        log("gw-load " + " ".join(args))
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=budget + 60)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"gw-load failed ({p.returncode}): {stderr[-2000:]}")
        out.append(json.loads(lines[-1]))
    return out


def sc_redis(opts: argparse.Namespace) -> dict:
    """e. Two nodes + Redis against one node, in the same run; then 50k connections over
    3 workers (the scale-out issue). Deliveries/s are summed over the load clients.

    Four publishers: one client's publishes are handled in order, each waiting for its
    Redis round trip, so a single publisher at rate max measures that round trip rather
    than fan-out."""
    quick = opts.quick
    members = 2000 if quick else 5000
    dur = ["--warmup", "1", "--duration", "3" if quick else "5", "--drain-wait", "1.5"]
    runs, rows = [], []
    redis = Redis()
    try:
        sets = ["broker.kind=redis", f"broker.url={redis.url}"]
        # One node, all members, publisher included.
        with Server("livegate", sets, tag="-redis-1node") as one:
            ld = _parallel_loads([(one, ["--conns", str(members), "--sources", "2", "--room", "bench:r1", "--rate", "max",
                                         "--publishers", "4", "--window", "64", *dur])], 120)[0]
        runs.append({"nodes": 1, "members": members, "load": [ld]})
        one_dps = ld["deliveries_per_s"]
        rows.append(["1 node", fmt_int(members), fmt_int(ld["published"]), fmt_int(one_dps), f"{ld['delivery_ratio']:.4f}",
                     fmt_f(ld["latency_ms"]["p50"]), fmt_f(ld["latency_ms"]["p99"])])
        # Two nodes, half the members on each; the publisher on node A.
        cpu0 = redis.cpu_s()
        # Each node gets one I/O thread: two nodes on this 2-core machine, like one node with two.
        node_sets = [*sets, "server.io_threads=1"]
        with Server("livegate", node_sets, tag="-redis-a") as a, Server("livegate", node_sets, tag="-redis-b") as b:
            half = members // 2
            la, lb = _parallel_loads([
                (a, ["--conns", str(half), "--sources", "2", "--room", "bench:r2", "--rate", "max", "--publishers", "4",
                   "--window", "64", *dur]),
                (b, ["--conns", str(half), "--sources", "2", "--room", "bench:r2", "--publishers", "0", *dur]),
            ], 120)
        redis_cpu = redis.cpu_s() - cpu0
        published = la["published"]
        two_dps = la["deliveries_per_s"] + lb["deliveries_per_s"]
        received = la["received"] + lb["received"]
        ratio = received / (published * members) if published else 0.0
        runs.append({"nodes": 2, "members": members, "load": [la, lb], "redis_cpu_s": redis_cpu})
        rows.append(["2 nodes + Redis", fmt_int(members), fmt_int(published), fmt_int(two_dps), f"{ratio:.4f}",
                     fmt_f(la["latency_ms"]["p50"]) + " / " + fmt_f(lb["latency_ms"]["p50"]),
                     fmt_f(la["latency_ms"]["p99"]) + " / " + fmt_f(lb["latency_ms"]["p99"])])
        md = table(["setup", "members", "published", "deliveries/s", "delivery ratio", "p50 ms (A / B)", "p99 ms (A / B)"], rows)
        md += (f"\n\nTwo nodes deliver **{two_dps / one_dps:.0%}** of one node's deliveries/s in the same run "
               f"(target ≥ 80 %). Redis CPU during the two-node run: {redis_cpu:.2f} s for {published:,} room messages "
               f"({redis_cpu / max(published, 1) * 1e6:.0f} µs per message: one EVALSHA per message, whatever the room size). "
               "The counts are sums over the two load clients; both nodes and both clients share the 2 cores.")
        # 50k connections over 3 workers (20k descriptors per process here).
        if not quick:
            total, per = 50_000, [17_000, 17_000, 16_000]
            with Server("livegate", [*sets, "server.workers=3", "presence.interval=30"], tag="-redis-3w") as w:
                loads = [(w, ["--conns", str(n), "--sources", "8", "--threads", "1", "--room", "bench:big",
                               "--connect-inflight", "1024", "--connect-timeout", "60", "--ping-interval", "0",
                               "--publishers", "1" if i == 0 else "0", "--rate", "20",
                               "--warmup", "0", "--duration", "10", "--drain-wait", "3"]) for i, n in enumerate(per)]
                results = _parallel_loads(loads, 240)
            ok = sum(r["conns_ok"] for r in results)
            pub = results[0]["published"]
            rec = sum(r["received"] for r in results)
            dps = sum(r["deliveries_per_s"] for r in results)
            runs.append({"workers": 3, "conns": total, "load": results})
            md += ("\n\n**50,000 connections, 3 workers + Redis, one room:** "
                   f"{ok:,} of {total + 1:,} connected; {pub:,} messages published at 20/s reached "
                   f"{rec:,} of {pub * (ok - 1):,} expected deliveries ({rec / max(pub * (ok - 1), 1):.4f}), "
                   f"{dps:,.0f} deliveries/s.")
    finally:
        redis.stop()
    return {"runs": runs, "markdown": md}


def sc_slow(opts: argparse.Namespace) -> dict:
    """Two parts. Saturation: chat at rate max with and without one slow client (the
    others' throughput). Overflow: 100 msgs/s of 3 KiB messages for 20 s, long enough for
    the slow client's buffers (~4 MiB of server socket buffer, which autotunes, plus the
    1 MiB queue bound) to overflow: chat is then dropped for that client, gift closes it
    with 4008."""
    n = 5000
    plan = [("max", "chat", 0), ("max", "chat", 1)]
    plan += [("100", t, s) for t in ("chat", "gift") for s in (0, 1)]
    runs, rows = [], []
    for rate, mtype, slow in plan:
        sat = rate == "max"
        args = ["--conns", str(n), "--room", f"bench:slow{mtype}", "--sources", "2", "--connect-inflight", "1024",
                "--rate", rate, "--warmup", "1", "--duration", ("3" if opts.quick else "5") if sat else "20",
                "--drain-wait", "1", "--msg-type", mtype, "--slow", str(slow), "--slow-rcvbuf", "16384",
                "--payload-bytes", "512" if sat else "3072"]
        rec = measure("livegate", args, budget=150, tag=f"-slow-{rate}-{mtype}-{slow}")
        rec.update(msg_type=mtype, slow=slow, rate=rate)
        runs.append(rec)
        ld = rec["load"]
        ed = rec["engine_delta"]
        closed = ld.get("slow_closes_by_code") or {}
        rows.append([rate, "512 B" if sat else "3 KiB", mtype, slow, fmt_int(ld["receivers"]),
                     fmt_int(ld["deliveries_per_s"]), fmt_f(ld["delivery_ratio"], 4), fmt_f(ld["latency_ms"]["p99"]),
                     ", ".join(f"{k}: {v}" for k, v in closed.items()) if slow else "",
                     fmt_int(ed.get("close_slow_consumer")), fmt_int(ed.get("dropped_normal")),
                     fmt_int(ed.get("dropped_high")), json.dumps(ld["closes_by_code"]) if ld["closes_by_code"] else ""])
    md = table(["rate", "payload", "type", "slow", "others", "deliveries/s (others)", "ratio", "p99 ms",
                "slow one ended", "close_slow_consumer", "dropped_normal", "dropped_high", "others closed"], rows)
    md += ("\n\nThe slow client joins and then never reads (gw-load `--slow 1`, 16 KiB SO_RCVBUF); it still sends "
           "heartbeats. `chat` is normal priority (over the 1 MiB queue bound it is dropped for that client "
           "only), `gift` high priority (over the bound the client is closed with 4008). Engine counters "
           "from /v1/stats on the API port (deltas over the run); `open` = still connected at the end.")
    return {"runs": runs, "markdown": md}


# ------------------------------------------------------------------- targets

def targets_check(results: dict[str, dict]) -> str:
    rows: list[list[str]] = []

    def row(issue: str, target: str, got: str, ok: bool | None) -> None:
        rows.append([issue, target, got, "n/a" if ok is None else ("**met**" if ok else "**not met**")])

    idle = results.get("idle", {}).get("runs", [])
    per = [r["rss_bytes_per_conn"] for r in idle if r["target"] == "livegate" and r["load"]["conns_ok"] >= 18_000
           and r.get("rss_bytes_per_conn")]
    row("engine", "≤ 4 KiB RSS per idle joined connection at 19k",
        f"{per[0] / 1024:.2f} KiB" if per else "not measured", (per[0] <= 4096) if per else None)

    fan = [r for r in results.get("fanout", {}).get("runs", []) + results.get("compare", {}).get("runs", [])
           if r["target"] == "livegate"]
    def best(n: int, rate: str | None = None) -> dict | None:
        c = [r for r in fan if r["members"] == n and (rate is None or r["rate"] == rate) and complete(r)]
        return max(c, key=lambda r: r["load"]["deliveries_per_s"]) if c else None
    b5 = best(5000)
    row("engine", "≥ 2,000,000 deliveries/s at 5k members, one msg per frame (all delivered)",
        f"{b5['load']['deliveries_per_s']:,.0f}/s (rate {b5['rate']})" if b5 else "not measured",
        b5["load"]["deliveries_per_s"] >= 2e6 if b5 else None)
    if b5:
        ns = b5["load"].get("server_cpu_ns_per_delivery")
        row("engine", "≤ 400 ns server CPU per delivery (at that load)", f"{ns:.0f} ns" if ns else "–",
            ns is not None and ns <= 400)
    lat_runs = [r for r in results.get("latency", {}).get("runs", []) if r["target"] == "livegate"]
    p99s = sorted(r["load"]["latency_ms"]["p99"] for r in (lat_runs or fan) if r["members"] == 5000 and r["rate"] == "50")
    med = p99s[len(p99s) // 2] if p99s else None
    row("engine", "p99 ≤ 40 ms at 50 msgs/s into 5k members",
        f"p99 {med:.1f} ms (median of {len(p99s)} runs: {', '.join(f'{x:.0f}' for x in p99s)})" if p99s
        else "not measured", med <= 40 if med is not None else None)
    mg = results.get("merge", {}).get("runs", [])
    mg = [r for r in mg if complete(r)]
    mbest = max(mg, key=lambda r: r["load"]["deliveries_per_s"]) if mg else None
    row("engine", "≥ 5,000,000 logical deliveries/s with a 50 ms merge window (all delivered)",
        f"{mbest['load']['deliveries_per_s']:,.0f}/s ({mbest['members']} members, rate {mbest['rate']})"
        if mbest else "not measured", mbest["load"]["deliveries_per_s"] >= 5e6 if mbest else None)
    st = [r for r in results.get("storm", {}).get("runs", []) if r.get("auth") == "jwt"]
    if st:
        ld = st[0]["load"]
        row("python", "≥ 5,000 JWT connects/s", f"{ld['connect_rate']:,.0f}/s ({ld['conns_ok']:,} clients, "
            f"{ld['conns_failed']} failed)", ld["connect_rate"] >= 5000 and ld["conns_failed"] == 0)
        row("load test", "20,000 connections within 2 s (as close as 20k fds allow)",
            f"{ld['conns_ok']:,} in {ld['connect_s']:.2f} s", ld["connect_s"] <= 2.0 * ld["conns_ok"] / 20_000)
    else:
        row("python", "≥ 5,000 JWT connects/s", "not measured", None)
    fr = results.get("fanout", {}).get("runs", []) + results.get("compare", {}).get("runs", [])
    for n in (5000, 10_000):
        lg, sk, wsb = best_max(fr, "livegate", n), best_max(fr, "socketify", n), best_max(fr, "websockets", n)
        if lg and sk:
            row("load test", f"fan-out at {n // 1000}k ≥ socketify's", f"{lg / sk:.2f}×", lg >= sk)
        elif lg:
            row("load test", f"fan-out at {n // 1000}k ≥ socketify's", "socketify not measured", None)
        if lg and wsb:
            row("load test", f"fan-out at {n // 1000}k ≥ 5× websockets baseline", f"{lg / wsb:.1f}×", lg >= 5 * wsb)
        elif lg:
            row("load test", f"fan-out at {n // 1000}k ≥ 5× websockets baseline", "websockets not measured", None)
    rr = results.get("redis", {}).get("runs", [])
    one = next((r for r in rr if r.get("nodes") == 1), None)
    two = next((r for r in rr if r.get("nodes") == 2), None)
    if one and two:
        d1 = one["load"][0]["deliveries_per_s"]
        d2 = sum(x["deliveries_per_s"] for x in two["load"])
        row("redis", "two nodes x 2.5k ≥ 80 % of one node x 5k (same run)", f"{d2 / d1:.0%}", d2 >= 0.8 * d1)
    else:
        row("redis", "two nodes + Redis", "not measured", None)
    return table(["issue", "target", "measured", "verdict"], rows)


def sc_scrape(opts: argparse.Namespace) -> dict:
    """Fan-out (5k members, rate max) on fresh gateways, without and with a thread scraping
    /metrics every 100 ms (20x a usual 2 s scrape, 150x the default 15 s)."""
    import threading
    import urllib.request

    n, interval = 5000, 0.1
    runs, rows = [], []
    for scraping in (False, True):
        args = ["--conns", str(n), "--room", f"bench:fan{n}", "--sources", "2", "--connect-inflight", "1024",
                *_pub_args("max", opts.quick)]
        srv = Server("livegate", None, f"-scrape-{int(scraping)}")
        stop = threading.Event()
        scrapes: list[float] = []

        def scraper(srv: Server = srv, stop: threading.Event = stop, scrapes: list[float] = scrapes) -> None:
            url = f"http://127.0.0.1:{srv.api_port}/metrics"
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        r.read()
                    scrapes.append(time.monotonic() - t0)
                except OSError:
                    pass
                stop.wait(max(0.0, interval - (time.monotonic() - t0)))

        with srv:
            th = threading.Thread(target=scraper, daemon=True)
            if scraping:
                th.start()
            try:
                s0 = srv.stats()
                res = gw_load(srv, args, 120)
                s1 = srv.stats()
            finally:
                stop.set()
                if scraping:
                    th.join(10)
        scrapes.sort()
        rec = {"target": "livegate", "args": args, "scraping": scraping, "load": res, "engine_delta": engine_delta(s0, s1),
               "scrapes": len(scrapes), "scrape_ms_p50": scrapes[len(scrapes) // 2] * 1000 if scrapes else None,
               "scrape_ms_max": scrapes[-1] * 1000 if scrapes else None}
        runs.append(rec)
        rows.append(_fanout_row("livegate", n, "max", res, ["every 100 ms" if scraping else "off", fmt_int(len(scrapes)),
                                                            fmt_f(rec["scrape_ms_p50"], 2)]))
    base, scr = (r["load"]["deliveries_per_s"] for r in runs)
    ratio = scr / base if base else None
    md = table([*FANOUT_COLS, "scrape", "scrapes", "scrape p50 ms"], rows)
    md += (f"\n\nDeliveries/s while scraping / without: **{fmt_f(ratio, 3)}** "
           f"({fmt_int(scr)} vs {fmt_int(base)}). Two fresh gateways, same fan-out; one Python thread in the "
           "benchmark process scrapes /metrics every 100 ms during the second run.")
    return {"runs": runs, "markdown": md, "ratio": ratio}


# ---------------------------------------------------------------------- main

RUNNERS = {"compare": sc_compare, "latency": sc_latency, "mixed": sc_mixed, "idle": sc_idle, "fanout": sc_fanout, "merge": sc_merge, "storm": sc_storm, "redis": sc_redis,
           "slow": sc_slow, "scrape": sc_scrape}
TITLES = {"compare": "b'. Fan-out against the peers", "latency": "b''. Latency at 50 msgs/s into 5k members",
          "mixed": "b'''. A small room beside a big one", "idle": "a. Idle joined connections", "fanout": "b. One-room fan-out, one message per frame",
          "merge": "c. Fan-out with a 50 ms merge window", "storm": "d. Connect storm",
          "redis": "e. Two nodes + Redis", "slow": "f. A slow consumer among 5k members",
          "scrape": "g. Fan-out while /metrics is scraped every 100 ms"}


def render(info: dict, names: list[str], results: dict[str, dict], with_targets: bool,
           titles: dict[str, str] = TITLES) -> str:
    m = info["machine"]
    parts = [f"Date: {info['date']} · commit `{m['commit']}` · {m['nproc']} × {m['cpu_model']} · "
             f"kernel {m['kernel']} · Python {m['python']}" + (" · **quick run**" if info.get("quick") else "")]
    for name in names:
        when = results[name].get("date")
        parts.append(f"### {titles[name]}" + (f" (run {when})" if when and when != info["date"] else "")
                     + f"\n\n{results[name]['markdown']}")
    if with_targets:
        parts.append("### Targets\n\n" + targets_check(results))
    return "\n\n".join(parts) + "\n"


def report(files: list[str]) -> int:
    """Merge raw result files (later files replace a scenario's results) into one report."""
    info: dict = {}
    results: dict[str, dict] = {}
    for f in files:
        d = json.loads(Path(f).read_text())
        info = {k: d[k] for k in ("date", "machine", "quick", "targets")}
        for name, r in d["results"].items():
            results[name] = {**r, "date": d["date"]}
    names = [n for n in (*SCENARIOS, *EXTRA) if n in results]
    print(render(info, names, results, with_targets=True))
    return 0


def socketify_missing() -> str | None:
    """Why the socketify peer cannot run here, or None when it can."""
    try:
        import importlib
        importlib.import_module("socketify")  # also loads its native library (needs libuv)
    except (ImportError, OSError) as e:
        return str(e)
    return None


def ensure_gw_load() -> None:
    if os.environ.get("GW_LOAD"):
        if not GW_LOAD.exists():
            raise SystemExit(f"GW_LOAD={GW_LOAD}: no such file")
        return
    if not GW_LOAD.exists():
        log("building gw-load (cargo build --release -p gw-load)")
        subprocess.run(["cargo", "build", "--release", "-p", "gw-load", "-q"], cwd=ROOT, check=True, timeout=900)


def run_scenarios(names: list[str], runners: dict, opts: argparse.Namespace) -> dict[str, dict]:
    """Runs each scenario; a failed one is recorded (``error``) and the others go on."""
    results: dict[str, dict] = {}
    for name in names:
        log(f"scenario {name}")
        t0 = time.monotonic()
        try:
            results[name] = runners[name](opts)
        except Exception as e:  # keep the other scenarios' figures
            log(f"scenario {name} failed: {e}")
            results[name] = {"runs": [], "markdown": f"**failed**: {e}", "error": str(e)}
        results[name]["elapsed_s"] = round(time.monotonic() - t0, 1)
    return results


def write_results(scenario: str, info: dict, results: dict[str, dict], md: str, stamp: str) -> Path:
    """Raw JSON and the markdown next to it in results/raw/; returns the JSON path."""
    RAW.mkdir(parents=True, exist_ok=True)
    out = RAW / f"{scenario}-{stamp}.json"
    out.write_text(json.dumps({**info, "scenario": scenario, "results": results}, indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)
    log(f"wrote {out.relative_to(ROOT)} and {out.with_suffix('.md').name}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="`run.py report RAW.json [RAW.json ...]` merges raw results (later files "
                                        "win per scenario) into one markdown report with the targets check.")
    ap.add_argument("scenario", choices=[*SCENARIOS, *EXTRA, "all"])
    ap.add_argument("--quick", action="store_true", help="fewer sizes/rates, shorter runs (a smoke run)")
    ap.add_argument("--target", default="livegate", choices=[*TARGETS, "all"],
                    help="server(s) for idle and fanout (default livegate; `all` adds both peers)")
    opts = ap.parse_args(argv)
    opts.targets = list(TARGETS) if opts.target == "all" else [opts.target]
    ensure_gw_load()
    opts.peers_available = []
    why = socketify_missing()
    if why is None:
        opts.peers_available.append("socketify")
    elif "socketify" in opts.targets:
        log(f"socketify cannot be used here ({why}); dropping it from the targets")
        opts.targets.remove("socketify")

    names = [*SCENARIOS, "latency"] if opts.scenario == "all" else [opts.scenario]
    started = dt.datetime.now(dt.UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    info = {"date": started.isoformat(timespec="seconds"), "machine": machine(), "quick": opts.quick,
            "targets": opts.targets}
    results = run_scenarios(names, RUNNERS, opts)
    md = render(info, names, results, with_targets=opts.scenario == "all")

    write_results(opts.scenario, info, results, md, stamp)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
