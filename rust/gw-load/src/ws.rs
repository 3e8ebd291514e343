//! Minimal client-side WebSocket (RFC 6455) support: the HTTP/1.1 upgrade,
//! masked frame encoding and an incremental parser for the (unmasked) frames
//! a server sends.
//!
//! The parser is built for throughput: complete frames are handed out as
//! slices of the caller's read buffer (no copy). Bytes are only copied into a
//! per-connection buffer when a frame is split across reads, or when a
//! message is fragmented into several frames, and that memory is released as
//! soon as the frame/message is complete, so idle connections own no buffers.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

/// Opcodes (RFC 6455 §5.2).
pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Largest frame or reassembled message accepted from the server.
pub const MAX_MESSAGE: usize = 64 << 20;

/// GUID appended to the key for `Sec-WebSocket-Accept` (RFC 6455 §1.3).
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A protocol violation by the server; the connection is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// RSV bits set (we negotiate no extensions).
    Reserved,
    /// Server frames must not be masked.
    Masked,
    /// Unknown opcode.
    BadOpcode,
    /// Control frame fragmented or longer than 125 bytes.
    BadControl,
    /// Continuation without a started message, or a new data frame while a
    /// fragmented message is still open.
    BadContinuation,
    /// Frame or message larger than [`MAX_MESSAGE`].
    TooBig,
}

/// A complete message (or control frame) delivered by [`FrameReader::feed`].
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// Close frame: status code (None when the payload is empty) and reason.
    Close(Option<u16>, &'a [u8]),
}

/// Decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    /// Bytes taken by the header itself (2, 4 or 10; servers never mask).
    pub header_len: usize,
    pub payload_len: usize,
}

impl Header {
    /// Total frame length (header + payload).
    #[inline]
    pub fn frame_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Parses a frame header from the start of `buf`.
/// Returns `Ok(None)` when more bytes are needed to decode the header.
#[inline]
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, ProtoError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(ProtoError::Reserved);
    }
    if b1 & 0x80 != 0 {
        return Err(ProtoError::Masked);
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0F;
    let (header_len, payload_len) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (4, u16::from_be_bytes([buf[2], buf[3]]) as u64)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (10, u64::from_be_bytes(b))
        }
        n => (2, n as u64),
    };
    match opcode {
        OP_CONT | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin || payload_len > 125 {
                return Err(ProtoError::BadControl);
            }
        }
        _ => return Err(ProtoError::BadOpcode),
    }
    if payload_len > MAX_MESSAGE as u64 {
        return Err(ProtoError::TooBig);
    }
    Ok(Some(Header { fin, opcode, header_len, payload_len: payload_len as usize }))
}

/// Incremental frame parser with message reassembly.
///
/// Two `Vec`s (empty, unallocated while idle): `partial` holds the bytes of a
/// frame split across reads, `frag` the payload of a fragmented message.
#[derive(Default)]
pub struct FrameReader {
    partial: Vec<u8>,
    frag: Vec<u8>,
    /// Opcode of the fragmented message in `frag` (0 = none open).
    frag_op: u8,
}

/// What a message handler tells the reader to do next.
pub enum Flow {
    Continue,
    /// Stop parsing (the connection is being closed); the rest is discarded.
    Stop,
}

impl FrameReader {
    #[cfg(test)]
    /// True while the reader buffers a partial frame or fragmented message.
    pub fn is_buffering(&self) -> bool {
        !self.partial.is_empty() || self.frag_op != 0
    }

    #[cfg(test)]
    /// Bytes currently held by the reader's buffers (capacity).
    pub fn buffered_capacity(&self) -> usize {
        self.partial.capacity() + self.frag.capacity()
    }

    /// Feeds freshly read bytes; calls `on_msg` for every complete message
    /// and control frame, in order. Returns `Ok(true)` if the handler asked to
    /// stop.
    pub fn feed<F>(&mut self, mut data: &[u8], mut on_msg: F) -> Result<bool, ProtoError>
    where
        F: FnMut(Message<'_>) -> Flow,
    {
        // 1. Complete a frame left over from the previous read, copying only
        //    the bytes that belong to that frame.
        if !self.partial.is_empty() {
            // Make sure the header is decodable (at most 10 header bytes).
            let hdr = loop {
                if let Some(h) = parse_header(&self.partial)? {
                    break h;
                }
                if data.is_empty() {
                    return Ok(false);
                }
                self.partial.push(data[0]);
                data = &data[1..];
            };
            let need = hdr.frame_len() - self.partial.len();
            let take = need.min(data.len());
            self.partial.extend_from_slice(&data[..take]);
            data = &data[take..];
            if take < need {
                return Ok(false);
            }
            // The frame is complete: dispatch it, then release the buffer.
            let partial = std::mem::take(&mut self.partial);
            let flow = self.dispatch(&hdr, &partial[hdr.header_len..], &mut on_msg)?;
            if let Flow::Stop = flow {
                return Ok(true);
            }
        }
        // 2. Parse complete frames straight out of the caller's buffer.
        loop {
            let hdr = match parse_header(data)? {
                Some(h) if h.frame_len() <= data.len() => h,
                _ => {
                    // Incomplete header or payload: keep the tail for later.
                    if !data.is_empty() {
                        self.partial.extend_from_slice(data);
                    }
                    return Ok(false);
                }
            };
            let payload = &data[hdr.header_len..hdr.frame_len()];
            if let Flow::Stop = self.dispatch(&hdr, payload, &mut on_msg)? {
                return Ok(true);
            }
            data = &data[hdr.frame_len()..];
        }
    }

    /// Handles one complete frame: control frames and unfragmented data
    /// frames go straight to the handler; fragments are reassembled.
    #[inline]
    fn dispatch<F>(&mut self, hdr: &Header, payload: &[u8], on_msg: &mut F) -> Result<Flow, ProtoError>
    where
        F: FnMut(Message<'_>) -> Flow,
    {
        match hdr.opcode {
            OP_TEXT | OP_BINARY => {
                if self.frag_op != 0 {
                    return Err(ProtoError::BadContinuation);
                }
                if hdr.fin {
                    Ok(on_msg(if hdr.opcode == OP_TEXT { Message::Text(payload) } else { Message::Binary(payload) }))
                } else {
                    self.frag_op = hdr.opcode;
                    self.frag.extend_from_slice(payload);
                    Ok(Flow::Continue)
                }
            }
            OP_CONT => {
                if self.frag_op == 0 {
                    return Err(ProtoError::BadContinuation);
                }
                if self.frag.len() + payload.len() > MAX_MESSAGE {
                    return Err(ProtoError::TooBig);
                }
                self.frag.extend_from_slice(payload);
                if !hdr.fin {
                    return Ok(Flow::Continue);
                }
                let op = std::mem::replace(&mut self.frag_op, 0);
                let msg = std::mem::take(&mut self.frag);
                Ok(on_msg(if op == OP_TEXT { Message::Text(&msg) } else { Message::Binary(&msg) }))
            }
            OP_PING => Ok(on_msg(Message::Ping(payload))),
            OP_PONG => Ok(on_msg(Message::Pong(payload))),
            OP_CLOSE => {
                let code = if payload.len() >= 2 { Some(u16::from_be_bytes([payload[0], payload[1]])) } else { None };
                let reason = if payload.len() > 2 { &payload[2..] } else { &[][..] };
                Ok(on_msg(Message::Close(code, reason)))
            }
            _ => Err(ProtoError::BadOpcode),
        }
    }
}

/// Appends one masked client frame (FIN set) to `out`.
/// `mask` must be unpredictable to intermediaries per the RFC; a fast PRNG is
/// plenty for a load generator talking to its own server.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | opcode);
    let n = payload.len();
    if n < 126 {
        out.push(0x80 | n as u8);
    } else if n <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// XORs `buf` with the 4-byte `mask` (RFC 6455 §5.3), 8 bytes at a time.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let m8 = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) ^ m8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Builds the HTTP/1.1 upgrade request. `path_and_query` starts with `/`.
pub fn upgrade_request(host: &str, path_and_query: &str, key: &str, subprotocol: &str) -> String {
    let mut req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if !subprotocol.is_empty() {
        req.push_str("Sec-WebSocket-Protocol: ");
        req.push_str(subprotocol);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    req
}

/// Base64 of 16 random bytes, for `Sec-WebSocket-Key`.
pub fn make_key(random: [u8; 16]) -> String {
    B64.encode(random)
}

/// The `Sec-WebSocket-Accept` value the server must answer for `key`.
pub fn accept_for(key: &str) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID.as_bytes());
    B64.encode(h.digest().bytes())
}

/// Why an upgrade response was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpgradeError {
    /// Status other than 101 (the code, 0 if the status line was unreadable).
    Status(u16),
    /// Missing or wrong `Sec-WebSocket-Accept`.
    BadAccept,
    /// Response header larger than we are willing to buffer.
    TooLong,
}

/// Looks for a complete HTTP response header in `buf`. Returns `Ok(None)`
/// when more bytes are needed, `Ok(Some(n))` with the header length (frames
/// start at `buf[n..]`) once a valid `101` response with the right accept
/// key has arrived.
pub fn check_upgrade_response(buf: &[u8], key: &str) -> Result<Option<usize>, UpgradeError> {
    let end = match memchr::memmem::find(buf, b"\r\n\r\n") {
        Some(p) => p + 4,
        None if buf.len() > 16 * 1024 => return Err(UpgradeError::TooLong),
        None => return Ok(None),
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or("");
    let status: u16 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    if !version.starts_with("HTTP/1.") || status != 101 {
        return Err(UpgradeError::Status(status));
    }
    let expected = accept_for(key);
    let accepted = lines.any(|l| {
        let mut kv = l.splitn(2, ':');
        let k = kv.next().unwrap_or("").trim();
        let v = kv.next().unwrap_or("").trim();
        k.eq_ignore_ascii_case("sec-websocket-accept") && v == expected
    });
    if !accepted {
        return Err(UpgradeError::BadAccept);
    }
    Ok(Some(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes an unmasked server frame.
    fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let n = payload.len();
        if n < 126 {
            v.push(n as u8);
        } else if n <= 0xFFFF {
            v.push(126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            v.push(127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[derive(Debug, PartialEq)]
    enum Owned {
        Text(Vec<u8>),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<u16>, Vec<u8>),
    }

    fn collect(reader: &mut FrameReader, chunks: &[&[u8]]) -> Vec<Owned> {
        let mut got = Vec::new();
        for c in chunks {
            reader
                .feed(c, |m| {
                    got.push(match m {
                        Message::Text(p) => Owned::Text(p.to_vec()),
                        Message::Binary(p) => Owned::Binary(p.to_vec()),
                        Message::Ping(p) => Owned::Ping(p.to_vec()),
                        Message::Pong(p) => Owned::Pong(p.to_vec()),
                        Message::Close(c, r) => Owned::Close(c, r.to_vec()),
                    });
                    Flow::Continue
                })
                .unwrap();
        }
        got
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut buf = server_frame(true, OP_TEXT, b"hello");
        buf.extend(server_frame(true, OP_PING, b"p"));
        buf.extend(server_frame(true, OP_BINARY, &[1, 2, 3]));
        let mut r = FrameReader::default();
        let got = collect(&mut r, &[&buf]);
        assert_eq!(got, vec![Owned::Text(b"hello".to_vec()), Owned::Ping(b"p".to_vec()), Owned::Binary(vec![1, 2, 3])]);
        assert!(!r.is_buffering());
        assert_eq!(r.buffered_capacity(), 0);
    }

    #[test]
    fn lengths_16_and_64_bit() {
        let p16 = vec![b'a'; 300];
        let p64 = vec![b'b'; 70_000];
        let f16 = server_frame(true, OP_TEXT, &p16);
        let f64_ = server_frame(true, OP_TEXT, &p64);
        assert_eq!(f16[1], 126);
        assert_eq!(f64_[1], 127);
        assert_eq!(parse_header(&f16).unwrap().unwrap().payload_len, 300);
        assert_eq!(parse_header(&f64_).unwrap().unwrap().header_len, 10);
        let mut all = f16.clone();
        all.extend_from_slice(&f64_);
        let mut r = FrameReader::default();
        assert_eq!(collect(&mut r, &[&all]), vec![Owned::Text(p16), Owned::Text(p64)]);
    }

    #[test]
    fn split_across_reads_at_every_offset() {
        // Frames with 7-, 16- and 64-bit lengths, split at every position
        // (including inside the extended-length header).
        let mut stream = server_frame(true, OP_TEXT, b"{\"op\":\"msg\"}");
        stream.extend(server_frame(true, OP_TEXT, &vec![b'x'; 1000]));
        stream.extend(server_frame(true, OP_TEXT, &vec![b'y'; 66_000]));
        stream.extend(server_frame(true, OP_CLOSE, &[0x03, 0xE8, b'b', b'y', b'e']));
        let expected = vec![
            Owned::Text(b"{\"op\":\"msg\"}".to_vec()),
            Owned::Text(vec![b'x'; 1000]),
            Owned::Text(vec![b'y'; 66_000]),
            Owned::Close(Some(1000), b"bye".to_vec()),
        ];
        for cut in (0..stream.len()).step_by(7).chain([1, 2, 3, 13, 14, 15, 16, 17, 1018, 1019, 1020]) {
            let mut r = FrameReader::default();
            let got = collect(&mut r, &[&stream[..cut], &stream[cut..]]);
            assert_eq!(got, expected, "cut at {cut}");
            assert!(!r.is_buffering());
        }
        // Byte-by-byte feeding.
        let mut r = FrameReader::default();
        let chunks: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(collect(&mut r, &chunks), expected);
    }

    #[test]
    fn fragmented_message_with_interleaved_ping() {
        let mut stream = server_frame(false, OP_TEXT, b"{\"op\":");
        stream.extend(server_frame(true, OP_PING, b"hb"));
        stream.extend(server_frame(false, OP_CONT, b"\"msg\",\"data\":"));
        stream.extend(server_frame(true, OP_CONT, b"{}}"));
        stream.extend(server_frame(true, OP_TEXT, b"next"));
        let expected = vec![
            Owned::Ping(b"hb".to_vec()),
            Owned::Text(b"{\"op\":\"msg\",\"data\":{}}".to_vec()),
            Owned::Text(b"next".to_vec()),
        ];
        let mut r = FrameReader::default();
        assert_eq!(collect(&mut r, &[&stream]), expected);
        assert_eq!(r.buffered_capacity(), 0, "fragment buffer released");
        // Same stream split inside the fragments.
        for cut in 1..stream.len() {
            let mut r = FrameReader::default();
            assert_eq!(collect(&mut r, &[&stream[..cut], &stream[cut..]]), expected, "cut at {cut}");
        }
    }

    #[test]
    fn protocol_errors() {
        let mut r = FrameReader::default();
        assert_eq!(r.feed(&server_frame(true, OP_CONT, b"x"), |_| Flow::Continue), Err(ProtoError::BadContinuation));
        let mut masked = server_frame(true, OP_TEXT, b"x");
        masked[1] |= 0x80;
        assert_eq!(parse_header(&masked), Err(ProtoError::Masked));
        assert_eq!(parse_header(&[0x83, 0]), Err(ProtoError::BadOpcode));
        assert_eq!(parse_header(&[0x09, 0]), Err(ProtoError::BadControl), "fragmented ping");
        assert_eq!(parse_header(&[0xC1, 0]), Err(ProtoError::Reserved));
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&(u64::MAX).to_be_bytes());
        assert_eq!(parse_header(&huge), Err(ProtoError::TooBig));
    }

    #[test]
    fn stop_discards_rest() {
        let mut stream = server_frame(true, OP_CLOSE, &[0x0F, 0xA0]);
        stream.extend(server_frame(true, OP_TEXT, b"after"));
        let mut r = FrameReader::default();
        let mut n = 0;
        let stopped = r
            .feed(&stream, |m| {
                n += 1;
                assert_eq!(m, Message::Close(Some(4000), b""));
                Flow::Stop
            })
            .unwrap();
        assert!(stopped);
        assert_eq!(n, 1);
    }

    #[test]
    fn encode_masks_and_roundtrips() {
        for len in [0usize, 5, 125, 126, 300, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut out = Vec::new();
            let mask = [0x11, 0x22, 0x33, 0x44];
            encode_frame(&mut out, OP_TEXT, &payload, mask);
            assert_eq!(out[0], 0x81);
            assert!(out[1] & 0x80 != 0, "client frames are masked");
            // Decode by hand: strip the mask bit, unmask the payload.
            let hl = match out[1] & 0x7F {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            let mut body = out[hl + 4..].to_vec();
            apply_mask(&mut body, mask);
            assert_eq!(body, payload, "len {len}");
            let mut unmasked = out[..hl].to_vec();
            unmasked[1] &= 0x7F;
            let h = parse_header(&unmasked).unwrap().unwrap();
            assert_eq!(h.payload_len, len);
        }
    }

    #[test]
    fn upgrade_response() {
        // RFC 6455 §1.3 example key/accept.
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        assert_eq!(accept_for(key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: gateway.v1\r\n\r\n\x81\x02hi";
        let n = check_upgrade_response(resp, key).unwrap().unwrap();
        assert_eq!(&resp[n..], b"\x81\x02hi");
        assert_eq!(check_upgrade_response(&resp[..40], key), Ok(None));
        assert_eq!(
            check_upgrade_response(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n", key),
            Err(UpgradeError::Status(401))
        );
        let bad = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: nope\r\n\r\n";
        assert_eq!(check_upgrade_response(bad, key), Err(UpgradeError::BadAccept));
    }
}
