//! Process-level helpers: file-descriptor limit and CPU accounting
//! (safe wrappers from `nix`, so the crate stays free of `unsafe`).

use nix::sys::resource::{getrlimit, getrusage, setrlimit, Resource, UsageWho};
use std::time::{SystemTime, UNIX_EPOCH};

/// Raises the RLIMIT_NOFILE soft limit to the hard limit and returns the
/// resulting soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        return Ok(hard);
    }
    Ok(soft)
}

/// User + system CPU time consumed by the whole process so far, in ns.
pub fn process_cpu_ns() -> u64 {
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000_000 + t.tv_usec() as u64 * 1_000;
            tv(u.user_time()) + tv(u.system_time())
        }
        Err(_) => 0,
    }
}

/// Wall-clock time in microseconds since the Unix epoch (the unit of the
/// `"t"` field publishers embed).
#[inline]
pub fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Small, fast xorshift64* generator for WebSocket masks and keys. Masks only
/// have to be unpredictable to intermediaries, which do not exist on the
/// loopback paths this tool targets; no cryptographic strength is needed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // Mix the seed with the clock so runs differ; never zero.
        let mut r = Rng((seed ^ unix_micros().rotate_left(17)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        r.next_u64();
        r
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    #[inline]
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }

    pub fn bytes16(&mut self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.next_u64().to_ne_bytes());
        b[8..].copy_from_slice(&self.next_u64().to_ne_bytes());
        b
    }
}

/// CPU time (user + system) of another process, in ns, from /proc/PID/stat.
pub fn other_process_cpu_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as u64;
    Some(ticks * 1_000_000_000 / hz)
}

/// Resident set size of another process in KiB, from /proc/PID/status.
pub fn other_process_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
