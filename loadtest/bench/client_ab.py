#!/usr/bin/env python
"""A/B of load-client builds: the same gateway, different gw-load binaries (or flags).

    python loadtest/bench/client_ab.py \\
        --variant old=/tmp/gw-load-old --variant new=target/release/gw-load \\
        [--variant 'unbuf=target/release/gw-load --tls-record-layer rustls'] \\
        [--rounds 6] [--transports wss,ws] [--ws old,new] [--rate max|N]

Each round runs tls.py's fan-out (5,000 members, rate max, one message per frame) with
every variant, against a fresh gateway per run (wss:// on its TLS port, ws:// on its
plain one), the order rotating from round to round so that a disturbance on the shared
machine hits all variants alike. Prints per run and, per transport and variant, the
medians of client CPU ns per delivery, deliveries/s, server CPU ns per delivery and
frames per socket write (engine counters: how many deliveries the gateway packs into
one write, i.e. one TLS record over wss://). At rate max the gateway packs dozens of
frames into each write, and how many varies from run to run with the load on the machine
(and with the client's speed); a fixed --rate below saturation gives every variant the
same offered load and about one frame per write. Raw runs:
results/raw/client-ab-<time>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the runner next to this file
import tls as tlsb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True,
                    help="NAME=PATH [gw-load flags...] (repeat; at least two)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--transports", default="wss,ws", help="wss, ws or both (default wss,ws)")
    ap.add_argument("--ws", default=None, help="variants to run over ws:// (default all)")
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--rate", default="max", help="publish rate: max (default) or msgs/s")
    opts = ap.parse_args(argv)
    variants: dict[str, tuple[Path, list[str]]] = {}
    for v in opts.variant:
        name, _, rest = v.partition("=")
        words = shlex.split(rest)
        if not name or not words or not Path(words[0]).exists():
            ap.error(f"--variant {v!r}: NAME=PATH with an existing gw-load binary")
        variants[name] = (Path(words[0]).resolve(), words[1:])
    transports = [t for t in opts.transports.split(",") if t]
    ws_names = opts.ws.split(",") if opts.ws else list(variants)
    n = opts.members
    runs: list[dict] = []
    started = dt.datetime.now(dt.UTC)
    with tempfile.TemporaryDirectory(prefix="livegate-client-ab-") as d:
        pki = tlsb.make_pki(Path(d), "ec")
        for rnd in range(opts.rounds):
            names = list(variants)
            names = names[rnd % len(names):] + names[:rnd % len(names)]
            for tr in transports:
                for name in names:
                    if tr == "ws" and name not in ws_names:
                        continue
                    path, extra = variants[name]
                    bench.GW_LOAD = path
                    args = [*extra, "--conns", str(n), "--room", f"bench:tlsfan{n}", "--sources", "2",
                            "--connect-inflight", "1024", *bench._pub_args(opts.rate, False)]
                    try:
                        rec = bench.measure("livegate", args, budget=150, tag="-client-ab", tls=pki, plain=tr == "ws")
                    except RuntimeError as e:
                        bench.log(f"{name} {tr}: failed: {e}")
                        continue
                    ld, ed = rec["load"], rec.get("engine_delta") or {}
                    row = {"round": rnd, "variant": name, "transport": tr, "rate": opts.rate, "args": args,
                           "deliveries_per_s": ld["deliveries_per_s"], "delivery_ratio": ld["delivery_ratio"],
                           "client_ns": ld["client_cpu_ns_per_delivery"],
                           "server_ns": ld.get("server_cpu_ns_per_delivery"),
                           "client_cpu": ld["client_cpu_util"], "server_cpu": ld.get("server_cpu_util"),
                           "frames_per_write": (ed["frames_out"] / ed["writev_calls"]
                                                if ed.get("writev_calls") else None),
                           "p50_ms": ld["latency_ms"]["p50"], "p99_ms": ld["latency_ms"]["p99"],
                           "negotiated": (ld.get("tls") or {}).get("negotiated")}
                    runs.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "args"}), flush=True)

    def med(xs: list) -> float | None:
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    def ok(r: dict) -> bool:  # run.py's `complete`: every publish reached every member
        return 0.99 <= r["delivery_ratio"] <= 1.01

    def each(sel: list[dict], f: str, fmt) -> str:
        return ", ".join(fmt(r[f]) + ("" if ok(r) else " (incomplete)") for r in sel)

    rows = []
    for tr in transports:
        for name in variants:
            sel = [r for r in runs if r["transport"] == tr and r["variant"] == name]
            good = [r for r in sel if ok(r)]
            if not good:
                continue
            rows.append([tr, name, f"{len(good)} / {len(sel)}", bench.fmt_int(med([r["client_ns"] for r in good])),
                         each(sel, "client_ns", bench.fmt_int),
                         bench.fmt_f(med([r["deliveries_per_s"] for r in good]) / 1e6, 2),
                         each(sel, "deliveries_per_s", lambda x: bench.fmt_f(x / 1e6, 2)),
                         bench.fmt_int(med([r["server_ns"] for r in good])),
                         bench.fmt_f(med([r["frames_per_write"] for r in good]), 1)])
    md = bench.table(["transport", "variant", "complete runs", "client ns/dlv (median)", "each run",
                      "M deliveries/s (median)", "each run", "server ns/dlv (median)",
                      "frames/write (median)"], rows)
    md += ("\n\nMedians over complete runs (delivery ratio within 1 % of 1); '(incomplete)' marks a run that was not "
           "(the machine was shared: such a run stalled or fell behind).")
    md += f"\n\n{n:,} members, rate {opts.rate}. Variants: " + "; ".join(f"**{k}** = `{p}{' ' + ' '.join(a) if a else ''}`"
                                      for k, (p, a) in variants.items())
    print("\n" + md)
    bench.RAW.mkdir(parents=True, exist_ok=True)
    out = bench.RAW / f"client-ab-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps({"date": started.isoformat(timespec="seconds"), "machine": bench.machine(),
                               "variants": {k: [str(p), *a] for k, (p, a) in variants.items()},
                               "runs": runs, "markdown": md}, indent=1))
    bench.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
