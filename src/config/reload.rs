//! `[reload]`: what besides SIGHUP reloads the config.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Reload when the config file or a file it names changes, not only on SIGHUP.
    pub watch_files: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self { watch_files: true }
    }
}
