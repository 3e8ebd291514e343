//! PROXY protocol header, versions 1 and 2 (HAProxy's `proxy-protocol.txt`), sans-I/O: the
//! first bytes of a connection in, the client's address and the header's length out.
//!
//! A load balancer in front of the gateway (HAProxy `send-proxy[-v2]`, AWS NLB, nginx
//! `proxy_protocol on`, ...) writes one header before the client's own bytes. Feed
//! [`parse`] the whole buffer after each read, as [`super::handshake::parse_request`] is
//! fed; on [`Parsed::Done`] drop `consumed` bytes and hand the rest to the HTTP parser.
//!
//! What gives an address: only TCP over IPv4 or IPv6 (v1 `TCP4`/`TCP6`, v2 `\x11`/`\x21`
//! with the PROXY command). Everything else the spec lets a receiver accept gives
//! `source: None` and the caller keeps the socket's peer: v1 `UNKNOWN`, the v2 LOCAL
//! command (the proxy's own health checks), and v2 AF_UNSPEC, UDP and AF_UNIX (the spec's
//! "fall back to UNSPEC mode" for combinations a receiver does not implement; HAProxy does
//! the same). The address is returned as sent (an IPv4-mapped IPv6 source stays IPv6; see
//! [`crate::limits::canonical`]). v2 TLVs are skipped unread (a CRC32c TLV is not checked).
//!
//! The decision comes as early as the bytes allow: a buffer that can no longer become a
//! valid header is an [`Parsed::Error`] at once, so a client speaking TLS or HTTP to a
//! PROXY listener is refused after its first byte instead of waiting for a timeout.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest v1 header, CRLF included (the spec's limit: `PROXY UNKNOWN` with two full
/// IPv6 addresses and two 5-digit ports is exactly 107 bytes).
pub const V1_MAX: usize = 107;

/// Longest v2 header we accept, the 16 fixed bytes included. The format allows
/// 16 + 65,535 bytes; the address blocks are at most 216 bytes (AF_UNIX) and the TLVs real
/// senders add (AWS VPC endpoint id, ALPN, authority, SSL info, CRC32c, unique id) a few
/// hundred more, so 4 KiB leaves ample room while bounding what a connection may buffer
/// before it is identified.
pub const V2_MAX: usize = 4096;

/// The v2 signature (12 bytes; the null byte means it is never a C string).
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V2_FIXED: usize = 16;

/// The result of [`parse`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid prefix of a header: read more (the buffer is under the header's cap).
    Partial,
    /// A complete header of `consumed` bytes; what follows belongs to the client.
    /// `source` is the client's address, or None when the socket's peer is to be used.
    Done { source: Option<SocketAddr>, consumed: usize },
    /// Not a PROXY header (or a broken one): close the connection.
    Error(&'static str),
}

/// Parse a PROXY protocol header (v1 or v2) at the start of `buf`.
///
/// Never reads past the header: `consumed <= buf.len()`, and the result for a complete
/// header does not change when more bytes follow it. Once a prefix is an `Error`, every
/// longer buffer starting with it is too.
pub fn parse(buf: &[u8]) -> Parsed {
    match buf.first() {
        None => Parsed::Partial,
        Some(b'P') => v1(buf),
        Some(b'\r') => v2(buf),
        Some(_) => Parsed::Error("not a PROXY protocol header"),
    }
}

// ---- version 1: one text line ------------------------------------------------------

fn v1(buf: &[u8]) -> Parsed {
    let window = &buf[..buf.len().min(V1_MAX)];
    // The line ends at the first CR or LF, which must be a CR followed by LF.
    let end = window.iter().position(|&b| b == b'\r' || b == b'\n');
    let (line, complete) = match end {
        Some(i) if window[i] == b'\n' => return Parsed::Error("PROXY v1 line ends with a bare LF"),
        Some(i) if i + 1 == V1_MAX => return Parsed::Error("PROXY v1 line longer than 107 bytes"),
        Some(i) => match buf.get(i + 1) {
            Some(b'\n') => (&buf[..i], true),
            Some(_) => return Parsed::Error("PROXY v1 line ends with a bare CR"),
            None => (&buf[..i], false),
        },
        None if buf.len() >= V1_MAX => return Parsed::Error("PROXY v1 line longer than 107 bytes"),
        None => (buf, false),
    };
    match v1_line(line, complete) {
        Err(e) => Parsed::Error(e),
        Ok(_) if !complete => Parsed::Partial,
        Ok(source) => Parsed::Done { source, consumed: line.len() + 2 },
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Family {
    Tcp4,
    Tcp6,
}

/// Check a v1 line without its CRLF. When `complete` is false the line is a prefix:
/// only the fields already ended by a space are parsed, the last one is checked for
/// characters and length, and `Ok(None)` means "nothing wrong so far".
fn v1_line(line: &[u8], complete: bool) -> Result<Option<SocketAddr>, &'static str> {
    const BAD: &str = "not a PROXY protocol header";
    let mut fields = line.split(|&b| b == b' ');
    let n_fields = line.iter().filter(|&&b| b == b' ').count() + 1;
    // A field is final if a space follows it or the line is complete.
    let is_final = |i: usize| complete || i + 1 < n_fields;

    let proxy = fields.next().unwrap_or_default();
    if !(if is_final(0) { proxy == b"PROXY" } else { b"PROXY".starts_with(proxy) }) {
        return Err(BAD);
    }
    let Some(proto) = fields.next() else {
        return if complete { Err(BAD) } else { Ok(None) };
    };
    let family = match proto {
        b"TCP4" if is_final(1) => Family::Tcp4,
        b"TCP6" if is_final(1) => Family::Tcp6,
        // The spec: the receiver must ignore whatever follows UNKNOWN up to the CRLF.
        b"UNKNOWN" if is_final(1) => return Ok(None),
        p if !is_final(1) && [&b"TCP4"[..], b"TCP6", b"UNKNOWN"].iter().any(|t| t.starts_with(p)) => return Ok(None),
        _ => return Err("PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN"),
    };

    let mut addrs = [None, None];
    let mut ports = [0u16; 2];
    for (i, field) in fields.enumerate() {
        let fin = is_final(i + 2);
        match i {
            0 | 1 => {
                let ok_char = |b: &u8| match family {
                    Family::Tcp4 => b.is_ascii_digit() || *b == b'.',
                    Family::Tcp6 => b.is_ascii_hexdigit() || *b == b':' || *b == b'.',
                };
                let max = if family == Family::Tcp4 { 15 } else { 45 };
                if !field.iter().all(ok_char) || field.len() > max {
                    return Err("PROXY v1 address is invalid");
                }
                if fin {
                    addrs[i] = Some(v1_addr(field, family)?);
                }
            }
            2 | 3 => {
                if !field.iter().all(u8::is_ascii_digit) || field.len() > 5 {
                    return Err("PROXY v1 port is invalid");
                }
                if fin {
                    ports[i - 2] = v1_port(field)?;
                }
            }
            _ => return Err("PROXY v1 line has too many fields"),
        }
    }
    if !complete {
        return Ok(None);
    }
    match addrs {
        [Some(src), Some(_)] if n_fields == 6 => Ok(Some(SocketAddr::new(src, ports[0]))),
        _ => Err("PROXY v1 line has too few fields"),
    }
}

/// An address in the family the line announced (IPv4: four decimal numbers without
/// leading zeros, as the spec demands and `Ipv4Addr`'s parser enforces).
fn v1_addr(field: &[u8], family: Family) -> Result<IpAddr, &'static str> {
    let s = std::str::from_utf8(field).map_err(|_| "PROXY v1 address is invalid")?;
    let ip = match family {
        Family::Tcp4 => s.parse::<Ipv4Addr>().map(IpAddr::V4),
        Family::Tcp6 => s.parse::<Ipv6Addr>().map(IpAddr::V6),
    };
    ip.map_err(|_| "PROXY v1 address is invalid")
}

/// A decimal port in 0..=65535 without leading zeros.
fn v1_port(field: &[u8]) -> Result<u16, &'static str> {
    if field.is_empty() || (field.len() > 1 && field[0] == b'0') {
        return Err("PROXY v1 port is invalid");
    }
    let n = field.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    u16::try_from(n).map_err(|_| "PROXY v1 port is out of range")
}

// ---- version 2: binary -------------------------------------------------------------

fn v2(buf: &[u8]) -> Parsed {
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] != V2_SIG[..n] {
        return Parsed::Error("not a PROXY protocol header");
    }
    let Some(&ver_cmd) = buf.get(12) else { return Parsed::Partial };
    if ver_cmd >> 4 != 2 {
        return Parsed::Error("PROXY v2 version is not 2");
    }
    let proxy = match ver_cmd & 0x0f {
        0 => false, // LOCAL: the proxy's own connection (health check); family ignored
        1 => true,
        _ => return Parsed::Error("PROXY v2 command is not LOCAL or PROXY"),
    };
    let Some(&fam) = buf.get(13) else { return Parsed::Partial };
    if proxy && !matches!(fam, 0x00 | 0x11 | 0x12 | 0x21 | 0x22 | 0x31 | 0x32) {
        return Parsed::Error("PROXY v2 address family or transport is invalid");
    }
    let Some(len) = buf.get(14..16) else { return Parsed::Partial };
    let total = V2_FIXED + usize::from(u16::from_be_bytes([len[0], len[1]]));
    if total > V2_MAX {
        return Parsed::Error("PROXY v2 header longer than 4096 bytes");
    }
    let need = match (proxy, fam) {
        (true, 0x11) => 12, // 2 x 4-byte address + 2 x 2-byte port
        (true, 0x21) => 36, // 2 x 16-byte address + 2 x 2-byte port
        _ => 0,
    };
    if total < V2_FIXED + need {
        return Parsed::Error("PROXY v2 address block too short for its family");
    }
    let Some(block) = buf.get(V2_FIXED..total) else { return Parsed::Partial };
    let source = match (proxy, fam) {
        (true, 0x11) => {
            let ip = Ipv4Addr::new(block[0], block[1], block[2], block[3]);
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([block[8], block[9]])))
        }
        (true, 0x21) => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&block[..16]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), u16::from_be_bytes([block[32], block[33]])))
        }
        // LOCAL, AF_UNSPEC, UDP, AF_UNIX: use the socket's peer.
        _ => None,
    };
    Parsed::Done { source, consumed: total }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    fn done(source: Option<SocketAddr>, consumed: usize) -> Parsed {
        Parsed::Done { source, consumed }
    }

    /// A v2 header: signature, version/command, family, length, then `body`.
    fn v2h(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIG.to_vec();
        h.extend([ver_cmd, fam]);
        h.extend((body.len() as u16).to_be_bytes());
        h.extend(body);
        h
    }

    fn tlv(t: u8, v: &[u8]) -> Vec<u8> {
        let mut out = vec![t];
        out.extend((v.len() as u16).to_be_bytes());
        out.extend(v);
        out
    }

    /// AWS NLB with proxy protocol v2 on a target group: TCP over IPv4, then the VPC
    /// endpoint TLV (type 0xEA, subtype 0x01 PP2_SUBTYPE_AWS_VPCE_ID).
    fn nlb_v4() -> Vec<u8> {
        let mut body = vec![198, 51, 100, 22, 10, 0, 1, 5];
        body.extend(35646u16.to_be_bytes());
        body.extend(443u16.to_be_bytes());
        body.extend(tlv(0xea, b"\x01vpce-08d2bf15fac5001c9"));
        v2h(0x21, 0x11, &body)
    }

    /// HAProxy `send-proxy-v2-ssl` over IPv6 with `proxy-v2-options authority,crc32c`:
    /// ALPN, authority, CRC32c (not verified), SSL (client flags, verify, version), NOOP.
    fn haproxy_v6() -> Vec<u8> {
        let src: Ipv6Addr = "2001:db8:85a3::8a2e:370:7334".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::443".parse().unwrap();
        let mut body = src.octets().to_vec();
        body.extend(dst.octets());
        body.extend(51234u16.to_be_bytes());
        body.extend(443u16.to_be_bytes());
        body.extend(tlv(0x01, b"h2"));
        body.extend(tlv(0x02, b"gw.example.com"));
        body.extend(tlv(0x03, &[0x5a, 0x1f, 0x09, 0xc3]));
        let mut ssl = vec![0x01, 0, 0, 0, 0];
        ssl.extend(tlv(0x21, b"TLSv1.3"));
        body.extend(tlv(0x20, &ssl));
        body.extend(tlv(0x04, &[0; 3]));
        v2h(0x21, 0x21, &body)
    }

    const V1_TCP4: &[u8] = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    const V1_TCP6: &[u8] = b"PROXY TCP6 2001:db8::1 2001:db8::2 56324 443\r\n";
    const V1_UNKNOWN_MAX: &[u8] = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";

    /// Every real header: (bytes, expected source).
    fn headers() -> Vec<(Vec<u8>, Option<SocketAddr>)> {
        vec![
            (V1_TCP4.to_vec(), sa("192.168.0.1:56324")),
            (V1_TCP6.to_vec(), sa("[2001:db8::1]:56324")),
            (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n".to_vec(), sa("0.0.0.0:0")),
            (b"PROXY TCP6 ::ffff:203.0.113.9 ::1 1 2\r\n".to_vec(), sa("[::ffff:203.0.113.9]:1")),
            (b"PROXY UNKNOWN\r\n".to_vec(), None),
            (V1_UNKNOWN_MAX.to_vec(), None),
            (nlb_v4(), sa("198.51.100.22:35646")),
            (haproxy_v6(), sa("[2001:db8:85a3::8a2e:370:7334]:51234")),
            (v2h(0x20, 0x00, &[]), None),       // HAProxy health check: LOCAL, no address
            (v2h(0x20, 0x11, &[1; 12]), None),  // LOCAL with an address block: skipped
            (v2h(0x20, 0xff, &[]), None),       // LOCAL: the family byte is ignored
            (v2h(0x21, 0x00, &[]), None),       // PROXY, AF_UNSPEC
            (v2h(0x21, 0x12, &[9; 12]), None),  // UDP over IPv4
            (v2h(0x21, 0x31, &[0; 216]), None), // AF_UNIX stream
            (v2h(0x21, 0x11, &[10, 1, 2, 3, 10, 0, 0, 1, 0x1f, 0x90, 0, 80]), sa("10.1.2.3:8080")),
        ]
    }

    #[test]
    fn real_headers_parse() {
        assert_eq!(V1_UNKNOWN_MAX.len(), V1_MAX);
        for (h, source) in headers() {
            assert_eq!(parse(&h), done(source, h.len()), "{h:?}");
        }
    }

    #[test]
    fn partial_at_every_split_until_complete() {
        for (h, source) in headers() {
            for cut in 0..h.len() {
                assert_eq!(parse(&h[..cut]), Parsed::Partial, "cut at {cut} of {h:?}");
            }
            assert_eq!(parse(&h), done(source, h.len()));
        }
    }

    #[test]
    fn trailing_bytes_are_left_for_the_client() {
        let tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        for (h, source) in headers() {
            for tail in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], tls_hello, b"\r\n", b"PROXY ", &V2_SIG[..]] {
                let buf = [&h[..], tail].concat();
                assert_eq!(parse(&buf), done(source, h.len()), "{buf:?}");
            }
        }
    }

    #[test]
    fn other_protocols_fail_on_their_first_bytes() {
        // TLS ClientHello, HTTP, SSH, a WebSocket frame: the first byte decides.
        for b in [&b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..], b"GET / HTTP/1.1\r\n", b"SSH-2.0", b"\x81\x85"]
        {
            assert!(matches!(parse(&b[..1]), Parsed::Error(_)), "{b:?}");
            assert!(matches!(parse(b), Parsed::Error(_)), "{b:?}");
        }
        // Starts like a signature: decided at the first byte that departs from it.
        for (b, at) in [
            (&b"POST / HTTP/1.1\r\n"[..], 2),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 3),
            (b"PROXY2", 6),
            (b"\r\n\r\nGET / HTTP/1.1", 5),
            (b"\r\n\r\n\0\r\nQUIX", 11),
        ] {
            assert_eq!(parse(&b[..at - 1]), Parsed::Partial, "{b:?}");
            assert!(matches!(parse(&b[..at]), Parsed::Error(_)), "{b:?}");
        }
        assert!(matches!(parse(b"\r\n"), Parsed::Partial)); // still a v2 prefix
    }

    #[test]
    fn bad_v1_lines() {
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n",     // bare LF
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\rX",    // bare CR
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324\r\n",       // too few fields
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 1\r\n", // too many
            b"PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n",  // two spaces
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443 \r\n",  // trailing space
            b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n",  // leading zero (octal?)
            b"PROXY TCP4 192.168.0.256 192.168.0.11 56324 443\r\n",
            b"PROXY TCP4 192.168.0 192.168.0.11 56324 443\r\n",
            b"PROXY TCP4 2001:db8::1 192.168.0.11 56324 443\r\n", // wrong family
            b"PROXY TCP6 192.168.0.1 2001:db8::2 56324 443\r\n",  // wrong family
            b"PROXY TCP6 2001:db8::1 192.168.0.11 56324 443\r\n", // destination wrong family
            b"PROXY TCP6 2001:db8:::1 2001:db8::2 56324 443\r\n",
            b"PROXY TCP6 fe80::1%eth0 fe80::2 56324 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n", // port out of range
            b"PROXY TCP4 192.168.0.1 192.168.0.11 99999 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 056324 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 0443 443\r\n", // leading zero
            b"PROXY TCP4 192.168.0.1 192.168.0.11 +443 443\r\n",
            b"PROXY TCP4 192.168.0.1 192.168.0.11 -1 443\r\n",
            b"PROXY UDP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            b"PROXY tcp4 192.168.0.1 192.168.0.11 56324 443\r\n",
            b"PROXY UNKNOWNX\r\n",
            b"PROXY TCP4\r\n",
            b"PROXY \r\n",
            b"PROXY\r\n",
            b"proxy TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ];
        for b in bad {
            assert!(matches!(parse(b), Parsed::Error(_)), "{}", String::from_utf8_lossy(b));
        }
        // No CRLF within 107 bytes: an error at 107 bytes, not a longer wait.
        let long = [&V1_UNKNOWN_MAX[..V1_MAX - 2], b"f\r\n"].concat();
        assert_eq!(parse(&long[..V1_MAX - 1]), Parsed::Partial);
        assert!(matches!(parse(&long[..V1_MAX]), Parsed::Error(_)));
        assert!(matches!(parse(&long), Parsed::Error(_)));
        let spaces = [&b"PROXY UNKNOWN"[..], &[b' '; 100]].concat();
        assert!(matches!(parse(&spaces), Parsed::Error(_)));
    }

    #[test]
    fn bad_v1_prefixes_fail_before_the_crlf() {
        for b in [
            &b"PROXY TCP5"[..],
            b"PROXY TCP4 10.0.0.x",
            b"PROXY TCP4 10.0.0.1.2.3.4.5.6.7",
            b"PROXY TCP4 10.0.0.01 ",
            b"PROXY TCP4 ::1",
            b"PROXY TCP6 2001:db8::g",
            b"PROXY TCP4 10.0.0.1 10.0.0.2 123456",
            b"PROXY TCP4 10.0.0.1 10.0.0.2 70000 ",
            b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2 ",
            b"PROXY TCP4  ",
            b"PROXY UNKNOWN\x16",
        ] {
            assert!(matches!(parse(b), Parsed::Error(_)), "{}", String::from_utf8_lossy(b));
        }
    }

    #[test]
    fn bad_v2_headers() {
        let mut addr = vec![10, 1, 2, 3, 10, 0, 0, 1, 0x1f, 0x90, 0, 80];
        assert!(matches!(parse(&v2h(0x11, 0x11, &addr)), Parsed::Error(_)), "version 1");
        assert!(matches!(parse(&v2h(0x31, 0x11, &addr)), Parsed::Error(_)), "version 3");
        assert!(matches!(parse(&v2h(0x22, 0x11, &addr)), Parsed::Error(_)), "command 2");
        for fam in [0x01, 0x10, 0x13, 0x41, 0xff] {
            assert!(matches!(parse(&v2h(0x21, fam, &addr)), Parsed::Error(_)), "family {fam:#x}");
        }
        addr.pop();
        assert!(matches!(parse(&v2h(0x21, 0x11, &addr)), Parsed::Error(_)), "IPv4 block of 11 bytes");
        assert!(matches!(parse(&v2h(0x21, 0x21, &[0; 35])), Parsed::Error(_)), "IPv6 block of 35 bytes");
        // Decided at the 13th/14th/16th byte, without waiting for the rest.
        assert!(matches!(parse(&v2h(0x11, 0x11, &[])[..13]), Parsed::Error(_)));
        assert!(matches!(parse(&v2h(0x21, 0x99, &[])[..14]), Parsed::Error(_)));
        assert!(matches!(parse(&v2h(0x21, 0x11, &[0; 4])), Parsed::Error(_)));
        // The length cap: 16 + 4080 is accepted, one more byte is refused at the 16th.
        let max = v2h(0x21, 0x11, &[0; V2_MAX - 16]);
        assert_eq!(parse(&max), done(sa("0.0.0.0:0"), V2_MAX));
        let over = v2h(0x21, 0x11, &[0; V2_MAX - 15]);
        assert!(matches!(parse(&over[..16]), Parsed::Error(_)));
        let mut huge = v2h(0x20, 0x00, &[]);
        huge[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(parse(&huge), Parsed::Error(_)));
    }
}
