"""Redis CPU per room message as the room grows (issue 4): it must stay constant, since a
room message is ONE EVALSHA (one PUBLISH inside) whatever the number of members.

Not a pytest test (no ``test_`` prefix). Run::

    . .venv/bin/activate
    python tests/redis/bench_redis_cpu.py --sizes 1000 10000 --rate 200 --duration 10

It starts a private redis-server and two gateway nodes (A and B, redis broker), holds half
of the members on each node with ``target/release/gw-load --hold``, measures an idle window
(presence ticks, pings), then publishes from one connection on A at ``--rate`` for
``--duration`` seconds, and reports the redis-server CPU time (/proc/PID/stat utime+stime,
minus the idle window) and ``INFO commandstats`` per published message.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the ``support`` package

from support import ROOT
from support.gateway import GatewayProcess
from support.redis import REDIS_NODE_SETTINGS, RedisServer, command, redis_node_config

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def usec(port: int) -> dict[str, tuple[int, int]]:
    out = {}
    for line in command(port, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            kv = dict(x.split("=", 1) for x in rest.split(","))
            out[name[8:]] = (int(kv["calls"]), int(kv["usec"]))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--load", default=str(ROOT / "target" / "release" / "gw-load"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    srv = RedisServer("redis-server", tmp / "redis")
    srv.start()
    config = redis_node_config(srv.url, presence_interval=1.0)
    nodes = [GatewayProcess(tmp / n, REDIS_NODE_SETTINGS, config=config, node_id=n) for n in ("A", "B")]
    results = []
    try:
        for n in nodes:
            n.start()
        assert srv.proc is not None
        for size in a.sizes:
            room = f"live:bench{size}"
            half = size // 2
            hold = str(int(2 * a.duration + 30))
            # Members: half on each node, held (heartbeats only) for the whole run.
            holders = [
                subprocess.Popen([a.load, "--url", node.ws_url(), "--conns", str(n), "--hold", hold, "--room", room, "--threads", "1",
                                  "--user-prefix", f"{node.node_id}{size}-"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for node, n in ((nodes[0], half), (nodes[1], size - half))
            ]
            for h in holders:
                assert h.stderr is not None
                while "READY" not in (line := h.stderr.readline()):
                    assert line, "gw-load exited before READY"
            time.sleep(1.0)
            # Idle baseline (presence ticks, pings): same length as the measured window.
            c0, k0 = cpu_seconds(srv.proc.pid), usec(srv.port)
            time.sleep(a.duration)
            c1, k1 = cpu_seconds(srv.proc.pid), usec(srv.port)
            # Publishing: one publisher connection on A, every member receives.
            out = subprocess.run([a.load, "--url", nodes[0].ws_url(), "--conns", "1", "--publishers", "1", "--rate", str(a.rate),
                                  "--room", room, "--user-prefix", f"p{size}-", "--duration", str(a.duration), "--drain-wait", "1", "--quiet"],
                                 capture_output=True, text=True, timeout=a.duration + 120)
            c2, k2 = cpu_seconds(srv.proc.pid), usec(srv.port)
            for h in holders:
                h.send_signal(signal.SIGKILL)
                h.wait()
            summary = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else {}

            def delta(x: dict[str, tuple[int, int]], y: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
                return {k: (y[k][0] - x.get(k, (0, 0))[0], y[k][1] - x.get(k, (0, 0))[1]) for k in y}

            idle, busy = delta(k0, k1), delta(k1, k2)
            msgs = busy.get("publish", (0, 0))[0] - idle.get("publish", (0, 0))[0]
            cpu_busy, cpu_idle = c2 - c1, c1 - c0
            ev = busy.get("evalsha", (0, 0))
            res = {
                "members": size,
                "messages": msgs,
                "evalsha_calls": ev[0],
                "redis_cpu_s_publishing": round(cpu_busy, 3),
                "redis_cpu_s_idle_same_time": round(cpu_idle, 3),
                "redis_cpu_us_per_msg": round((cpu_busy - cpu_idle) * 1e6 / msgs, 1) if msgs else None,
                "evalsha_usec_per_call": round(ev[1] / ev[0], 1) if ev[0] else None,
                "commands_per_msg": round((sum(c for c, _ in busy.values()) - sum(c for c, _ in idle.values())) / msgs, 2) if msgs else None,
                "gw_load": {k: summary.get(k) for k in ("sent", "received", "deliveries_per_s", "delivery_ratio") if k in summary},
            }
            print(json.dumps(res), flush=True)
            results.append(res)
    finally:
        for n in nodes:
            n.stop()
        srv.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
