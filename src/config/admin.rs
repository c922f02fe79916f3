//! `[admin]`: the admin listener's addresses.

use std::net::SocketAddr;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where `/metrics`, `/healthz`, `/readyz` and `/status` are served; none by default.
    pub listen: Vec<Spanned<SocketAddr>>,
}
