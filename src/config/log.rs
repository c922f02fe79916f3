//! `[log]`: the log level and the access log.

use serde::{Deserialize, Deserializer};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a filter such as `info,openai_proxy=debug`.
    pub level: Level,
    /// One line per request, at info level.
    pub access_log: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            level: Level("info".into()),
            access_log: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level(String);

impl Level {
    pub fn filter(&self) -> EnvFilter {
        EnvFilter::builder()
            .parse(&self.0)
            .expect("checked when the config was read")
    }
}

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        EnvFilter::builder()
            .parse(&text)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a log level: {e}")))?;
        Ok(Self(text))
    }
}
