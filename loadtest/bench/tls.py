#!/usr/bin/env python
"""TLS benchmarks (issue 13), on run.py's servers, load client and reporting.

    python loadtest/bench/tls.py SCENARIO [--quick] [--rounds N] [--keys ec,rsa] [--target ...]

Scenarios:
  tls-handshake  a. full and resumed TLS handshakes per second on one server core: the
                 server pinned to CPU 0 (gateway: server.io_threads = 1), gw-load
                 --mode handshake pinned to CPU 1; with and without the WebSocket
                 upgrade after the handshake
  tls-fanout     b. fan-out into 5,000 members at rate max: livegate over ws://,
                 livegate over wss://, socketify over wss:// (and over ws:// for
                 context), interleaved, --rounds rounds; the ratios are taken within
                 each round (goals: TLS >= 1.5x socketify-TLS, >= 60 % of plain)
  tls-idle       c. server RSS per idle joined TLS connection at 19,000 connections
                 (quick: 10,000)
  all            the three

A test CA and a server certificate (SAN localhost and 127.0.0.1), one pair per key type
(ECDSA P-256, RSA-2048: --keys), are made at run time in a temporary directory and
removed afterwards; nothing secret is written anywhere else. A target that cannot serve
TLS (the gateway before its engine has TLS, socketify without libuv) is reported as not
available and skipped, never faked. Raw JSON and markdown go to results/raw/ like run.py's.
"""

# ruff: noqa: RUF001 (the tables use typographic dashes and signs)
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the runner next to this file

TARGETS = ("livegate", "socketify")
KEYS = {"ec": "ECDSA P-256", "rsa": "RSA-2048"}
SERVER_CPU, CLIENT_CPU = "0", "1"


# ----------------------------------------------------------------------- PKI

def make_pki(directory: Path, key: str = "ec") -> dict[str, str]:
    """A throw-away CA and a server certificate for localhost / 127.0.0.1 signed by it,
    written as PEM into ``directory``. Returns the paths (``ca``, ``cert``, ``key``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def new_key() -> Any:
        return ec.generate_private_key(ec.SECP256R1()) if key == "ec" else rsa.generate_private_key(65537, 2048)

    now = dt.datetime.now(dt.UTC)
    ca_key, srv_key = new_key(), new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "livegate bench CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
          .not_valid_after(now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.pem", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    paths["key"].chmod(0o600)
    return {k: str(v) for k, v in paths.items()}


# ------------------------------------------------------------------- helpers

def attempt(what: str, fn: Any, unavailable: dict[str, str]) -> dict | None:
    """Runs one measurement; a target that fails to start (e.g. the gateway without TLS
    rejecting the [server.tls] section) is noted in ``unavailable`` and skipped."""
    try:
        return fn()
    except RuntimeError as e:
        unavailable[what] = str(e).strip().splitlines()[-1][:300] if str(e).strip() else "failed"
        bench.log(f"{what}: not available ({unavailable[what]})")
        return None


def unavailable_md(unavailable: dict[str, str]) -> str:
    if not unavailable:
        return ""
    return "\n\nNot measured: " + "; ".join(f"**{k}** ({v})" for k, v in unavailable.items()) + "."


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _tls_desc(ld: dict) -> str:
    n = (ld.get("tls") or {}).get("negotiated") or {}
    return " ".join(x for x in (n.get("version"), n.get("cipher"), n.get("group")) if x and x != "-") or "–"


# ----------------------------------------------------------------- scenarios

HS_CASES = [  # (label, gw-load arguments)
    ("full", ["--tls-resume", "off", "--tls-verify-once"]),
    ("resumed", ["--tls-resume", "on", "--tls-verify-once"]),
    ("full + upgrade", ["--tls-resume", "off", "--tls-verify-once", "--upgrade"]),
    ("resumed + upgrade", ["--tls-resume", "on", "--tls-verify-once", "--upgrade"]),
]


def per_core(ld: dict) -> float | None:
    """Handshakes one server core could do, from the server's CPU per handshake."""
    us = ld.get("server_cpu_us_per_handshake")
    return 1e6 / us if us else None


def bound(ld: dict) -> str:
    """Which side limited the rate: a saturated core (>= 0.9 of one CPU), else latency."""
    srv, cli = ld.get("server_cpu_util") or 0, ld.get("client_cpu_util") or 0
    if srv >= 0.9:
        return "server"
    return "client" if cli >= 0.9 else "neither (latency)"


def sc_handshake(opts: argparse.Namespace) -> dict:
    """a. One server core: server on CPU 0 (gateway with one I/O thread), client on CPU 1;
    every case for each certificate key type."""
    dur = "3" if opts.quick else "10"
    runs, rows, unavailable = [], [], {}
    for rnd in range(opts.rounds):
        for key, pki in opts.pkis.items():
            for target in opts.targets:
                if target in unavailable:
                    continue
                for label, extra in HS_CASES:
                    sets = ["server.io_threads=1"] if target == "livegate" else None
                    args = ["--mode", "handshake", "--concurrency", str(opts.concurrency), "--warmup", "2",
                            "--duration", dur, *extra]
                    rec = attempt(target, lambda t=target, a=args, s=sets, p=pki, lb=label: bench.measure(
                        t, a, budget=60, sets=s, tag=f"-tls-hs-{lb.replace(' ', '')}", tls=p,
                        server_cpus=SERVER_CPU, client_cpus=CLIENT_CPU), unavailable)
                    if rec is None:
                        break
                    rec.update(case=label, round=rnd, key=key)
                    runs.append(rec)
                    ld = rec["load"]
                    rows.append([target, KEYS[key], label, rnd + 1, bench.fmt_int(ld["handshakes_per_s"]),
                                 f"{ld['resumed']:,} / {ld['full']:,}", bench.fmt_int(ld["failed"]),
                                 bench.fmt_f(ld["tls_handshake_ms"]["p50"], 2),
                                 bench.fmt_f(ld["tls_handshake_ms"]["p99"], 2),
                                 bench.fmt_f(ld.get("server_cpu_util"), 2),
                                 bench.fmt_f(ld.get("server_cpu_us_per_handshake")), bench.fmt_int(per_core(ld)),
                                 bench.fmt_f(ld["client_cpu_util"], 2), bench.fmt_f(ld["client_cpu_us_per_handshake"]),
                                 bound(ld), _tls_desc(ld)])
    md = bench.table(["target", "cert", "case", "round", "handshakes/s", "resumed / full", "failed", "p50 ms",
                      "p99 ms", "server CPU", "server µs/hs", "per server core", "client CPU", "client µs/hs",
                      "bound by", "negotiated"], rows)
    summary = []
    for key in opts.pkis:
        for target in opts.targets:
            for label, _ in HS_CASES:
                sel = [r["load"] for r in runs if r["target"] == target and r["case"] == label and r["key"] == key]
                if sel:
                    xs = [ld["handshakes_per_s"] for ld in sel]
                    pc = [x for x in map(per_core, sel) if x]
                    summary.append([target, KEYS[key], label, bench.fmt_int(median(xs)),
                                    ", ".join(bench.fmt_int(x) for x in xs), bench.fmt_int(median(pc))])
    if summary:
        md += "\n\n" + bench.table(["target", "cert", "case", "median handshakes/s", "each round",
                                     "median per server core"], summary)
    md += (f"\n\nServer pinned to CPU {SERVER_CPU} (`taskset`; the gateway with `server.io_threads = 1`), gw-load "
           f"`--mode handshake --concurrency {opts.concurrency}` pinned to CPU {CLIENT_CPU}; a fresh server per row, 2 s "
           f"warmup (fills the session cache), {dur} s measured. `full` = "
           "`--tls-resume off` (every connection a full handshake), `resumed` = `--tls-resume on` (each of the "
           "concurrent connections is one emulated client that resumes its own previous session); both with "
           "`--tls-verify-once`, so that the client's two P-256 verifications per full handshake do not make the "
           "client the bottleneck; `+ upgrade` also waits for the WebSocket `101`. Server CPU 1.00 = its core saturated; client CPU well below 1.00 = the "
           "client was not the bottleneck. `per server core` = 10⁶ / server µs per handshake: what one core "
           "would do when it is not saturated (the client or the round trips limited the run)."
           + unavailable_md(unavailable))
    return {"runs": runs, "markdown": md, "unavailable": unavailable}


FANOUT_PLAN = [  # (label, target, transport): the gateway serves ws:// and wss:// from one config
    ("livegate ws", "livegate", "ws"),
    ("livegate wss", "livegate", "wss"),
    ("socketify wss", "socketify", "wss"),
    ("socketify ws", "socketify", "ws-only"),  # socketify serves one or the other: a plain server
]


def sc_fanout(opts: argparse.Namespace) -> dict:
    """b. 5,000 members, rate max, one message per frame; the plan interleaved per round."""
    n = 5000
    runs, rows, unavailable = [], [], {}
    for rnd in range(opts.rounds):
        plan = FANOUT_PLAN[rnd % len(FANOUT_PLAN):] + FANOUT_PLAN[:rnd % len(FANOUT_PLAN)]  # rotate the order
        for label, target, transport in plan:
            if target not in opts.targets or label in unavailable or (target in unavailable):
                continue
            args = ["--conns", str(n), "--room", f"bench:tlsfan{n}", "--sources", "2", "--connect-inflight", "1024",
                    *bench._pub_args("max", opts.quick)]
            pki = None if transport == "ws-only" else opts.pki
            rec = attempt(label, lambda t=target, a=args, k=pki, p=transport == "ws": bench.measure(
                t, a, budget=150, tag=f"-tls-fan-{'wss' if k and not p else 'ws'}", tls=k, plain=p), unavailable)
            if rec is None:
                if target == "livegate":
                    unavailable.setdefault("livegate", unavailable[label])
                continue
            rec.update(label=label, round=rnd, members=n, rate="max")
            runs.append(rec)
            ld = rec["load"]
            rows.append([*bench._fanout_row(label, n, "max", ld), bench.fmt_f(ld.get("server_cpu_util"), 2),
                         bench.fmt_f(ld["client_cpu_util"], 2), rnd + 1])
    md = bench.table([*bench.FANOUT_COLS, "server CPU", "client CPU", "round"], rows)
    ratios = fanout_ratios(runs, opts.rounds)
    return {"runs": runs, "markdown": md + "\n\n" + ratios["markdown"] + unavailable_md(unavailable),
            "ratios": ratios["values"], "unavailable": unavailable}


def fanout_ratios(runs: list[dict], rounds: int) -> dict:
    """Per round: livegate wss / livegate ws, livegate wss / socketify wss, socketify wss /
    socketify ws; the medians over the rounds with the goals."""
    def dps(label: str, rnd: int) -> float | None:
        r = next((r for r in runs if r["label"] == label and r["round"] == rnd and bench.complete(r)), None)
        return r["load"]["deliveries_per_s"] if r else None

    pairs = [("livegate wss / livegate ws", "livegate wss", "livegate ws", 0.60),
             ("livegate wss / socketify wss", "livegate wss", "socketify wss", 1.50),
             ("socketify wss / socketify ws", "socketify wss", "socketify ws", None)]
    rows, values = [], {}
    for name, a, b, goal in pairs:
        each = []
        for rnd in range(rounds):
            x, y = dps(a, rnd), dps(b, rnd)
            if x and y:
                each.append(x / y)
        med = median(each)
        values[name] = {"each": each, "median": med, "goal": goal}
        verdict = "–" if med is None or goal is None else ("**met**" if med >= goal else "**not met**")
        rows.append([name, bench.fmt_f(med, 2) if med is not None else "not measured",
                     ", ".join(f"{x:.2f}" for x in each), f"≥ {goal:.2f}" if goal else "", verdict])
    md = ("Ratios of saturation deliveries/s, taken within each round (a run whose delivery ratio is off 1 by "
          "more than 1 % does not count), median over the rounds:\n\n"
          + bench.table(["ratio", "median", "each round", "goal", "verdict"], rows))
    return {"markdown": md, "values": values}


def sc_idle(opts: argparse.Namespace) -> dict:
    """c. RSS per idle joined TLS connection (the plain `idle` scenario over wss://)."""
    ns = [10_000] if opts.quick else [19_000]
    hold = 2.0 if opts.quick else 4.0
    runs, rows, unavailable = [], [], {}
    # The gateway over ws:// first, for the difference TLS makes in the same run.
    plan = [("livegate", None)] if "livegate" in opts.targets else []
    plan += [(t, opts.pki) for t in opts.targets]
    for target, pki in plan:
        label = f"{target} {'wss' if pki else 'ws'}"
        for n in ns:
            got = attempt(label, lambda t=target, k=n, p=pki, lb=label: bench.idle_run(t, k, hold, tls=p, label=lb),
                          unavailable)
            if got is None:
                break
            rec, row = got
            rec["label"] = label
            runs.append(rec)
            rows.append(row)
    md = bench.table(bench.IDLE_COLS, rows)
    md += (f"\n\nRSS per connection = (RSS with N joined idle wss:// connections − RSS right after start) / N; "
           f"the connections resume TLS sessions where the server allows it (gw-load `--tls-resume on`). "
           f"Certificate: {opts.key_desc}. {bench.FD_CAP:,} descriptors per process here, so 19,000 is the "
           "single-process maximum." + unavailable_md(unavailable))
    return {"runs": runs, "markdown": md, "unavailable": unavailable}


RUNNERS = {"tls-handshake": sc_handshake, "tls-fanout": sc_fanout, "tls-idle": sc_idle}
TITLES = {"tls-handshake": "TLS a. Handshakes per second on one server core",
          "tls-fanout": "TLS b. Fan-out over TLS into 5,000 members",
          "tls-idle": "TLS c. Idle joined TLS connections"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=[*RUNNERS, "all"])
    ap.add_argument("--quick", action="store_true", help="shorter runs, one round, 10k idle connections")
    ap.add_argument("--rounds", type=int, default=None, help="rounds for tls-handshake and tls-fanout (default 3, quick 1)")
    ap.add_argument("--target", default="all", choices=[*TARGETS, "all"], help="servers (default both)")
    ap.add_argument("--keys", default="ec,rsa", help="server key types, comma-separated: ec (ECDSA P-256), rsa "
                    "(RSA-2048); tls-handshake runs each, the others use the first (default ec,rsa)")
    ap.add_argument("--concurrency", type=int, default=64, help="tls-handshake: connections in flight (default 64)")
    opts = ap.parse_args(argv)
    opts.rounds = opts.rounds or (1 if opts.quick else 3)
    opts.targets = list(TARGETS) if opts.target == "all" else [opts.target]
    keys = [k.strip() for k in opts.keys.split(",") if k.strip()]
    if not keys or set(keys) - set(KEYS):
        ap.error(f"--keys: choose from {', '.join(KEYS)}")
    opts.key_desc = KEYS[keys[0]]
    bench.ensure_gw_load()
    why = bench.socketify_missing()
    if why is not None and "socketify" in opts.targets:
        bench.log(f"socketify cannot be used here ({why}); dropping it from the targets")
        opts.targets.remove("socketify")

    names = list(RUNNERS) if opts.scenario == "all" else [opts.scenario]
    started = dt.datetime.now(dt.UTC)
    info = {"date": started.isoformat(timespec="seconds"), "machine": bench.machine(), "quick": opts.quick,
            "targets": opts.targets}
    with tempfile.TemporaryDirectory(prefix="livegate-tls-") as d:
        opts.pkis = {}
        for k in keys:
            (Path(d) / k).mkdir()
            opts.pkis[k] = make_pki(Path(d) / k, k)
        opts.pki = opts.pkis[keys[0]]
        results = bench.run_scenarios(names, RUNNERS, opts)
    md = bench.render(info, names, results, with_targets=False, titles=TITLES)
    bench.write_results(opts.scenario, info, results, md, started.strftime("%Y%m%dT%H%M%SZ"))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
