//! Every frame the engine builds itself, and the little parsing they need: WebSocket
//! control frames (ping, pong, close), the application pong, the `batch` envelope and the
//! error frames the engine sends without Python (rate limited, overloaded). Payload
//! builders return the JSON text; callers wrap it in a text frame.

use std::io::Write;

use super::codes::CloseCode;
use super::frame::{encode, OP_CLOSE, OP_PING, OP_PONG};

/// Largest application pong payload (`{"op":"pong","ts":` + 20 digits + `}`).
pub const APP_PONG_MAX: usize = 40;
/// Longest string id echoed in an error frame; longer ones are answered with `null`.
pub const ID_MAX: usize = 64;

/// An empty WebSocket ping.
pub fn ws_ping() -> Vec<u8> {
    encode(OP_PING, false, b"")
}

/// The pong answering a ping with `payload` (at most 125 bytes: the decoder checked).
pub fn ws_pong(payload: &[u8]) -> Vec<u8> {
    encode(OP_PONG, false, payload)
}

/// A close frame. The reason is cut to 123 bytes on a character boundary.
pub fn close(code: CloseCode, reason: &str) -> Vec<u8> {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(OP_CLOSE, false, &payload)
}

/// `{"op":"pong","ts":<unix ms>}`.
pub fn app_pong(unix_ms: u64) -> Vec<u8> {
    let mut p = Vec::with_capacity(APP_PONG_MAX);
    let _ = write!(p, "{{\"op\":\"pong\",\"ts\":{unix_ms}}}");
    p
}

/// The application heartbeat `{"op":"ping"}` (answered by the engine, never by Python).
pub fn is_app_ping(data: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        op: &'a str,
    }
    data.len() <= 256
        && memchr::memmem::find(data, b"\"ping\"").is_some()
        && serde_json::from_slice::<Probe>(data).is_ok_and(|p| p.op == "ping")
}

/// The `id` of a client request as JSON text, when it is a number or a string of at most
/// [`ID_MAX`] bytes; `None` otherwise (not JSON, no id, another type). Only called on
/// the refusal paths (rate limited, shed), never for a message that reaches Python.
pub fn request_id(data: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(default)]
        id: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(data).ok()?.id? {
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::String(s) if s.len() <= ID_MAX => serde_json::to_string(&s).ok(),
        _ => None,
    }
}

/// `{"op":"error","id":<id or null>,"code":<code>,"message":"<message>"}`; `message` is
/// a constant of the engine (plain ASCII, nothing to escape).
pub fn error(id: Option<&str>, code: u16, message: &str) -> Vec<u8> {
    debug_assert!(!message.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20));
    let mut p = Vec::with_capacity(48 + message.len() + id.map_or(4, str::len));
    let _ = write!(p, "{{\"op\":\"error\",\"id\":{},\"code\":{code},\"message\":\"{message}\"}}", id.unwrap_or("null"));
    p
}

/// `{"op":"batch","room":<room>,"msgs":[m1,m2,…]}`, spliced from already-encoded message
/// payloads (no re-serialisation).
pub fn batch<'a>(room: &str, msgs: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let room_json = serde_json::to_string(room).expect("a string serializes");
    let size: usize = msgs.clone().map(|m| m.len() + 1).sum();
    let mut p = Vec::with_capacity(size + room_json.len() + 32);
    p.extend_from_slice(b"{\"op\":\"batch\",\"room\":");
    p.extend_from_slice(room_json.as_bytes());
    p.extend_from_slice(b",\"msgs\":[");
    for (i, m) in msgs.enumerate() {
        if i > 0 {
            p.push(b',');
        }
        p.extend_from_slice(m);
    }
    p.extend_from_slice(b"]}");
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_reason_is_cut_to_123_bytes_on_char_boundary() {
        let reason = "é".repeat(100); // 200 bytes
        let f = close(4003, &reason);
        let len = (f[1] & 0x7f) as usize;
        assert!(len <= 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }

    #[test]
    fn app_ping_detection() {
        assert!(is_app_ping(br#"{"op":"ping"}"#));
        assert!(is_app_ping(br#"{ "id": 3, "op" : "ping" }"#));
        assert!(!is_app_ping(br#"{"op":"publish","data":"ping"}"#));
        assert!(!is_app_ping(br#"{"op":"ping""#));
        assert!(!is_app_ping(b"ping"));
    }

    #[test]
    fn app_pong_fits_its_reserve() {
        assert_eq!(app_pong(1_700_000_000_123), br#"{"op":"pong","ts":1700000000123}"#);
        assert!(app_pong(u64::MAX).len() <= APP_PONG_MAX);
    }

    #[test]
    fn error_frames_echo_short_ids_only() {
        let e = |data: &[u8]| {
            let id = request_id(data);
            serde_json::from_slice::<serde_json::Value>(&error(id.as_deref(), 4029, "rate limited")).unwrap()
        };
        let v = e(br#"{"op":"publish","id":7,"room":"r"}"#);
        assert_eq!(v, serde_json::json!({"op":"error","id":7,"code":4029,"message":"rate limited"}));
        assert_eq!(e(br#"{"id":"a\"b"}"#)["id"], "a\"b");
        assert_eq!(e(br#"{"id":1.5e3}"#)["id"], 1500.0);
        assert!(e(format!(r#"{{"id":"{}"}}"#, "x".repeat(65)).as_bytes())["id"].is_null());
        assert!(e(br#"{"id":{"a":1}}"#)["id"].is_null());
        assert!(e(br#"{"op":"x"}"#)["id"].is_null());
        assert!(e(b"not json")["id"].is_null());
        assert!(e(b"[1,2]")["id"].is_null());
    }

    #[test]
    fn batch_splices_payloads() {
        let msgs: [&[u8]; 2] = [br#"{"a":1}"#, br#"{"b":2}"#];
        let p = batch("live:\"x\"", msgs.iter().copied());
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v, serde_json::json!({"op":"batch","room":"live:\"x\"","msgs":[{"a":1},{"b":2}]}));
    }
}
