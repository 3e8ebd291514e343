//! permessage-deflate (RFC 7692): offer negotiation, per-connection inflate, shared deflate.
//!
//! The server always answers with `server_no_context_takeover`, so a server message is a
//! self-contained deflate block: it is compressed once per window size and the same bytes
//! go to every recipient that negotiated that window size.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::close;
use super::frame::ProtoError;

const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What the engine allows; clients can only ask for less.
#[derive(Debug, Clone)]
pub struct DeflateConfig {
    pub enabled: bool,
    /// Upper bound for the client's compression window (memory of our inflater: 2^bits).
    pub client_max_window_bits: u8,
    /// Messages shorter than this are sent uncompressed (RSV1 clear).
    pub min_size: usize,
    /// zlib level 0..=9 for server messages.
    pub level: u32,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        Self { enabled: true, client_max_window_bits: 15, min_size: 128, level: 5 }
    }
}

/// Negotiated parameters of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    /// Window the server compresses with (9..=15; a requested 8 is served with 9, as zlib does).
    pub server_window_bits: u8,
    pub client_window_bits: u8,
    pub client_no_context_takeover: bool,
}

#[derive(Default)]
struct Offer {
    server_no_context: bool,
    client_no_context: bool,
    server_bits: Option<u8>,
    client_bits: Option<Option<u8>>,
}

fn parse_bits(v: Option<&str>) -> Result<Option<u8>, ()> {
    match v {
        None => Ok(None),
        Some(v) => {
            let v = v.trim().trim_matches('"');
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 2 {
                return Err(());
            }
            let n: u8 = v.parse().map_err(|_| ())?;
            if (8..=15).contains(&n) {
                Ok(Some(n))
            } else {
                Err(())
            }
        }
    }
}

fn parse_offer(s: &str) -> Option<Offer> {
    let mut parts = s.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut o = Offer::default();
    for p in parts {
        if p.is_empty() {
            return None;
        }
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v)),
            None => (p, None),
        };
        match k.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if v.is_none() && !o.server_no_context => o.server_no_context = true,
            "client_no_context_takeover" if v.is_none() && !o.client_no_context => o.client_no_context = true,
            "server_max_window_bits" if o.server_bits.is_none() => o.server_bits = Some(parse_bits(v).ok()??),
            "client_max_window_bits" if o.client_bits.is_none() => o.client_bits = Some(parse_bits(v).ok()?),
            _ => return None, // unknown or duplicate parameter: decline this offer
        }
    }
    Some(o)
}

/// Pick the first acceptable offer among the `Sec-WebSocket-Extensions` header values.
/// Returns the parameters and the response header value.
pub fn negotiate<'a>(
    values: impl IntoIterator<Item = &'a str>,
    cfg: &DeflateConfig,
) -> Option<(DeflateParams, String)> {
    if !cfg.enabled {
        return None;
    }
    for value in values {
        for offer in value.split(',') {
            let Some(o) = parse_offer(offer) else { continue };
            let mut resp = String::from("permessage-deflate; server_no_context_takeover");
            let server_bits = match o.server_bits {
                Some(b) => {
                    resp.push_str(&format!("; server_max_window_bits={b}"));
                    b.max(9)
                }
                None => 15,
            };
            if o.client_no_context {
                resp.push_str("; client_no_context_takeover");
            }
            // zlib cannot inflate with a window outside 9..=15: clamped, not validated.
            let cap = cfg.client_max_window_bits.clamp(9, 15);
            let client_bits = match o.client_bits {
                // The client said it can limit its window: ask for our cap.
                Some(offered) => {
                    let b = offered.unwrap_or(15).min(cap);
                    resp.push_str(&format!("; client_max_window_bits={b}"));
                    b
                }
                None if cap < 15 => continue, // cannot limit this client's window: decline
                None => 15,
            };
            return Some((
                DeflateParams {
                    server_window_bits: server_bits,
                    client_window_bits: client_bits.max(9),
                    client_no_context_takeover: o.client_no_context,
                },
                resp,
            ));
        }
    }
    None
}

/// Per-connection decompressor for client messages. Its state (about 40 KiB with a
/// 15-bit window) is allocated on the first compressed message only, and dropped after
/// each message when the client promised `client_no_context_takeover`.
pub struct Inflater {
    bits: u8,
    no_context: bool,
    d: Option<Box<Decompress>>,
}

impl Inflater {
    pub fn new(p: &DeflateParams) -> Self {
        Self { bits: p.client_window_bits, no_context: p.client_no_context_takeover, d: None }
    }

    /// Inflate one message (all its fragments concatenated), at most `max` bytes out.
    pub fn inflate(&mut self, data: &[u8], max: usize) -> Result<Vec<u8>, ProtoError> {
        let bad = ProtoError { code: close::INVALID_PAYLOAD, reason: "invalid deflate data" };
        let big = ProtoError { code: close::TOO_BIG, reason: "message too large" };
        let bits = self.bits;
        let d = self.d.get_or_insert_with(|| Box::new(Decompress::new_with_window_bits(false, bits)));
        let mut out = Vec::with_capacity((data.len() * 3).clamp(64, max.max(64)).min(max.saturating_add(1)));
        for input in [data, &TAIL[..]] {
            let mut pos = 0;
            loop {
                if out.len() == out.capacity() {
                    if out.len() > max {
                        return Err(big);
                    }
                    // Exact growth: the buffer never exceeds max + 1 bytes (one byte over
                    // the cap proves the message too large), whatever the ratio (a
                    // deflate bomb inflates 1,000:1).
                    let room = max.saturating_add(1) - out.len();
                    out.reserve_exact(out.len().max(256).min(room));
                }
                let before_in = d.total_in();
                let st = d.decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync).map_err(|_| bad)?;
                pos += (d.total_in() - before_in) as usize;
                if out.len() > max {
                    return Err(big);
                }
                if st == Status::StreamEnd && pos < input.len() {
                    return Err(bad);
                }
                if pos >= input.len() && out.len() < out.capacity() {
                    break;
                }
            }
        }
        if self.no_context {
            self.d = None;
        }
        Ok(out)
    }
}

thread_local! {
    static COMPRESSORS: RefCell<[Option<Compress>; 7]> = const { RefCell::new([None, None, None, None, None, None, None]) };
}

/// Raw-deflate `payload` as one self-contained message (no context takeover), with the
/// trailing `00 00 ff ff` removed as RFC 7692 §7.2.1 requires. One compressor per window
/// size is kept per thread and reset between messages.
pub fn deflate(payload: &[u8], window_bits: u8, level: u32) -> Vec<u8> {
    // zlib knows windows 9..=15 and levels 0..=9 only ("expect" below would fail).
    let bits = window_bits.clamp(9, 15);
    COMPRESSORS.with(|c| {
        let mut c = c.borrow_mut();
        let comp = c[(bits - 9) as usize]
            .get_or_insert_with(|| Compress::new_with_window_bits(Compression::new(level.min(9)), false, bits));
        comp.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        let mut pos = 0;
        loop {
            let before = comp.total_in();
            comp.compress_vec(&payload[pos..], &mut out, FlushCompress::Sync).expect("deflate cannot fail");
            pos += (comp.total_in() - before) as usize;
            if pos >= payload.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - 4);
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_browser_offer() {
        let (p, resp) = negotiate(["permessage-deflate; client_max_window_bits"], &DeflateConfig::default()).unwrap();
        assert_eq!(resp, "permessage-deflate; server_no_context_takeover; client_max_window_bits=15");
        assert_eq!(p.server_window_bits, 15);
    }

    #[test]
    fn honours_server_window_and_skips_bad_offers() {
        let (p, resp) = negotiate(
            ["permessage-deflate; server_max_window_bits=16, permessage-deflate; server_max_window_bits=10; client_no_context_takeover"],
            &DeflateConfig::default(),
        )
        .unwrap();
        assert_eq!(p.server_window_bits, 10);
        assert!(p.client_no_context_takeover);
        assert!(resp.contains("server_max_window_bits=10"));
        assert!(negotiate(["permessage-deflate; foo"], &DeflateConfig::default()).is_none());
        assert!(negotiate(["x-webkit-deflate-frame"], &DeflateConfig::default()).is_none());
        assert!(negotiate(
            ["permessage-deflate; server_no_context_takeover; server_no_context_takeover"],
            &DeflateConfig::default()
        )
        .is_none());
    }

    #[test]
    fn round_trip_through_inflater() {
        let msg = br#"{"op":"msg","room":"live:1","data":{"text":"hello hello hello hello"}}"#.repeat(20);
        for bits in [9u8, 12, 15] {
            let z = deflate(&msg, bits, 5);
            assert!(z.len() < msg.len());
            let p =
                DeflateParams { server_window_bits: bits, client_window_bits: bits, client_no_context_takeover: true };
            let mut inf = Inflater::new(&p);
            assert_eq!(inf.inflate(&z, 1 << 20).unwrap(), msg);
            // The same bytes decode again with a fresh context: no context takeover.
            assert_eq!(inf.inflate(&z, 1 << 20).unwrap(), msg);
        }
        assert_eq!(deflate(b"", 15, 5), vec![0x00]);
    }

    /// A minimal raw-deflate parser (after RFC 1951 and zlib's puff.c) that only measures:
    /// returns (decoded length, longest back-reference distance).
    fn measure_distances(z: &[u8]) -> (usize, usize) {
        struct Bits<'a> {
            d: &'a [u8],
            pos: usize, // in bits
        }
        impl Bits<'_> {
            fn bits(&mut self, n: u32) -> usize {
                let mut v = 0;
                for i in 0..n {
                    let b = (self.d[self.pos / 8] >> (self.pos % 8)) & 1;
                    self.pos += 1;
                    v |= (b as usize) << i;
                }
                v
            }
        }
        struct Huff {
            count: [usize; 16],
            symbol: Vec<usize>,
        }
        fn huff(lengths: &[u8]) -> Huff {
            let mut count = [0; 16];
            for &l in lengths {
                count[l as usize] += 1;
            }
            count[0] = 0;
            let mut offs = [0; 16];
            for l in 1..15 {
                offs[l + 1] = offs[l] + count[l];
            }
            let mut symbol = vec![0; lengths.len()];
            for (sym, &l) in lengths.iter().enumerate() {
                if l != 0 {
                    symbol[offs[l as usize]] = sym;
                    offs[l as usize] += 1;
                }
            }
            Huff { count, symbol }
        }
        fn decode(b: &mut Bits, h: &Huff) -> usize {
            let (mut code, mut first, mut index) = (0usize, 0usize, 0usize);
            for len in 1..16 {
                code |= b.bits(1);
                let count = h.count[len];
                if code < first + count {
                    return h.symbol[index + code - first];
                }
                index += count;
                first = (first + count) << 1;
                code <<= 1;
            }
            panic!("bad Huffman code");
        }
        const LBASE: [usize; 29] = [
            3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195,
            227, 258,
        ];
        const LEXT: [u32; 29] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0];
        const DBASE: [usize; 30] = [
            1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537, 2049, 3073,
            4097, 6145, 8193, 12289, 16385, 24577,
        ];
        const DEXT: [u32; 30] =
            [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13];
        let data = [z, &TAIL[..]].concat();
        let mut b = Bits { d: &data, pos: 0 };
        let (mut out, mut max_dist) = (0usize, 0usize);
        while b.pos + 3 <= data.len() * 8 {
            let last = b.bits(1) == 1;
            let (lit, dist) = match b.bits(2) {
                0 => {
                    b.pos = b.pos.div_ceil(8) * 8;
                    let len = b.bits(16);
                    b.bits(16);
                    b.pos += 8 * len;
                    out += len;
                    if last {
                        break;
                    }
                    continue;
                }
                1 => {
                    let mut l = [8u8; 288];
                    l[144..256].fill(9);
                    l[256..280].fill(7);
                    (huff(&l), huff(&[5u8; 30]))
                }
                2 => {
                    let (nlen, ndist, ncode) = (b.bits(5) + 257, b.bits(5) + 1, b.bits(4) + 4);
                    const ORDER: [usize; 19] = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15];
                    let mut cl = [0u8; 19];
                    for &o in &ORDER[..ncode] {
                        cl[o] = b.bits(3) as u8;
                    }
                    let ch = huff(&cl);
                    let mut lengths = Vec::new();
                    while lengths.len() < nlen + ndist {
                        match decode(&mut b, &ch) {
                            s @ 0..=15 => lengths.push(s as u8),
                            16 => {
                                let prev = *lengths.last().expect("repeat after a length");
                                let n = 3 + b.bits(2);
                                lengths.extend(std::iter::repeat_n(prev, n));
                            }
                            17 => {
                                let n = 3 + b.bits(3);
                                lengths.extend(std::iter::repeat_n(0, n));
                            }
                            _ => {
                                let n = 11 + b.bits(7);
                                lengths.extend(std::iter::repeat_n(0, n));
                            }
                        }
                    }
                    (huff(&lengths[..nlen]), huff(&lengths[nlen..]))
                }
                t => panic!("block type {t}"),
            };
            loop {
                let sym = decode(&mut b, &lit);
                match sym {
                    0..=255 => out += 1,
                    256 => break,
                    _ => {
                        let i = sym - 257;
                        out += LBASE[i] + b.bits(LEXT[i]);
                        let d = decode(&mut b, &dist);
                        let d = DBASE[d] + b.bits(DEXT[d]);
                        max_dist = max_dist.max(d);
                    }
                }
            }
            if last {
                break;
            }
        }
        (out, max_dist)
    }

    #[test]
    fn window_8_is_served_by_a_stream_that_fits_256_bytes() {
        // A client asking server_max_window_bits=8 gets 8 echoed; zlib cannot deflate with
        // 8 and uses 9, but its matches never reach further back than 512 - 262 = 250 bytes
        // (MAX_DIST), so every back-reference fits the 256-byte window promised.
        let mut msg = Vec::new();
        let mut x = 12345u32;
        for i in 0..4000u32 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            msg.extend_from_slice(format!("w{} ", (x >> 16) % 64).as_bytes());
            if i % 7 == 0 {
                let back = msg.len().saturating_sub(300);
                let rep = msg[back..back + 20.min(msg.len() - back)].to_vec();
                msg.extend_from_slice(&rep); // repeats about 300 bytes back
            }
        }
        for level in [1, 5, 9] {
            let z = deflate(&msg, 8, level);
            let (len, dist) = measure_distances(&z);
            assert_eq!(len, msg.len(), "parser read the whole stream");
            assert!(dist <= 256, "level {level}: distance {dist} > 256");
            // The measurement has teeth: with a 15-bit window the same data reaches further.
            assert!(measure_distances(&deflate(&msg, 15, level)).1 > 256);
        }
        let (p, resp) = negotiate(["permessage-deflate; server_max_window_bits=8"], &DeflateConfig::default()).unwrap();
        assert_eq!(p.server_window_bits, 9);
        assert!(resp.contains("server_max_window_bits=8"));
    }

    #[test]
    fn inflate_limit_is_1009() {
        let msg = vec![b'a'; 200_000];
        let z = deflate(&msg, 15, 5);
        let p = DeflateParams { server_window_bits: 15, client_window_bits: 15, client_no_context_takeover: false };
        assert_eq!(Inflater::new(&p).inflate(&z, 65536).unwrap_err().code, 1009);
        assert_eq!(Inflater::new(&p).inflate(&[0xff, 0xff, 0xff], 65536).unwrap_err().code, 1007);
    }

    #[test]
    fn inflate_output_never_outgrows_the_cap() {
        let p = DeflateParams { server_window_bits: 15, client_window_bits: 15, client_no_context_takeover: false };
        // A deflate bomb: 64 MiB of zeros in about 64 KiB.
        let bomb = deflate(&vec![0u8; 64 << 20], 15, 9);
        assert!(bomb.len() < 100_000, "{}", bomb.len());
        assert_eq!(Inflater::new(&p).inflate(&bomb, 65536).unwrap_err().code, 1009);
        // Exactly the cap is fine, and the buffer is never larger than cap + 1.
        for max in [1000, 4096, 65536, 100_000] {
            let out = Inflater::new(&p).inflate(&deflate(&vec![7u8; max], 15, 5), max).unwrap();
            assert_eq!(out.len(), max);
            assert!(out.capacity() <= max + 1, "{max}: capacity {}", out.capacity());
            assert_eq!(Inflater::new(&p).inflate(&deflate(&vec![7u8; max + 1], 15, 5), max).unwrap_err().code, 1009);
        }
    }
}
