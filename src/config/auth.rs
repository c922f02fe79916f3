//! `[auth]`: passthrough or tokens mode, and the files tokens mode reads.

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The client's own key goes upstream unchanged.
    #[default]
    Passthrough,
    /// The proxy's key goes upstream; clients send tokens from `tokens_file`.
    Tokens,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mode: Mode,
    /// One line: the OpenAI key. Relative: in `$CREDENTIALS_DIRECTORY` when systemd passes
    /// credentials, else next to the config.
    pub upstream_key_file: Option<Spanned<PathBuf>>,
    /// `[[token]]` tables; relative to the config's directory.
    pub tokens_file: Option<Spanned<PathBuf>>,
    /// Sent upstream as OpenAI-Organization and OpenAI-Project, in place of any the client sent.
    pub organization: Option<Spanned<String>>,
    pub project: Option<Spanned<String>>,
}
