//! `[limits]`: every token's default limits, and where the counters live.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::Timeout;

/// A limit: a whole number above zero (a zero limit would refuse everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub u64);

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = i64::deserialize(d)?;
        match u64::try_from(n) {
            Ok(n) if n > 0 => Ok(Self(n)),
            _ => Err(serde::de::Error::custom(
                "a limit is a whole number above 0 (leave it out for no limit)",
            )),
        }
    }
}

/// Where the shared counters are kept.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Backend {
    /// In this process, saved to the state directory.
    #[default]
    Local,
    /// A Redis server, by its URL (`redis://` or `rediss://`); its Debug hides the password.
    Redis(RedisUrl),
}

impl<'de> Deserialize<'de> for Backend {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "local" {
            Ok(Self::Local)
        } else if text.starts_with("redis://") || text.starts_with("rediss://") {
            RedisUrl::parse(&text)
                .map(Self::Redis)
                .map_err(serde::de::Error::custom)
        } else {
            Err(serde::de::Error::custom(
                "backend is \"local\", or a Redis URL: \"redis://HOST:PORT/DB\" (\"rediss://\" for TLS)",
            ))
        }
    }
}

/// What a request meets while the backend cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendError {
    /// Let it through, uncounted.
    #[default]
    Allow,
    /// Refuse it (503, `limits_unavailable`).
    Deny,
}

/// `[limits]`: the default limits of every token, and where the counters live.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub requests_per_minute: Option<Limit>,
    pub tokens_per_minute: Option<Limit>,
    pub tokens_per_day: Option<Limit>,
    pub max_concurrent: Option<Limit>,
    pub backend: Backend,
    pub on_backend_error: OnBackendError,
    /// The longest a request waits for Redis before `on_backend_error` decides.
    pub redis_timeout: Timeout,
    /// Where the local backend saves its counters; `$STATE_DIRECTORY` (systemd's
    /// `StateDirectory=`) wins, and without either it is the config file's directory.
    pub state_directory: Option<PathBuf>,
    /// Adds `stream_options.include_usage` to streamed chat completion requests that lack it,
    /// so that their streams end with the usage chunk. Off: it changes the client's request
    /// and its stream.
    pub stream_usage: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            requests_per_minute: None,
            tokens_per_minute: None,
            tokens_per_day: None,
            max_concurrent: None,
            backend: Backend::Local,
            on_backend_error: OnBackendError::Allow,
            redis_timeout: Timeout(Duration::from_millis(50)),
            state_directory: None,
            stream_usage: false,
        }
    }
}

/// A `redis://` or `rediss://` URL: `[[user:]password@]host[:port][/db]`.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

/// Never shows the password.
impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "rediss" } else { "redis" };
        write!(f, "{scheme}://{}:{}/{}", self.host, self.port, self.db)
    }
}

impl RedisUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (tls, rest) = match (
            text.strip_prefix("rediss://"),
            text.strip_prefix("redis://"),
        ) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            _ => return Err("a Redis URL starts with redis:// or rediss://".into()),
        };
        let (authority, db) = rest.split_once('/').unwrap_or((rest, ""));
        let db = match db {
            "" => 0,
            db => db
                .parse()
                .map_err(|_| "the database after '/' is a number")?,
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let decode =
            |s: &str| String::from_utf8_lossy(&super::percent_decoded(s.as_bytes())).into_owned();
        let (user, password) = match userinfo.map(|u| u.split_once(':')) {
            None => (None, None),
            Some(Some((user, password))) => (
                (!user.is_empty()).then(|| decode(user)),
                Some(decode(password)),
            ),
            Some(None) => (None, userinfo.map(decode)),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => {
                (host, port.parse().map_err(|_| "the port is a number")?)
            }
            _ => (hostport, 6379),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("the Redis URL names no host".into());
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
            user,
            password,
            db,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let url = RedisUrl::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.db, url.tls),
            ("127.0.0.1", 6380, 2, false)
        );
        let url = RedisUrl::parse("rediss://:s%40cret@[::1]").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.password.as_deref()),
            ("::1", 6379, Some("s@cret"))
        );
        assert!(url.tls && url.user.is_none());
        let url = RedisUrl::parse("redis://app:pw@localhost/0").unwrap();
        assert_eq!(
            (url.user.as_deref(), url.password.as_deref()),
            (Some("app"), Some("pw"))
        );
        assert!(!format!("{url:?}").contains("pw"));
        assert!(RedisUrl::parse("redis://host:port").is_err());
        assert!(RedisUrl::parse("redis:///0").is_err());
        assert!(RedisUrl::parse("redis://h/x").is_err());
    }
}
