//! RFC 6455 framing, sans-I/O: bytes in, events out; payloads in, frame bytes out.
//!
//! [`Decoder`] turns client bytes into [`Event`]s and enforces every rule a server must
//! (masking, control-frame limits, reserved bits, fragmentation order, UTF-8, sizes).
//! [`encode`] builds the unmasked server frames.

use super::close;
use super::deflate::Inflater;

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

/// What an event costs against a decode budget besides its payload.
pub const EVENT_COST: usize = 64;

impl Event {
    /// Payload bytes plus [`EVENT_COST`].
    pub fn cost(&self) -> usize {
        EVENT_COST
            + match self {
                Event::Text(d) | Event::Binary(d) | Event::Ping(d) | Event::Pong(d) => d.len(),
                Event::Close(_, r) => r.len(),
            }
    }
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
}

/// Incremental frame decoder and message assembler for one connection.
pub struct Decoder {
    cfg: DecoderConfig,
    partial: Option<Partial>,
    inflater: Option<Inflater>,
    closed: bool,
    /// UTF-8 state of the uncompressed text message in progress.
    utf8: Utf8Stream,
    /// Payload bytes of the (incomplete) frame at the head of the input already fed to
    /// `utf8`, so invalid text fails fast, before the frame is complete (RFC 6455 §8.1).
    frame_fed: usize,
}

const BAD_UTF8: ProtoError = ProtoError::new(close::INVALID_PAYLOAD, "invalid UTF-8 in text message");

/// Incremental UTF-8 validation of one message fed in arbitrary pieces: an error is
/// reported at the first byte that cannot start or continue a valid sequence.
#[derive(Debug, Default, Clone, Copy)]
struct Utf8Stream {
    /// The start of a code point cut at the end of the last piece.
    carry: [u8; 4],
    len: u8,
}

impl Utf8Stream {
    fn feed(&mut self, mut data: &[u8]) -> Result<(), ProtoError> {
        if self.len > 0 {
            let have = self.len as usize;
            let width = match self.carry[0] {
                0xC2..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4, // 0xF0..=0xF4: other lead bytes are never carried
            };
            let take = (width - have).min(data.len());
            let mut seq = self.carry;
            seq[have..have + take].copy_from_slice(&data[..take]);
            match std::str::from_utf8(&seq[..have + take]) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still incomplete: `data` was used up.
                    self.carry = seq;
                    self.len = (have + take) as u8;
                    return Ok(());
                }
                Err(_) => return Err(BAD_UTF8),
            }
            data = &data[take..];
        }
        match std::str::from_utf8(data) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &data[e.valid_up_to()..];
                self.carry[..rest.len()].copy_from_slice(rest);
                self.len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(BAD_UTF8),
        }
    }

    /// At the end of the message: a cut code point is invalid.
    fn finish(&mut self) -> Result<(), ProtoError> {
        let complete = self.len == 0;
        *self = Self::default();
        if complete {
            Ok(())
        } else {
            Err(BAD_UTF8)
        }
    }
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
        return Err(ProtoError::new(close::PROTOCOL_ERROR, "reserved bits set"));
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
                return Err(ProtoError::new(close::PROTOCOL_ERROR, "payload length has the top bit set"));
            }
            (usize::try_from(l).unwrap_or(usize::MAX), 10)
        }
        l => (l, 2),
    };
    if opcode >= 0x8 {
        if !fin {
            return Err(ProtoError::new(close::PROTOCOL_ERROR, "fragmented control frame"));
        }
        if len > 125 {
            return Err(ProtoError::new(close::PROTOCOL_ERROR, "control frame payload over 125 bytes"));
        }
    }
    if len > max_frame {
        return Err(ProtoError::new(close::TOO_BIG, "frame too large"));
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

impl Decoder {
    pub fn new(cfg: DecoderConfig, inflater: Option<Inflater>) -> Self {
        Self { cfg, partial: None, inflater, closed: false, utf8: Utf8Stream::default(), frame_fed: 0 }
    }

    /// True once a close frame has been decoded; later bytes are ignored.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Decode every complete frame in `buf` (unmasking in place), pushing events to `out`.
    /// Returns how many bytes were consumed; the rest is an incomplete frame to be
    /// offered again with more bytes appended.
    pub fn decode(&mut self, buf: &mut [u8], out: &mut Vec<Event>) -> Result<usize, ProtoError> {
        let mut unlimited = usize::MAX;
        self.decode_some(buf, out, &mut unlimited).map(|(n, _)| n)
    }

    /// Like [`Self::decode`], but stops once the events produced used up `budget` (bytes
    /// of payload plus [`EVENT_COST`] per event): then the bool is true and `buf` may
    /// hold more complete frames, to be offered again later. This bounds what one read
    /// turns into: 64 KiB of compressed input can inflate to gigabytes.
    pub fn decode_some(
        &mut self,
        buf: &mut [u8],
        out: &mut Vec<Event>,
        budget: &mut usize,
    ) -> Result<(usize, bool), ProtoError> {
        let mut pos = 0;
        while !self.closed {
            let Some(h) = parse_header(&buf[pos..], self.cfg.max_frame)? else { break };
            // Everything the header alone decides fails now, before the payload arrives.
            self.check_header(&h)?;
            let start = pos + h.header_len;
            let plain_text = self.is_plain_text(&h);
            if buf.len() < start + h.len {
                // Incomplete frame: validate the text that already arrived (fail fast),
                // without unmasking in place: these bytes are offered again later.
                if plain_text {
                    self.feed_masked(&h, &buf[start..])?;
                }
                break;
            }
            let payload = &mut buf[start..start + h.len];
            if let Some(m) = h.mask {
                apply_mask(payload, m);
            }
            if plain_text {
                if h.opcode == OP_TEXT && self.frame_fed == 0 {
                    self.utf8 = Utf8Stream::default();
                }
                self.utf8.feed(&payload[self.frame_fed..])?;
            }
            self.frame_fed = 0;
            let before = out.len();
            self.frame(h, payload, out)?;
            pos = start + h.len;
            if out.len() > before {
                let cost: usize = out[before..].iter().map(Event::cost).sum();
                *budget = budget.saturating_sub(cost);
                if *budget == 0 {
                    return Ok((pos, true));
                }
            }
        }
        Ok((pos, false))
    }

    /// The rules a frame header alone decides (RFC 6455 §5.2, §5.4, §5.5; RFC 7692 §6).
    fn check_header(&self, h: &Header) -> Result<(), ProtoError> {
        if h.mask.is_none() && self.cfg.require_mask {
            return Err(ProtoError::new(close::PROTOCOL_ERROR, "client frame not masked"));
        }
        match h.opcode {
            OP_TEXT | OP_BINARY => {
                if self.partial.is_some() {
                    return Err(ProtoError::new(close::PROTOCOL_ERROR, "new data frame inside a fragmented message"));
                }
                if h.rsv1 && self.inflater.is_none() {
                    return Err(ProtoError::new(close::PROTOCOL_ERROR, "RSV1 set without permessage-deflate"));
                }
                if h.len > self.cfg.max_message {
                    return Err(ProtoError::new(close::TOO_BIG, "message too large"));
                }
            }
            OP_CONT => {
                if h.rsv1 {
                    return Err(ProtoError::new(close::PROTOCOL_ERROR, "RSV1 set on a continuation frame"));
                }
                let Some(p) = self.partial.as_ref() else {
                    return Err(ProtoError::new(close::PROTOCOL_ERROR, "continuation frame without a message"));
                };
                if p.data.len() + h.len > self.cfg.max_message {
                    return Err(ProtoError::new(close::TOO_BIG, "message too large"));
                }
            }
            OP_PING | OP_PONG | OP_CLOSE if h.rsv1 => {
                return Err(ProtoError::new(close::PROTOCOL_ERROR, "RSV1 set on a control frame"));
            }
            OP_PING | OP_PONG | OP_CLOSE => {}
            _ => return Err(ProtoError::new(close::PROTOCOL_ERROR, "unknown opcode")),
        }
        Ok(())
    }

    /// True when the payload of `h` is part of an uncompressed text message (validated
    /// as UTF-8 while it arrives). Only called after [`Self::check_header`] passed.
    fn is_plain_text(&self, h: &Header) -> bool {
        match h.opcode {
            OP_TEXT => !h.rsv1,
            OP_CONT => self.partial.as_ref().is_some_and(|p| p.opcode == OP_TEXT && !p.compressed),
            _ => false,
        }
    }

    /// Validate the still-masked payload bytes `masked[frame_fed..]` of an incomplete text
    /// frame (`masked` is the part of the payload that has arrived).
    fn feed_masked(&mut self, h: &Header, masked: &[u8]) -> Result<(), ProtoError> {
        let avail = masked.len();
        if avail <= self.frame_fed {
            return Ok(());
        }
        if h.opcode == OP_TEXT && self.frame_fed == 0 {
            self.utf8 = Utf8Stream::default();
        }
        let mut chunk = [0u8; 512];
        let mut off = self.frame_fed;
        while off < avail {
            let n = (avail - off).min(chunk.len());
            let piece = &mut chunk[..n];
            piece.copy_from_slice(&masked[off..off + n]);
            if let Some(m) = h.mask {
                // Chunks start at multiples of 512 past `frame_fed`: rotate the key.
                let r = off & 3;
                apply_mask(piece, [m[r], m[(r + 1) & 3], m[(r + 2) & 3], m[(r + 3) & 3]]);
            }
            self.utf8.feed(piece)?;
            off += n;
        }
        self.frame_fed = avail;
        Ok(())
    }

    fn frame(&mut self, h: Header, payload: &[u8], out: &mut Vec<Event>) -> Result<(), ProtoError> {
        match h.opcode {
            OP_TEXT | OP_BINARY => {
                if h.fin && !h.rsv1 {
                    if h.opcode == OP_TEXT {
                        self.utf8.finish()?;
                        out.push(Event::Text(payload.to_vec()));
                    } else {
                        out.push(Event::Binary(payload.to_vec()));
                    }
                    return Ok(());
                }
                let mut p =
                    Partial { opcode: h.opcode, compressed: h.rsv1, data: Vec::with_capacity(payload.len().max(256)) };
                p.data.extend_from_slice(payload);
                self.partial = Some(p);
                self.continue_message(h.fin, out)
            }
            OP_CONT => {
                let p = self.partial.as_mut().expect("checked by check_header");
                p.data.extend_from_slice(payload);
                self.continue_message(h.fin, out)
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
                    1 => return Err(ProtoError::new(close::PROTOCOL_ERROR, "close frame with a 1-byte payload")),
                    _ => {
                        let code = u16::from_be_bytes([payload[0], payload[1]]);
                        if !close::peer_may_send(code) {
                            return Err(ProtoError::new(close::PROTOCOL_ERROR, "invalid close code"));
                        }
                        let reason = std::str::from_utf8(&payload[2..])
                            .map_err(|_| ProtoError::new(close::INVALID_PAYLOAD, "invalid UTF-8 in close reason"))?;
                        out.push(Event::Close(Some(code), reason.to_owned()));
                    }
                }
                Ok(())
            }
            _ => Err(ProtoError::new(close::PROTOCOL_ERROR, "unknown opcode")),
        }
    }

    /// After appending a fragment: validate incrementally and emit the message on FIN.
    fn continue_message(&mut self, fin: bool, out: &mut Vec<Event>) -> Result<(), ProtoError> {
        // Uncompressed text was validated as it arrived (see `decode`).
        if !fin {
            return Ok(());
        }
        let p = self.partial.take().expect("partial message");
        let data = if p.compressed {
            let inflater = self.inflater.as_mut().expect("checked at first frame");
            let data = inflater.inflate(&p.data, self.cfg.max_message)?;
            if p.opcode == OP_TEXT && std::str::from_utf8(&data).is_err() {
                return Err(BAD_UTF8);
            }
            data
        } else {
            if p.opcode == OP_TEXT {
                self.utf8.finish()?;
            }
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
            let mut d =
                Decoder::new(DecoderConfig { max_frame: 1 << 20, max_message: 1 << 20, require_mask: true }, None);
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

    /// Feed `bytes` in pieces of `chop` bytes the way the server does (an incomplete frame
    /// is offered again with more bytes appended). Returns the events or the first error.
    fn run_chopped(d: &mut Decoder, bytes: &[u8], chop: usize) -> Result<Vec<Event>, ProtoError> {
        let mut pending = Vec::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(chop.max(1)) {
            pending.extend_from_slice(piece);
            let n = d.decode(&mut pending, &mut out)?;
            pending.drain(..n);
        }
        Ok(out)
    }

    #[test]
    fn invalid_utf8_fails_fast_inside_an_incomplete_frame() {
        // Autobahn 6.4.3: one text frame whose payload arrives in three chops; the second
        // chop holds a code point above U+10FFFF and must fail before the frame is complete.
        let part1 = [0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5];
        let part2 = [0xf4, 0x90, 0x80, 0x80];
        let part3 = b"edited";
        let payload = [&part1[..], &part2[..], &part3[..]].concat();
        let f = encode_client(OP_TEXT, true, &payload, M);
        let head = f.len() - payload.len();
        let mut d = dec();
        let mut buf = f[..head + part1.len()].to_vec();
        let mut out = Vec::new();
        assert_eq!(d.decode(&mut buf, &mut out), Ok(0), "first chop is valid so far");
        assert_eq!(buf, f[..head + part1.len()], "incomplete frame is left masked");
        let mut buf = f[..head + part1.len() + part2.len()].to_vec();
        assert_eq!(d.decode(&mut buf, &mut out).unwrap_err().code, 1007);
        // Autobahn 6.4.4: byte by byte, the error is seen at the 0x90 after 0xf4.
        let mut d = dec();
        let mut buf = Vec::new();
        for (i, b) in f.iter().enumerate() {
            buf.push(*b);
            let r = d.decode(&mut buf.clone(), &mut out);
            if i < head + part1.len() + 1 {
                assert_eq!(r, Ok(0), "byte {i}");
            } else {
                assert_eq!(r.unwrap_err().code, 1007, "byte {i}");
                break;
            }
        }
        // Same in a continuation frame of a fragmented message.
        let mut bytes = encode_client(OP_TEXT, false, &part1, M);
        bytes.extend(encode_client(OP_CONT, true, &[&part2[..], &part3[..]].concat(), M));
        let cut = bytes.len() - part3.len() - 1;
        assert_eq!(run(&mut dec(), &bytes[..cut]).unwrap_err().code, 1007);
    }

    #[test]
    fn utf8_validation_agrees_with_std_for_every_split() {
        let samples: &[&[u8]] = &[
            "κόσμε".as_bytes(),
            "a€b𝄞c\u{10FFFF}".as_bytes(),
            "\u{7ff}\u{800}\u{ffff}\u{10000}".as_bytes(),
            &[0xed, 0x9f, 0xbf, b'x'], // U+D7FF: valid
            &[0xed, 0xa0, 0x80],       // surrogate
            &[0xc0, 0xaf],             // overlong '/'
            &[0xe0, 0x80, 0xaf],       // overlong
            &[0xf0, 0x8f, 0xbf, 0xbf], // overlong
            &[0xf4, 0x90, 0x80, 0x80], // above U+10FFFF
            &[0xf5, 0x80, 0x80, 0x80], // invalid lead
            &[b'a', 0x80],             // lone continuation
            &[b'a', 0xe2, 0x82],       // truncated at the end
            &[0xf0, 0x9d, 0x84],       // truncated 4-byte
            &[0xe2, 0x82, b'a', 0xac], // interrupted sequence
        ];
        for &msg in samples {
            let valid = std::str::from_utf8(msg).is_ok();
            for split in 0..=msg.len() {
                // Two fragments split at `split`, each fed in chops of 1..=3 bytes.
                let mut bytes = encode_client(OP_TEXT, false, &msg[..split], M);
                bytes.extend(encode_client(OP_CONT, true, &msg[split..], M));
                for chop in [1usize, 2, 3, 7, bytes.len()] {
                    let r = run_chopped(&mut dec(), &bytes, chop);
                    match r {
                        Ok(ev) => {
                            assert!(valid, "{msg:02x?} split {split} chop {chop} accepted");
                            assert_eq!(ev, vec![Event::Text(msg.to_vec())]);
                        }
                        Err(e) => {
                            assert!(!valid, "{msg:02x?} split {split} chop {chop}: {e:?}");
                            assert_eq!(e.code, 1007);
                        }
                    }
                }
            }
            let single = encode_client(OP_TEXT, true, msg, M);
            for chop in [1usize, 4, single.len()] {
                assert_eq!(run_chopped(&mut dec(), &single, chop).is_ok(), valid, "{msg:02x?} chop {chop}");
            }
        }
    }

    #[test]
    fn large_text_frame_in_many_reads_is_validated_once() {
        // A 1 MiB text frame arriving in 1000-byte reads (mask offsets not multiples of 4).
        let text = "añ€𝄞".repeat(1 << 16);
        let f = encode_client(OP_TEXT, true, text.as_bytes(), M);
        let mut d = Decoder::new(DecoderConfig { max_frame: 1 << 21, max_message: 1 << 21, require_mask: true }, None);
        let ev = run_chopped(&mut d, &f, 1000).unwrap();
        assert_eq!(ev, vec![Event::Text(text.into_bytes())]);
        // And the next message starts with a fresh UTF-8 state.
        assert_eq!(
            run_chopped(&mut d, &encode_client(OP_TEXT, true, b"ok", M), 1).unwrap(),
            vec![Event::Text(b"ok".to_vec())]
        );
    }

    #[test]
    fn header_rules_fail_before_the_payload_arrives() {
        // Unmasked, unknown opcode, RSV1 without deflate: decided by the header alone.
        let mut unmasked = encode(OP_TEXT, false, &[b'a'; 1000]);
        unmasked.truncate(10);
        assert_eq!(run(&mut dec(), &unmasked).unwrap_err().code, 1002);
        assert_eq!(run(&mut dec(), &encode_client(0x5, true, &[0; 200], M)[..10]).unwrap_err().code, 1002);
        let mut rsv1 = encode_client(OP_BINARY, true, &[0; 200], M);
        rsv1[0] |= 0x40;
        assert_eq!(run(&mut dec(), &rsv1[..10]).unwrap_err().code, 1002);
        // A continuation that would take the message over the cap: 1009 from its header.
        let mut bytes = encode_client(OP_BINARY, false, &vec![0; 40 * 1024], M);
        let cont = encode_client(OP_CONT, true, &vec![0; 40 * 1024], M);
        bytes.extend_from_slice(&cont[..8]);
        assert_eq!(run(&mut dec(), &bytes).unwrap_err().code, 1009);
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
}
