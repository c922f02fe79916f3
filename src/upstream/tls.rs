//! TLS to the upstream: the client config (the system's trust roots plus `ca_file`), and the
//! connectors that offer HTTP/2 or HTTP/1.1 by ALPN.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use super::Config;
use crate::config::{ConfigError, ConfigFile};

/// How an https:// upstream's connections are secured.
pub(super) struct Tls {
    /// Offers h2 when the config allows it.
    pub pooled: tokio_rustls::TlsConnector,
    /// Offers only http/1.1: for upgrades and the pool of HTTP/1.1 connections.
    pub http1: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl Tls {
    /// The connectors over `tls`, for `server_name`; h2 is offered when `http2` allows it.
    pub fn new(tls: &rustls::ClientConfig, http2: bool, server_name: ServerName<'static>) -> Self {
        let offering = |protocols: &[&[u8]]| {
            let mut tls = tls.clone();
            tls.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
            tokio_rustls::TlsConnector::from(Arc::new(tls))
        };
        let pooled: &[&[u8]] = if http2 {
            &[b"h2", b"http/1.1"]
        } else {
            &[b"http/1.1"]
        };
        Self {
            pooled: offering(pooled),
            http1: offering(&[b"http/1.1"]),
            server_name,
        }
    }
}

/// The client config: the system's trust roots and those of `ca_pem` (the `ca_file`'s bytes).
pub(super) fn client_tls(
    config: &Config,
    file: &ConfigFile,
    ca_pem: Option<&[u8]>,
) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    // A damaged certificate in the system store is skipped, as every TLS client does.
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let (Some(pem), Some(key)) = (ca_pem, &config.ca_file) {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| {
                file.error_at(
                    key.span(),
                    format!("{}: bad PEM: {e}", key.get_ref().display()),
                )
            })?;
            roots.add(cert).map_err(|e| {
                file.error_at(
                    key.span(),
                    format!("{}: unusable CA certificate: {e}", key.get_ref().display()),
                )
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(file.error_at(
                key.span(),
                format!("{} holds no PEM certificate", key.get_ref().display()),
            ));
        }
    }
    if roots.is_empty() {
        return Err(ConfigError::File {
            path: file.path.clone(),
            message: "no trust roots: the system store is empty and no upstream.ca_file is set"
                .into(),
        });
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// ring, with AES-128-GCM first, as browsers order it: 128-bit security, and its ten AES rounds
/// to AES-256's fourteen make every byte to and from the upstream cheaper for both ends.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}
