//! Reproducers for crashes the fuzz targets found in gateway-core, through its public
//! API only. Each test fails (panics inside gateway-core) until the bug is fixed; run
//! them with `cd fuzz && cargo test --test regressions`. They are meant to move into
//! gateway-core's own tests together with the fix.

use gateway_core::protocol::deflate::{deflate, negotiate, DeflateConfig, DeflateParams, Inflater};
use gateway_core::protocol::frame::{encode_client, Decoder, DecoderConfig, Event, OP_BINARY};

/// Incompressible bytes (xorshift), then zeros: the compressed size follows `noise`.
fn payload(noise: usize, zeros: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_u32;
    let mut v: Vec<u8> = (0..noise)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    v.resize(noise + zeros, 0);
    v
}

/// fuzz/artifacts/deflate/crash-53e2c0f38f72e359cbcd873a988adad25457c72e, minimized:
/// `Inflater::inflate` panics ("min > max", deflate.rs `out.len().clamp(256, max -
/// out.len())`) when its output buffer fills up less than 256 bytes below `max`.
#[test]
fn inflate_small_cap_does_not_panic() {
    let p = DeflateParams { server_window_bits: 15, client_window_bits: 15, client_no_context_takeover: true };
    let z = deflate(&[b'a'; 100], 15, 6);
    // Over the cap: must be an error (1009), not a panic.
    let r = Inflater::new(&p).inflate(&z, 80);
    assert!(matches!(r, Err(e) if e.code == 1009), "{r:?}");
    // Within the cap: must inflate.
    assert_eq!(Inflater::new(&p).inflate(&z, 200).unwrap(), vec![b'a'; 100]);
}

/// The same panic with the engine's default limits (64 KiB messages) and a browser's
/// permessage-deflate offer: a client sends one 65 480-byte binary message, within
/// max_message, compressed to about 21.8 KB (3 x 21.8 KB lands in the last 256 bytes
/// below 65 536), and the decoder panics instead of returning the message.
#[test]
fn default_limits_compressed_message_does_not_panic() {
    let (params, _) = negotiate(["permessage-deflate; client_max_window_bits"], &DeflateConfig::default()).unwrap();
    let cfg = DecoderConfig::default();
    // The noise length whose compressed size lands in the zone (about 21.6 K).
    let (msg, z) = (21_000..22_000)
        .step_by(10)
        .map(|noise| payload(noise, 65_480 - noise))
        .map(|m| {
            let z = deflate(&m, params.client_window_bits, 6);
            (m, z)
        })
        .find(|(_, z)| (65_300..65_530).contains(&(z.len() * 3)))
        .expect("a message compressing to 21.8 KB");
    assert!(msg.len() <= cfg.max_message);
    let mut wire = encode_client(OP_BINARY, true, &z, [1, 2, 3, 4]);
    wire[0] |= 0x40; // RSV1: compressed
    let mut dec = Decoder::new(cfg, Some(Inflater::new(&params)));
    let mut out = Vec::new();
    assert_eq!(dec.decode(&mut wire, &mut out), Ok(wire.len()));
    assert_eq!(out, vec![Event::Binary(msg)]);
}

/// fuzz/artifacts/deflate/deflate-exact-cap-4eb7339eedf02998399e1407d2db83b824a8f021:
/// a message that inflates to exactly `max` bytes is refused with 1009 when the output
/// buffer was allocated exactly `max` bytes big (3 x compressed size >= max): the loop
/// sees a full buffer and takes it for "more output pending".
#[test]
fn inflate_exactly_the_cap_is_accepted() {
    let p = DeflateParams { server_window_bits: 15, client_window_bits: 15, client_no_context_takeover: true };
    let msg = r#"{"op":"presence","room":"大厅","users":["张三","李四","wx_7f3a"]}"#.as_bytes();
    let z = deflate(msg, 15, 6);
    assert!(z.len() * 3 >= msg.len());
    assert_eq!(Inflater::new(&p).inflate(&z, msg.len()), Ok(msg.to_vec()));
}

/// The same with the engine's default limits: an uncompressed message of exactly
/// max_message (64 KiB) is accepted, the same message compressed is closed with 1009.
#[test]
fn default_limits_compressed_message_of_max_size_is_accepted() {
    let (params, _) = negotiate(["permessage-deflate; client_max_window_bits"], &DeflateConfig::default()).unwrap();
    let cfg = DecoderConfig::default();
    let msg = payload(22_000, cfg.max_message - 22_000);
    let z = deflate(&msg, params.client_window_bits, 6);
    assert!(z.len() * 3 >= cfg.max_message, "compressed to {} bytes", z.len());
    for (frame_bytes, rsv1) in [(msg.as_slice(), false), (z.as_slice(), true)] {
        let mut wire = encode_client(OP_BINARY, true, frame_bytes, [1, 2, 3, 4]);
        if rsv1 {
            wire[0] |= 0x40;
        }
        let mut dec = Decoder::new(cfg.clone(), Some(Inflater::new(&params)));
        let mut out = Vec::new();
        assert_eq!(dec.decode(&mut wire, &mut out), Ok(wire.len()), "compressed: {rsv1}");
        assert_eq!(out, vec![Event::Binary(msg.clone())]);
    }
}
