//! PROXY protocol header (v1 text, v2 binary): arbitrary bytes arrive in arbitrary chunks
//! and the parser is offered the whole buffer after each one (as a read loop does).
//!
//! Input: 1 config byte, then the connection's first bytes.
//!   0: chunking seed (0 = all at once)
//!
//! Invariants: no panic; Partial only under the version's cap (107 bytes for v1, 4096 for
//! v2) and, for v2, under the length its fixed part declares; once a prefix is an Error,
//! the whole input is too; a Done is the same for the header alone, for the whole input
//! and with more bytes appended, and one byte less of it is Partial; `consumed` is within
//! the buffer and the caps, a v1 header ends at its first CRLF; the source's family is
//! the one the header announces (v1 TCP4/TCP6, v2 PROXY over TCP4/TCP6, else None); the
//! source written back into v1 and v2 headers parses to itself.
#![no_main]

use std::net::SocketAddr;

use gateway_core::protocol::proxy::{parse, Parsed, V1_MAX, V2_MAX};
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Headers announcing `src` (the destination is the family's loopback, port 443).
fn encode(src: SocketAddr) -> [Vec<u8>; 2] {
    let (v1, fam, mut block) = match src {
        SocketAddr::V4(a) => {
            let mut b = a.ip().octets().to_vec();
            b.extend([127, 0, 0, 1]);
            (format!("PROXY TCP4 {} 127.0.0.1 {} 443\r\n", a.ip(), a.port()), 0x11, b)
        }
        SocketAddr::V6(a) => {
            let mut b = a.ip().octets().to_vec();
            b.extend(std::net::Ipv6Addr::LOCALHOST.octets());
            (format!("PROXY TCP6 {} ::1 {} 443\r\n", a.ip(), a.port()), 0x21, b)
        }
    };
    block.extend(src.port().to_be_bytes());
    block.extend(443u16.to_be_bytes());
    let mut v2 = V2_SIG.to_vec();
    v2.extend([0x21, fam]);
    v2.extend((block.len() as u16).to_be_bytes());
    v2.extend(block);
    [v1.into_bytes(), v2]
}

fn check_done(buf: &[u8], whole: &[u8], source: Option<SocketAddr>, consumed: usize) {
    let done = Parsed::Done { source, consumed };
    assert!(consumed <= buf.len(), "consumed {consumed} of {}", buf.len());
    let head = &buf[..consumed];
    if head[0] == b'P' {
        assert!((15..=V1_MAX).contains(&consumed), "v1 header of {consumed} bytes");
        let crlf = head.windows(2).position(|w| w == b"\r\n");
        assert_eq!(crlf, Some(consumed - 2), "v1 header does not end at its first CRLF");
        assert!(!head[..consumed - 2].iter().any(|&b| b == b'\r' || b == b'\n'), "CR or LF inside a v1 line");
        let family = match source {
            Some(SocketAddr::V4(_)) => Some(&b"PROXY TCP4 "[..]),
            Some(SocketAddr::V6(_)) => Some(&b"PROXY TCP6 "[..]),
            None => None,
        };
        match family {
            Some(prefix) => assert!(head.starts_with(prefix), "source {source:?} from {head:?}"),
            None => assert!(head.starts_with(b"PROXY UNKNOWN"), "no source from {head:?}"),
        }
    } else {
        assert!((16..=V2_MAX).contains(&consumed), "v2 header of {consumed} bytes");
        assert_eq!(&head[..12], V2_SIG);
        assert_eq!(consumed, 16 + usize::from(u16::from_be_bytes([head[14], head[15]])));
        let announced = match (head[12], head[13]) {
            (0x21, 0x11) => Some(true),
            (0x21, 0x21) => Some(false),
            _ => None,
        };
        assert_eq!(announced, source.map(|s| s.is_ipv4()), "source {source:?} from {:?}", &head[..16]);
    }
    assert_eq!(parse(head), done, "header alone");
    assert_eq!(parse(&head[..consumed - 1]), Parsed::Partial, "one byte short of a header");
    assert_eq!(parse(whole), done, "whole input");
    let mut more = buf.to_vec();
    more.extend_from_slice(b"\x16\x03\x01\r\n\r\nGET / HTTP/1.1\r\n\xff");
    assert_eq!(parse(&more), done, "more bytes appended");
    if let Some(src) = source {
        for h in encode(src) {
            assert_eq!(parse(&h), Parsed::Done { source, consumed: h.len() }, "round trip of {src} via {h:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| common::run(|| one(data)));

fn one(data: &[u8]) {
    let mut p = common::Prefix::new(data);
    let seed = p.byte();
    let input = p.rest();

    let mut buf: Vec<u8> = Vec::new();
    for piece in common::chunks(input, seed) {
        buf.extend_from_slice(piece);
        if buf.is_empty() {
            assert_eq!(parse(&buf), Parsed::Partial);
            continue;
        }
        match parse(&buf) {
            Parsed::Partial => {
                if buf[0] == b'P' {
                    assert!(buf.len() < V1_MAX, "v1 Partial with {} bytes", buf.len());
                } else {
                    assert!(buf.len() < V2_MAX, "v2 Partial with {} bytes", buf.len());
                    if buf.len() >= 16 {
                        let total = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
                        assert!(buf.len() < total, "v2 Partial with {} of {total} bytes", buf.len());
                    }
                }
            }
            Parsed::Done { source, consumed } => return check_done(&buf, input, source, consumed),
            Parsed::Error(_) => {
                assert!(matches!(parse(input), Parsed::Error(_)), "prefix is an Error, whole input is not");
                return;
            }
        }
    }
}
