//! `[tls]`: the TLS listeners, and their certificate and key.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// TLS listeners (ALPN h2 and http/1.1).
    pub listen: Vec<Spanned<SocketAddr>>,
    /// PEM: the certificate, then any intermediates.
    pub cert_file: Spanned<PathBuf>,
    /// PEM: PKCS#8, PKCS#1 or SEC1.
    pub key_file: Spanned<PathBuf>,
}
