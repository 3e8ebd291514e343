//! The relay through real sockets: an engine on its own runtime, a fake upstream and raw
//! clients on the test's runtime.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::{body_len, upstream_head, Refusal};
use crate::protocol::handshake::{parse_request, Parsed};
use crate::{Engine, EngineConfig};

const SECRET: &str = "s3cret-0123456789";

fn config(upstream: SocketAddr) -> EngineConfig {
    EngineConfig {
        server_host: "127.0.0.1".into(),
        server_port: 0,
        server_io_threads: 2,
        media_prefix: "/media/".into(),
        media_upstream: upstream.to_string(),
        media_secret: SECRET.into(),
        media_max_body: 1 << 20,
        ..EngineConfig::default()
    }
}

fn start(cfg: EngineConfig) -> (Engine, SocketAddr) {
    let e = Engine::new(cfg).expect("engine");
    let addr = e.start().expect("start");
    (e, addr)
}

fn counter(e: &Engine, name: &str) -> u64 {
    e.counters().into_iter().find(|(k, _)| *k == name).map(|(_, v)| v).unwrap_or_else(|| panic!("no counter {name}"))
}

/// Wait (up to 3 s) for a counter to reach `want`: a relay's task ends after its client
/// has read the answer (the drain), a little after the client saw it.
async fn settles(e: &Engine, name: &str, want: u64) {
    for _ in 0..300 {
        if counter(e, name) == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counter(e, name), want, "{name}");
}

/// Read until EOF (or the deadline): everything the peer sent.
async fn read_all(s: &mut (impl AsyncReadExt + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

/// Read a request head (up to the blank line) and return it with the bytes read past it.
async fn read_head(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return (String::from_utf8(buf).unwrap(), rest);
        }
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "EOF in the request head");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0)
}

/// An upstream that takes one request, hands (head, body) to the test and answers 200.
async fn echo_upstream() -> (SocketAddr, oneshot::Receiver<(String, Vec<u8>)>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let (head, mut body) = read_head(&mut s).await;
        let want = content_length(&head);
        let mut chunk = vec![0u8; 65536];
        while body.len() < want {
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "EOF in the body");
            body.extend_from_slice(&chunk[..n]);
        }
        let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}", 2 + 8, "ok");
        s.write_all(reply.as_bytes()).await.unwrap();
        s.write_all(format!("{:08}", body.len()).as_bytes()).await.unwrap();
        let _ = tx.send((head, body));
    });
    (addr, rx)
}

/// A port nothing listens on.
async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn status(resp: &[u8]) -> u16 {
    std::str::from_utf8(&resp[9..12]).unwrap().parse().unwrap()
}

#[test]
fn content_length_rules() {
    let req = |hs: &[(&str, &str)]| {
        let mut raw = String::from("POST /media/x HTTP/1.1\r\nHost: h\r\n");
        for (k, v) in hs {
            raw.push_str(&format!("{k}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        match parse_request(raw.as_bytes(), 64, 8192) {
            Parsed::Done(r, _) => r,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(body_len(&req(&[])), Ok(0));
    assert_eq!(body_len(&req(&[("Content-Length", "12")])), Ok(12));
    assert_eq!(body_len(&req(&[("Content-Length", "12"), ("Content-Length", "12")])), Ok(12));
    assert_eq!(body_len(&req(&[("Content-Length", "12, 13")])), Err(Refusal::BadRequest));
    assert_eq!(body_len(&req(&[("Content-Length", "-1")])), Err(Refusal::BadRequest));
    assert_eq!(body_len(&req(&[("Content-Length", "+5")])), Err(Refusal::BadRequest));
    assert_eq!(body_len(&req(&[("Content-Length", "99999999999999999999999")])), Ok(u64::MAX));
    assert_eq!(body_len(&req(&[("Transfer-Encoding", "chunked")])), Err(Refusal::LengthRequired));
    assert_eq!(
        body_len(&req(&[("Transfer-Encoding", "chunked"), ("Content-Length", "3")])),
        Err(Refusal::LengthRequired)
    );
}

#[test]
fn head_rewrite_drops_hop_by_hop_and_spoofed_headers() {
    let raw = "PUT /media/upload?a=1&b=2 HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, X-Hop\r\n\
X-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic x\r\nTE: trailers\r\nUpgrade: websocket\r\n\
X-Gateway-Media-Secret: forged\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Real-IP: 6.6.6.6\r\n\
Forwarded: for=6.6.6.6\r\nExpect: 100-continue\r\nAuthorization: Bearer t\r\nContent-Type: multipart/form-data; boundary=x\r\n\
Content-Length: 5\r\n\r\n";
    let Parsed::Done(req, _) = parse_request(raw.as_bytes(), 64, 8192) else { panic!() };
    let head = String::from_utf8(upstream_head(&req, Some(5), SECRET, "10.1.2.3".parse().unwrap(), true)).unwrap();
    let lines: Vec<&str> = head.split("\r\n").collect();
    assert_eq!(lines[0], "PUT /media/upload?a=1&b=2 HTTP/1.1");
    let names: Vec<String> = lines[1..]
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| l.split(':').next().unwrap().to_ascii_lowercase())
        .collect();
    assert_eq!(
        names,
        [
            "host",
            "authorization",
            "content-type",
            "content-length",
            "x-gateway-media-secret",
            "x-forwarded-for",
            "x-forwarded-proto",
            "connection"
        ]
    );
    assert!(head.contains(&format!("X-Gateway-Media-Secret: {SECRET}\r\n")));
    assert!(head.contains("X-Forwarded-For: 10.1.2.3\r\n"));
    assert!(head.contains("X-Forwarded-Proto: https\r\n"));
    assert!(head.contains("Connection: close\r\n"));
    assert!(head.contains("content-type: multipart/form-data; boundary=x\r\n"));
    assert!(head.ends_with("\r\n\r\n"));
    assert!(!head.contains("forged") && !head.contains("6.6.6.6"));
}

#[test]
fn bad_settings_are_refused_at_start() {
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let err = |f: &dyn Fn(&mut EngineConfig)| {
        let mut c = config(up);
        f(&mut c);
        Engine::new(c).err().map(|e| e.to_string()).unwrap_or_default()
    };
    assert!(err(&|c| c.media_prefix = "media/".into()).starts_with("media_prefix:"));
    assert!(err(&|c| c.media_prefix = "/".into()).starts_with("media_prefix:"));
    assert!(err(&|c| c.media_prefix = "/w".into()).contains("server_ws_path"));
    assert!(err(&|c| c.media_upstream = "localhost:80".into()).starts_with("media_upstream:"));
    assert!(err(&|c| c.media_upstream = "127.0.0.1:0".into()).starts_with("media_upstream:"));
    assert!(err(&|c| c.media_secret = String::new()).starts_with("media_secret:"));
    assert!(err(&|c| c.media_secret = "a b".into()).starts_with("media_secret:"));
    assert!(err(&|c| c.media_max_body = 0).starts_with("media_max_body:"));
    assert!(err(&|c| c.media_timeout = Duration::ZERO).starts_with("media_timeout:"));
    assert!(err(&|c| c.media_idle_timeout = Duration::ZERO).starts_with("media_idle_timeout:"));
    assert!(err(&|c| c.media_max_inflight = 0).starts_with("media_max_inflight:"));
    assert_eq!(err(&|_| {}), "");
    // Off: nothing is checked.
    assert_eq!(err(&|c| *c = EngineConfig { media_upstream: "junk".into(), ..EngineConfig::default() }), "");
}

#[tokio::test]
async fn post_body_split_across_reads_is_relayed_with_the_head_rewritten() {
    let (up, got) = echo_upstream().await;
    let (eng, addr) = start(config(up));
    let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut c = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /media/upload?room=r1 HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\nKeep-Alive: timeout=9\r\n\
X-Gateway-Media-Secret: forged\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nX-Custom: kept\r\n\
Content-Length: {}\r\n\r\n",
        body.len()
    );
    // The head with the body's first bytes in one write, then the rest in pieces.
    c.write_all(&[head.as_bytes(), &body[..1000]].concat()).await.unwrap();
    for part in body[1000..].chunks(70_001) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.write_all(part).await.unwrap();
    }
    let resp = read_all(&mut c).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.ends_with(&format!("ok{:08}", body.len())), "{text}");
    let (uhead, ubody) = got.await.unwrap();
    assert!(ubody == body, "body differs ({} bytes)", ubody.len());
    assert!(uhead.starts_with("POST /media/upload?room=r1 HTTP/1.1\r\n"), "{uhead}");
    let lower = uhead.to_ascii_lowercase();
    assert_eq!(lower.matches("x-gateway-media-secret:").count(), 1, "{uhead}");
    assert!(uhead.contains(&format!("X-Gateway-Media-Secret: {SECRET}\r\n")), "{uhead}");
    assert!(uhead.contains("X-Forwarded-For: 127.0.0.1\r\n"), "{uhead}");
    assert!(uhead.contains("X-Forwarded-Proto: http\r\n"), "{uhead}");
    assert!(uhead.contains("Connection: close\r\n"), "{uhead}");
    assert!(uhead.contains("x-custom: kept\r\n"), "{uhead}");
    assert!(!uhead.contains("6.6.6.6") && !uhead.contains("forged") && !lower.contains("keep-alive"), "{uhead}");
    drop(c);
    settles(&eng, "media_relay_inflight_current", 0).await;
    assert_eq!(counter(&eng, "media_relay_requests"), 1);
    assert_eq!(counter(&eng, "media_relay_bytes_in"), body.len() as u64);
    assert_eq!(counter(&eng, "media_relay_bytes_out"), resp.len() as u64);
}

#[tokio::test]
async fn get_without_body_and_expect_continue() {
    let (up, got) = echo_upstream().await;
    let (_eng, addr) = start(config(up));
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /media/f/m_1?e=1&s=2 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let resp = read_all(&mut c).await;
    assert_eq!(status(&resp), 200);
    let (uhead, ubody) = got.await.unwrap();
    assert!(uhead.starts_with("GET /media/f/m_1?e=1&s=2 HTTP/1.1\r\n"), "{uhead}");
    assert!(!uhead.to_ascii_lowercase().contains("content-length"), "{uhead}");
    assert!(ubody.is_empty());

    // Expect: 100-continue is answered by the engine; the upstream never sees it.
    let (up, got) = echo_upstream().await;
    let (_eng, addr) = start(config(up));
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"POST /media/upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 25];
    c.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.write_all(b"hello").await.unwrap();
    let resp = read_all(&mut c).await;
    assert_eq!(status(&resp), 200);
    let (uhead, ubody) = got.await.unwrap();
    assert!(!uhead.to_ascii_lowercase().contains("expect"), "{uhead}");
    assert_eq!(ubody, b"hello");
}

/// A listener that fails the test if anything connects to it within `wait`.
async fn assert_no_connection(l: &TcpListener, wait: Duration) {
    assert!(tokio::time::timeout(wait, l.accept()).await.is_err(), "the upstream was contacted");
}

#[tokio::test]
async fn chunked_is_411() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (eng, addr) = start(config(l.local_addr().unwrap()));
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"POST /media/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .unwrap();
    let resp = read_all(&mut c).await;
    assert_eq!(status(&resp), 411, "{}", String::from_utf8_lossy(&resp));
    assert!(String::from_utf8_lossy(&resp).contains("\"code\":\"bad_request\""));
    assert_no_connection(&l, Duration::from_millis(100)).await;
    assert_eq!(counter(&eng, "media_relay_refused_length_required"), 1);
}

#[tokio::test]
async fn oversize_is_413_before_the_body_is_sent() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (eng, addr) = start(config(l.local_addr().unwrap()));
    let mut c = TcpStream::connect(addr).await.unwrap();
    // Only the head: the answer must not wait for the 10 MB it announces.
    c.write_all(b"POST /media/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf)).await.expect("answered at once").unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert_eq!(status(text.as_bytes()), 413, "{text}");
    assert!(text.contains(&format!("\"code\":\"too_large\",\"limit\":{}", 1 << 20)), "{text}");
    assert!(text.contains("Connection: close"), "{text}");
    // The client may still send some of its body: it is drained, the answer stays readable.
    let _ = c.write_all(&vec![0u8; 200_000]).await;
    let _ = read_all(&mut c).await;
    assert_no_connection(&l, Duration::from_millis(50)).await;
    assert_eq!(counter(&eng, "media_relay_refused_too_large"), 1);
    assert_eq!(counter(&eng, "media_relay_bytes_in"), 0);
}

#[tokio::test]
async fn early_upstream_answer_mid_body_reaches_the_client() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let (_head, mut body) = read_head(&mut s).await;
        let mut chunk = vec![0u8; 16384];
        while body.len() < 100_000 {
            let n = s.read(&mut chunk).await.unwrap();
            body.extend_from_slice(&chunk[..n]);
        }
        let msg = "{\"error\":\"file too large\",\"code\":\"too_large\"}";
        let reply = format!(
            "HTTP/1.1 413 Payload Too Large\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}",
            msg.len()
        );
        s.write_all(reply.as_bytes()).await.unwrap();
        // Closed with the rest of the body unread (the kernel resets the connection).
    });
    let (eng, addr) = start(config(up));
    let c = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = c.into_split();
    let total = 1_000_000;
    let writer = tokio::spawn(async move {
        let head = format!("POST /media/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {total}\r\n\r\n");
        w.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![7u8; 16384];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            if w.write_all(&chunk[..n]).await.is_err() {
                break;
            }
            sent += n;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        sent
    });
    let resp = read_all(&mut r).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 413 Payload Too Large\r\n"), "{text}");
    assert!(text.ends_with("\"code\":\"too_large\"}"), "{text}");
    // What the client still sent after the answer was drained, not passed on.
    writer.await.unwrap();
    let bytes_in = counter(&eng, "media_relay_bytes_in");
    assert!((100_000..total as u64).contains(&bytes_in), "{bytes_in}");
}

#[tokio::test]
async fn upstream_down_is_502() {
    let (eng, addr) = start(config(dead_port().await));
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"POST /media/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc").await.unwrap();
    let resp = read_all(&mut c).await;
    let text = String::from_utf8_lossy(&resp);
    assert_eq!(status(&resp), 502, "{text}");
    assert!(text.contains("Retry-After: 1\r\n"), "{text}");
    assert_eq!(counter(&eng, "media_relay_refused_upstream"), 1);
    drop(c);
    settles(&eng, "media_relay_inflight_current", 0).await;
}

#[tokio::test]
async fn upstream_closing_without_answer_is_502() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let _ = read_head(&mut s).await;
        s.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
    });
    let (_eng, addr) = start(config(up));
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /media/x HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(status(&read_all(&mut c).await), 502);
}

#[tokio::test]
async fn idle_timeouts_answer_504_for_the_upstream_and_408_for_the_client() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let (eng, addr) = start(EngineConfig { media_idle_timeout: Duration::from_millis(300), ..config(up) });
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = read_head(&mut s).await;
            held.push(s); // never answers
        }
    });
    // The upstream says nothing.
    let t = std::time::Instant::now();
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /media/slow HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let resp = read_all(&mut c).await;
    assert_eq!(status(&resp), 504, "{}", String::from_utf8_lossy(&resp));
    assert!(t.elapsed() >= Duration::from_millis(290) && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // The client stops sending its body.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"POST /media/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789").await.unwrap();
    let resp = read_all(&mut c).await;
    assert_eq!(status(&resp), 408, "{}", String::from_utf8_lossy(&resp));
    assert_eq!(counter(&eng, "media_relay_refused_timeout"), 2);
    // The whole-request deadline, while bytes keep trickling.
    drop(eng);
    let l2 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (eng, addr) =
        start(EngineConfig { media_timeout: Duration::from_millis(400), ..config(l2.local_addr().unwrap()) });
    tokio::spawn(async move {
        let (mut s, _) = l2.accept().await.unwrap();
        let mut sink = vec![0u8; 4096];
        while s.read(&mut sink).await.is_ok_and(|n| n > 0) {}
    });
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"POST /media/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n").await.unwrap();
    let t = std::time::Instant::now();
    for _ in 0..20 {
        if c.write_all(b"x").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resp = read_all(&mut c).await;
    assert_eq!(status(&resp), 408, "{}", String::from_utf8_lossy(&resp));
    assert!(t.elapsed() < Duration::from_secs(3));
    assert_eq!(counter(&eng, "media_relay_refused_timeout"), 1);
    hold.abort();
}

#[tokio::test]
async fn inflight_cap_answers_503() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let _ = read_head(&mut s).await;
        let _ = release_rx.await;
        s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").await.unwrap();
    });
    let (eng, addr) = start(EngineConfig { media_max_inflight: 1, ..config(up) });
    let mut a = TcpStream::connect(addr).await.unwrap();
    a.write_all(b"GET /media/a HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    for _ in 0..200 {
        if counter(&eng, "media_relay_inflight_current") == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(counter(&eng, "media_relay_inflight_current"), 1);
    let mut b = TcpStream::connect(addr).await.unwrap();
    b.write_all(b"GET /media/b HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let resp = read_all(&mut b).await;
    let text = String::from_utf8_lossy(&resp);
    assert_eq!(status(&resp), 503, "{text}");
    assert!(text.contains("Retry-After: 1\r\n") && text.contains("\"code\":\"busy\""), "{text}");
    assert_eq!(counter(&eng, "media_relay_refused_busy"), 1);
    release_tx.send(()).unwrap();
    assert_eq!(status(&read_all(&mut a).await), 204);
    drop(a);
    settles(&eng, "media_relay_inflight_current", 0).await;
}

#[tokio::test]
async fn draining_answers_503_and_other_paths_are_untouched() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (eng, addr) = start(config(l.local_addr().unwrap()));
    // Not under the prefix: the usual answers.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"POST /mediax HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await.unwrap();
    assert_eq!(status(&read_all(&mut c).await), 405);
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(status(&read_all(&mut c).await), 200);
    // Connected before the drain, asking after it.
    let mut c = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    eng.drain(crate::protocol::close::RESTART, "restarting", None);
    c.write_all(b"GET /media/x HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let resp = read_all(&mut c).await;
    assert_eq!(status(&resp), 503);
    assert!(String::from_utf8_lossy(&resp).contains("Retry-After: 1\r\n"));
    assert_eq!(counter(&eng, "media_relay_refused_draining"), 1);
    assert_no_connection(&l, Duration::from_millis(50)).await;
}

#[tokio::test]
async fn client_going_away_drops_the_upstream() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let (_, rest) = read_head(&mut s).await;
        let mut sink = vec![0u8; 4096];
        // Waits for the rest of the body: EOF comes when the engine drops the connection.
        let mut n = rest.len();
        while let Ok(k) = s.read(&mut sink).await {
            if k == 0 {
                break;
            }
            n += k;
        }
        let _ = tx.send(n);
    });
    let (eng, addr) = start(config(up));
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"POST /media/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(c);
    let n = tokio::time::timeout(Duration::from_secs(2), rx).await.expect("upstream dropped").unwrap();
    assert_eq!(n, 10);
    settles(&eng, "media_relay_client_gone", 1).await;
}

#[test]
fn answer_length_from_its_head() {
    use super::response_total;
    assert_eq!(response_total(b"HTTP/1.1 200 OK\r\nContent-Le", false), None);
    let h = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 12\r\n\r\n";
    assert_eq!(response_total(h, false), Some(Some(h.len() as u64 + 12)));
    assert_eq!(response_total(h, true), Some(Some(h.len() as u64)));
    let h = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n";
    assert_eq!(response_total(h, false), Some(Some(h.len() as u64)));
    assert_eq!(response_total(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc", false), Some(None));
}

#[test]
fn pace_pays_after_reading_and_refills_at_its_rate() {
    use super::Pace;
    let t0 = tokio::time::Instant::now();
    assert_eq!(Pace::new(0).pay(1 << 30, t0), Duration::ZERO, "rate 0: no limit");
    let mut p = Pace::new(1_000_000); // burst: 250 kB
    assert_eq!(p.pay(250_000, t0), Duration::ZERO);
    let wait = p.pay(100_000, t0);
    assert!((wait.as_secs_f64() - 0.1).abs() < 1e-6, "{wait:?}");
    // A second later the debt is paid and the bucket full again (never more than the burst).
    assert_eq!(p.pay(250_000, t0 + Duration::from_secs(2)), Duration::ZERO);
    assert!(p.pay(1, t0 + Duration::from_secs(2)) > Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_paced_per_relay_and_per_node() {
    // 600 kB at 1 MB/s per relay: the first 250 kB pass at once, the rest take ~0.35 s.
    for (rate, node) in [(1_000_000u64, 0u64), (0, 1_000_000)] {
        let (up, got) = echo_upstream().await;
        let (eng, addr) = start(EngineConfig { media_rate: rate, media_node_rate: node, ..config(up) });
        let body = vec![7u8; 600_000];
        let mut c = TcpStream::connect(addr).await.unwrap();
        let head = format!("POST /media/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", body.len());
        let t0 = std::time::Instant::now();
        c.write_all(head.as_bytes()).await.unwrap();
        c.write_all(&body).await.unwrap();
        let resp = read_all(&mut c).await;
        let took = t0.elapsed();
        assert_eq!(status(&resp), 200);
        assert_eq!(got.await.unwrap().1.len(), body.len());
        assert!(took >= Duration::from_millis(300), "rate {rate}/{node}: {took:?}");
        assert!(took < Duration::from_secs(3), "rate {rate}/{node}: {took:?}");
        drop(eng);
    }
}
