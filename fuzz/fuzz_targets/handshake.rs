//! HTTP/1.1 upgrade parser: request bytes arrive in arbitrary chunks and the parser is
//! offered the whole buffer after each one (as the engine's read loop does), with
//! various header-count and head-size caps. A complete head is classified, its
//! extension offers negotiated and the 101 response built.
//!
//! Input: 4 config bytes, then the request bytes.
//!   0: max_headers (index into MAX_HEADERS)   1: max_bytes (index into MAX_BYTES)
//!   2: chunking seed (0 = all at once)   3: our client_max_window_bits (9 + byte % 7)
//!
//! Invariants: no panic; Partial only while the buffer is under max_bytes; a complete
//! head is within max_bytes and the buffer, has at most max_headers headers whose
//! names and values fit in it; errors are 400/431/505; the parse result of a prefix
//! does not change when more bytes follow; negotiated parameters stay in range.
#![no_main]

use gateway_core::protocol::deflate::{negotiate, DeflateConfig};
use gateway_core::protocol::handshake::{accept_key, parse_request, response_101, Kind, Parsed};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const MAX_HEADERS: [usize; 8] = [0, 1, 2, 4, 8, 16, 64, 100];
const MAX_BYTES: [usize; 8] = [0, 1, 16, 64, 256, 1024, 8192, 65536];

fn check_done(buf: &[u8], req: &gateway_core::protocol::handshake::Request, n: usize, mh: usize, mb: usize, bits: u8) {
    assert!(n <= buf.len() && n <= mb, "head of {n} bytes, buffer {}, max {mb}", buf.len());
    assert!(req.headers.len() <= mh, "{} headers > max {mh}", req.headers.len());
    let header_bytes: usize = req.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(header_bytes + req.method.len() + req.path.len() + req.query.len() <= n, "request bigger than its head");
    for (k, _) in &req.headers {
        assert!(!k.bytes().any(|b| b.is_ascii_uppercase()), "header name not lower-cased: {k:?}");
    }
    match req.kind() {
        Kind::Upgrade { key, protocols, extensions } => {
            assert_eq!(req.method, "GET");
            assert_eq!(accept_key(&key).len(), 28);
            let cfg = DeflateConfig { client_max_window_bits: bits, ..DeflateConfig::default() };
            let ext = negotiate(extensions.iter().map(String::as_str), &cfg);
            if let Some((p, resp)) = &ext {
                assert!((9..=15).contains(&p.server_window_bits), "{p:?}");
                assert!((9..=15).contains(&p.client_window_bits) && p.client_window_bits <= bits.max(9), "{p:?}");
                assert!(resp.starts_with("permessage-deflate"), "{resp}");
            }
            let r = response_101(&key, protocols.first().map(String::as_str), ext.as_ref().map(|(_, s)| s.as_str()));
            assert!(r.starts_with(b"HTTP/1.1 101 ") && r.ends_with(b"\r\n\r\n"));
        }
        Kind::Bad(status, _) => assert!(matches!(status, 400 | 405 | 426), "status {status}"),
        Kind::Plain => {}
    }
}

fuzz_target!(|data: &[u8]| common::run(|| one(data)));

fn one(data: &[u8]) {
    let mut p = common::Prefix::new(data);
    let mh = p.pick(&MAX_HEADERS);
    let mb = p.pick(&MAX_BYTES);
    let seed = p.byte();
    let bits = 9 + p.byte() % 7;
    let input = p.rest();

    let mut buf: Vec<u8> = Vec::new();
    for piece in common::chunks(input, seed) {
        buf.extend_from_slice(piece);
        match parse_request(&buf, mh, mb) {
            Parsed::Partial => assert!(buf.len() < mb, "Partial with {} bytes buffered, max {mb}", buf.len()),
            Parsed::Done(req, n) => {
                check_done(&buf, &req, n, mh, mb, bits);
                // The same head is found with everything that follows it.
                match parse_request(input, mh, mb) {
                    Parsed::Done(_, m) => assert_eq!(m, n, "head length changed with more bytes"),
                    other => panic!("prefix parsed as Done({n}), whole input as {other:?}"),
                }
                return;
            }
            Parsed::Error(status, _) => {
                assert!(matches!(status, 400 | 431 | 505), "status {status}");
                return;
            }
        }
    }
}
