//! TLS for the WebSocket listener, with rustls's own sans-IO API: ciphertext in, plaintext out,
//! and the reverse.
//!
//! Why not an async wrapper (futures-rustls): the connection driver is a hand-written poll loop
//! over raw bytes already, and a socket handed off between shards must take its TLS session
//! with it. `rustls::ServerConnection` is `Send`, so it travels in the hand-off message with the
//! descriptor; an async stream wrapping a glommio socket could not.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

use crate::config::{ConfigError, TlsConfig};

/// Builds the server's TLS configuration (TLS 1.2 and 1.3) from PEM files. Errors name the key
/// and file at fault, including a key that does not match the certificate.
pub fn load(cfg: &TlsConfig) -> Result<Option<Arc<ServerConfig>>, ConfigError> {
    let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
        return Ok(None);
    };
    let err = |k: &str, p: &Path, e: &dyn std::fmt::Display| {
        ConfigError(format!("tls.{k}: {}: {e}", p.display()))
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err("cert", cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err("cert", cert, &e))?;
    if certs.is_empty() {
        return Err(err("cert", cert, &"no certificate in the file"));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| err("key", key, &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConfigError(format!("tls: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| err("key", key, &format!("does not fit tls.cert: {e}")))?;
    Ok(Some(Arc::new(config)))
}

/// A TLS error on one connection: it is closed (rustls may have queued an alert to send).
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

/// One connection's TLS session.
pub struct Tls {
    conn: ServerConnection,
}

impl Tls {
    pub fn new(config: &Arc<ServerConfig>) -> Result<Tls, TlsError> {
        ServerConnection::new(config.clone())
            .map(|conn| Tls { conn })
            .map_err(|e| TlsError(e.to_string()))
    }

    /// Takes a session handed over from another shard.
    pub fn from_session(conn: ServerConnection) -> Tls {
        Tls { conn }
    }

    pub fn into_session(self) -> ServerConnection {
        self.conn
    }

    /// Feeds ciphertext read from the socket; decrypted bytes go to `plain`. Returns false once
    /// the peer has sent close_notify (end of stream).
    pub fn read(
        &mut self,
        mut data: &[u8],
        plain: &mut impl FnMut(&[u8]),
    ) -> Result<bool, TlsError> {
        let mut open = true;
        while !data.is_empty() {
            let n = self
                .conn
                .read_tls(&mut data)
                .map_err(|e| TlsError(e.to_string()))?;
            let state = self
                .conn
                .process_new_packets()
                .map_err(|e| TlsError(e.to_string()))?;
            let mut left = state.plaintext_bytes_to_read();
            let mut buf = [0u8; 4096];
            while left > 0 {
                let k = self
                    .conn
                    .reader()
                    .read(&mut buf[..left.min(4096)])
                    .map_err(|e| TlsError(e.to_string()))?;
                plain(&buf[..k]);
                left -= k;
            }
            if state.peer_has_closed() {
                open = false;
            }
            if n == 0 {
                break;
            }
        }
        Ok(open)
    }

    /// Encrypts `plain` for sending.
    pub fn write(&mut self, plain: &[u8]) {
        // The plaintext buffer is unlimited by default and drained by `drain` right after.
        let _ = self.conn.writer().write_all(plain);
    }

    /// Sends close_notify after whatever is already written.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }

    /// Moves ciphertext waiting to go out (handshake, records, alerts) to the end of `out`.
    pub fn drain(&mut self, out: &mut Vec<u8>) {
        while self.conn.wants_write() {
            if self.conn.write_tls(out).is_err() {
                break;
            }
        }
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }
}
