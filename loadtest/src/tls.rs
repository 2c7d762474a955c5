//! `wss://` targets: one rustls client configuration for the whole fleet, trusting the
//! certificates of `--ca-file` (PEM: the server's CA, or its self-signed certificate) and
//! nothing else. The handshake is part of every connection's measured handshake latency, and
//! the server's CPU for it is in `--server-pid`'s ramp figures.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The client configuration for `wss://` URLs: TLS 1.2 and 1.3 with ring, the roots of
/// `ca_file`, no session resumption.
pub fn client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let what = |e: &dyn std::fmt::Display| format!("--ca-file {}: {e}", ca_file.display());
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| what(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| what(&e))?;
    if certs.is_empty() {
        return Err(what(&"no PEM certificate in it"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| what(&e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| what(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every connection a full handshake: the fleet shares this configuration, and resumed
    // sessions would make a TLS handshake figure a mix of two things.
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_a_certificate_is_refused_with_its_name() {
        let dir = std::env::temp_dir().join(format!("lt-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client_config(&empty).unwrap_err();
        assert!(
            e.contains("empty.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = client_config(&dir.join("missing.pem")).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
