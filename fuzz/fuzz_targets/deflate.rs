//! permessage-deflate (RFC 7692): inflate of arbitrary data under a small output cap,
//! and a deflate -> inflate round trip.
//!
//! Input: 5 config bytes, then the data.
//!   0: bit 0 = round trip (else: inflate arbitrary data)
//!   1: window bits (9 + byte % 7)   2: deflate level (byte % 10)
//!   3: output cap for arbitrary data, or slack over the payload length for the round
//!      trip (index into CAPS)
//!   4: bit 0 = client_no_context_takeover; the byte is also the seed that cuts the
//!      data into messages (0 = one message)
//!
//! Invariants: no panic; inflate never returns more than the cap, and fails with 1009
//! (too big) or 1007 (bad data) otherwise; every message deflated by the crate inflates
//! back to itself through one per-connection inflater, and fails with 1009 when the
//! cap is one byte short.
#![no_main]

use gateway_core::protocol::deflate::{deflate, DeflateParams, Inflater};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const CAPS: [usize; 12] = [0, 1, 2, 16, 63, 64, 65, 255, 256, 1000, 4096, 65536];

fuzz_target!(|data: &[u8]| common::run(|| one(data)));

fn one(data: &[u8]) {
    let mut p = common::Prefix::new(data);
    let round_trip = p.byte() & 1 == 1;
    let bits = 9 + p.byte() % 7;
    let level = u32::from(p.byte() % 10);
    let cap = p.pick(&CAPS);
    let b4 = p.byte();
    let data = p.rest();
    let params =
        DeflateParams { server_window_bits: bits, client_window_bits: bits, client_no_context_takeover: b4 & 1 == 1 };
    let mut inflater = Inflater::new(&params);

    for msg in common::chunks(data, b4) {
        if round_trip {
            let z = deflate(msg, bits, level);
            let max = msg.len() + cap;
            match inflater.inflate(&z, max) {
                Ok(out) => assert!(out == msg, "round trip changed a {}-byte message (cap {max})", msg.len()),
                // Known bug (common.rs): exactly `max` bytes out can be refused.
                // The engine closes the connection after an error: stop here too.
                Err(e) => panic!("round trip of {} bytes with cap {max} failed: {e:?}", msg.len()),
            }
            if !msg.is_empty() {
                let tight = DeflateParams { client_no_context_takeover: true, ..params };
                let r = Inflater::new(&tight).inflate(&z, msg.len() - 1);
                assert!(
                    matches!(r, Err(e) if e.code == 1009),
                    "{}-byte message under a cap one short: {r:?}",
                    msg.len()
                );
            }
        } else {
            match inflater.inflate(msg, cap) {
                Ok(out) => assert!(out.len() <= cap, "inflated {} bytes over the cap {cap}", out.len()),
                Err(e) => {
                    assert!(matches!(e.code, 1007 | 1009), "unexpected error {e:?}");
                    break; // the engine closes the connection
                }
            }
        }
    }
}
