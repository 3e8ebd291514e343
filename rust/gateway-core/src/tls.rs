//! TLS for the client listener: rustls on the aws-lc-rs provider, TLS 1.2 and 1.3 only,
//! ALPN `http/1.1`, session resumption by tickets (and a bounded session-id cache for
//! TLS 1.2 clients without tickets).
//!
//! Connections use rustls's *unbuffered* API: the caller owns every buffer. Records are
//! decrypted in the I/O thread's scratch buffer and encrypted into a per-thread buffer, so
//! an idle connection keeps only rustls's state (about 2 KiB: keys and sequence numbers),
//! no plaintext or ciphertext buffers (rustls's buffered `ServerConnection` keeps a 4 KiB
//! receive buffer per connection). A fan-out encrypts a member's frames and writes them
//! under the member's queue lock, exactly like a plain direct write (`conn.rs`).
//!
//! The certificate is reloadable: [`Acceptor::reload`] builds a new server config from the
//! files and swaps it in for new connections; open connections keep the one they started
//! with. Tickets stay valid across reloads (one ticketer per engine).

use std::fmt;
use std::fs;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus};
use rustls::{HandshakeKind, ServerConfig};

pub use rustls::server::UnbufferedServerConnection as Session;

/// Entries of the TLS 1.2 session-id cache, shared by all connections (tickets need none).
const SESSION_CACHE: usize = 4096;
/// TLS 1.3 tickets sent after each full handshake: one per connection the client will
/// reopen (a mini-program reconnects one socket at a time).
const TLS13_TICKETS: usize = 1;
/// A certificate this close to its end is warned about.
pub const EXPIRY_WARNING_SECS: i64 = 14 * 86_400;

/// A certificate or key that cannot be served, with the config key to blame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    /// `server.tls.cert_file` or `server.tls.key_file`.
    pub key: &'static str,
    pub message: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for TlsError {}

const CERT_KEY: &str = "server.tls.cert_file";
const KEY_KEY: &str = "server.tls.key_file";

fn cert_err(message: String) -> TlsError {
    TlsError { key: CERT_KEY, message }
}

fn key_err(message: String) -> TlsError {
    TlsError { key: KEY_KEY, message }
}

/// What is known about the served leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub subject: String,
    /// Certificates in the chain file, leaf included.
    pub chain_len: usize,
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Read and check a certificate chain and its key: readable PEM, an X.509 leaf that has
/// not expired, a key of a supported type (RSA, ECDSA, Ed25519) that matches the leaf.
pub fn load(cert_file: &str, key_file: &str) -> Result<(Arc<CertifiedKey>, CertInfo), TlsError> {
    load_with(&provider(), cert_file, key_file, unix_now())
}

fn load_with(
    provider: &CryptoProvider,
    cert_file: &str,
    key_file: &str,
    now: i64,
) -> Result<(Arc<CertifiedKey>, CertInfo), TlsError> {
    if cert_file.is_empty() {
        return Err(cert_err("not set".into()));
    }
    if key_file.is_empty() {
        return Err(key_err("not set".into()));
    }
    let pem = fs::read(cert_file).map_err(|e| cert_err(format!("cannot read {cert_file}: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("bad PEM in {cert_file}: {e}")))?;
    if chain.is_empty() {
        return Err(cert_err(format!("no PEM certificate (BEGIN CERTIFICATE) in {cert_file}")));
    }
    let info = cert_info(&chain[0], chain.len()).map_err(|e| cert_err(format!("{cert_file}: {e}")))?;
    if info.not_after <= now {
        return Err(cert_err(format!(
            "the certificate in {cert_file} ({}) expired at {} (Unix time {})",
            info.subject,
            rfc3339(info.not_after),
            info.not_after
        )));
    }
    let pem = fs::read(key_file).map_err(|e| key_err(format!("cannot read {key_file}: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| key_err(format!("no usable PEM private key (PKCS#8, SEC1 or PKCS#1) in {key_file}: {e}")))?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(format!("unsupported private key in {key_file}: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| key_err(format!("{key_file} does not match the certificate in {cert_file} ({e})")))?;
    Ok((Arc::new(certified), info))
}

fn cert_info(der: &CertificateDer<'_>, chain_len: usize) -> Result<CertInfo, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let validity = cert.validity();
    let serial = cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect::<String>();
    Ok(CertInfo {
        not_after: validity.not_after.timestamp(),
        not_before: validity.not_before.timestamp(),
        serial,
        subject: cert.subject().to_string(),
        chain_len,
    })
}

/// `2026-11-28T23:59:59Z` for Unix seconds (UTC; proleptic Gregorian).
pub fn rfc3339(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Always the one certificate (no SNI selection: one gateway, one name or a SAN list).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The engine's TLS configuration: the current certificate and what survives reloads.
pub struct Acceptor {
    cert_file: String,
    key_file: String,
    provider: Arc<CryptoProvider>,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<ServerSessionMemoryCache>,
    current: Mutex<(Arc<ServerConfig>, CertInfo)>,
}

impl Acceptor {
    /// Load the files (errors name the config key) and build the server config.
    pub fn new(cert_file: &str, key_file: &str) -> Result<Self, TlsError> {
        let provider = provider();
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| cert_err(format!("cannot make a session-ticket key: {e}")))?;
        let sessions = ServerSessionMemoryCache::new(SESSION_CACHE);
        let (key, info) = load_with(&provider, cert_file, key_file, unix_now())?;
        let config = build(&provider, &ticketer, &sessions, key)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            provider,
            ticketer,
            sessions,
            current: Mutex::new((config, info)),
        })
    }

    /// Read the files again and serve the new certificate to new connections. On an error
    /// the current certificate stays.
    pub fn reload(&self) -> Result<CertInfo, TlsError> {
        let (key, info) = load_with(&self.provider, &self.cert_file, &self.key_file, unix_now())?;
        let config = build(&self.provider, &self.ticketer, &self.sessions, key)?;
        *self.current.lock() = (config, info.clone());
        Ok(info)
    }

    /// The certificate being served.
    pub fn info(&self) -> CertInfo {
        self.current.lock().1.clone()
    }

    /// A server session for a new connection, on the current certificate.
    pub fn session(&self) -> Result<Session, rustls::Error> {
        let config = self.current.lock().0.clone();
        Session::new(config)
    }
}

fn build(
    provider: &Arc<CryptoProvider>,
    ticketer: &Arc<dyn ProducesTickets>,
    sessions: &Arc<ServerSessionMemoryCache>,
    key: Arc<CertifiedKey>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut c = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| cert_err(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(key)));
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    c.ticketer = ticketer.clone();
    c.session_storage = sessions.clone();
    c.send_tls13_tickets = TLS13_TICKETS;
    Ok(Arc::new(c))
}

// ---- record processing (no sockets here) --------------------------------------------------

/// Why a TLS connection failed; each is a label of `gateway_tls_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Not TLS at all (garbage, or a malformed record).
    NotTls,
    /// The client offers no TLS version we speak (only TLS 1.0/1.1, say).
    Version,
    /// No cipher suite, group or signature scheme in common.
    Params,
    /// The client sent an alert: usually it does not trust our certificate.
    Alert,
    /// The client's ALPN list lacks `http/1.1`.
    Alpn,
    Other,
}

impl Failure {
    pub fn of(e: &rustls::Error) -> Self {
        use rustls::{Error, PeerIncompatible as P};
        match e {
            Error::InvalidMessage(_)
            | Error::InappropriateMessage { .. }
            | Error::InappropriateHandshakeMessage { .. } => Self::NotTls,
            Error::PeerIncompatible(
                P::Tls12NotOffered | P::Tls12NotOfferedOrEnabled | P::SupportedVersionsExtensionRequired,
            ) => Self::Version,
            Error::PeerIncompatible(_) => Self::Params,
            Error::AlertReceived(_) => Self::Alert,
            Error::NoApplicationProtocol => Self::Alpn,
            _ => Self::Other,
        }
    }
}

/// Where a session stands after its input was processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The handshake needs more input.
    Handshaking,
    /// Application data may be sent; more input is welcome.
    Open,
    /// The client sent close_notify: it sends nothing more.
    PeerClosed,
}

/// Append what an `EncodeTlsData` state holds to `out`.
fn encode(state: &mut rustls::unbuffered::EncodeTlsData<'_, rustls::server::ServerConnectionData>, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + 4096, 0);
    let n = match state.encode(&mut out[start..]) {
        Ok(n) => n,
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            out.resize(start + required_size, 0);
            state.encode(&mut out[start..]).unwrap_or(0)
        }
        Err(_) => 0,
    };
    out.truncate(start + n);
}

/// Process the records in `input`: decrypted application data is appended to `plain`,
/// records rustls wants sent (handshake flights, tickets, alerts, key updates) to `out`,
/// which the caller sends before anything it encrypts later. Returns the bytes of `input`
/// consumed (an incomplete record stays) and the session's state.
///
/// On an error, the alert rustls prepared is appended to `out` (send it, then close).
pub fn process(
    sess: &mut Session,
    input: &mut [u8],
    plain: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(usize, Progress), rustls::Error> {
    guarded(|| process_records(sess, input, plain, out))
}

/// Run a call into rustls's state machine, turning a panic inside it into an error: one
/// connection's bad bytes must never kill the I/O task (which would skip the connection's
/// cleanup: its counters and per-IP slot). rustls 0.23 panics when it is called again
/// after an error in the middle of a handshake message (seen by the load client); the
/// code here avoids that call, and this catches whatever else such a bug would do.
fn guarded<T>(f: impl FnOnce() -> Result<T, rustls::Error>) -> Result<T, rustls::Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(rustls::Error::General("the TLS state machine panicked".into())))
}

fn process_records(
    sess: &mut Session,
    input: &mut [u8],
    plain: &mut Vec<u8>,
    out: &mut Vec<u8>,
) -> Result<(usize, Progress), rustls::Error> {
    let mut used = 0;
    loop {
        let UnbufferedStatus { mut discard, state } = sess.process_tls_records(&mut input[used..]);
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                take_alert(sess, out);
                return Err(e);
            }
        };
        match state {
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    let rec = rec?;
                    discard += rec.discard;
                    plain.extend_from_slice(rec.payload);
                }
            }
            ConnectionState::EncodeTlsData(mut e) => encode(&mut e, out),
            // `out` keeps it, in order, for the caller to send.
            ConnectionState::TransmitTlsData(t) => t.done(),
            ConnectionState::BlockedHandshake => return Ok((used + discard, Progress::Handshaking)),
            ConnectionState::WriteTraffic(_) => return Ok((used + discard, Progress::Open)),
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Ok((used + discard, Progress::PeerClosed));
            }
            // Early data is off (max_early_data_size = 0); nothing else is expected.
            _ => return Err(rustls::Error::General("unexpected TLS state".into())),
        }
        used += discard;
    }
}

/// After an error, rustls queues a fatal alert: put it on `out`. One call only (the
/// alert is the first thing it hands back; a further call can panic, see `guarded`).
fn take_alert(sess: &mut Session, out: &mut Vec<u8>) {
    let _ = guarded(|| {
        let UnbufferedStatus { state, .. } = sess.process_tls_records(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
            encode(&mut e, out);
        }
        Ok(())
    });
}

/// Encrypt `data` as application-data records appended to `out` (after any records rustls
/// has waiting, such as a key update). Fails if the session may not send application data.
pub fn encrypt(sess: &mut Session, data: &[u8], out: &mut Vec<u8>) -> Result<(), rustls::Error> {
    guarded(|| encrypt_records(sess, data, out))
}

fn encrypt_records(sess: &mut Session, data: &[u8], out: &mut Vec<u8>) -> Result<(), rustls::Error> {
    loop {
        let UnbufferedStatus { state, .. } = sess.process_tls_records(&mut []);
        match state? {
            ConnectionState::WriteTraffic(mut w) => {
                // Per 16 KiB record: 5 header + 1 content type + 16 tag bytes (TLS 1.3),
                // 5 + 8 nonce + 16 tag (TLS 1.2 GCM).
                let start = out.len();
                let mut need = data.len() + (data.len() / 16_384 + 1) * 64;
                loop {
                    out.resize(start + need, 0);
                    match w.encrypt(data, &mut out[start..]) {
                        Ok(n) => {
                            out.truncate(start + n);
                            return Ok(());
                        }
                        Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size }))
                            if required_size > need =>
                        {
                            need = required_size;
                        }
                        Err(e) => {
                            out.truncate(start);
                            return Err(rustls::Error::General(format!("encrypt: {e}")));
                        }
                    }
                }
            }
            ConnectionState::EncodeTlsData(mut e) => encode(&mut e, out),
            ConnectionState::TransmitTlsData(t) => t.done(),
            _ => return Err(rustls::Error::General("TLS session cannot send application data".into())),
        }
    }
}

/// Append a close_notify alert to `out` (best effort: nothing if the session cannot send).
pub fn close_notify(sess: &mut Session, out: &mut Vec<u8>) {
    let UnbufferedStatus { state, .. } = sess.process_tls_records(&mut []);
    if let Ok(ConnectionState::WriteTraffic(mut w)) = state {
        let start = out.len();
        out.resize(start + 64, 0);
        let n = w.queue_close_notify(&mut out[start..]).unwrap_or(0);
        out.truncate(start + n);
    }
}

/// Whether a completed handshake resumed a session.
pub fn resumed(sess: &Session) -> bool {
    sess.handshake_kind() == Some(HandshakeKind::Resumed)
}

/// Whether the first bytes of a connection on a TLS port look like a plain HTTP request
/// (`GET /…`), which deserves an HTTP answer rather than a TLS alert.
pub fn looks_like_http(first: &[u8]) -> bool {
    first.len() >= 4
        && first[..first.len().min(8)].iter().take_while(|b| b.is_ascii_uppercase()).count() >= 3
        && first.iter().take(8).any(|b| *b == b' ')
}

/// Whether a connection's first record is a ClientHello whose `legacy_version` is below
/// TLS 1.2: such a client speaks TLS 1.1 at most (TLS 1.3 clients put 1.2 there, RFC 8446
/// §4.1.2). rustls would fail it later, on the signature schemes a TLS 1.0 client lacks,
/// with a vaguer alert.
pub fn offers_only_old_versions(first: &[u8]) -> bool {
    first.len() >= 11 && first[0] == 0x16 && first[5] == 0x01 && u16::from_be_bytes([first[9], first[10]]) < 0x0303
}

/// A fatal `protocol_version` alert record (RFC 8446 §6.2), in a TLS 1.0 record an old
/// client can read.
pub const PROTOCOL_VERSION_ALERT: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_910_399), "2026-11-28T23:59:59Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn http_is_told_from_tls() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"POST /x HTTP/1.1\r\n"));
        assert!(!looks_like_http(&[0x16, 0x03, 0x01, 0x00, 0xa0]));
        assert!(!looks_like_http(b"\x00\x01garbage"));
        assert!(!looks_like_http(b"GE"));
    }

    #[test]
    fn old_client_hellos_are_recognised() {
        let hello = |v: [u8; 2]| [&[0x16, 0x03, 0x01, 0x00, 0x2d, 0x01, 0x00, 0x00, 0x29][..], &v].concat();
        assert!(offers_only_old_versions(&hello([0x03, 0x01])));
        assert!(offers_only_old_versions(&hello([0x03, 0x02])));
        assert!(!offers_only_old_versions(&hello([0x03, 0x03])));
        assert!(!offers_only_old_versions(&hello([0x03, 0x01])[..10]));
    }

    #[test]
    fn missing_files_name_their_key() {
        let e = load("/nonexistent/cert.pem", "/nonexistent/key.pem").unwrap_err();
        assert_eq!(e.key, "server.tls.cert_file");
        assert!(e.message.contains("cannot read /nonexistent/cert.pem"), "{e}");
        let e = load("", "k").unwrap_err();
        assert_eq!(e.to_string(), "server.tls.cert_file: not set");
    }

    #[test]
    fn not_pem_is_refused() {
        let dir = std::env::temp_dir().join(format!("gw-tls-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("junk.pem");
        fs::write(&f, "hello\n").unwrap();
        let e = load(f.to_str().unwrap(), f.to_str().unwrap()).unwrap_err();
        assert_eq!(e.key, "server.tls.cert_file");
        assert!(e.message.contains("no PEM certificate"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}

/// A rustls client against our server session, in memory: the record layer both ways,
/// key updates, close_notify, reloads.
#[cfg(test)]
mod session_tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};
    use std::io::{Read, Write};

    struct Pki {
        dir: std::path::PathBuf,
        ca: rcgen::Certificate,
        ca_key: rcgen::KeyPair,
    }

    impl Pki {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("gw-tls-{tag}-{}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = p.self_signed(&ca_key).unwrap();
            Self { dir, ca, ca_key }
        }

        /// A leaf for localhost: (cert file, key file, serial hex).
        fn leaf(&self, name: &str, alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
            let key = rcgen::KeyPair::generate_for(alg).unwrap();
            let p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
            let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
            let (c, k) = (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}.key")));
            fs::write(&c, cert.pem()).unwrap();
            fs::write(&k, key.serialize_pem()).unwrap();
            (c.to_str().unwrap().into(), k.to_str().unwrap().into())
        }

        fn client(&self, versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ClientConfig> {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.der().clone()).unwrap();
            let mut c = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(c)
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    /// Move the client's pending records to the server; return the server's plaintext.
    fn to_server(
        client: &mut ClientConnection,
        server: &mut Session,
        raw: &mut Vec<u8>,
        back: &mut Vec<u8>,
    ) -> (Vec<u8>, Progress) {
        while client.wants_write() {
            client.write_tls(raw).unwrap();
        }
        let mut plain = Vec::new();
        let (used, p) = process(server, raw, &mut plain, back).unwrap();
        raw.drain(..used);
        (plain, p)
    }

    /// Feed the server's records to the client; return the client's plaintext.
    fn to_client(client: &mut ClientConnection, out: &mut Vec<u8>) -> Vec<u8> {
        let mut rd = &out[..];
        let mut got = Vec::new();
        while !rd.is_empty() {
            client.read_tls(&mut rd).unwrap();
            client.process_new_packets().unwrap();
            let _ = client.reader().read_to_end(&mut got);
        }
        out.clear();
        got
    }

    fn connect(
        pki: &Pki,
        server: &mut Session,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> ClientConnection {
        let mut client =
            ClientConnection::new(pki.client(versions), ServerName::try_from("localhost").unwrap()).unwrap();
        let (mut raw, mut out) = (Vec::new(), Vec::new());
        for _ in 0..10 {
            let (plain, p) = to_server(&mut client, server, &mut raw, &mut out);
            assert!(plain.is_empty());
            to_client(&mut client, &mut out);
            if p == Progress::Open && !client.is_handshaking() {
                return client;
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn records_both_ways_key_updates_and_close_notify() {
        let pki = Pki::new("rec");
        for (alg, versions) in [
            (&rcgen::PKCS_ECDSA_P256_SHA256, &[&rustls::version::TLS13][..]),
            (&rcgen::PKCS_ECDSA_P256_SHA256, &[&rustls::version::TLS12][..]),
            (&rcgen::PKCS_ED25519, &[&rustls::version::TLS13][..]),
        ] {
            let (c, k) = pki.leaf("leaf", alg);
            let acceptor = Acceptor::new(&c, &k).unwrap();
            let mut server = acceptor.session().unwrap();
            let mut client = connect(&pki, &mut server, versions);
            assert_eq!(client.alpn_protocol(), Some(&b"http/1.1"[..]));
            let (mut raw, mut out) = (Vec::new(), Vec::new());
            // Client to server, split into many records, and a 40 KiB message.
            let big: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
            client.writer().write_all(&big).unwrap();
            let (plain, _) = to_server(&mut client, &mut server, &mut raw, &mut out);
            assert_eq!(plain, big);
            // Server to client: one record batch per call.
            encrypt(&mut server, b"hello", &mut out).unwrap();
            encrypt(&mut server, &big, &mut out).unwrap();
            let got = to_client(&mut client, &mut out);
            assert_eq!(&got[..5], b"hello");
            assert_eq!(&got[5..], &big[..]);
            if versions[0] == &rustls::version::TLS13 {
                // The client rotates its keys; the server answers with its own update
                // (on `out`) and both directions keep working.
                client.refresh_traffic_keys().unwrap();
                client.writer().write_all(b"after update").unwrap();
                let (plain, _) = to_server(&mut client, &mut server, &mut raw, &mut out);
                assert_eq!(plain, b"after update");
                encrypt(&mut server, b"reply", &mut out).unwrap();
                assert_eq!(to_client(&mut client, &mut out), b"reply");
            }
            // close_notify from the client: the session reports it.
            client.send_close_notify();
            let (_, p) = to_server(&mut client, &mut server, &mut raw, &mut out);
            assert_eq!(p, Progress::PeerClosed);
        }
    }

    #[test]
    fn a_record_split_anywhere_is_decrypted_once_whole() {
        let pki = Pki::new("split");
        let (c, k) = pki.leaf("leaf", &rcgen::PKCS_ECDSA_P256_SHA256);
        let acceptor = Acceptor::new(&c, &k).unwrap();
        let mut server = acceptor.session().unwrap();
        let mut client = connect(&pki, &mut server, &[&rustls::version::TLS13]);
        client.writer().write_all(b"0123456789").unwrap();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let (mut held, mut out, mut plain) = (Vec::new(), Vec::new(), Vec::new());
        for b in wire {
            held.push(b);
            let (used, _) = process(&mut server, &mut held, &mut plain, &mut out).unwrap();
            held.drain(..used);
        }
        assert_eq!(plain, b"0123456789");
        assert!(held.is_empty());
    }

    #[test]
    fn tampered_records_fail_with_an_alert() {
        let pki = Pki::new("tamper");
        let (c, k) = pki.leaf("leaf", &rcgen::PKCS_ECDSA_P256_SHA256);
        let acceptor = Acceptor::new(&c, &k).unwrap();
        let mut server = acceptor.session().unwrap();
        let mut client = connect(&pki, &mut server, &[&rustls::version::TLS13]);
        client.writer().write_all(b"secret").unwrap();
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire).unwrap();
        }
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let (mut out, mut plain) = (Vec::new(), Vec::new());
        assert!(process(&mut server, &mut wire, &mut plain, &mut out).is_err());
        assert!(plain.is_empty());
        assert_eq!(out.first(), Some(&0x17), "an encrypted alert record goes out");
    }

    #[test]
    fn an_error_in_the_middle_of_a_handshake_message_is_an_error_not_a_panic() {
        let pki = Pki::new("midhs");
        let (c, k) = pki.leaf("leaf", &rcgen::PKCS_ECDSA_P256_SHA256);
        let acceptor = Acceptor::new(&c, &k).unwrap();
        // A ClientHello that announces 1,000 bytes and brings 6, then a record of an
        // unknown content type; and the same with a truncated record header after it.
        let start = [0x16, 0x03, 0x01, 0x00, 0x0a, 0x01, 0x00, 0x03, 0xe8, 0x03, 0x03, 0, 0, 0, 0];
        for tail in [
            &[0xff, 0x03, 0x03, 0x00, 0x01, 0x00][..],
            &[0x17, 0x03, 0x03, 0x00, 0x05, 1, 2, 3, 4, 5][..],
            &[0x16, 0x03][..],
        ] {
            let mut server = acceptor.session().unwrap();
            let (mut plain, mut out) = (Vec::new(), Vec::new());
            let mut input = [&start[..], tail].concat();
            let first = process(&mut server, &mut input, &mut plain, &mut out);
            // Whatever rustls makes of it, calling again (as a read loop would) must not panic.
            let mut more = vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];
            let second = process(&mut server, &mut more, &mut plain, &mut out);
            assert!(first.is_err() || second.is_err() || matches!(first, Ok((_, Progress::Handshaking))));
            assert!(plain.is_empty());
        }
    }

    #[test]
    fn reload_swaps_for_new_sessions_and_keeps_the_old_on_error() {
        let pki = Pki::new("reload");
        let (c1, k1) = pki.leaf("one", &rcgen::PKCS_ECDSA_P256_SHA256);
        let acceptor = Acceptor::new(&c1, &k1).unwrap();
        let first = acceptor.info();
        let (c2, k2) = pki.leaf("two", &rcgen::PKCS_ECDSA_P256_SHA256);
        fs::copy(&c2, &c1).unwrap();
        // Cert two with key one: refused, the served certificate is unchanged.
        let e = acceptor.reload().unwrap_err();
        assert_eq!(e.key, "server.tls.key_file");
        assert!(e.message.contains("does not match"), "{e}");
        assert_eq!(acceptor.info(), first);
        fs::copy(&k2, &k1).unwrap();
        let second = acceptor.reload().unwrap();
        assert_ne!(second.serial, first.serial);
        assert_eq!(acceptor.info(), second);
        let mut server = acceptor.session().unwrap();
        let client = connect(&pki, &mut server, &[&rustls::version::TLS13]);
        let served = client.peer_certificates().unwrap()[0].clone();
        let (_, leaf) = x509_parser::parse_x509_certificate(&served).unwrap();
        assert_eq!(leaf.raw_serial().iter().map(|b| format!("{b:02x}")).collect::<String>(), second.serial);
    }
}
