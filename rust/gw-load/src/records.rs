//! The TLS record layer after the handshake (`--tls-record-layer direct`):
//! records are decrypted in place, in the buffer the socket was read into,
//! with the AEAD rustls negotiated and the traffic keys it derived (its
//! kernel-connection API, meant for kTLS, hands them over once the handshake
//! is done). No copy, no allocation per record.
//!
//! NOTE: this is the receive path of a load generator. rustls's own record
//! processing (unbuffered `ReadTraffic`) copies each record's plaintext into a
//! fresh `Vec` and returns to the caller once per record; its buffered
//! `ClientConnection` also copies the ciphertext into its own growing and
//! shrinking buffer. With the gateway sending one small record (~100-300 bytes)
//! per delivery, that bookkeeping cost as much as the decryption itself.
//!
//! What stays with rustls: the whole handshake (certificate verification,
//! `--tls-verify-once`, resumption), the key schedule (TLS 1.3 key updates via
//! [`KernelConnection::update_rx_secret`]), session tickets that arrive after
//! the handshake ([`KernelConnection::handle_new_session_ticket`], so later
//! connections resume as before), and the AEAD implementations themselves
//! (the provider's `MessageDecrypter`/`MessageEncrypter`, which check the tag,
//! unpad TLS 1.3 records and enforce the plaintext size limit). What is ours:
//! framing records, sequence numbers, content types, alerts.
//!
//! Not supported (the connection fails with a `tls_` close key): a
//! post-handshake message split across records (servers send tickets and key
//! updates whole), and TLS 1.2 renegotiation (rustls refuses it too).

use rustls::client::ClientConnectionData;
use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::{
    AlertDescription, ConnectionTrafficSecrets, ContentType, Error, HandshakeType, PeerMisbehaved, ProtocolVersion,
    SupportedCipherSuite,
};

/// Record header: type, legacy version, length.
const HEADER: usize = 5;
/// Largest plaintext fragment (2^14).
const MAX_FRAGMENT: usize = 16_384;
/// Largest ciphertext a peer may send: 2^14 + 2048 (TLS 1.2; TLS 1.3 allows 256).
pub const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 2048;
/// Largest record on the wire.
pub const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT;

/// What a [`Records::open`] call ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// All complete records were processed; the rest is a partial record.
    More,
    /// The peer sent `close_notify`: nothing more will come.
    PeerClosed,
}

/// One connection's record layer once the handshake is done.
pub struct Records {
    rx: Box<dyn MessageDecrypter>,
    rx_seq: u64,
    tx: Box<dyn MessageEncrypter>,
    tx_seq: u64,
    /// Refresh the sending key (TLS 1.3) before `tx_seq` reaches this.
    tx_limit: u64,
    tls13: bool,
    /// TLS 1.3 session tickets received since the switch.
    pub tickets: u32,
    suite: SupportedCipherSuite,
    /// Key updates and tickets (rarely touched, so out of line).
    kernel: Box<KernelConnection<ClientConnectionData>>,
}

impl Records {
    /// Takes over from a handshake that completed (see `tls::Session`).
    pub fn new(
        (secrets, kernel): (rustls::ExtractedSecrets, KernelConnection<ClientConnectionData>),
    ) -> Result<Records, Error> {
        let suite = kernel.negotiated_cipher_suite();
        let tls13 = kernel.protocol_version() == ProtocolVersion::TLSv1_3;
        let common = match suite {
            SupportedCipherSuite::Tls13(s) => &s.common,
            SupportedCipherSuite::Tls12(s) => &s.common,
        };
        let (rx_seq, rx) = secrets.rx;
        let (tx_seq, tx) = secrets.tx;
        let mut tx = encrypter(suite, tx)?;
        if tx_seq > 0 {
            // NOTE: aws-lc's TLS AES-GCM sealing key learns the nonce mask
            // from its first call, which it assumes to be sequence number 0,
            // and then refuses nonces that do not increase. A TLS 1.2 client
            // has already sent its Finished under this key (sequence 0), so
            // the new key is primed with an empty record at 0 that is thrown
            // away (never sent: nothing new is revealed). Without it the third
            // record fails to encrypt.
            let empty = OutboundPlainMessage {
                typ: ContentType::ApplicationData,
                version: ProtocolVersion::TLSv1_2,
                payload: OutboundChunks::Single(&[]),
            };
            tx.encrypt(empty, 0)?;
        }
        Ok(Records {
            rx: decrypter(suite, rx)?,
            rx_seq,
            tx,
            tx_seq,
            // rustls refreshes at the confidentiality limit too; keep a margin
            // for the key update record itself.
            tx_limit: common.confidentiality_limit.saturating_sub(16),
            tls13,
            tickets: 0,
            suite,
            kernel: Box::new(kernel),
        })
    }

    /// Decrypts the complete records at the start of `input` in place and
    /// hands each application-data payload to `on_plain`. Records to send in
    /// reply (a requested key update) are appended to `wire`. Returns the
    /// bytes consumed (what is left is the start of a record) and whether the
    /// peer closed.
    #[inline]
    pub fn open<E>(
        &mut self,
        input: &mut [u8],
        wire: &mut Vec<u8>,
        tls_err: &impl Fn(Error) -> E,
        on_plain: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(usize, Opened), E> {
        let mut used = 0;
        loop {
            let rest = &mut input[used..];
            if rest.len() < HEADER {
                return Ok((used, Opened::More));
            }
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            if len > MAX_CIPHERTEXT {
                return Err(tls_err(Error::InvalidMessage(rustls::InvalidMessage::MessageTooLarge)));
            }
            if rest.len() < HEADER + len {
                return Ok((used, Opened::More));
            }
            used += HEADER + len;
            let typ = ContentType::from(rest[0]);
            // TLS 1.3 wraps everything in application-data records (the real
            // type is inside); TLS 1.2 shows it outside.
            let outer_ok = match typ {
                ContentType::ApplicationData => true,
                ContentType::Alert | ContentType::Handshake => !self.tls13,
                _ => false,
            };
            if !outer_ok {
                return Err(tls_err(Error::InappropriateMessage {
                    expect_types: vec![ContentType::ApplicationData],
                    got_type: typ,
                }));
            }
            let version = ProtocolVersion::from(u16::from_be_bytes([rest[1], rest[2]]));
            let msg = InboundOpaqueMessage::new(typ, version, &mut rest[HEADER..HEADER + len]);
            let plain = self.rx.decrypt(msg, self.rx_seq).map_err(tls_err)?;
            self.rx_seq += 1;
            match plain.typ {
                ContentType::ApplicationData => {
                    if !plain.payload.is_empty() {
                        on_plain(plain.payload)?;
                    }
                }
                ContentType::Alert => {
                    if self.alert(plain.payload).map_err(tls_err)? {
                        return Ok((used, Opened::PeerClosed));
                    }
                }
                ContentType::Handshake => self.post_handshake(plain.payload, wire).map_err(tls_err)?,
                other => {
                    return Err(tls_err(Error::InappropriateMessage {
                        expect_types: vec![ContentType::ApplicationData],
                        got_type: other,
                    }))
                }
            }
        }
    }

    /// An alert: true for `close_notify`, Ok(false) for one to ignore.
    fn alert(&self, p: &[u8]) -> Result<bool, Error> {
        let &[level, desc] = p else {
            return Err(Error::InvalidMessage(rustls::InvalidMessage::UnexpectedMessage("malformed alert")));
        };
        let desc = AlertDescription::from(desc);
        match desc {
            AlertDescription::CloseNotify => Ok(true),
            // As rustls: TLS 1.3 ignores user_canceled, TLS 1.2 any warning.
            AlertDescription::UserCanceled if self.tls13 => Ok(false),
            _ if !self.tls13 && level == 1 => Ok(false),
            _ => Err(Error::AlertReceived(desc)),
        }
    }

    /// Handshake messages after the handshake: TLS 1.3 session tickets (given
    /// to rustls's session cache) and key updates.
    fn post_handshake(&mut self, mut p: &[u8], wire: &mut Vec<u8>) -> Result<(), Error> {
        while !p.is_empty() {
            let [typ, a, b, c, ..] = *p else { return Err(fragmented()) };
            let n = u32::from_be_bytes([0, a, b, c]) as usize;
            let Some(body) = p.get(4..4 + n) else { return Err(fragmented()) };
            p = &p[4 + n..];
            match HandshakeType::from(typ) {
                HandshakeType::NewSessionTicket if self.tls13 => {
                    self.kernel.handle_new_session_ticket(body)?;
                    self.tickets += 1;
                }
                HandshakeType::KeyUpdate if self.tls13 => {
                    // The last message under the old key (RFC 8446 §5.1).
                    if !p.is_empty() {
                        return Err(Error::PeerMisbehaved(PeerMisbehaved::KeyEpochWithPendingFragment));
                    }
                    let requested = match body {
                        [0] => false,
                        [1] => true,
                        _ => return Err(Error::InvalidMessage(rustls::InvalidMessage::InvalidKeyUpdate)),
                    };
                    let (seq, secrets) = self.kernel.update_rx_secret()?;
                    self.rx = decrypter(self.suite, secrets)?;
                    self.rx_seq = seq;
                    if requested {
                        self.update_tx(wire)?;
                    }
                }
                other => {
                    return Err(Error::InappropriateHandshakeMessage {
                        expect_types: vec![HandshakeType::NewSessionTicket, HandshakeType::KeyUpdate],
                        got_type: other,
                    })
                }
            }
        }
        Ok(())
    }

    /// Sends a TLS 1.3 `key_update` (update_not_requested) under the current
    /// key, then switches to the next one.
    fn update_tx(&mut self, wire: &mut Vec<u8>) -> Result<(), Error> {
        self.seal_one(ContentType::Handshake, &[HandshakeType::KeyUpdate.into(), 0, 0, 1, 0], wire)?;
        let (seq, secrets) = self.kernel.update_tx_secret()?;
        self.tx = encrypter(self.suite, secrets)?;
        self.tx_seq = seq;
        Ok(())
    }

    /// Encrypts `data` as application-data records appended to `wire`.
    pub fn seal(&mut self, data: &[u8], wire: &mut Vec<u8>) -> Result<(), Error> {
        for chunk in data.chunks(MAX_FRAGMENT) {
            self.seal_one(ContentType::ApplicationData, chunk, wire)?;
        }
        Ok(())
    }

    /// Appends an encrypted `close_notify` alert to `wire`.
    pub fn close_notify(&mut self, wire: &mut Vec<u8>) -> Result<(), Error> {
        self.seal_one(ContentType::Alert, &[1, AlertDescription::CloseNotify.into()], wire)
    }

    fn seal_one(&mut self, typ: ContentType, payload: &[u8], wire: &mut Vec<u8>) -> Result<(), Error> {
        if self.tx_seq >= self.tx_limit {
            if !self.tls13 {
                return Err(Error::EncryptError);
            }
            if typ != ContentType::Handshake {
                self.update_tx(wire)?;
            }
        }
        let msg =
            OutboundPlainMessage { typ, version: ProtocolVersion::TLSv1_2, payload: OutboundChunks::Single(payload) };
        let rec = self.tx.encrypt(msg, self.tx_seq)?.encode();
        self.tx_seq += 1;
        if wire.is_empty() {
            *wire = rec;
        } else {
            wire.extend_from_slice(&rec);
        }
        Ok(())
    }
}

fn fragmented() -> Error {
    Error::General("post-handshake message split across records (not supported)".into())
}

fn key_iv(secrets: ConnectionTrafficSecrets) -> Result<(rustls::crypto::cipher::AeadKey, [u8; 12]), Error> {
    match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(iv.as_ref());
            Ok((key, nonce))
        }
        _ => Err(Error::General("unsupported AEAD for the direct record layer".into())),
    }
}

/// The provider's decrypter for `suite` with these secrets. TLS 1.2: the
/// extracted IV is the fixed part followed by the explicit nonce start.
fn decrypter(
    suite: SupportedCipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> Result<Box<dyn MessageDecrypter>, Error> {
    let (key, iv) = key_iv(secrets)?;
    Ok(match suite {
        SupportedCipherSuite::Tls13(s) => s.aead_alg.decrypter(key, iv.into()),
        SupportedCipherSuite::Tls12(s) => {
            let fixed = s.aead_alg.key_block_shape().fixed_iv_len;
            s.aead_alg.decrypter(key, &iv[..fixed])
        }
    })
}

fn encrypter(
    suite: SupportedCipherSuite,
    secrets: ConnectionTrafficSecrets,
) -> Result<Box<dyn MessageEncrypter>, Error> {
    let (key, iv) = key_iv(secrets)?;
    Ok(match suite {
        SupportedCipherSuite::Tls13(s) => s.aead_alg.encrypter(key, iv.into()),
        SupportedCipherSuite::Tls12(s) => {
            let shape = s.aead_alg.key_block_shape();
            let (fixed, explicit) = (shape.fixed_iv_len, shape.explicit_nonce_len);
            s.aead_alg.encrypter(key, &iv[..fixed], &iv[fixed..fixed + explicit])
        }
    })
}
