//! Cheap scanning of server payloads without JSON parsing.
//!
//! Every room message envelope starts with `{"op":"msg"` (docs/protocol.md),
//! and a `batch` frame carries several of them in its `msgs` array, so the
//! number of room messages in a text frame is the number of occurrences of
//! that marker. Publishers put `"t":<unix micros>` inside `data`; the first
//! `"t":` after a marker (and before the next marker) is that timestamp.

use memchr::memmem::Finder;

/// Marker that starts every room message envelope.
pub const MSG_MARKER: &[u8] = br#"{"op":"msg""#;
/// Key of the publisher timestamp inside `data`.
pub const T_KEY: &[u8] = br#""t":"#;
/// Key of the sender's user id in a room message envelope.
pub const FROM_KEY: &[u8] = br#""from":""#;
/// Key of a request id in an `ack` or `error` frame.
pub const ID_KEY: &[u8] = br#""id":"#;

/// Pre-built substring searchers (built once per thread).
pub struct Scanner {
    msg: Finder<'static>,
    t: Finder<'static>,
    from: Finder<'static>,
    id: Finder<'static>,
}

impl Default for Scanner {
    fn default() -> Self {
        Scanner {
            msg: Finder::new(MSG_MARKER),
            t: Finder::new(T_KEY),
            from: Finder::new(FROM_KEY),
            id: Finder::new(ID_KEY),
        }
    }
}

impl Scanner {
    /// Number of room messages in a text payload (`msg` or `batch`).
    #[inline]
    pub fn count(&self, payload: &[u8]) -> u64 {
        self.msg.find_iter(payload).count() as u64
    }

    /// Counts the messages in `payload` and calls `on_t` with the publisher
    /// timestamp of every message selected by the sampler (`None` when a
    /// selected message carries no parsable `"t"`). `countdown` is the
    /// caller's sampling counter: a message is selected when it reaches 0,
    /// after which it is reset to `every` (so every `every`-th message is
    /// sampled across calls).
    #[inline]
    pub fn count_and_sample<F: FnMut(Option<u64>)>(
        &self,
        payload: &[u8],
        countdown: &mut u32,
        every: u32,
        mut on_t: F,
    ) -> u64 {
        let mut n = 0u64;
        let mut it = self.msg.find_iter(payload).peekable();
        while let Some(pos) = it.next() {
            n += 1;
            *countdown -= 1;
            if *countdown == 0 {
                *countdown = every;
                let end = it.peek().copied().unwrap_or(payload.len());
                on_t(self.find_t(&payload[pos + MSG_MARKER.len()..end]));
            }
        }
        n
    }

    /// Calls `f` with each room message of `payload` (the bytes after its
    /// marker, up to the next marker); returns their number.
    #[inline]
    pub fn each_message<F: FnMut(&Scanner, &[u8])>(&self, payload: &[u8], mut f: F) -> u64 {
        let mut n = 0u64;
        let mut it = self.msg.find_iter(payload).peekable();
        while let Some(pos) = it.next() {
            n += 1;
            let end = it.peek().copied().unwrap_or(payload.len());
            f(self, &payload[pos + MSG_MARKER.len()..end]);
        }
        n
    }

    /// The number in the sender id `"from":"<prefix><number>"` of a message,
    /// None when the sender is not of that form.
    #[inline]
    pub fn sender_number(&self, msg: &[u8], prefix: &[u8]) -> Option<u64> {
        let p = self.from.find(msg)? + FROM_KEY.len();
        let rest = msg[p..].strip_prefix(prefix)?;
        let end = memchr::memchr(b'"', rest)?;
        parse_uint(&rest[..end])
    }

    /// The request id of an `ack`/`error` frame (`"id":<integer>`).
    #[inline]
    pub fn request_id(&self, frame: &[u8]) -> Option<u64> {
        let p = self.id.find(frame)? + ID_KEY.len();
        parse_uint(&frame[p..])
    }

    /// First `"t":<integer>` in `s`, parsed (whitespace after the colon is
    /// allowed). Returns `None` if there is none or it is not an integer.
    #[inline]
    pub fn find_t(&self, s: &[u8]) -> Option<u64> {
        let p = self.t.find(s)? + T_KEY.len();
        parse_uint(&s[p..])
    }
}

/// Parses a leading unsigned decimal integer (skipping leading spaces).
#[inline]
pub fn parse_uint(s: &[u8]) -> Option<u64> {
    let mut i = 0;
    while i < s.len() && s[i] == b' ' {
        i += 1;
    }
    let start = i;
    // Up to 19 digits always fit in a u64, so the hot loop needs no overflow
    // checks (this runs once per sampled message).
    let end = s.len().min(start + 19);
    let mut v: u64 = 0;
    while i < end && s[i].is_ascii_digit() {
        v = v * 10 + (s[i] - b'0') as u64;
        i += 1;
    }
    if i == start || (i < s.len() && s[i].is_ascii_digit()) {
        None // no digits, or more than 19 (not a timestamp)
    } else {
        Some(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BATCH: &str = r#"{"op":"batch","room":"bench","msgs":[{"op":"msg","room":"bench","seq":1,"epoch":"e","type":"chat","prio":1,"from":"u1","data":{"t":1000,"p":"xx"},"ts":1},{"op":"msg","room":"bench","seq":2,"epoch":"e","type":"chat","prio":1,"from":"u1","data":{"p":"no t here"},"ts":2},{"op":"msg","room":"bench","seq":3,"epoch":"e","type":"chat","prio":1,"from":"u1","data":{"t": 3000,"p":"x"},"ts":3}]}"#;

    #[test]
    fn counts_single_and_batch() {
        let s = Scanner::default();
        assert_eq!(s.count(BATCH.as_bytes()), 3);
        assert_eq!(s.count(br#"{"op":"msg","room":"r","data":{"t":5}}"#), 1);
        assert_eq!(s.count(br#"{"op":"ack","id":1,"seq":3}"#), 0);
        assert_eq!(s.count(br#"{"op":"presence","room":"r","conns":3}"#), 0);
        assert_eq!(s.count(b""), 0);
    }

    #[test]
    fn t_extraction_per_message() {
        let s = Scanner::default();
        let mut countdown = 1;
        let mut ts = Vec::new();
        let n = s.count_and_sample(BATCH.as_bytes(), &mut countdown, 1, |t| ts.push(t));
        assert_eq!(n, 3);
        // The second message has no "t": the search must not run into the
        // third message's timestamp. "ts" and "type" must not match.
        assert_eq!(ts, vec![Some(1000), None, Some(3000)]);
    }

    #[test]
    fn sampling_every_kth_across_calls() {
        let s = Scanner::default();
        let mut countdown = 2;
        let mut ts = Vec::new();
        s.count_and_sample(BATCH.as_bytes(), &mut countdown, 2, |t| ts.push(t));
        s.count_and_sample(BATCH.as_bytes(), &mut countdown, 2, |t| ts.push(t));
        // Messages 2, 4 and 6 of the two batches are sampled.
        assert_eq!(ts, vec![None, Some(1000), Some(3000)]);
    }

    #[test]
    fn senders_and_request_ids() {
        let s = Scanner::default();
        let mut seen = Vec::new();
        let dm = br#"{"op":"msg","room":"dm:u10:u9","seq":4,"epoch":"e","type":"chat","prio":1,"from":"u10","data":{"t":7,"p":""},"ts":1}"#;
        let n = s.each_message(dm, |s, m| seen.push((s.sender_number(m, b"u"), s.find_t(m))));
        assert_eq!((n, seen), (1, vec![(Some(10), Some(7))]));
        let sys = br#"{"op":"msg","room":"g","seq":1,"from":null,"data":{}}"#;
        s.each_message(sys, |s, m| assert_eq!(s.sender_number(m, b"u"), None));
        assert_eq!(s.sender_number(br#","from":"bot7","data":{}"#, b"u"), None);
        assert_eq!(s.request_id(br#"{"op":"ack","id":123,"seq":9}"#), Some(123));
        assert_eq!(s.request_id(br#"{"op":"ack","seq":9}"#), None);
    }

    #[test]
    fn parse_t_values() {
        let s = Scanner::default();
        assert_eq!(s.find_t(br#","data":{"t":1732262400123456,"p":""}"#), Some(1732262400123456));
        assert_eq!(s.find_t(br#","data":{"t":"str"}"#), None);
        assert_eq!(s.find_t(br#","ts":17,"type":"chat""#), None);
        assert_eq!(parse_uint(b"99999999999999999999999"), None, "overflow");
        assert_eq!(parse_uint(b"42}"), Some(42));
    }
}

/// Value of the leading `"op"` field of a JSON object payload, tolerating
/// whitespace (`{"op": "ack", ...}` as Python's json.dumps writes it).
/// Used for the rare control frames (connected/ack/error), not for counting.
pub fn op_of(p: &[u8]) -> Option<&[u8]> {
    fn ws(p: &[u8], mut i: usize) -> usize {
        while i < p.len() && matches!(p[i], b' ' | b'\t' | b'\r' | b'\n') {
            i += 1;
        }
        i
    }
    let mut i = ws(p, 0);
    if p.get(i) != Some(&b'{') {
        return None;
    }
    i = ws(p, i + 1);
    if !p[i..].starts_with(b"\"op\"") {
        return None;
    }
    i = ws(p, i + 4);
    if p.get(i) != Some(&b':') {
        return None;
    }
    i = ws(p, i + 1);
    if p.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let len = memchr::memchr(b'"', &p[start..])?;
    Some(&p[start..start + len])
}

#[cfg(test)]
mod op_tests {
    use super::op_of;

    #[test]
    fn op_field() {
        assert_eq!(op_of(br#"{"op":"ack","id":1}"#), Some(&b"ack"[..]));
        assert_eq!(op_of(br#"{"op": "connected", "session": "x"}"#), Some(&b"connected"[..]));
        assert_eq!(op_of(br#" { "op" : "error" }"#), Some(&b"error"[..]));
        assert_eq!(op_of(br#"{"id":1,"op":"ack"}"#), None);
        assert_eq!(op_of(b"{\"op\":\"unterminated"), None);
        assert_eq!(op_of(b""), None);
    }
}
