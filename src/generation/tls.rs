//! The TLS listeners' acceptor, built from `[tls]`'s certificate and key.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ConfigError, ConfigFile, FileRead, tls};

/// The TLS acceptor for the listeners, and the files it was made from.
pub fn acceptor(
    config: &tls::Config,
    file: &ConfigFile,
) -> Result<(tokio_rustls::TlsAcceptor, Vec<FileRead>), ConfigError> {
    let (cert_path, cert_pem) = file.read_named(&config.cert_file)?;
    let (key_path, key_pem) = file.read_named(&config.key_file)?;
    let at_cert = |message: String| file.error_at(config.cert_file.span(), message);
    let at_key = |message: String| file.error_at(config.key_file.span(), message);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| at_cert(format!("{}: bad PEM: {e}", cert_path.display())))?;
    if chain.is_empty() {
        return Err(at_cert(format!(
            "{} holds no PEM certificate",
            cert_path.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        at_key(format!(
            "{}: no usable private key: {e}",
            key_path.display()
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| at_key(format!("the key does not fit the certificate: {e}")))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    Ok((acceptor, vec![(cert_path, cert_pem), (key_path, key_pem)]))
}
