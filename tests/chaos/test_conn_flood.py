"""A connection flood from one IP beside honest clients from another IP.

Honest clients (source 127.0.0.3): 20 members of one room, 4 of them publishing 20 msgs/s
each, plus a new honest connection (connect + ``connected`` + join) every 50 ms. Measured
twice in the same test: quiet, then while ``flood.py`` (its own process, source
127.0.0.2) keeps up to 2,000 upgraded connections open and churns new attempts at up to
1,000/s, then quiet again. The honest message p99 (8,000 samples) and connect p95 (~95
samples a phase: their p99 is the slowest one or two, a single scheduling hiccup on this
shared 2-core machine, seen once in CI at 52 ms) under the flood must stay within 2x of
the quiet baseline (the worse of the two quiet phases, at least FLOOR_MS).

DEPENDS ON the per-IP caps another engineer is adding to the engine:
``limits.max_conns_per_ip``, ``limits.max_handshakes_per_ip``, ``limits.max_conns``
(refused upgrades answered with HTTP 429 for a per-IP cap, 503 for the global one). The
test sets them with ``--set`` and asserts that the flood gets at most
``max_conns_per_ip`` connections and is refused with 429 beyond. While this gateway does
not know those keys (``gateway check-config`` refuses them), the test runs without them
and still measures and checks everything else, then FAILS, naming the missing keys and
what it measured: it can only pass once the caps exist.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from chaoslib import HERE, ROOT, Peer
from support.gateway import GatewayProcess

HONEST_IP = "127.0.0.3"
FLOOD_IP = "127.0.0.2"
ROOM = "chaos:honest"
MEMBERS = 20
PUBLISHERS = 4
PUB_RATE = 20.0
PHASE_S = 5.0
#: The per-IP caps (keys of the engine work in progress, see the module docstring).
CONNS_PER_IP = 100
CAPS = [f"limits.max_conns_per_ip={CONNS_PER_IP}", "limits.max_handshakes_per_ip=20", "limits.max_conns=15000"]
#: Latencies below this are timer noise on a shared 2-core machine: a quiet p99 of 1 ms
#: counts as this much before doubling.
FLOOR_MS = 5.0


def caps_supported() -> tuple[bool, str]:
    """Whether this gateway accepts the per-IP cap keys (``gateway check-config``)."""
    args = [sys.executable, "-m", "gateway", "check-config", "--dev"]
    for s in CAPS:
        args += ["--set", s]
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "python")})
    return p.returncode == 0, (p.stderr or p.stdout).strip()[-300:]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def honest_phase(node: GatewayProcess, members: list[Peer], tag: str) -> dict[str, Any]:
    """PHASE_S seconds of honest chat and honest connects; returns latencies (ms) and
    failures."""
    pubs = members[:PUBLISHERS]
    marks = [len(m.msgs) for m in members]
    sent = 0
    stop = asyncio.Event()

    async def publish(p: Peer) -> None:
        nonlocal sent
        nxt = time.perf_counter()
        k = 0
        while not stop.is_set():
            await p.send("publish", room=ROOM, type="chat", data={"t": time.perf_counter(), "ph": tag, "k": k, "p": p.name})
            sent += 1
            k += 1
            nxt += 1 / PUB_RATE
            await asyncio.sleep(max(0.0, nxt - time.perf_counter()))

    connect_ms: list[float] = []
    connect_fail: list[str] = []

    async def connects() -> None:
        i = 0
        while not stop.is_set():
            q = Peer(f"honest-{tag}-{i}")
            i += 1
            t0 = time.perf_counter()
            try:
                await q.connect(node, local_addr=HONEST_IP, timeout=5)
                await q.join(ROOM)
                connect_ms.append((time.perf_counter() - t0) * 1000)
            except Exception as e:  # (refused with 429/503, reset, timeout: counted)
                connect_fail.append(repr(e)[:120])
            finally:
                await q.close()
            await asyncio.sleep(0.05)

    tasks = [asyncio.ensure_future(publish(p)) for p in pubs] + [asyncio.ensure_future(connects())]
    await asyncio.sleep(PHASE_S)
    stop.set()
    await asyncio.gather(*tasks)
    await asyncio.sleep(1.0)
    lat: list[float] = []
    got = 0
    for m, mark in zip(members, marks, strict=True):
        for f in m.msgs[mark:]:
            d = f.get("data") or {}
            if d.get("ph") == tag:
                got += 1
                lat.append((f["_t"] - d["t"]) * 1000)
    return {"sent": sent, "expected": sent * len(members), "got": got, "p50": pct(lat, 0.5), "p99": pct(lat, 0.99),
            "max": max(lat, default=float("nan")), "connects": len(connect_ms), "connect_p50": pct(connect_ms, 0.5),
            "connect_p95": pct(connect_ms, 0.95), "connect_p99": pct(connect_ms, 0.99), "connect_fail": connect_fail}


async def test_connection_flood_from_one_ip_beside_honest_clients(single_node: Callable[..., GatewayProcess]) -> None:
    supported, why = await asyncio.to_thread(caps_supported)
    node = await asyncio.to_thread(single_node, "flood", ["server.io_threads=2", *(CAPS if supported else [])])
    members = [Peer(f"member{i}") for i in range(MEMBERS)]
    flood: asyncio.subprocess.Process | None = None
    try:
        for m in members:
            await m.connect(node, local_addr=HONEST_IP)
            await m.join(ROOM)
        quiet = await honest_phase(node, members, "quiet")

        flood = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "flood.py"), "--port", str(node.port), "--source", FLOOD_IP, "--hold", "2000",
            "--inflight", "200", "--rate", "1000", "--ready-held", str(CONNS_PER_IP if supported else 1000),
            "--ramp-max", "6", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert flood.stdout is not None and flood.stdin is not None
        line = await asyncio.wait_for(flood.stdout.readline(), 20)
        assert line.startswith(b"READY"), line
        flood.stdin.write(b"mark\n")
        await flood.stdin.drain()
        conns_under_flood = (await node.stats())["connections"]
        flooded = await honest_phase(node, members, "flood")
        flood.stdin.write(b"stop\n")
        await flood.stdin.drain()
        out, err = await asyncio.wait_for(flood.communicate(), 30)
        assert flood.returncode == 0, err.decode()[-2000:]
        fl = json.loads(out.decode().strip().splitlines()[-1])
        await asyncio.sleep(1.0)
        quiet_after = await honest_phase(node, members, "after")
        assert node.running(), node.log_tail()
        assert all(m.is_open for m in members), "an honest member was disconnected"
    finally:
        if flood is not None and flood.returncode is None:
            flood.kill()
            await flood.wait()
        for m in members:
            await m.close()
        await node.astop()

    def fmt(r: dict[str, Any]) -> str:
        return (f"msgs {r['got']}/{r['expected']} p50 {r['p50']:.1f} p99 {r['p99']:.1f} max {r['max']:.1f} ms; "
                f"connects {r['connects']} p50 {r['connect_p50']:.1f} p95 {r['connect_p95']:.1f} p99 {r['connect_p99']:.1f} ms, failed {len(r['connect_fail'])}")

    report = (f"\nper-IP caps {'set' if supported else 'NOT AVAILABLE (' + why + ')'}\n"
              f"quiet: {fmt(quiet)}\nflood: {fmt(flooded)}\nafter: {fmt(quiet_after)}\n"
              f"flood process: {fl}; gateway connections at the start of the flood phase: {conns_under_flood}")
    print(report)

    problems: list[str] = []
    for tag, r in (("quiet", quiet), ("flood", flooded), ("after", quiet_after)):
        if r["got"] != r["expected"]:
            problems.append(f"{tag}: honest members got {r['got']} of {r['expected']} messages")
        if r["connect_fail"]:
            problems.append(f"{tag}: honest connects failed: {r['connect_fail'][:3]}")
        if r["connects"] < 10:
            problems.append(f"{tag}: only {r['connects']} honest connects")
    # The baseline: the worse of the quiet phases before and after the flood (this machine
    # is shared: a neighbour's burst during one quiet phase must not decide the test).
    for what, k in (("message p99", "p99"), ("connect p95", "connect_p95")):
        base = max(quiet[k], quiet_after[k])
        if flooded[k] > 2 * max(base, FLOOR_MS):
            problems.append(f"honest {what} {flooded[k]:.1f} ms under the flood vs {base:.1f} ms quiet (> 2x)")
    outcomes = fl["outcomes"]
    win = fl["window"]
    # The flood was real during the measured phase (on this shared machine a slow flood
    # process would make the test pass for nothing): at least 150 attempts/s, and
    # without caps more than 1,000 connections held throughout.
    if win["attempts"] < 150 * PHASE_S:
        problems.append(f"the flood made only {win['attempts']} attempts during the measured phase: {win}")
    if not supported and win["held_min"] < 1000:
        problems.append(f"the flood held only {win['held_min']} connections during the measured phase: {win}")
    if supported:
        # The cap: at most CONNS_PER_IP upgraded connections from the flooding IP, every
        # upgrade beyond it refused with 429 (not 503: the global cap is far away).
        if fl["most_held"] > CONNS_PER_IP or win["held_max"] > CONNS_PER_IP:
            problems.append(f"the flooding IP held {fl['most_held']} connections (cap {CONNS_PER_IP})")
        upgrades = {k: v for k, v in outcomes.items() if not k.startswith("idle")}
        refused = sum(v for k, v in upgrades.items() if k != "101")
        if outcomes.get("429", 0) == 0 or outcomes.get("429", 0) < 0.99 * refused:
            problems.append(f"refused upgrades of the flood must be 429: {upgrades}")
        if outcomes.get("101", 0) > CONNS_PER_IP:
            problems.append(f"{outcomes.get('101')} flood upgrades accepted (cap {CONNS_PER_IP}, none closed by the flood)")
    else:
        problems.append("DEPENDS ON the per-IP caps (limits.max_conns_per_ip, limits.max_handshakes_per_ip, limits.max_conns), "
                        f"which this gateway does not know yet: {why}")
    assert not problems, "\n".join(problems) + report
