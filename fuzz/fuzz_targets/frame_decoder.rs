//! RFC 6455 frame decoder: arbitrary bytes, fed in arbitrary chunks, with either role
//! (server: masked client frames required; client: unmasked server frames), with or
//! without permessage-deflate, and with various frame and message caps.
//!
//! Input: 5 config bytes, then the byte stream.
//!   0: bit 0 = client role; (byte >> 1) % 3 = no deflate / deflate with context
//!      takeover / deflate with client_no_context_takeover
//!   1: max_frame (index into CAPS)   2: max_message (index into CAPS)
//!   3: client window bits (9 + byte % 7)   4: chunking seed (0 = all at once)
//!
//! Invariants: no panic; every message within max_message, control payloads within
//! 125 bytes and max_frame; text is UTF-8; errors are 1002/1007/1009; nothing follows a
//! Close; the bytes left buffered are at most one incomplete frame (< 14 + max_frame);
//! the chunking does not change the events or the error; the events re-encoded with
//! the crate's encoders decode to the same events.
#![no_main]

use gateway_core::protocol::deflate::{DeflateParams, Inflater};
use gateway_core::protocol::frame::{
    encode, encode_client, Decoder, DecoderConfig, Event, ProtoError, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT,
};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const CAPS: [usize; 14] = [0, 1, 2, 16, 125, 126, 127, 128, 1000, 4096, 65535, 65536, 65537, 1 << 20];
/// Longest frame header: 2 + 8 (64-bit length) + 4 (mask).
const MAX_HEADER: usize = 14;

#[derive(Debug, PartialEq)]
struct Outcome {
    events: Vec<Event>,
    err: Option<ProtoError>,
}

fn check_events(evs: &[Event], cfg: &DecoderConfig, closed_before: bool) {
    let mut closed = closed_before;
    for ev in evs {
        assert!(!closed, "event after Close: {ev:?}");
        match ev {
            Event::Text(d) => {
                assert!(d.len() <= cfg.max_message, "text of {} > max_message {}", d.len(), cfg.max_message);
                assert!(std::str::from_utf8(d).is_ok(), "text event is not UTF-8");
            }
            Event::Binary(d) => {
                assert!(d.len() <= cfg.max_message, "binary of {} > max_message {}", d.len(), cfg.max_message)
            }
            Event::Ping(d) | Event::Pong(d) => {
                assert!(d.len() <= 125.min(cfg.max_frame), "control payload {}", d.len())
            }
            Event::Close(code, reason) => {
                closed = true;
                let payload = if code.is_some() { 2 + reason.len() } else { 0 };
                assert!(payload <= 125.min(cfg.max_frame), "close payload {payload}");
                if let Some(c) = code {
                    assert!(matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999), "close code {c}");
                } else {
                    assert!(reason.is_empty());
                }
            }
        }
    }
}

fn drive(cfg: &DecoderConfig, deflate: Option<DeflateParams>, pieces: &[&[u8]]) -> Outcome {
    let mut dec = Decoder::new(cfg.clone(), deflate.map(|p| Inflater::new(&p)));
    let mut pending: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    for piece in pieces {
        if dec.is_closed() {
            break; // the engine discards input after a close frame
        }
        pending.extend_from_slice(piece);
        let mut out = Vec::new();
        let res = dec.decode(&mut pending, &mut out);
        check_events(&out, cfg, events.iter().any(|e| matches!(e, Event::Close(..))));
        events.extend(out);
        match res {
            Ok(n) => {
                assert!(n <= pending.len(), "consumed {n} of {}", pending.len());
                pending.drain(..n);
                if !dec.is_closed() {
                    assert!(
                        pending.len() < MAX_HEADER + cfg.max_frame,
                        "{} bytes left buffered with max_frame {}",
                        pending.len(),
                        cfg.max_frame
                    );
                } else {
                    assert!(matches!(events.last(), Some(Event::Close(..))), "closed without a Close event");
                }
            }
            Err(e) => {
                assert!(matches!(e.code, 1002 | 1007 | 1009), "unexpected close code {e:?}");
                return Outcome { events, err: Some(e) };
            }
        }
    }
    Outcome { events, err: None }
}

/// Encode the events again (masked and unmasked) and decode them with fresh decoders.
fn reencode(events: &[Event]) {
    for masked in [true, false] {
        let mut wire = Vec::new();
        for ev in events {
            let (op, payload) = match ev {
                Event::Text(d) => (OP_TEXT, d.clone()),
                Event::Binary(d) => (OP_BINARY, d.clone()),
                Event::Ping(d) => (OP_PING, d.clone()),
                Event::Pong(d) => (OP_PONG, d.clone()),
                Event::Close(None, _) => (OP_CLOSE, Vec::new()),
                Event::Close(Some(c), r) => (OP_CLOSE, [&c.to_be_bytes()[..], r.as_bytes()].concat()),
            };
            if masked {
                wire.extend(encode_client(op, true, &payload, [0x37, 0xfa, 0x21, 0x3d]));
            } else {
                wire.extend(encode(op, false, &payload));
            }
        }
        let cfg = DecoderConfig { max_frame: 1 << 21, max_message: 1 << 21, require_mask: masked };
        let mut dec = Decoder::new(cfg, None);
        let mut out = Vec::new();
        let n = dec.decode(&mut wire, &mut out).expect("re-encoded events decode");
        assert_eq!(n, wire.len());
        assert_eq!(out, events, "re-encoded events differ (masked: {masked})");
    }
}

fuzz_target!(|data: &[u8]| common::run(|| one(data)));

fn one(data: &[u8]) {
    let mut p = common::Prefix::new(data);
    let b0 = p.byte();
    let client_role = b0 & 1 == 1;
    let deflate_mode = (b0 >> 1) % 3;
    let max_frame = p.pick(&CAPS);
    let max_message = p.pick(&CAPS);
    let bits = 9 + p.byte() % 7;
    let seed = p.byte();
    let stream = p.rest();

    let cfg = DecoderConfig { max_frame, max_message, require_mask: !client_role };
    let deflate = (deflate_mode > 0).then_some(DeflateParams {
        server_window_bits: 15,
        client_window_bits: bits,
        client_no_context_takeover: deflate_mode == 2,
    });

    let chunked = drive(&cfg, deflate, &common::chunks(stream, seed));
    if seed != 0 {
        let whole = drive(&cfg, deflate, &[stream]);
        assert_eq!(chunked, whole, "chunking changed the outcome");
    }
    reencode(&chunked.events);
}
