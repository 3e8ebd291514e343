//! `gw-load`: a compiled, low-CPU WebSocket load client for the live-chat
//! gateway. It holds tens of thousands of connections with one mio event
//! loop per thread (no async runtime), measures fan-out throughput, delivery
//! ratio and latency, and prints one JSON summary to stdout.
//!
//! Modules: `cli` (flags), `worker` (event loop), `conn` (per-connection
//! protocol state), `ws` (frame parse/encode, upgrade), `tls` (wss:// over
//! rustls), `records` (the TLS record layer after the handshake), `handshake` (--mode handshake: connection set-ups per second),
//! `scan` (message counting without JSON parsing), `jwt`, `stats`
//! (histogram, counters), `sys` (rlimit, rusage, clock, PRNG).

#![forbid(unsafe_code)]

mod cli;
mod conn;
mod handshake;
mod jwt;
mod records;
mod scan;
mod stats;
mod sys;
mod tls;
mod worker;
mod ws;

use clap::Parser;
use cli::{Config, Mode, OnOff, Rate};
use serde_json::{json, Map, Value};
use stats::{Counters, Histogram, Snapshot};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use worker::{Phase, Shared, Worker};

/// Extra descriptors besides the connections (epoll fds, stdio, slack).
const FD_RESERVE: u64 = 64;

/// Set when stdin reached EOF (--stop-on-stdin-eof).
static STDIN_CLOSED: AtomicBool = AtomicBool::new(false);

fn main() {
    let args = cli::Args::parse();
    let cfg = match Config::from_args(args) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("gw-load: {e}");
            std::process::exit(2);
        }
    };
    if cfg.args.stop_on_stdin_eof {
        thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            STDIN_CLOSED.store(true, Ordering::Release);
        });
    }
    let result = match cfg.args.mode {
        Mode::Load => run(cfg),
        Mode::Handshake => run_handshake(cfg),
    };
    match result {
        Ok(summary) => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{summary}");
            let _ = out.flush();
        }
        Err(e) => {
            eprintln!("gw-load: {e}");
            std::process::exit(1);
        }
    }
}

/// The coordinator: starts the workers, walks through the phases, collects
/// the results.
struct Coordinator {
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    start: Instant,
    deadline: Instant,
    timed_out: bool,
    last_progress: Instant,
    last_received: u64,
}

impl Coordinator {
    fn new(cfg: &Arc<Config>, shared: &Arc<Shared>) -> Coordinator {
        let start = Instant::now();
        Coordinator {
            cfg: cfg.clone(),
            shared: shared.clone(),
            start,
            deadline: start + cfg.timeout,
            timed_out: false,
            last_progress: start,
            last_received: 0,
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot::read(&self.shared.counters)
    }

    /// Prints a progress line to stderr at most once a second.
    fn progress(&mut self, label: &str) {
        let now = Instant::now();
        if now.duration_since(self.last_progress) < Duration::from_secs(1) {
            return;
        }
        let dt = now.duration_since(self.last_progress).as_secs_f64();
        self.last_progress = now;
        let s = self.snapshot();
        let handshakes = self.cfg.args.mode == Mode::Handshake;
        // Handshake mode counts completed connections in `ready`.
        let total = if handshakes { s.ready } else { s.received_total };
        let rate = (total - self.last_received.min(total)) as f64 / dt;
        self.last_received = total;
        if self.cfg.args.quiet {
            return;
        }
        if handshakes {
            eprintln!(
                "[{:7.1}s] phase={:<7} done={} ({:.0}/s) failed={}",
                now.duration_since(self.start).as_secs_f64(),
                label,
                s.ready,
                rate,
                s.failed
            );
            return;
        }
        eprintln!(
            "[{:7.1}s] phase={:<7} ready={}/{} pub_ready={}/{} failed={} lost={} published={} acks={} received={} ({:.0}/s)",
            now.duration_since(self.start).as_secs_f64(),
            label,
            s.ready - s.lost,
            self.cfg.args.conns,
            s.pub_ready - s.pub_lost,
            self.cfg.publishers(),
            s.failed,
            s.lost + s.pub_lost,
            s.published_total,
            s.acks_total,
            s.received_total,
            rate
        );
    }

    /// Sleeps `secs` (printing progress lines labelled `label`), or until the
    /// overall deadline. Returns false when the deadline was hit. The measured
    /// phase and --hold also end when stdin closed (--stop-on-stdin-eof).
    fn wait(&mut self, label: &str, secs: f64) -> bool {
        let until = Instant::now() + Duration::from_secs_f64(secs);
        let stoppable = label == Phase::Measure.name() || label == "hold";
        loop {
            let now = Instant::now();
            if now >= self.deadline {
                self.timed_out = true;
                return false;
            }
            if now >= until || (stoppable && STDIN_CLOSED.load(Ordering::Acquire)) {
                return true;
            }
            self.progress(label);
            thread::sleep((until.min(self.deadline) - now).min(Duration::from_millis(50)));
        }
    }

    /// Waits until every connection is ready or failed (or the deadline).
    fn wait_connected(&mut self) -> bool {
        let total = self.cfg.total_conns();
        loop {
            let s = self.snapshot();
            if s.ready + s.pub_ready + s.slow_ready + s.failed >= total {
                return true;
            }
            if Instant::now() >= self.deadline {
                self.timed_out = true;
                return false;
            }
            self.progress("connect");
            thread::sleep(Duration::from_millis(5));
        }
    }
}

fn run(cfg: Arc<Config>) -> Result<Value, String> {
    // File descriptors: raise the soft limit and warn if N won't fit.
    let needed = cfg.total_conns() + FD_RESERVE;
    match sys::raise_nofile_limit() {
        Ok(limit) if limit < needed => eprintln!(
            "gw-load: warning: RLIMIT_NOFILE is {limit} but {} connections need about {needed}; \
             connections beyond the limit will fail",
            cfg.total_conns()
        ),
        Ok(_) => {}
        Err(e) => eprintln!("gw-load: warning: cannot raise RLIMIT_NOFILE: {e}"),
    }
    if cfg.sources.is_empty() && cfg.total_conns() > 25_000 {
        eprintln!(
            "gw-load: warning: {} connections from one source address may exhaust ephemeral ports; use --sources",
            cfg.total_conns()
        );
    }

    let threads = cfg.args.threads as usize;
    let shared = Arc::new(Shared::new(threads));
    let mut co = Coordinator::new(&cfg, &shared);
    let start = co.start;
    let handles = spawn_workers(&cfg, &shared, "gw-load", Worker::new, Worker::run)?;

    // Phase 1: connect everything.
    co.wait_connected();
    let connect_s = start.elapsed().as_secs_f64();
    let after_connect = co.snapshot();
    eprintln!("READY {}", after_connect.ready + after_connect.pub_ready + after_connect.slow_ready);
    let _ = std::io::stderr().flush();

    // Phase 2: hold, or warmup + measure + drain.
    let mut measured_s = 0.0;
    let mut cpu_ns = 0u64;
    // Wall time `cpu_ns` was taken over (the measured phase and the drain).
    let mut cpu_wall_s = 0.0;
    let server_pid = cfg.args.server_pid;
    let server_rss_connected = server_pid.and_then(sys::other_process_rss_kib);
    let mut server_cpu_ns: Option<u64> = None;
    let mut receivers = after_connect.ready - after_connect.lost;
    let mode;
    if let Some(hold) = cfg.args.hold {
        mode = "hold";
        let span = CpuSpan::start(server_pid);
        co.wait("hold", hold);
        (cpu_wall_s, cpu_ns, server_cpu_ns) = span.end();
        measured_s = cpu_wall_s;
    } else if !co.timed_out {
        mode = "publish";
        let s = co.snapshot();
        let can_publish = s.pub_ready > s.pub_lost;
        if !can_publish && cfg.publishers() > 0 {
            eprintln!("gw-load: warning: no publisher connection is ready; nothing will be published");
        }
        let mut ok = true;
        if cfg.args.warmup > 0.0 {
            shared.set_phase(Phase::Warmup);
            ok = co.wait(Phase::Warmup.name(), cfg.args.warmup);
            shared.set_phase(Phase::Quiet);
            // Let warmup messages drain so they are not counted as measured.
            ok = ok && co.wait(Phase::Quiet.name(), cfg.args.drain_wait);
        }
        if ok {
            let s = co.snapshot();
            receivers = s.ready - s.lost;
            let span = CpuSpan::start(server_pid);
            shared.set_phase(Phase::Measure);
            co.wait(Phase::Measure.name(), cfg.args.duration);
            measured_s = span.t0.elapsed().as_secs_f64();
            shared.set_phase(Phase::Drain);
            co.wait(Phase::Drain.name(), cfg.args.drain_wait);
            (cpu_wall_s, cpu_ns, server_cpu_ns) = span.end();
        }
    } else {
        mode = "publish";
    }
    shared.set_phase(Phase::Done);

    // Collect.
    let mut counters = Counters::default();
    let mut lat = Histogram::default();
    let mut connect_hist = Histogram::default();
    let mut ack_lat = Histogram::default();
    let mut per_msg: Option<std::collections::HashMap<u64, (u64, u32)>> = None;
    let mut measured_t: Option<(u64, u64)> = None;
    let mut closes: Map<String, Value> = Map::new();
    let mut slow_closes: Map<String, Value> = Map::new();
    let (mut tls_full, mut tls_resumed, mut negotiated) = (0, 0, None);
    for h in handles {
        let r = h.join().map_err(|_| "a worker thread panicked".to_string())?;
        tls_full += r.tls_full;
        tls_resumed += r.tls_resumed;
        negotiated = negotiated.or(r.tls_negotiated);
        counters.add(&r.counters);
        lat.merge(&r.lat);
        connect_hist.merge(&r.connect_hist);
        ack_lat.merge(&r.ack_lat);
        if let Some(part) = r.per_msg {
            let all = per_msg.get_or_insert_with(Default::default);
            for (t, (last, n)) in part {
                let e = all.entry(t).or_insert((0, 0));
                e.0 = e.0.max(last);
                e.1 += n;
            }
        }
        if let Some((lo, hi)) = r.measured_t {
            let m = measured_t.get_or_insert((lo, hi));
            *m = (m.0.min(lo), m.1.max(hi));
        }
        for (map, part) in [(&mut closes, r.closes), (&mut slow_closes, r.slow_closes)] {
            for (k, v) in part {
                let e = map.entry(k).or_insert(json!(0));
                *e = json!(e.as_u64().unwrap_or(0) + v);
            }
        }
    }

    let ms = |us: u64| us as f64 / 1000.0; // histogram unit is µs
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let conns_ok = counters.ready + counters.pub_ready + counters.slow_ready;
    let expected = counters.published * receivers;
    let ratio = if expected > 0 { counters.received as f64 / expected as f64 } else { 0.0 };
    let per_s = if measured_s > 0.0 { counters.received as f64 / measured_s } else { 0.0 };
    let ns_per = if counters.received > 0 { cpu_ns as f64 / counters.received as f64 } else { 0.0 };
    let (per_message, last_delivery) = per_message_report(per_msg.as_ref(), measured_t, receivers);
    let extra = json!({
        "acks_per_s": if measured_s > 0.0 { (counters.acks as f64 / measured_s).round() } else { 0.0 },
        "ack_ms": {
            "p50": ms(ack_lat.quantile(0.50)),
            "p90": ms(ack_lat.quantile(0.90)),
            "p99": ms(ack_lat.quantile(0.99)),
            "max": ms(ack_lat.max()),
            "samples": ack_lat.count(),
        },
        "measured_publish_t_us": measured_t.map(|(lo, hi)| json!([lo, hi])),
        "last_delivery_ms": last_delivery,
        "per_message": per_message,
    });
    let mut summary = json!({
        "mode": mode,
        "url": cfg.args.url,
        "threads": threads,
        "conns_requested": cfg.total_conns(),
        "conns_ok": conns_ok,
        "conns_failed": counters.failed,
        "conns_lost": counters.lost + counters.pub_lost,
        "receivers": receivers,
        "publishers": counters.pub_ready,
        "connect_s": round3(connect_s),
        "connect_rate": if connect_s > 0.0 { (conns_ok as f64 / connect_s).round() } else { 0.0 },
        "connect_ms": {
            "p50": ms(connect_hist.quantile(0.50)),
            "p99": ms(connect_hist.quantile(0.99)),
            "max": ms(connect_hist.max()),
        },
        "rate": match cfg.rate { Rate::Max => json!("max"), Rate::Fixed(r) => json!(r) },
        "published": counters.published,
        "published_total": counters.published_total,
        "publish_acks": counters.acks,
        "publish_errors": counters.errors,
        "received": counters.received,
        "publisher_received": counters.pub_received,
        "duration_s": round3(measured_s),
        "deliveries_per_s": per_s.round(),
        "expected_deliveries": expected,
        "delivery_ratio": (ratio * 10000.0).round() / 10000.0,
        "latency_ms": {
            "p50": ms(lat.quantile(0.50)),
            "p90": ms(lat.quantile(0.90)),
            "p99": ms(lat.quantile(0.99)),
            "max": ms(lat.max()),
            "samples": lat.count(),
            "samples_without_t": counters.no_t,
        },
        "tls": tls_report(&cfg, negotiated, json!({"full": tls_full, "resumed": tls_resumed})),
        "client_cpu_s": round3(cpu_ns as f64 / 1e9),
        "client_cpu_util": util(cpu_ns, cpu_wall_s),
        "client_cpu_ns_per_delivery": ns_per.round(),
        "server_pid": server_pid,
        "server_cpu_s": server_cpu_ns.map(|n| round3(n as f64 / 1e9)),
        "server_cpu_util": server_cpu_ns.map(|n| util(n, cpu_wall_s)),
        "server_cpu_ns_per_delivery": server_cpu_ns.filter(|_| counters.received > 0).map(|n| (n as f64 / counters.received as f64).round()),
        "server_rss_kib_connected": server_rss_connected,
        "server_rss_kib_end": server_pid.and_then(sys::other_process_rss_kib),
        "closes_by_code": closes,
        "slow": cfg.args.slow,
        "slow_ready": counters.slow_ready,
        "slow_closes_by_code": slow_closes,
        "slow_bytes_read_at_end": counters.slow_bytes,
        "msg_type": cfg.args.msg_type,
        "timed_out": co.timed_out,
    });
    if let (Value::Object(out), Value::Object(more)) = (&mut summary, extra) {
        out.extend(more);
    }
    Ok(summary)
}

/// --per-message: every message seen, `[t, last receive unix µs, receivers]`
/// sorted by `t`, and over the messages this process published in the
/// measured phase (`measured`: their first and last `t`) the time from publish
/// to the last of this process's receivers: p50/p90/p99/max, how many
/// messages, and how many reached fewer than `receivers`. Both null without
/// --per-message; the second also without measured publishes (a receive-only
/// process: merge its `per_message` with the publisher's).
fn per_message_report(
    per_msg: Option<&std::collections::HashMap<u64, (u64, u32)>>,
    measured: Option<(u64, u64)>,
    receivers: u64,
) -> (Value, Value) {
    let Some(map) = per_msg else { return (Value::Null, Value::Null) };
    let mut rows: Vec<(u64, u64, u32)> = map.iter().map(|(&t, &(last, n))| (t, last, n)).collect();
    rows.sort_unstable();
    let list = Value::Array(rows.iter().map(|&(t, last, n)| json!([t, last, n])).collect());
    let Some((lo, hi)) = measured else { return (list, Value::Null) };
    let mut h = Histogram::default();
    let mut partial = 0u64;
    for &(t, last, n) in rows.iter().filter(|r| r.0 >= lo && r.0 <= hi) {
        h.record(last.saturating_sub(t));
        if (n as u64) < receivers {
            partial += 1;
        }
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let report = json!({
        "p50": ms(h.quantile(0.50)),
        "p90": ms(h.quantile(0.90)),
        "p99": ms(h.quantile(0.99)),
        "max": ms(h.max()),
        "messages": h.count(),
        "messages_short_of_receivers": partial,
    });
    (list, report)
}

/// Starts one event-loop thread per --threads: `new(tid, cfg, shared)`, then
/// `run` on its own thread.
fn spawn_workers<W: Send + 'static, T: Send + 'static>(
    cfg: &Arc<Config>,
    shared: &Arc<Shared>,
    name: &str,
    new: fn(usize, Arc<Config>, Arc<Shared>) -> std::io::Result<W>,
    run: fn(W) -> T,
) -> Result<Vec<thread::JoinHandle<T>>, String> {
    (0..cfg.args.threads as usize)
        .map(|tid| {
            let w = new(tid, cfg.clone(), shared.clone()).map_err(|e| format!("cannot create event loop: {e}"))?;
            thread::Builder::new()
                .name(format!("{name}-{tid}"))
                .spawn(move || run(w))
                .map_err(|e| format!("cannot spawn thread: {e}"))
        })
        .collect()
}

/// Our CPU time and the --server-pid process's over a stretch of wall time.
struct CpuSpan {
    t0: Instant,
    cpu0: u64,
    server: Option<(u32, u64)>,
}

impl CpuSpan {
    fn start(server_pid: Option<u32>) -> CpuSpan {
        CpuSpan {
            cpu0: sys::process_cpu_ns(),
            server: server_pid.and_then(|p| sys::other_process_cpu_ns(p).map(|c| (p, c))),
            t0: Instant::now(),
        }
    }

    /// (wall seconds, our CPU ns, the server's CPU ns) since `start`.
    fn end(&self) -> (f64, u64, Option<u64>) {
        let server = self.server.and_then(|(p, c0)| sys::other_process_cpu_ns(p).map(|c| c - c0));
        (self.t0.elapsed().as_secs_f64(), sys::process_cpu_ns() - self.cpu0, server)
    }
}

/// CPU time over wall time (1.0 = one core busy), 3 decimals.
fn util(cpu_ns: u64, wall_s: f64) -> f64 {
    if wall_s > 0.0 {
        (cpu_ns as f64 / 1e9 / wall_s * 1000.0).round() / 1000.0
    } else {
        0.0
    }
}

/// The `tls` object of the report (null for ws://).
fn tls_report(cfg: &Config, negotiated: Option<tls::Negotiated>, handshakes: Value) -> Value {
    if cfg.tls.is_none() {
        return Value::Null;
    }
    let offered = match cfg.args.tls_version {
        Some(cli::TlsVersion::V12) => "1.2",
        Some(cli::TlsVersion::V13) => "1.3",
        None => "1.2,1.3",
    };
    json!({
        "versions_offered": offered,
        "resume": cfg.args.tls_resume == OnOff::On,
        "verify_once": cfg.args.tls_verify_once,
        "handshakes": handshakes,
        "negotiated": negotiated.map(|n| json!({
            "version": n.version, "cipher": n.cipher, "group": n.group, "alpn": n.alpn,
        })),
    })
}

/// `--mode handshake`: connect, handshake, close, again, with --concurrency
/// in flight, for --warmup (not counted) + --duration.
fn run_handshake(cfg: Arc<Config>) -> Result<Value, String> {
    let needed = cfg.args.concurrency as u64 + FD_RESERVE;
    match sys::raise_nofile_limit() {
        Ok(limit) if limit < needed => {
            eprintln!("gw-load: warning: RLIMIT_NOFILE is {limit}, --concurrency needs about {needed}")
        }
        Ok(_) => {}
        Err(e) => eprintln!("gw-load: warning: cannot raise RLIMIT_NOFILE: {e}"),
    }
    let threads = cfg.args.threads as usize;
    let shared = Arc::new(Shared::new(threads));
    let mut co = Coordinator::new(&cfg, &shared);
    let handles = spawn_workers(&cfg, &shared, "gw-load-hs", handshake::HsWorker::new, handshake::HsWorker::run)?;
    let server_pid = cfg.args.server_pid;
    let mut ok = true;
    if cfg.args.warmup > 0.0 {
        shared.set_phase(Phase::Warmup);
        ok = co.wait(Phase::Warmup.name(), cfg.args.warmup);
    }
    let (mut measured_s, mut cpu_ns, mut server_cpu_ns) = (0.0, 0, None);
    if ok {
        let span = CpuSpan::start(server_pid);
        shared.set_phase(Phase::Measure);
        co.wait(Phase::Measure.name(), cfg.args.duration);
        shared.set_phase(Phase::Done);
        (measured_s, cpu_ns, server_cpu_ns) = span.end();
    }
    shared.set_phase(Phase::Done);
    let mut r = handshake::HsResult::default();
    for h in handles {
        r.merge(h.join().map_err(|_| "a worker thread panicked".to_string())?);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let round3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let per_s = if measured_s > 0.0 { r.done as f64 / measured_s } else { 0.0 };
    let us_per = |ns: u64| if r.done > 0 { Some(round3(ns as f64 / 1e3 / r.done as f64)) } else { None };
    let failed = r.failed();
    let tls = tls_report(&cfg, r.negotiated, json!({"full": r.full, "resumed": r.resumed}));
    Ok(json!({
        "mode": "handshake",
        "url": cfg.args.url,
        "threads": threads,
        "concurrency": cfg.args.concurrency,
        "upgrade": cfg.args.upgrade,
        "tls": tls,
        "warmup_s": cfg.args.warmup,
        "duration_s": round3(measured_s),
        "handshakes": r.done,
        "handshakes_per_s": per_s.round(),
        "full": r.full,
        "resumed": r.resumed,
        "failed": failed,
        "failures_by_cause": r.failures,
        "closed_without_ticket": r.no_ticket,
        "tls_handshake_ms": {
            "p50": ms(r.tls_hist.quantile(0.50)),
            "p99": ms(r.tls_hist.quantile(0.99)),
            "max": ms(r.tls_hist.max()),
        },
        "connection_ms": {
            "p50": ms(r.conn_hist.quantile(0.50)),
            "p99": ms(r.conn_hist.quantile(0.99)),
            "max": ms(r.conn_hist.max()),
        },
        "client_cpu_s": round3(cpu_ns as f64 / 1e9),
        "client_cpu_util": util(cpu_ns, measured_s),
        "client_cpu_us_per_handshake": us_per(cpu_ns),
        "server_pid": server_pid,
        "server_cpu_s": server_cpu_ns.map(|n| round3(n as f64 / 1e9)),
        "server_cpu_util": server_cpu_ns.map(|n| util(n, measured_s)),
        "server_cpu_us_per_handshake": server_cpu_ns.and_then(us_per),
        "timed_out": co.timed_out,
    }))
}
