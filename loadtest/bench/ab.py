"""Interleaved A/B of two builds of the gateway: fan-out deliveries/s, publish-to-receive
latency and publish->ack latency, measured in one run so that the machine's drift hits both.

A build is a ``python/`` directory holding the ``gateway`` package with its compiled
``_core`` (e.g. a checkout of an older commit after ``maturin develop``, or an exported
tree). Each round starts a fresh gateway of each build (the order alternates), runs the
same loads, and stops it::

    python loadtest/bench/ab.py --a /tmp/base/python --b python --rounds 5

Loads (gw-load for fan-out, a tiny asyncio client for acks):
- ``max``: 5,000 members of one room, 2 publishers at ``--rate max`` (saturation);
- ``50``: the same room at 50 msgs/s (250,000 deliveries/s offered): latency percentiles;
- ``ack``: one client publishes ``--acks`` messages one after another into a room only it
  is in and times each publish -> ack (the Python request path: parse, policy, hooks,
  broker, engine).

Both builds get the same TOML (``gateway-bench.toml`` without the keys an older build does
not know); ``--b-set`` adds ``--set`` values for build B only (e.g. limits it knows).
Prints a table per load (medians over the rounds and B/A) and writes the raw rounds to
``loadtest/results/raw/ab-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from run import free_port, http_json  # noqa: E402  (the bench runner's helpers)

GW_LOAD = ROOT / "target" / "release" / "gw-load"
def _toml() -> str:
    """The bench TOML minus its ``[limits]`` table (keys an older build rejects)."""
    text = (HERE / "gateway-bench.toml").read_text()
    out, skip = [], False
    for line in text.splitlines():
        if line.strip().startswith("["):
            skip = line.strip() == "[limits]"
        if not skip:
            out.append(line)
    return "\n".join(out) + "\n"


class Gateway:
    def __init__(self, pydir: str, sets: list[str], tmp: Path) -> None:
        self.port, self.api = free_port(), free_port()
        cfg = tmp / "ab.toml"
        cfg.write_text(_toml())
        cmd = [sys.executable, "-m", "gateway", "run", "-c", str(cfg), "--host", "127.0.0.1", "--port", str(self.port), "--api-port", str(self.api)]
        for s in sets:
            cmd += ["--set", s]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env["PYTHONPATH"] = str(Path(pydir).resolve())
        self.log = open(tmp / "gateway.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=tmp)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if http_json(f"http://127.0.0.1:{self.api}/readyz", 1.0).get("ready"):
                    return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"gateway of {pydir} did not start: see {tmp / 'gateway.log'}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def fanout(gw: Gateway, rate: str, conns: int) -> dict[str, Any]:
    args = [str(GW_LOAD), "--url", f"ws://127.0.0.1:{gw.port}/ws", "--conns", str(conns), "--room", "bench:ab", "--sources", "8",
            "--connect-inflight", "256", "--publishers", "2", "--rate", rate, "--warmup", "1", "--duration", "5", "--drain-wait", "1",
            "--lat-sample", "4", "--ping-interval", "20", "--window", "32", "--server-pid", str(gw.proc.pid), "--quiet", "--timeout", "60"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120).stdout
    d = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    return {"deliveries_per_s": d["deliveries_per_s"], "ratio": d["delivery_ratio"], "p50": d["latency_ms"]["p50"],
            "p99": d["latency_ms"]["p99"], "server_ns": d.get("server_cpu_ns_per_delivery")}


async def _acks(port: int, n: int) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{port}/ws?user=acker", max_size=None, compression=None) as ws:
        await ws.recv()  # connected
        await ws.send(orjson.dumps({"op": "join", "id": 0, "room": "bench:acks"}).decode())
        while orjson.loads(await ws.recv()).get("op") != "ack":
            pass
        times = []
        for i in range(1, n + 1):
            t0 = time.perf_counter()
            await ws.send(orjson.dumps({"op": "publish", "id": i, "room": "bench:acks", "type": "chat", "data": {"i": i}}).decode())
            while True:
                f = orjson.loads(await ws.recv())
                if f.get("op") == "ack" and f.get("id") == i:
                    break
                if f.get("op") == "error":
                    raise RuntimeError(f)
            times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return {"ack_p50_us": times[len(times) // 2], "ack_p99_us": times[int(len(times) * 0.99)]}


def one_round(build: str, pydir: str, sets: list[str], opts: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"build": build}
    for load in opts.loads:
        with tempfile.TemporaryDirectory() as t:
            gw = Gateway(pydir, sets, Path(t))
            try:
                if load == "ack":
                    row.update(asyncio.run(_acks(gw.port, opts.acks)))
                else:
                    row[load] = fanout(gw, load, opts.conns)
            finally:
                gw.stop()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="python/ directory of build A (the baseline)")
    ap.add_argument("--b", required=True, help="python/ directory of build B")
    ap.add_argument("--b-set", action="append", default=[], help="--set for build B only (repeatable)")
    ap.add_argument("--set", dest="both_set", action="append", default=[],
                    help="--set for both builds (repeatable), e.g. the [limits] of gateway-bench.toml when build A knows them")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=5000)
    ap.add_argument("--acks", type=int, default=3000)
    ap.add_argument("--loads", nargs="+", default=["max", "50", "ack"])
    opts = ap.parse_args()
    rounds: list[dict[str, Any]] = []
    for r in range(opts.rounds):
        order = [("A", opts.a, opts.both_set), ("B", opts.b, [*opts.both_set, *opts.b_set])]
        for build, pydir, sets in order if r % 2 == 0 else reversed(order):
            row = one_round(build, pydir, sets, opts)
            row["round"] = r
            rounds.append(row)
            print(json.dumps(row), flush=True)
    raw = ROOT / "loadtest" / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"ab-{int(time.time())}.json").write_text(json.dumps({"a": opts.a, "b": opts.b, "b_set": opts.b_set, "rounds": rounds}, indent=1))

    def med(build: str, get: Any) -> float:
        return statistics.median(get(x) for x in rounds if x["build"] == build)

    print(f"\n{'metric':<34}{'A (median)':>14}{'B (median)':>14}{'B/A':>8}")
    metrics: list[tuple[str, Any]] = []
    for load in opts.loads:
        if load == "ack":
            metrics += [("publish->ack p50 us", lambda x: x["ack_p50_us"]), ("publish->ack p99 us", lambda x: x["ack_p99_us"])]
        else:
            metrics += [(f"{load}: deliveries/s", lambda x, ld=load: x[ld]["deliveries_per_s"]),
                        (f"{load}: latency p99 ms", lambda x, ld=load: x[ld]["p99"]),
                        (f"{load}: server ns/delivery", lambda x, ld=load: x[ld]["server_ns"] or 0)]
    for name, get in metrics:
        a, b = med("A", get), med("B", get)
        print(f"{name:<34}{a:>14.1f}{b:>14.1f}{(b / a if a else 0):>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
