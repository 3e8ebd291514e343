//! RFC 6455 framing, sans-I/O: bytes in, events out; payloads in, frame bytes out.
//!
//! [`Decoder`] turns client bytes into [`Event`]s and enforces every rule a server must
//! (masking, control-frame limits, reserved bits, fragmentation order, UTF-8, sizes).
//! [`encode`] builds the unmasked server frames.

use super::deflate::Inflater;
use super::CloseCode;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A protocol violation: the connection must be closed with `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtoError {
    pub code: u16,
    pub reason: &'static str,
}

impl ProtoError {
    const fn new(code: u16, reason: &'static str) -> Self {
        Self { code, reason }
    }
}

/// One complete thing the client said.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// `None` when the close frame carried no status code.
    Close(Option<u16>, String),
}

/// Limits applied while decoding.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    pub max_frame: usize,
    pub max_message: usize,
    /// RFC 6455 §5.1: a server MUST close on an unmasked client frame.
    pub require_mask: bool,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self { max_frame: 64 * 1024, max_message: 64 * 1024, require_mask: true }
    }
}

struct Partial {
    opcode: u8,
    compressed: bool,
    data: Vec<u8>,
    /// Prefix of `data` already known to be valid UTF-8 (text, uncompressed only).
    utf8_ok: usize,
}

/// Incremental frame decoder and message assembler for one connection.
pub struct Decoder {
    cfg: DecoderConfig,
    partial: Option<Partial>,
    inflater: Option<Inflater>,
    closed: bool,
}

/// Parsed fixed part of a frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: usize,
    header_len: usize,
}

fn parse_header(buf: &[u8], max_frame: usize) -> Result<Option<Header>, ProtoError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let fin = b0 & 0x80 != 0;
    let rsv1 = b0 & 0x40 != 0;
    if b0 & 0x30 != 0 {
        return Err(ProtoError::new(1002, "reserved bits set"));
    }
    let opcode = b0 & 0x0F;
    let masked = b1 & 0x80 != 0;
    let len7 = (b1 & 0x7F) as usize;
    let (len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let l = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if l >> 63 != 0 {
                return Err(ProtoError::new(1002, "payload length has the top bit set"));
            }
            (usize::try_from(l).unwrap_or(usize::MAX), 10)
        }
        l => (l, 2),
    };
    if opcode >= 0x8 {
        if !fin {
            return Err(ProtoError::new(1002, "fragmented control frame"));
        }
        if len > 125 {
            return Err(ProtoError::new(1002, "control frame payload over 125 bytes"));
        }
    }
    if len > max_frame {
        return Err(ProtoError::new(1009, "frame too large"));
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header { fin, rsv1, opcode, mask, len, header_len: pos }))
}

/// XOR-unmask in place; `offset` is the position of `data[0]` within the payload.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let m32 = u32::from_ne_bytes(mask);
    let m64 = (u64::from(m32) << 32) | u64::from(m32);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes")) ^ m64;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// Validate as much of `data[from..]` as is complete; returns the new valid prefix length.
/// An incomplete code point at the end is fine unless `fin`.
fn check_utf8(data: &[u8], from: usize, fin: bool) -> Result<usize, ProtoError> {
    match std::str::from_utf8(&data[from..]) {
        Ok(_) => Ok(data.len()),
        Err(e) if e.error_len().is_none() && !fin => Ok(from + e.valid_up_to()),
        Err(_) => Err(ProtoError::new(1007, "invalid UTF-8 in text message")),
    }
}

impl Decoder {
    pub fn new(cfg: DecoderConfig, inflater: Option<Inflater>) -> Self {
        Self { cfg, partial: None, inflater, closed: false }
    }

    /// True once a close frame has been decoded; later bytes are ignored.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Decode every complete frame in `buf` (unmasking in place), pushing events to `out`.
    /// Returns how many bytes were consumed; the rest is an incomplete frame to be
    /// offered again with more bytes appended.
    pub fn decode(&mut self, buf: &mut [u8], out: &mut Vec<Event>) -> Result<usize, ProtoError> {
        let mut pos = 0;
        while !self.closed {
            let Some(h) = parse_header(&buf[pos..], self.cfg.max_frame)? else { break };
            let total = h.header_len + h.len;
            if buf.len() - pos < total {
                break;
            }
            let payload = &mut buf[pos + h.header_len..pos + total];
            match h.mask {
                Some(m) => apply_mask(payload, m),
                None if self.cfg.require_mask => {
                    return Err(ProtoError::new(1002, "client frame not masked"))
                }
                None => {}
            }
            self.frame(h, payload, out)?;
            pos += total;
        }
        Ok(pos)
    }

    fn frame(&mut self, h: Header, payload: &[u8], out: &mut Vec<Event>) -> Result<(), ProtoError> {
        match h.opcode {
            OP_TEXT | OP_BINARY => {
                if self.partial.is_some() {
                    return Err(ProtoError::new(1002, "new data frame inside a fragmented message"));
                }
                if h.rsv1 && self.inflater.is_none() {
                    return Err(ProtoError::new(1002, "RSV1 set without permessage-deflate"));
                }
                if payload.len() > self.cfg.max_message {
                    return Err(ProtoError::new(1009, "message too large"));
                }
                if h.fin && !h.rsv1 {
                    if h.opcode == OP_TEXT {
                        check_utf8(payload, 0, true)?;
                        out.push(Event::Text(payload.to_vec()));
                    } else {
                        out.push(Event::Binary(payload.to_vec()));
                    }
                    return Ok(());
                }
                let mut p = Partial {
                    opcode: h.opcode,
                    compressed: h.rsv1,
                    data: Vec::with_capacity(payload.len().max(256)),
                    utf8_ok: 0,
                };
                p.data.extend_from_slice(payload);
                self.partial = Some(p);
                self.continue_message(h.fin, out)
            }
            OP_CONT => {
                if h.rsv1 {
                    return Err(ProtoError::new(1002, "RSV1 set on a continuation frame"));
                }
                let Some(p) = self.partial.as_mut() else {
                    return Err(ProtoError::new(1002, "continuation frame without a message"));
                };
                if p.data.len() + payload.len() > self.cfg.max_message {
                    return Err(ProtoError::new(1009, "message too large"));
                }
                p.data.extend_from_slice(payload);
                self.continue_message(h.fin, out)
            }
            OP_PING | OP_PONG | OP_CLOSE if h.rsv1 => {
                Err(ProtoError::new(1002, "RSV1 set on a control frame"))
            }
            OP_PING => {
                out.push(Event::Ping(payload.to_vec()));
                Ok(())
            }
            OP_PONG => {
                out.push(Event::Pong(payload.to_vec()));
                Ok(())
            }
            OP_CLOSE => {
                self.closed = true;
                match payload.len() {
                    0 => out.push(Event::Close(None, String::new())),
                    1 => return Err(ProtoError::new(1002, "close frame with a 1-byte payload")),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !valid_close_code(code) {
                            return Err(ProtoError::new(1002, "invalid close code"));
                        }
                        let reason = std::str::from_utf8(&payload[2..])
                            .map_err(|_| ProtoError::new(1007, "invalid UTF-8 in close reason"))?;
                        out.push(Event::Close(Some(code), reason.to_owned()));
                    }
                }
                Ok(())
            }
            _ => Err(ProtoError::new(1002, "unknown opcode")),
        }
    }

    /// After appending a fragment: validate incrementally and emit the message on FIN.
    fn continue_message(&mut self, fin: bool, out: &mut Vec<Event>) -> Result<(), ProtoError> {
        let p = self.partial.as_mut().expect("partial message");
        if p.opcode == OP_TEXT && !p.compressed {
            // Fail fast on invalid UTF-8, even before the message is complete.
            p.utf8_ok = check_utf8(&p.data, p.utf8_ok, fin)?;
        }
        if !fin {
            return Ok(());
        }
        let p = self.partial.take().expect("partial message");
        let data = if p.compressed {
            let inflater = self.inflater.as_mut().expect("checked at first frame");
            let data = inflater.inflate(&p.data, self.cfg.max_message)?;
            if p.opcode == OP_TEXT {
                check_utf8(&data, 0, true)?;
            }
            data
        } else {
            p.data
        };
        out.push(if p.opcode == OP_TEXT { Event::Text(data) } else { Event::Binary(data) });
        Ok(())
    }
}

/// Length of the header of an unmasked server frame carrying `len` payload bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Append the header of an unmasked server frame to `out`.
pub fn write_header(out: &mut Vec<u8>, opcode: u8, rsv1: bool, len: usize) {
    let b0 = 0x80 | if rsv1 { 0x40 } else { 0 } | opcode;
    match len {
        0..=125 => out.extend_from_slice(&[b0, len as u8]),
        126..=65535 => {
            out.extend_from_slice(&[b0, 126]);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.extend_from_slice(&[b0, 127]);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

/// Encode one complete unmasked server frame.
pub fn encode(opcode: u8, rsv1: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(header_len(payload.len()) + payload.len());
    write_header(&mut out, opcode, rsv1, payload.len());
    out.extend_from_slice(payload);
    out
}

/// Encode a close frame. The reason is cut to 123 bytes on a character boundary.
pub fn encode_close(code: CloseCode, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(OP_CLOSE, false, &payload)
}

/// Encode a masked client frame (used by tests and benches to play the client).
pub fn encode_client(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(14 + payload.len());
    let b0 = if fin { 0x80 } else { 0 } | opcode;
    match payload.len() {
        l @ 0..=125 => out.extend_from_slice(&[b0, 0x80 | l as u8]),
        l @ 126..=65535 => {
            out.extend_from_slice(&[b0, 0x80 | 126]);
            out.extend_from_slice(&(l as u16).to_be_bytes());
        }
        l => {
            out.extend_from_slice(&[b0, 0x80 | 127]);
            out.extend_from_slice(&(l as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn dec() -> Decoder {
        Decoder::new(DecoderConfig::default(), None)
    }

    fn run(d: &mut Decoder, bytes: &[u8]) -> Result<(usize, Vec<Event>), ProtoError> {
        let mut buf = bytes.to_vec();
        let mut out = Vec::new();
        let n = d.decode(&mut buf, &mut out)?;
        Ok((n, out))
    }

    #[test]
    fn rfc_example_masked_hello() {
        // RFC 6455 §5.7: a single-frame masked text message "Hello".
        let bytes = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let (n, ev) = run(&mut dec(), &bytes).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(ev, vec![Event::Text(b"Hello".to_vec())]);
    }

    #[test]
    fn unmasked_client_frame_is_1002() {
        let bytes = [0x81, 0x05, b'H', b'e', b'l', b'l', b'o'];
        assert_eq!(run(&mut dec(), &bytes).unwrap_err().code, 1002);
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let f = encode_client(OP_TEXT, true, b"hello world", M);
        let mut d = dec();
        for cut in 0..f.len() {
            let (n, ev) = run(&mut d, &f[..cut]).unwrap();
            assert_eq!((n, ev.len()), (0, 0), "cut at {cut}");
        }
        let (n, ev) = run(&mut d, &f).unwrap();
        assert_eq!(n, f.len());
        assert_eq!(ev, vec![Event::Text(b"hello world".to_vec())]);
    }

    #[test]
    fn fragments_with_interleaved_ping() {
        let mut bytes = encode_client(OP_TEXT, false, b"Hel", M);
        bytes.extend(encode_client(OP_PING, true, b"p", M));
        bytes.extend(encode_client(OP_CONT, false, b"lo ", M));
        bytes.extend(encode_client(OP_CONT, true, b"there", M));
        let (n, ev) = run(&mut dec(), &bytes).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(ev, vec![Event::Ping(b"p".to_vec()), Event::Text(b"Hello there".to_vec())]);
    }

    #[test]
    fn lengths_16_and_64_bit() {
        for len in [125usize, 126, 65535, 65536, 100_000] {
            let payload = vec![b'a'; len];
            let mut d = Decoder::new(
                DecoderConfig { max_frame: 1 << 20, max_message: 1 << 20, require_mask: true },
                None,
            );
            let (_, ev) = run(&mut d, &encode_client(OP_BINARY, true, &payload, M)).unwrap();
            assert_eq!(ev, vec![Event::Binary(payload)]);
            let enc = encode(OP_BINARY, false, &vec![0; len]);
            assert_eq!(enc.len(), header_len(len) + len);
        }
    }

    #[test]
    fn oversized_frame_and_message_are_1009() {
        let big = vec![b'a'; 64 * 1024 + 1];
        assert_eq!(run(&mut dec(), &encode_client(OP_TEXT, true, &big, M)).unwrap_err().code, 1009);
        // Two fragments, each under the frame cap, together over the message cap.
        let half = vec![b'a'; 40 * 1024];
        let mut bytes = encode_client(OP_TEXT, false, &half, M);
        bytes.extend(encode_client(OP_CONT, true, &half, M));
        assert_eq!(run(&mut dec(), &bytes).unwrap_err().code, 1009);
    }

    #[test]
    fn invalid_utf8_is_1007_and_fails_fast() {
        let bad = [0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80];
        assert_eq!(run(&mut dec(), &encode_client(OP_TEXT, true, &bad, M)).unwrap_err().code, 1007);
        // Fail fast: the first fragment already holds an invalid sequence.
        let bytes = encode_client(OP_TEXT, false, &[0xff, b'a'], M);
        assert_eq!(run(&mut dec(), &bytes).unwrap_err().code, 1007);
        // A code point split across fragments is fine.
        let mut bytes = encode_client(OP_TEXT, false, &[b'a', 0xe2, 0x82], M);
        bytes.extend(encode_client(OP_CONT, true, &[0xac], M));
        let (_, ev) = run(&mut dec(), &bytes).unwrap();
        assert_eq!(ev, vec![Event::Text("a€".as_bytes().to_vec())]);
    }

    #[test]
    fn control_frame_rules() {
        let long = vec![0u8; 126];
        assert_eq!(run(&mut dec(), &encode_client(OP_PING, true, &long, M)).unwrap_err().code, 1002);
        assert_eq!(run(&mut dec(), &encode_client(OP_PING, false, b"", M)).unwrap_err().code, 1002);
        assert_eq!(run(&mut dec(), &encode_client(0x3, true, b"", M)).unwrap_err().code, 1002);
        assert_eq!(run(&mut dec(), &encode_client(OP_CONT, true, b"x", M)).unwrap_err().code, 1002);
        let mut rsv = encode_client(OP_TEXT, true, b"x", M);
        rsv[0] |= 0x20;
        assert_eq!(run(&mut dec(), &rsv).unwrap_err().code, 1002);
        let mut rsv1 = encode_client(OP_TEXT, true, b"x", M);
        rsv1[0] |= 0x40;
        assert_eq!(run(&mut dec(), &rsv1).unwrap_err().code, 1002, "RSV1 without deflate");
    }

    #[test]
    fn close_frames() {
        let (_, ev) = run(&mut dec(), &encode_client(OP_CLOSE, true, b"", M)).unwrap();
        assert_eq!(ev, vec![Event::Close(None, String::new())]);
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        let (_, ev) = run(&mut dec(), &encode_client(OP_CLOSE, true, &p, M)).unwrap();
        assert_eq!(ev, vec![Event::Close(Some(1000), "bye".into())]);
        for bad in [999u16, 1004, 1005, 1006, 1015, 2000, 5000] {
            let p = bad.to_be_bytes();
            assert_eq!(run(&mut dec(), &encode_client(OP_CLOSE, true, &p, M)).unwrap_err().code, 1002);
        }
        assert_eq!(run(&mut dec(), &encode_client(OP_CLOSE, true, &[3], M)).unwrap_err().code, 1002);
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.push(0xff);
        assert_eq!(run(&mut dec(), &encode_client(OP_CLOSE, true, &p, M)).unwrap_err().code, 1007);
    }

    #[test]
    fn bytes_after_close_are_ignored() {
        let mut bytes = encode_client(OP_CLOSE, true, b"", M);
        let close_len = bytes.len();
        bytes.extend(encode_client(OP_TEXT, true, b"late", M));
        let mut d = dec();
        let (n, ev) = run(&mut d, &bytes).unwrap();
        assert_eq!(n, close_len);
        assert_eq!(ev.len(), 1);
        assert!(d.is_closed());
    }

    #[test]
    fn close_reason_is_cut_to_123_bytes_on_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes
        let f = encode_close(4003, &reason);
        let len = (f[1] & 0x7f) as usize;
        assert!(len <= 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }
}
