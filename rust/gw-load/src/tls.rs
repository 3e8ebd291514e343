//! `wss://`: the rustls client configuration, and each connection's TLS
//! state ([`Session`]) between our non-blocking sockets and the WebSocket
//! code. rustls's *unbuffered* client API: the caller owns every buffer.
//!
//! Reads: one `read(2)` of up to the thread's scratch buffer per readiness
//! event, as on the plain path, into the scratch buffer after [`HEADROOM`]
//! bytes of room. The records are then decrypted in that buffer: by rustls
//! during the handshake, and afterwards, with `--tls-record-layer direct` (the
//! default), by [`Records`] on the keys rustls negotiated (no copy, no
//! allocation per record: see `records.rs` for why). A record cut by the end
//! of a read is kept by the connection and put in the room in front of the
//! next read's bytes.
//!
//! Writes: frames are encoded into `Conn::out` as on the plain path; a flush
//! encrypts them into [`Session::wire`] (held back until the handshake is
//! done, then sent with the client's `Finished`) and writes that. At most
//! 64 KiB of records wait there; the rest stays in `out`, so the publish
//! backlog check keeps working.
//!
//! An idle connection keeps rustls's key state and no buffers (both byte
//! vectors are released once empty).

use crate::cli::TlsVersion;
use crate::records::{Opened, Records};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{
    ClientConnectionData, ClientSessionMemoryCache, Resumption, UnbufferedClientConnection, WebPkiServerVerifier,
};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::{CipherSuite, ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, SignatureScheme};
use std::io::{self, Write};
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
    /// Our record layer after the handshake (`--tls-record-layer direct`).
    direct: bool,
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
    /// `verify_once`: see [`VerifyOnce`]. `direct`: after the handshake,
    /// records are decrypted by [`Records`] instead of rustls.
    pub fn new(
        host: &str,
        ca_pem: &str,
        resume: bool,
        version: Option<TlsVersion>,
        verify_once: bool,
        direct: bool,
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
        // The traffic keys leave rustls only for our record layer.
        config.enable_secret_extraction = direct;
        // IPv6 literals arrive with brackets from the URL authority.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let server_name =
            ServerName::try_from(bare.to_string()).map_err(|_| format!("{host} is not a valid TLS server name"))?;
        Ok(Tls { config: Arc::new(config), server_name, resume, direct })
    }

    /// The settings for one emulated client of handshake mode: a session
    /// cache of its own (when resuming), for a client that reconnects, as a
    /// device does. Sharing one cache among many concurrent connections
    /// instead would make them compete for the server's tickets (rustls keeps
    /// at most 8 per server and uses each once; a server may send one per
    /// connection). Records stay with rustls: the connections close right
    /// after the handshake, so our record layer would only add the switch.
    pub fn emulated_client(&self) -> Tls {
        let mut config = (*self.config).clone();
        config.enable_secret_extraction = false;
        if self.resume {
            config.resumption = Resumption::store(Arc::new(ClientSessionMemoryCache::new(1)));
        }
        Tls { config: Arc::new(config), server_name: self.server_name.clone(), resume: self.resume, direct: false }
    }

    /// The TLS state of one new connection (generates its key share and
    /// puts the ClientHello in [`Session::wire`]).
    pub fn connect(&self) -> Result<Box<Session>, rustls::Error> {
        let conn = UnbufferedClientConnection::new(self.config.clone(), self.server_name.clone())?;
        Session::new(conn, self.direct).map(Box::new)
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

/// Where a session stands after its input was processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The handshake needs more input.
    Handshaking,
    /// Application data may flow; more input is welcome.
    Open,
    /// The server sent `close_notify`: no more plaintext will come.
    PeerClosed,
}

/// Room left in front of the bytes just read (see [`Session::read`]): the
/// largest record, so the start of a record a read ended in goes in front of
/// the next read's bytes without moving them.
pub const HEADROOM: usize = 20 * 1024;
const _: () = assert!(HEADROOM >= crate::records::MAX_RECORD);
/// At most this many bytes of records wait in [`Session::wire`]; more
/// plaintext stays with the caller (so its backlog checks keep working).
const WIRE_LIMIT: usize = 64 * 1024;

/// One wss:// connection's TLS state, without I/O: ciphertext in
/// ([`Session::read`]), plaintext out through a callback, records to send in
/// [`Session::wire`] (written by [`flush`]).
pub struct Session {
    state: State,
    /// Records to send, in order: handshake flights, encrypted frames, alerts.
    pub wire: Vec<u8>,
    /// The start of a record (during the handshake: of a flight) the last read
    /// ended in. Empty, and unallocated, most of the time.
    pending: Vec<u8>,
}

enum State {
    /// rustls's unbuffered client drives: the handshake, and with `direct`
    /// off everything after it.
    Rustls { conn: Box<UnbufferedClientConnection>, direct: bool },
    /// After the handshake: our record layer on rustls's keys.
    Direct { records: Records, info: Summary },
    /// The switch to `Direct` failed (the connection is being dropped).
    Failed,
}

/// What the handshake negotiated, kept when rustls's connection is handed
/// over to [`Records`] (plain values: nothing allocated per connection).
#[derive(Clone, Copy)]
struct Summary {
    resumed: Option<bool>,
    version: Option<rustls::ProtocolVersion>,
    suite: Option<CipherSuite>,
    group: Option<rustls::NamedGroup>,
    /// We offer `http/1.1` only, so an agreed protocol is that one.
    alpn: bool,
    /// TLS 1.3 tickets that arrived before the switch.
    tickets: u32,
}

impl Summary {
    fn of(c: &UnbufferedClientConnection) -> Summary {
        Summary {
            resumed: c.handshake_kind().map(|k| k == HandshakeKind::Resumed),
            version: c.protocol_version(),
            suite: c.negotiated_cipher_suite().map(|s| s.suite()),
            group: c.negotiated_key_exchange_group().map(|g| g.name()),
            alpn: c.alpn_protocol().is_some(),
            tickets: c.tls13_tickets_received(),
        }
    }
}

impl Session {
    fn new(conn: UnbufferedClientConnection, direct: bool) -> Result<Session, rustls::Error> {
        let mut s =
            Session { state: State::Rustls { conn: Box::new(conn), direct }, wire: Vec::new(), pending: Vec::new() };
        // The ClientHello.
        s.process(&mut [], &|e| e, &mut |_| Ok(()))?;
        Ok(s)
    }

    /// Processes the bytes just read, `buf[at..]`; `buf[..at]` is free room
    /// ([`HEADROOM`] on the hot path) where the start of a record left over
    /// from the previous read is put, so that nothing is copied but that
    /// start. Records are decrypted in `buf` itself; each piece of plaintext
    /// goes to `on_plain`, in order. Records to send in reply (handshake
    /// flights, alerts before an error) are appended to [`Session::wire`].
    pub fn read<E>(
        &mut self,
        buf: &mut [u8],
        at: usize,
        tls_err: impl Fn(rustls::Error) -> E,
        mut on_plain: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<Progress, E> {
        let pre = self.pending.len();
        if pre > at {
            // A large handshake flight in pieces (or a caller without room):
            // gather it in `pending`.
            let mut input = std::mem::take(&mut self.pending);
            input.extend_from_slice(&buf[at..]);
            let (used, p) = self.process(&mut input, &tls_err, &mut on_plain)?;
            if used < input.len() {
                input.drain(..used);
                self.pending = input;
            }
            return Ok(p);
        }
        let start = at - pre;
        if pre > 0 {
            buf[start..at].copy_from_slice(&self.pending);
            self.pending = Vec::new();
        }
        let input = &mut buf[start..];
        let (used, p) = self.process(input, &tls_err, &mut on_plain)?;
        if used < input.len() {
            self.pending = input[used..].to_vec();
        }
        Ok(p)
    }

    fn process<E>(
        &mut self,
        input: &mut [u8],
        tls_err: &impl Fn(rustls::Error) -> E,
        on_plain: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(usize, Progress), E> {
        let (used, p) = match &mut self.state {
            State::Direct { records, .. } => {
                let (used, opened) = records.open(input, &mut self.wire, tls_err, on_plain)?;
                let p = match opened {
                    Opened::More => Progress::Open,
                    Opened::PeerClosed => Progress::PeerClosed,
                };
                return Ok((used, p));
            }
            State::Rustls { conn, direct } => {
                let (used, p) = drive(conn, input, &mut self.wire, tls_err, on_plain)?;
                if !(*direct && p == Progress::Open) {
                    return Ok((used, p));
                }
                (used, p)
            }
            State::Failed => return Err(tls_err(rustls::Error::General("TLS session failed".into()))),
        };
        // The handshake is done and rustls has nothing left to send: our
        // record layer takes over for the rest of the input.
        debug_assert_eq!(p, Progress::Open);
        self.switch().map_err(tls_err)?;
        let (more, p) = self.process(&mut input[used..], tls_err, on_plain)?;
        Ok((used + more, p))
    }

    fn switch(&mut self) -> Result<(), rustls::Error> {
        let State::Rustls { conn, .. } = std::mem::replace(&mut self.state, State::Failed) else {
            return Err(rustls::Error::General("no handshake to take over".into()));
        };
        let info = Summary::of(&conn);
        let records = Records::new(conn.dangerous_into_kernel_connection()?)?;
        self.state = State::Direct { records, info };
        Ok(())
    }

    /// Encrypts `data` into [`Session::wire`]; false (nothing taken) while
    /// the handshake is still going on.
    pub fn seal(&mut self, data: &[u8]) -> Result<bool, rustls::Error> {
        match &mut self.state {
            State::Direct { records, .. } => records.seal(data, &mut self.wire).map(|()| true),
            State::Rustls { conn, .. } if !conn.is_handshaking() => encrypt(conn, data, &mut self.wire).map(|()| true),
            State::Rustls { .. } => Ok(false),
            State::Failed => Err(rustls::Error::General("TLS session failed".into())),
        }
    }

    /// Appends a `close_notify` alert to [`Session::wire`] (nothing before the
    /// handshake is done).
    pub fn close_notify(&mut self) {
        match &mut self.state {
            State::Direct { records, .. } => {
                let _ = records.close_notify(&mut self.wire);
            }
            State::Rustls { conn, .. } => close_notify(conn, &mut self.wire),
            State::Failed => {}
        }
    }

    pub fn is_handshaking(&self) -> bool {
        match &self.state {
            State::Rustls { conn, .. } => conn.is_handshaking(),
            State::Direct { .. } | State::Failed => false,
        }
    }

    /// True for a resumed handshake, None while it is not known yet.
    pub fn resumed(&self) -> Option<bool> {
        self.summary().and_then(|s| s.resumed)
    }

    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.summary().and_then(|s| s.version)
    }

    /// TLS 1.3 session tickets received so far.
    pub fn tickets(&self) -> u32 {
        match &self.state {
            State::Rustls { conn, .. } => conn.tls13_tickets_received(),
            State::Direct { records, info } => info.tickets + records.tickets,
            State::Failed => 0,
        }
    }

    fn summary(&self) -> Option<Summary> {
        match &self.state {
            State::Rustls { conn, .. } => Some(Summary::of(conn)),
            State::Direct { info, .. } => Some(*info),
            State::Failed => None,
        }
    }

    /// What the handshake negotiated, for the report.
    pub fn negotiated(&self) -> Negotiated {
        let s = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        let info = self.summary();
        Negotiated {
            version: s(info.and_then(|i| i.version).map(|v| format!("{v:?}"))),
            cipher: s(info.and_then(|i| i.suite).map(|c| format!("{c:?}"))),
            group: s(info.and_then(|i| i.group).map(|g| format!("{g:?}"))),
            alpn: if info.is_some_and(|i| i.alpn) { "http/1.1".into() } else { "-".into() },
        }
    }
}

/// Runs rustls's unbuffered client over `input` (complete records are
/// consumed, a partial one is left): plaintext to `on_plain`, records to send
/// to `wire`. Returns the bytes consumed and where the session stands. On an
/// error the alert rustls prepared is appended to `wire`.
fn drive<E>(
    conn: &mut UnbufferedClientConnection,
    input: &mut [u8],
    wire: &mut Vec<u8>,
    tls_err: &impl Fn(rustls::Error) -> E,
    on_plain: &mut impl FnMut(&[u8]) -> Result<(), E>,
) -> Result<(usize, Progress), E> {
    let mut used = 0;
    loop {
        let UnbufferedStatus { mut discard, state } = conn.process_tls_records(&mut input[used..]);
        let state = match state {
            Ok(s) => s,
            Err(e) => {
                take_alert(conn, &mut input[used + discard..], wire);
                return Err(tls_err(e));
            }
        };
        match state {
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    let rec = rec.map_err(tls_err)?;
                    discard += rec.discard;
                    on_plain(rec.payload)?;
                }
            }
            ConnectionState::EncodeTlsData(mut e) => encode(&mut e, wire),
            // `wire` keeps it, in order, for the caller to send.
            ConnectionState::TransmitTlsData(t) => t.done(),
            ConnectionState::BlockedHandshake => return Ok((used + discard, Progress::Handshaking)),
            ConnectionState::WriteTraffic(_) => return Ok((used + discard, Progress::Open)),
            ConnectionState::PeerClosed | ConnectionState::Closed => return Ok((used + discard, Progress::PeerClosed)),
            _ => return Err(tls_err(rustls::Error::General("unexpected TLS state".into()))),
        }
        used += discard;
    }
}

/// Appends what an `EncodeTlsData` state holds to `wire`, sized exactly (an
/// idle connection keeps no spare capacity).
fn encode(e: &mut EncodeTlsData<'_, ClientConnectionData>, wire: &mut Vec<u8>) {
    let need = match e.encode(&mut []) {
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => required_size,
        _ => return, // empty, or already encoded
    };
    let start = wire.len();
    wire.resize(start + need, 0);
    let n = e.encode(&mut wire[start..]).unwrap_or(0);
    wire.truncate(start + n);
}

/// After an error rustls has usually queued a fatal alert: put it on `wire`.
/// One call only: the alert comes out before rustls looks at input again
/// (looking again would meet the failed record a second time). `rest` is the
/// input after what the failed call consumed, in case rustls does look (it
/// may still refer to a handshake message it was joining, so an empty slice
/// would not do).
fn take_alert(conn: &mut UnbufferedClientConnection, rest: &mut [u8], wire: &mut Vec<u8>) {
    if let Ok(ConnectionState::EncodeTlsData(mut e)) = conn.process_tls_records(rest).state {
        encode(&mut e, wire);
    }
}

/// Encrypts `data` with rustls (`--tls-record-layer rustls`, handshake mode)
/// as application-data records appended to `wire`.
fn encrypt(conn: &mut UnbufferedClientConnection, data: &[u8], wire: &mut Vec<u8>) -> Result<(), rustls::Error> {
    loop {
        match conn.process_tls_records(&mut []).state? {
            ConnectionState::WriteTraffic(mut w) => {
                // Per 16 KiB record at most 5 header + 1 type + 16 tag bytes
                // (TLS 1.3), 5 + 8 nonce + 16 tag (TLS 1.2).
                let start = wire.len();
                let mut need = data.len() + (data.len() / 16_384 + 1) * 64;
                loop {
                    wire.resize(start + need, 0);
                    match w.encrypt(data, &mut wire[start..]) {
                        Ok(n) => {
                            wire.truncate(start + n);
                            return Ok(());
                        }
                        Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size }))
                            if required_size > need =>
                        {
                            need = required_size;
                        }
                        Err(e) => {
                            wire.truncate(start);
                            return Err(rustls::Error::General(format!("encrypt: {e}")));
                        }
                    }
                }
            }
            ConnectionState::EncodeTlsData(mut e) => encode(&mut e, wire),
            ConnectionState::TransmitTlsData(t) => t.done(),
            _ => return Err(rustls::Error::General("TLS session cannot send application data".into())),
        }
    }
}

fn close_notify(conn: &mut UnbufferedClientConnection, wire: &mut Vec<u8>) {
    if let Ok(ConnectionState::WriteTraffic(mut w)) = conn.process_tls_records(&mut []).state {
        let mut rec = [0u8; 64];
        if let Ok(n) = w.queue_close_notify(&mut rec) {
            wire.extend_from_slice(&rec[..n]);
        }
    }
}

/// Encrypts `out` into the session's records (while fewer than 64 KiB of
/// them wait) and writes them to `sock` until both are sent or the socket
/// would block. Returns how many bytes of `out` were taken. During the
/// handshake `out` is held back and only handshake records go out.
pub fn flush<S: Write>(sess: &mut Session, sock: &mut S, out: &[u8]) -> io::Result<usize> {
    let mut off = 0;
    loop {
        if off < out.len() && sess.wire.len() < WIRE_LIMIT {
            let n = (out.len() - off).min(WIRE_LIMIT - sess.wire.len());
            if sess.seal(&out[off..off + n]).map_err(io::Error::other)? {
                off += n;
            }
        }
        if sess.wire.is_empty() {
            return Ok(off);
        }
        match sock.write(&sess.wire) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            // All sent: release the buffer (idle connections keep none).
            Ok(n) if n == sess.wire.len() => sess.wire = Vec::new(),
            Ok(n) => {
                sess.wire.drain(..n);
            }
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

/// Test PKI made at test time: a CA, a server certificate for `localhost`
/// and 127.0.0.1 signed by it, and a rustls server config (tickets on).
#[cfg(test)]
pub mod testing {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::crypto::aws_lc_rs;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use rustls::{CipherSuite, ServerConfig};
    use std::path::PathBuf;
    use std::sync::Arc;

    pub struct Pki {
        /// PEM file with the CA certificate (deleted on drop).
        pub ca_path: PathBuf,
        pub server: Arc<ServerConfig>,
        cert: CertificateDer<'static>,
        key: Vec<u8>,
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.ca_path);
        }
    }

    impl Pki {
        /// A server config like `server` offering only `suites`.
        pub fn server_with(&self, suites: &[CipherSuite]) -> Arc<ServerConfig> {
            server_config(&self.cert, &self.key, suites)
        }
    }

    /// Tickets on, ALPN `http/1.1`, aws-lc-rs's suites (only `suites` unless empty).
    fn server_config(cert: &CertificateDer<'static>, key: &[u8], suites: &[CipherSuite]) -> Arc<ServerConfig> {
        let mut provider = aws_lc_rs::default_provider();
        if !suites.is_empty() {
            provider.cipher_suites.retain(|s| suites.contains(&s.suite()));
        }
        let mut server = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())))
            .unwrap();
        server.ticketer = aws_lc_rs::Ticketer::new().unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(server)
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

        let cert = CertificateDer::from(cert.der().to_vec());
        let key = key.serialize_der();
        Pki { ca_path, server: server_config(&cert, &key, &[]), cert, key }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::ServerConnection;
    use std::io::Read;

    const LAYERS: [bool; 2] = [true, false]; // direct, rustls

    /// Gives `wire` to the client in reads of `chunk` bytes, each with `room`
    /// bytes free in front; returns the plaintext and whether the peer closed.
    fn feed(cli: &mut Session, wire: &[u8], chunk: usize, room: usize) -> Result<(Vec<u8>, bool), rustls::Error> {
        let mut plain = Vec::new();
        let mut closed = false;
        for piece in wire.chunks(chunk.max(1)) {
            let mut buf = vec![0u8; room + piece.len()];
            buf[room..].copy_from_slice(piece);
            let p = cli.read(
                &mut buf,
                room,
                |e| e,
                |p| {
                    plain.extend_from_slice(p);
                    Ok(())
                },
            )?;
            closed |= p == Progress::PeerClosed;
        }
        Ok((plain, closed))
    }

    fn server_wire(srv: &mut ServerConnection) -> Vec<u8> {
        let mut wire = Vec::new();
        while srv.wants_write() {
            srv.write_tls(&mut wire).unwrap();
        }
        wire
    }

    /// Moves the server's pending records to the client in reads of `chunk`
    /// bytes (with room in front, as on the hot path).
    fn server_to_client(srv: &mut ServerConnection, cli: &mut Session, chunk: usize) -> (Vec<u8>, bool) {
        feed(cli, &server_wire(srv), chunk, HEADROOM).unwrap()
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

    /// `out` through `flush` into the server (several flushes when it is more
    /// than the 64 KiB of records a session holds); returns its plaintext.
    fn client_to_server(cli: &mut Session, srv: &mut ServerConnection, out: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        let mut off = 0;
        loop {
            let mut wire = Vec::new();
            off += flush(cli, &mut wire, &out[off..]).unwrap();
            assert!(cli.wire.is_empty(), "a Vec takes everything");
            plain.extend(server_feed(srv, &wire));
            if off == out.len() {
                return plain;
            }
            assert!(!cli.is_handshaking(), "plaintext is held back only during the handshake");
        }
    }

    /// A handshake with the upgrade request queued from the start: it goes
    /// out only once the handshake is done (with the client's Finished).
    fn handshake(tls: &Tls, pki: &testing::Pki) -> (Box<Session>, ServerConnection) {
        let mut cli = tls.connect().unwrap();
        let mut srv = ServerConnection::new(pki.server.clone()).unwrap();
        srv.set_buffer_limit(None);
        let req = b"GET / HTTP/1.1\r\n\r\n";
        let mut off = 0;
        for _ in 0..4 {
            let mut wire = Vec::new();
            off += flush(&mut cli, &mut wire, &req[off..]).unwrap();
            let got = server_feed(&mut srv, &wire);
            if off > 0 {
                assert!(!cli.is_handshaking());
                assert_eq!(got, req);
                // Tickets (TLS 1.3) come now.
                let _ = server_to_client(&mut srv, &mut cli, 100);
                return (cli, srv);
            }
            assert!(got.is_empty());
            let (p, _) = server_to_client(&mut srv, &mut cli, 7);
            assert!(p.is_empty());
        }
        panic!("handshake did not complete");
    }

    fn tls_for(pki: &testing::Pki, version: TlsVersion, direct: bool) -> Tls {
        Tls::new("127.0.0.1", pki.ca_path.to_str().unwrap(), true, Some(version), false, direct).unwrap()
    }

    #[test]
    fn data_both_ways_in_any_split_then_close_notify() {
        let pki = testing::pki();
        for direct in LAYERS {
            for version in [TlsVersion::V13, TlsVersion::V12] {
                let what = format!("direct {direct}, {version:?}");
                let (mut cli, mut srv) = handshake(&tls_for(&pki, version, direct), &pki);
                let n = cli.negotiated();
                assert_eq!(n.alpn, "http/1.1");
                assert!(n.cipher.contains("AES_128_GCM"), "browser order: {}", n.cipher);
                // Server -> client: many small records and one large write (cut
                // into 16 KiB records), read in odd pieces, with and without room.
                let mut sent = Vec::new();
                for i in 0..300u32 {
                    let m = format!("message {i} {}", "x".repeat((i % 50) as usize));
                    srv.writer().write_all(m.as_bytes()).unwrap();
                    sent.extend_from_slice(m.as_bytes());
                }
                let small = sent.len();
                let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
                srv.writer().write_all(&big).unwrap();
                sent.extend_from_slice(&big);
                for (chunk, room) in [(13, HEADROOM), (1000, HEADROOM), (70_000, HEADROOM), (977, 0), (100_000, 0)] {
                    let (got, closed) = feed(&mut cli, &server_wire(&mut srv), chunk, room).unwrap();
                    assert!(!closed);
                    assert_eq!(got, sent, "{what}: chunk {chunk}, room {room}");
                    srv.writer().write_all(&sent).unwrap();
                }
                // Byte by byte (small records only: each read copies the partial record).
                let _ = server_to_client(&mut srv, &mut cli, 4096);
                srv.writer().write_all(&sent[..small]).unwrap();
                assert_eq!(server_to_client(&mut srv, &mut cli, 1).0, &sent[..small], "{what}");
                // Client -> server: more than the 64 KiB of records a session holds.
                let up: Vec<u8> = (0..200_000u32).map(|i| (i % 13) as u8).collect();
                assert_eq!(client_to_server(&mut cli, &mut srv, &up), up, "{what}");
                // The client's close_notify reaches the server.
                cli.close_notify();
                let mut wire = Vec::new();
                flush(&mut cli, &mut wire, &[]).unwrap();
                server_feed(&mut srv, &wire);
                assert!(srv.process_new_packets().unwrap().peer_has_closed(), "{what}");
                // And the server's reaches the client, even in pieces.
                srv.send_close_notify();
                let (_, closed) = server_to_client(&mut srv, &mut cli, 3);
                assert!(closed, "{what}");
            }
        }
    }

    #[test]
    fn every_suite_we_offer() {
        let mut pki = testing::pki();
        for (suite, version) in [
            (CipherSuite::TLS13_AES_256_GCM_SHA384, TlsVersion::V13),
            (CipherSuite::TLS13_CHACHA20_POLY1305_SHA256, TlsVersion::V13),
            (CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384, TlsVersion::V12),
            (CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256, TlsVersion::V12),
        ] {
            pki.server = pki.server_with(&[suite]);
            for direct in LAYERS {
                let what = format!("{suite:?}, direct {direct}");
                let (mut cli, mut srv) = handshake(&tls_for(&pki, version, direct), &pki);
                assert_eq!(cli.negotiated().cipher, format!("{suite:?}"));
                let down: Vec<u8> = (0..40_000u32).map(|i| (i % 241) as u8).collect();
                srv.writer().write_all(&down).unwrap();
                assert_eq!(server_to_client(&mut srv, &mut cli, 1500).0, down, "{what}");
                // Several records up (TLS 1.2: a sending key that already sealed the Finished).
                for i in 0..5 {
                    let up = format!("up {i}");
                    assert_eq!(client_to_server(&mut cli, &mut srv, up.as_bytes()), up.as_bytes(), "{what}");
                }
            }
        }
    }

    #[test]
    fn key_updates_both_ways() {
        let pki = testing::pki();
        for direct in LAYERS {
            let (mut cli, mut srv) = handshake(&tls_for(&pki, TlsVersion::V13, direct), &pki);
            for round in 0..3 {
                // rustls's server asks for an update in return.
                srv.refresh_traffic_keys().unwrap();
                srv.writer().write_all(b"after the update").unwrap();
                let (got, _) = server_to_client(&mut srv, &mut cli, 50);
                assert_eq!(got, b"after the update", "direct {direct}, round {round}");
                // Our key_update went out first: the server reads what follows.
                let msg = format!("client data {round}");
                assert_eq!(client_to_server(&mut cli, &mut srv, msg.as_bytes()), msg.as_bytes());
            }
        }
    }

    #[test]
    fn tampered_records_and_alerts_end_the_session() {
        let pki = testing::pki();
        for direct in LAYERS {
            for version in [TlsVersion::V13, TlsVersion::V12] {
                let (mut cli, mut srv) = handshake(&tls_for(&pki, version, direct), &pki);
                srv.writer().write_all(b"hello").unwrap();
                let mut wire = server_wire(&mut srv);
                let last = wire.len() - 1;
                wire[last] ^= 1;
                let err = feed(&mut cli, &wire, 4096, HEADROOM).unwrap_err();
                assert_eq!(error_key(&err), "decrypt", "direct {direct}, {version:?}: {err:?}");
            }
            // A fatal alert (here: the server fails on garbage from us).
            let (mut cli, mut srv) = handshake(&tls_for(&pki, TlsVersion::V13, direct), &pki);
            let mut junk =
                &[0x17u8, 3, 3, 0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20][..];
            srv.read_tls(&mut junk).unwrap();
            assert!(srv.process_new_packets().is_err());
            let err = feed(&mut cli, &server_wire(&mut srv), 4096, HEADROOM).unwrap_err();
            assert!(error_key(&err).starts_with("alert_"), "direct {direct}: {err:?}");
        }
    }

    #[test]
    fn resumption_follows_the_option() {
        let pki = testing::pki();
        let ca = pki.ca_path.to_str().unwrap();
        for direct in LAYERS {
            for version in [TlsVersion::V12, TlsVersion::V13] {
                // TLS 1.3 tickets arrive after the handshake: with `direct`
                // they go through our record layer into rustls's cache.
                let on = Tls::new("localhost", ca, true, Some(version), false, direct).unwrap();
                let (first, _) = handshake(&on, &pki);
                assert_eq!(first.resumed(), Some(false));
                if version == TlsVersion::V13 {
                    assert!(first.tickets() > 0, "direct {direct}");
                }
                let (second, _) = handshake(&on, &pki);
                assert_eq!(second.resumed(), Some(true), "direct {direct}, {version:?}");
                let off = Tls::new("localhost", ca, false, Some(version), false, direct).unwrap();
                let _ = handshake(&off, &pki);
                let (again, _) = handshake(&off, &pki);
                assert_eq!(again.resumed(), Some(false), "{version:?}");
            }
        }
    }

    #[test]
    fn certificates_are_checked() {
        let pki = testing::pki();
        let other = testing::pki();
        let fail = |tls: &Tls| {
            let mut cli = tls.connect().unwrap();
            let mut srv = ServerConnection::new(pki.server.clone()).unwrap();
            let _ = client_to_server(&mut cli, &mut srv, b"");
            let err = feed(&mut cli, &server_wire(&mut srv), 4096, HEADROOM).expect_err("accepted");
            // The alert for the server is ready to go.
            assert!(!cli.wire.is_empty());
            err
        };
        // Trusting another CA: the handshake fails on the certificate.
        for once in [false, true] {
            let tls = Tls::new("localhost", other.ca_path.to_str().unwrap(), false, None, once, true).unwrap();
            let err = fail(&tls);
            assert!(error_key(&err).starts_with("cert_"), "{err:?}");
        }
        // A name the certificate does not carry.
        let tls = Tls::new("example.com", pki.ca_path.to_str().unwrap(), false, None, false, true).unwrap();
        assert!(error_key(&fail(&tls)).starts_with("cert_"));
        // --tls-verify-once: full handshakes keep working with the remembered certificate.
        let once = Tls::new("127.0.0.1", pki.ca_path.to_str().unwrap(), false, None, true, true).unwrap();
        for _ in 0..3 {
            let (cli, _) = handshake(&once, &pki);
            assert_eq!(cli.resumed(), Some(false));
        }
        assert!(Tls::new("localhost", "/nonexistent.pem", true, None, false, true).is_err());
    }

    /// The receive path's cost per record, in memory (no sockets): the
    /// gateway's fan-out shape, one ~150-byte frame per record, read in
    /// pieces of a few records and of 64 KiB. Compares our record layer, rustls's
    /// unbuffered connection and its buffered `ClientConnection` (what gw-load
    /// used before). Run with
    /// `cargo test --release -p gw-load bench_receive -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark"]
    fn bench_receive() {
        use rustls::ClientConnection;
        use std::hint::black_box;
        use std::io::BufRead;

        const RECORDS: usize = 200_000;
        // This thread's CPU time (other load on the machine does not count).
        let cpu_ns = || {
            let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_THREAD).unwrap();
            let tv = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000_000 + t.tv_usec() as u64 * 1_000;
            tv(u.user_time()) + tv(u.system_time())
        };
        let pki = testing::pki();
        let frame = {
            let body = format!(
                r#"{{"op":"msg","room":"bench","seq":123456,"data":{{"t":1764000000000000,"p":"{}"}}}}"#,
                "x".repeat(60)
            );
            let mut f = vec![0x81, body.len() as u8];
            f.extend_from_slice(body.as_bytes());
            f
        };
        let records = |srv: &mut ServerConnection| {
            let mut wire = Vec::new();
            for _ in 0..RECORDS {
                srv.writer().write_all(&frame).unwrap();
                while srv.wants_write() {
                    srv.write_tls(&mut wire).unwrap();
                }
            }
            wire
        };
        for read_size in [600usize, 65_536] {
            let mut scratch = vec![0u8; HEADROOM + read_size];
            for variant in ["direct", "rustls unbuffered", "rustls buffered"] {
                let mut best = f64::MAX;
                for _ in 0..5 {
                    let mut got = 0usize;
                    let t0;
                    if variant == "rustls buffered" {
                        let mut cli = ClientConnection::new(
                            tls_for(&pki, TlsVersion::V13, false).config,
                            "127.0.0.1".try_into().unwrap(),
                        )
                        .unwrap();
                        let mut srv = ServerConnection::new(pki.server.clone()).unwrap();
                        while cli.is_handshaking() || srv.is_handshaking() {
                            let mut w = Vec::new();
                            while cli.wants_write() {
                                cli.write_tls(&mut w).unwrap();
                            }
                            server_feed(&mut srv, &w);
                            let w = server_wire(&mut srv);
                            let mut r = &w[..];
                            while !r.is_empty() {
                                cli.read_tls(&mut r).unwrap();
                                cli.process_new_packets().unwrap();
                            }
                        }
                        let wire = records(&mut srv);
                        t0 = cpu_ns();
                        for piece in wire.chunks(read_size) {
                            scratch[..piece.len()].copy_from_slice(piece);
                            let mut data = &scratch[..piece.len()];
                            while !data.is_empty() {
                                cli.read_tls(&mut data).unwrap();
                                let st = cli.process_new_packets().unwrap();
                                if st.plaintext_bytes_to_read() > 0 {
                                    let mut rd = cli.reader();
                                    while let Ok(buf) = rd.fill_buf() {
                                        if buf.is_empty() {
                                            break;
                                        }
                                        let n = buf.len();
                                        got += black_box(buf).len();
                                        rd.consume(n);
                                    }
                                }
                            }
                        }
                    } else {
                        let (mut cli, mut srv) = handshake(&tls_for(&pki, TlsVersion::V13, variant == "direct"), &pki);
                        let wire = records(&mut srv);
                        t0 = cpu_ns();
                        for piece in wire.chunks(read_size) {
                            scratch[HEADROOM..HEADROOM + piece.len()].copy_from_slice(piece);
                            cli.read(
                                &mut scratch[..HEADROOM + piece.len()],
                                HEADROOM,
                                |e| e,
                                |p| {
                                    got += black_box(p).len();
                                    Ok(())
                                },
                            )
                            .unwrap();
                        }
                    }
                    best = best.min((cpu_ns() - t0) as f64 / RECORDS as f64);
                    assert_eq!(got, RECORDS * frame.len());
                }
                println!("reads of {read_size:>6} B, {variant:<18}: {best:6.1} ns/record ({} B records; best of 5, thread CPU time)", frame.len() + 22);
            }
        }
    }
}
