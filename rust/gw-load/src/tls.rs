//! `wss://`: the rustls client configuration and the glue between rustls's
//! buffered `ClientConnection` and our non-blocking sockets.
//!
//! Reads: one `read(2)` of up to the thread's scratch buffer (256 KiB) per
//! readiness event, as on the plain path; the ciphertext is then fed to rustls
//! from memory (`read_tls` takes at most ~4 KiB per call, so letting it read the
//! socket itself would cost a system call per 4 KiB), each batch decrypted by
//! `process_new_packets`, and the plaintext handed to the WebSocket parser
//! straight out of rustls's buffer (`fill_buf`, no copy).
//!
//! Writes: frames are encoded into `Conn::out` as on the plain path; a flush
//! moves them into rustls (`writer()`, which encrypts at once, or buffers until
//! the handshake is done) and writes the records with `write_tls` (vectored).
//! rustls buffers at most 64 KiB of records; the rest stays in `out`, so the
//! publish backlog check keeps working.

use crate::cli::TlsVersion;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionMemoryCache, Resumption, WebPkiServerVerifier};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CipherSuite, ClientConfig, ClientConnection, DigitallySignedStruct, HandshakeKind, RootCertStore, SignatureScheme,
};
use std::io::{self, BufRead, Write};
use std::sync::{Arc, Mutex};

/// Client session cache entries (one per server name, with up to 8 TLS 1.3
/// tickets each): far more than the one server a run talks to.
const SESSION_CACHE: usize = 256;

/// What every connection of a run shares.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
    resume: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl Tls {
    /// Trusts the certificates in `ca_pem` (nothing else), offers ALPN
    /// `http/1.1`, keeps a session cache when `resume` (off: every connection
    /// is a full handshake), and limits the protocol to `version` if given.
    /// `verify_once`: see [`VerifyOnce`].
    pub fn new(
        host: &str,
        ca_pem: &str,
        resume: bool,
        version: Option<TlsVersion>,
        verify_once: bool,
    ) -> Result<Tls, String> {
        let mut roots = RootCertStore::empty();
        let mut n = 0;
        for cert in CertificateDer::pem_file_iter(ca_pem).map_err(|e| format!("--ca {ca_pem}: {e}"))? {
            let cert = cert.map_err(|e| format!("--ca {ca_pem}: {e}"))?;
            roots.add(cert).map_err(|e| format!("--ca {ca_pem}: {e}"))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("--ca {ca_pem}: no certificate in the file"));
        }
        let versions: &[&rustls::SupportedProtocolVersion] = match version {
            Some(TlsVersion::V12) => &[&rustls::version::TLS12],
            Some(TlsVersion::V13) => &[&rustls::version::TLS13],
            None => rustls::ALL_VERSIONS,
        };
        let provider = Arc::new(browser_order(aws_lc_rs::default_provider()));
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        if verify_once {
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("TLS verifier: {e}"))?;
            config.dangerous().set_certificate_verifier(Arc::new(VerifyOnce { inner, verified: Mutex::default() }));
        }
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = if resume { Resumption::in_memory_sessions(SESSION_CACHE) } else { Resumption::disabled() };
        // IPv6 literals arrive with brackets from the URL authority.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server_name =
            ServerName::try_from(bare.to_string()).map_err(|_| format!("{host} is not a valid TLS server name"))?;
        Ok(Tls { config: Arc::new(config), server_name, resume })
    }

    /// The same settings with a session cache of its own (when resuming):
    /// one emulated client that reconnects, as a device does. Sharing one cache
    /// among many concurrent connections instead would make them compete for
    /// the server's tickets (rustls keeps at most 8 per server and uses each
    /// once; a server may send one per connection).
    pub fn with_own_sessions(&self) -> Tls {
        if !self.resume {
            return self.clone();
        }
        let mut config = (*self.config).clone();
        config.resumption = Resumption::store(Arc::new(ClientSessionMemoryCache::new(1)));
        Tls { config: Arc::new(config), server_name: self.server_name.clone(), resume: true }
    }

    /// A client session for one connection (generates its key share).
    pub fn connect(&self) -> Result<Box<ClientConnection>, rustls::Error> {
        ClientConnection::new(self.config.clone(), self.server_name.clone()).map(Box::new)
    }
}

/// aws-lc-rs's suites with AES-128-GCM before AES-256-GCM in each TLS
/// version, the order browsers and the Android/iOS stacks offer (rustls's
/// default puts AES-256 first). The server picks; most follow the client's
/// order.
fn browser_order(mut p: CryptoProvider) -> CryptoProvider {
    let rank = |s: CipherSuite| match s {
        CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => 3,
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 4,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 => 5,
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 6,
        _ => 7,
    };
    p.cipher_suites.sort_by_key(|s| rank(s.suite())); // stable: the rest keep their order
    p
}

/// `--tls-verify-once`: the first handshake that presents a certificate
/// verifies it fully (chain to --ca, name, validity, and the handshake
/// signature); later handshakes presenting the byte-identical certificate
/// skip both checks.
///
/// NOTE: a load-generator shortcut for full-handshake benchmarks with ECDSA
/// certificates. There the client's share (two P-256 verifications, chain
/// and CertificateVerify, ~35 % of its CPU per handshake in a profile) costs
/// more than the server's one P-256 signature, so one client core could not
/// saturate one server core. The server's work is the same either way. Never
/// for anything but a benchmark against your own server.
#[derive(Debug)]
struct VerifyOnce {
    inner: Arc<WebPkiServerVerifier>,
    /// End-entity certificates that passed (one server per run: a tiny list).
    verified: Mutex<Vec<Vec<u8>>>,
}

impl VerifyOnce {
    fn known(&self, cert: &CertificateDer<'_>) -> bool {
        self.verified.lock().map(|v| v.iter().any(|c| c[..] == cert[..])).unwrap_or(false)
    }

    /// A handshake signature: skipped for a known certificate, else verified
    /// by `inner` (and the certificate remembered).
    fn signature(
        &self,
        cert: &CertificateDer<'_>,
        inner: impl FnOnce() -> Result<HandshakeSignatureValid, rustls::Error>,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if self.known(cert) {
            return Ok(HandshakeSignatureValid::assertion());
        }
        let ok = inner()?;
        self.remember(cert);
        Ok(ok)
    }

    fn remember(&self, cert: &CertificateDer<'_>) {
        if let Ok(mut v) = self.verified.lock() {
            if !v.iter().any(|c| c[..] == cert[..]) {
                v.push(cert.to_vec());
            }
        }
    }
}

impl ServerCertVerifier for VerifyOnce {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.known(end_entity) {
            return Ok(ServerCertVerified::assertion());
        }
        // Remembered only once its handshake signature verified too.
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(cert, || self.inner.verify_tls12_signature(message, cert, dss))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(cert, || self.inner.verify_tls13_signature(message, cert, dss))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why a TLS connection failed (the `closes_by_code` key is `tls_<this>`).
pub fn error_key(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => format!("cert_{c:?}"),
        E::AlertReceived(a) => format!("alert_{a:?}"),
        E::NoApplicationProtocol => "no_alpn".into(),
        E::PeerIncompatible(_) => "incompatible".into(),
        E::PeerMisbehaved(_) => "misbehaved".into(),
        E::InvalidMessage(_) => "invalid_message".into(),
        E::DecryptError => "decrypt".into(),
        _ => "other".into(),
    }
}

/// What feeding ciphertext produced besides plaintext.
pub enum Fed {
    /// More bytes are needed (or everything was consumed).
    More,
    /// The peer sent `close_notify`: no more plaintext will come.
    Closed,
}

/// Feeds `wire` (ciphertext just read from the socket) to `tls` and calls
/// `on_plain` with each piece of plaintext, in order, straight out of rustls's
/// buffer. `on_plain`'s error stops the feeding.
pub fn feed<E>(
    tls: &mut ClientConnection,
    mut wire: &[u8],
    tls_err: impl Fn(rustls::Error) -> E,
    mut on_plain: impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<Fed, E> {
    while !wire.is_empty() {
        // Reading from a slice cannot fail except for rustls's own limits,
        // which draining the plaintext after every batch keeps us under.
        if let Err(e) = tls.read_tls(&mut wire) {
            debug_assert!(false, "read_tls from memory failed: {e}");
            return Err(tls_err(rustls::Error::General(e.to_string())));
        }
        let state = tls.process_new_packets().map_err(&tls_err)?;
        if state.plaintext_bytes_to_read() > 0 {
            let mut rd = tls.reader();
            loop {
                match rd.fill_buf() {
                    Ok([]) => return Ok(Fed::Closed),
                    Ok(buf) => {
                        let n = buf.len();
                        on_plain(buf)?;
                        rd.consume(n);
                    }
                    Err(_) => break, // WouldBlock: drained
                }
            }
        }
        if state.peer_has_closed() {
            return Ok(Fed::Closed);
        }
    }
    Ok(Fed::More)
}

/// Moves `out` into rustls and writes records to `sock` until both are empty
/// or the socket would block. Returns how many bytes of `out` rustls took.
pub fn flush<S: Write>(tls: &mut ClientConnection, sock: &mut S, out: &[u8]) -> io::Result<usize> {
    let mut off = 0;
    loop {
        let mut took = 0;
        if off < out.len() {
            took = tls.writer().write(&out[off..])?;
            off += took;
        }
        if !tls.wants_write() {
            // Nothing to send: done, or rustls holds the plaintext until the
            // handshake completes (it writes it then, see the read path).
            if off == out.len() || took == 0 {
                return Ok(off);
            }
            continue;
        }
        match tls.write_tls(sock) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(off),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// A summary of one finished handshake, for the report.
pub struct Negotiated {
    pub version: String,
    pub cipher: String,
    pub group: String,
    pub alpn: String,
}

pub fn negotiated(tls: &ClientConnection) -> Negotiated {
    let s = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    Negotiated {
        version: s(tls.protocol_version().map(|v| format!("{v:?}"))),
        cipher: s(tls.negotiated_cipher_suite().map(|c| format!("{:?}", c.suite()))),
        group: s(tls.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()))),
        alpn: s(tls.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned())),
    }
}

/// True for a resumed handshake, None while it is not known yet.
pub fn resumed(tls: &ClientConnection) -> Option<bool> {
    tls.handshake_kind().map(|k| k == HandshakeKind::Resumed)
}

/// Test PKI made at test time: a CA, a server certificate for `localhost`
/// and 127.0.0.1 signed by it, and a rustls server config (tickets on).
#[cfg(test)]
pub mod testing {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::crypto::aws_lc_rs;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::ServerConfig;
    use std::path::PathBuf;
    use std::sync::Arc;

    pub struct Pki {
        /// PEM file with the CA certificate (deleted on drop).
        pub ca_path: PathBuf,
        pub server: Arc<ServerConfig>,
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.ca_path);
        }
    }

    pub fn pki() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, &ca_key);
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();

        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ca_path = std::env::temp_dir().join(format!("gw-load-test-ca-{}-{n}.pem", std::process::id()));
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();

        let mut server = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        server.ticketer = aws_lc_rs::Ticketer::new().unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Pki { ca_path, server: Arc::new(server) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::ServerConnection;
    use std::io::Read;

    /// Moves the server's pending records to the client through `feed`, in
    /// pieces of `chunk` bytes; returns the plaintext the client got.
    fn server_to_client(srv: &mut ServerConnection, cli: &mut ClientConnection, chunk: usize) -> (Vec<u8>, bool) {
        let mut wire = Vec::new();
        while srv.wants_write() {
            srv.write_tls(&mut wire).unwrap();
        }
        let mut plain = Vec::new();
        let mut closed = false;
        for piece in wire.chunks(chunk.max(1)) {
            let fed = feed(
                cli,
                piece,
                |e| e,
                |p| {
                    plain.extend_from_slice(p);
                    Ok(())
                },
            )
            .unwrap();
            closed |= matches!(fed, Fed::Closed);
        }
        (plain, closed)
    }

    /// Feeds records to the server; returns its plaintext.
    fn server_feed(srv: &mut ServerConnection, mut wire: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        while !wire.is_empty() {
            srv.read_tls(&mut wire).unwrap();
            srv.process_new_packets().unwrap();
            let _ = srv.reader().read_to_end(&mut plain);
        }
        plain
    }

    /// Client records (written by `flush`) into the server; returns its plaintext.
    fn client_to_server(cli: &mut ClientConnection, srv: &mut ServerConnection, out: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        let mut off = 0;
        loop {
            let mut wire = Vec::new();
            off += flush(cli, &mut wire, &out[off..]).unwrap();
            plain.extend(server_feed(srv, &wire));
            // Leftover input means rustls's 64 KiB buffer was full: go round.
            if off == out.len() && !cli.wants_write() {
                return plain;
            }
        }
    }

    fn handshake(tls: &Tls, pki: &testing::Pki) -> (ClientConnection, ServerConnection) {
        let mut cli = *tls.connect().unwrap();
        let mut srv = ServerConnection::new(pki.server.clone()).unwrap();
        srv.set_buffer_limit(None);
        // The request written before the handshake is held until it is done.
        assert!(client_to_server(&mut cli, &mut srv, b"GET / HTTP/1.1\r\n\r\n").is_empty());
        for _ in 0..4 {
            let (p, _) = server_to_client(&mut srv, &mut cli, 7);
            assert!(p.is_empty());
            let got = client_to_server(&mut cli, &mut srv, b"");
            if !cli.is_handshaking() && !got.is_empty() {
                assert_eq!(got, b"GET / HTTP/1.1\r\n\r\n");
                // Tickets (TLS 1.3) go out now.
                let _ = server_to_client(&mut srv, &mut cli, 100);
                return (cli, srv);
            }
        }
        panic!("handshake did not complete");
    }

    #[test]
    fn data_both_ways_in_any_split_then_close_notify() {
        let pki = testing::pki();
        let tls = Tls::new("127.0.0.1", pki.ca_path.to_str().unwrap(), true, None, false).unwrap();
        let (mut cli, mut srv) = handshake(&tls, &pki);
        assert_eq!(cli.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(negotiated(&cli).cipher, "TLS13_AES_128_GCM_SHA256", "browser order");
        // Server -> client: many small records and one large write, fed in odd pieces.
        let mut sent = Vec::new();
        for i in 0..300u32 {
            let m = format!("message {i} {}", "x".repeat((i % 50) as usize));
            srv.writer().write_all(m.as_bytes()).unwrap();
            sent.extend_from_slice(m.as_bytes());
        }
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        srv.writer().write_all(&big).unwrap();
        sent.extend_from_slice(&big);
        for chunk in [1usize, 1000, 5, 70_000] {
            // Same bytes again, each time cut differently.
            let (got, closed) = server_to_client(&mut srv, &mut cli, chunk);
            assert!(!closed);
            assert_eq!(got, sent, "chunk {chunk}");
            srv.writer().write_all(&sent).unwrap();
        }
        let _ = server_to_client(&mut srv, &mut cli, 4096);
        // Client -> server: more than rustls's 64 KiB buffer in one flush.
        let up: Vec<u8> = (0..200_000u32).map(|i| (i % 13) as u8).collect();
        assert_eq!(client_to_server(&mut cli, &mut srv, &up), up);
        srv.send_close_notify();
        let (_, closed) = server_to_client(&mut srv, &mut cli, 3);
        assert!(closed);
    }

    #[test]
    fn resumption_follows_the_option() {
        let pki = testing::pki();
        let ca = pki.ca_path.to_str().unwrap();
        for version in [TlsVersion::V12, TlsVersion::V13] {
            let on = Tls::new("localhost", ca, true, Some(version), false).unwrap();
            let (first, _) = handshake(&on, &pki);
            assert_eq!(resumed(&first), Some(false));
            let (second, _) = handshake(&on, &pki);
            assert_eq!(resumed(&second), Some(true), "{version:?}");
            let off = Tls::new("localhost", ca, false, Some(version), false).unwrap();
            let _ = handshake(&off, &pki);
            let (again, _) = handshake(&off, &pki);
            assert_eq!(resumed(&again), Some(false), "{version:?}");
        }
    }

    #[test]
    fn certificates_are_checked() {
        let pki = testing::pki();
        let other = testing::pki();
        // Trusting another CA: the handshake fails on the certificate.
        for once in [false, true] {
            let tls = Tls::new("localhost", other.ca_path.to_str().unwrap(), false, None, once).unwrap();
            let mut cli = *tls.connect().unwrap();
            let mut srv = ServerConnection::new(pki.server.clone()).unwrap();
            let _ = client_to_server(&mut cli, &mut srv, b"");
            let mut wire = Vec::new();
            while srv.wants_write() {
                srv.write_tls(&mut wire).unwrap();
            }
            let err = feed(&mut cli, &wire, |e| e, |_| Ok(())).err().expect("untrusted certificate accepted");
            assert!(error_key(&err).starts_with("cert_"), "{err:?}");
        }
        // A name the certificate does not carry.
        let tls = Tls::new("example.com", pki.ca_path.to_str().unwrap(), false, None, false).unwrap();
        let mut cli = *tls.connect().unwrap();
        let mut srv = ServerConnection::new(pki.server.clone()).unwrap();
        let _ = client_to_server(&mut cli, &mut srv, b"");
        let mut wire = Vec::new();
        while srv.wants_write() {
            srv.write_tls(&mut wire).unwrap();
        }
        assert!(feed(&mut cli, &wire, |e| e, |_| Ok(())).is_err());
        // --tls-verify-once: full handshakes keep working with the remembered certificate.
        let once = Tls::new("127.0.0.1", pki.ca_path.to_str().unwrap(), false, None, true).unwrap();
        for _ in 0..3 {
            let (cli, _) = handshake(&once, &pki);
            assert_eq!(resumed(&cli), Some(false));
        }
        assert!(Tls::new("localhost", "/nonexistent.pem", true, None, false).is_err());
    }
}
