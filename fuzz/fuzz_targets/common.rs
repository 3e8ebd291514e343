//! Helpers shared by the targets: reading the small config prefix of an input and
//! cutting the rest into chunks the way a socket might deliver it.
//!
//! Every input is `[config bytes][stream bytes]`. The config bytes are read with
//! `Prefix::byte` (a missing byte reads as 0), so a short input still runs.
#![allow(dead_code)]

pub struct Prefix<'a> {
    data: &'a [u8],
}

impl<'a> Prefix<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    /// One of `table`, chosen by the next byte.
    pub fn pick<T: Copy>(&mut self, table: &[T]) -> T {
        table[self.byte() as usize % table.len()]
    }

    pub fn rest(self) -> &'a [u8] {
        self.data
    }
}

/// Cut `data` into chunks chosen by `seed`: 0 delivers everything at once, other
/// values give a deterministic mix of chunk sizes (1 byte at a time up to 4 KiB).
pub fn chunks(data: &[u8], seed: u8) -> Vec<&[u8]> {
    if seed == 0 || data.is_empty() {
        return vec![data];
    }
    const MAX: [usize; 8] = [1, 2, 3, 7, 16, 100, 1024, 4096];
    let max = MAX[(seed & 7) as usize];
    let mut x = u32::from(seed) * 0x9E37_79B9 | 1;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (1 + x as usize % max).min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
    }
    out
}

/// Known bugs of gateway-core found by these targets (see README.md). None is open: the
/// two found first (`deflate-clamp`, a "min > max" panic when the inflater's buffer filled
/// up within 256 bytes of the cap, and `deflate-exact-cap`, a 1009 for a message inflating
/// to exactly the cap) were fixed when the inflater learned to grow exactly;
/// fuzz/tests/regressions.rs keeps them fixed.
///
/// Panics already reported to the engine's owner, tolerated while their id is listed in
/// `LIVEGATE_FUZZ_KNOWN` (comma-separated; tools/fuzz.sh sets it, see README.md) so a
/// run keeps looking for new crashes. An entry matches on the panic's source file and
/// the start of its message; any other panic aborts as usual. Remove an entry once its
/// bug is fixed.
const KNOWN: &[(&str, &str, &str)] = &[];

std::thread_local! {
    static KNOWN_HIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True when the known bug `id` is listed in `LIVEGATE_FUZZ_KNOWN`.
pub fn tolerated(id: &str) -> bool {
    static ALLOWED: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    ALLOWED
        .get_or_init(|| {
            std::env::var("LIVEGATE_FUZZ_KNOWN")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .iter()
        .any(|a| a == id)
}

fn install_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook(); // libfuzzer-sys's: print, then abort
        let seen = std::sync::atomic::AtomicU64::new(0);
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file()).unwrap_or("");
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            let known = KNOWN.iter().find(|(id, f, m)| tolerated(id) && file.ends_with(f) && msg.starts_with(m));
            match known {
                Some((id, ..)) => {
                    KNOWN_HIT.with(|h| h.set(true));
                    let n = seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n.is_power_of_two() || n == 0 {
                        eprintln!("livegate-fuzz: known bug {id} hit ({} times so far), tolerated: {info}", n + 1);
                    }
                }
                None => prev(info),
            }
        }));
    });
}

/// Run one input, tolerating only the known panics listed above.
pub fn run(f: impl FnOnce()) {
    install_hook();
    KNOWN_HIT.with(|h| h.set(false));
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        if !KNOWN_HIT.with(|h| h.get()) {
            std::panic::resume_unwind(p);
        }
    }
}
