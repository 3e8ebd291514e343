//! HTTP/1.1 upgrade (RFC 6455 §4), sans-I/O: request bytes in, a classified request and
//! response bytes out.

use base64::Engine as _;

/// A parsed HTTP request head.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Raw query string without the `?`.
    pub query: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
}

/// What to do with a request.
#[derive(Debug)]
pub enum Kind {
    /// A valid WebSocket upgrade.
    Upgrade { key: String, protocols: Vec<String>, extensions: Vec<String> },
    /// A plain HTTP request (health, demo page, ...).
    Plain,
    /// A broken upgrade attempt: answer with this status and reason.
    Bad(u16, &'static str),
}

#[derive(Debug)]
pub enum Parsed {
    /// Need more bytes.
    Partial,
    /// Request head complete: the request and the bytes it used.
    Done(Request, usize),
    /// Unparseable or over the limits: answer with this status and close.
    Error(u16, &'static str),
}

/// Parse a request head, enforcing the header count and total size caps.
pub fn parse_request(buf: &[u8], max_headers: usize, max_bytes: usize) -> Parsed {
    let mut storage = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut storage);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() >= max_bytes {
                Parsed::Error(431, "request head too large")
            } else {
                Parsed::Partial
            }
        }
        Ok(httparse::Status::Complete(n)) => {
            if n > max_bytes {
                return Parsed::Error(431, "request head too large");
            }
            if req.version != Some(1) {
                return Parsed::Error(505, "HTTP/1.1 required");
            }
            let target = req.path.unwrap_or("/");
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_owned(), q.to_owned()),
                None => (target.to_owned(), String::new()),
            };
            let mut headers = Vec::with_capacity(req.headers.len());
            for h in req.headers.iter() {
                let Ok(v) = std::str::from_utf8(h.value) else {
                    return Parsed::Error(400, "header value is not UTF-8");
                };
                headers.push((h.name.to_ascii_lowercase(), v.trim().to_owned()));
            }
            Parsed::Done(Request { method: req.method.unwrap_or("").to_owned(), path, query, headers }, n)
        }
        Err(httparse::Error::TooManyHeaders) => Parsed::Error(431, "too many headers"),
        Err(_) => Parsed::Error(400, "malformed HTTP request"),
    }
}

impl Request {
    /// First value of a header (name lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// Classify per RFC 6455 §4.2.1.
    pub fn kind(&self) -> Kind {
        let wants_upgrade = self.header_has_token("upgrade", "websocket");
        if !wants_upgrade {
            return Kind::Plain;
        }
        if self.method != "GET" {
            return Kind::Bad(405, "WebSocket upgrade requires GET");
        }
        if !self.header_has_token("connection", "upgrade") {
            return Kind::Bad(400, "Connection header must contain Upgrade");
        }
        if self.header("sec-websocket-version") != Some("13") {
            return Kind::Bad(426, "Sec-WebSocket-Version 13 required");
        }
        let Some(key) = self.header("sec-websocket-key") else {
            return Kind::Bad(400, "missing Sec-WebSocket-Key");
        };
        match base64::engine::general_purpose::STANDARD.decode(key) {
            Ok(k) if k.len() == 16 => {}
            _ => return Kind::Bad(400, "invalid Sec-WebSocket-Key"),
        }
        let list = |name: &str| -> Vec<String> {
            self.headers
                .iter()
                .filter(|(k, _)| k == name)
                .flat_map(|(_, v)| v.split(','))
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        let extensions =
            self.headers.iter().filter(|(k, _)| k == "sec-websocket-extensions").map(|(_, v)| v.clone()).collect();
        Kind::Upgrade { key: key.to_owned(), protocols: list("sec-websocket-protocol"), extensions }
    }
}

/// `Sec-WebSocket-Accept` for a key (RFC 6455 §4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut h = sha1_smol::Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.digest().bytes())
}

/// The 101 response.
pub fn response_101(key: &str, protocol: Option<&str>, extension: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        accept_key(key)
    );
    if let Some(p) = protocol {
        r.push_str("Sec-WebSocket-Protocol: ");
        r.push_str(p);
        r.push_str("\r\n");
    }
    if let Some(e) = extension {
        r.push_str("Sec-WebSocket-Extensions: ");
        r.push_str(e);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

pub fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// A complete plain HTTP response that closes the connection.
pub fn response(status: u16, content_type: &str, body: &[u8], extra: &[(&str, &str)]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        status_text(status),
        body.len()
    );
    for (k, v) in extra {
        r.push_str(k);
        r.push_str(": ");
        r.push_str(v);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    let mut out = r.into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ: &[u8] = b"GET /ws?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: gateway.v1, token.x\r\n\r\n";

    #[test]
    fn rfc_accept_key() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_upgrade() {
        let Parsed::Done(req, n) = parse_request(REQ, 32, 8192) else { panic!() };
        assert_eq!(n, REQ.len());
        assert_eq!((req.path.as_str(), req.query.as_str()), ("/ws", "token=abc"));
        match req.kind() {
            Kind::Upgrade { protocols, .. } => assert_eq!(protocols, vec!["gateway.v1", "token.x"]),
            k => panic!("{k:?}"),
        }
        let resp = String::from_utf8(response_101("dGhlIHNhbXBsZSBub25jZQ==", Some("gateway.v1"), None)).unwrap();
        assert!(resp.contains("Sec-WebSocket-Protocol: gateway.v1\r\n"));
    }

    #[test]
    fn partial_and_limits() {
        assert!(matches!(parse_request(&REQ[..20], 32, 8192), Parsed::Partial));
        assert!(matches!(parse_request(REQ, 3, 8192), Parsed::Error(431, _)));
        assert!(matches!(parse_request(&REQ[..100], 32, 64), Parsed::Error(431, _)));
        assert!(matches!(parse_request(b"\x16\x03\x01garbage\r\n\r\n", 32, 8192), Parsed::Error(400, _)));
    }

    #[test]
    fn classifies_bad_upgrades() {
        let v8 = String::from_utf8(REQ.to_vec()).unwrap().replace("Version: 13", "Version: 8");
        let Parsed::Done(req, _) = parse_request(v8.as_bytes(), 32, 8192) else { panic!() };
        assert!(matches!(req.kind(), Kind::Bad(426, _)));
        let nokey = String::from_utf8(REQ.to_vec()).unwrap().replace("Sec-WebSocket-Key", "X-Key");
        let Parsed::Done(req, _) = parse_request(nokey.as_bytes(), 32, 8192) else { panic!() };
        assert!(matches!(req.kind(), Kind::Bad(400, _)));
        let Parsed::Done(req, _) = parse_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 32, 8192) else { panic!() };
        assert!(matches!(req.kind(), Kind::Plain));
    }
}
