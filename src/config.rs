//! The TOML config: one plain struct per section (`config/`), composed here, and the value types
//! they share. Plain serde data: nothing here knows the runtime, and nothing else in the crate is
//! imported here.
//!
//! Every value is checked while it is deserialized, so that toml can point at it: an error
//! always reads `FILE:LINE:COLUMN: message`. Files the config names are read by `generation`,
//! which reports their errors at the key that named them.

pub mod admin;
pub mod auth;
pub mod limits;
pub mod log;
pub mod proxy;
pub mod reload;
pub mod routes;
pub mod server;
pub mod tls;
pub mod upstream;

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};
use toml::Spanned;

pub const DEFAULT_PATH: &str = "/etc/openai-proxy/config.toml";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Plain-HTTP listeners (HTTP/1.1 and HTTP/2 with prior knowledge).
    pub listen: Vec<Spanned<SocketAddr>>,
    #[serde(default)]
    pub tls: Option<tls::Config>,
    #[serde(default)]
    pub upstream: upstream::Config,
    /// More upstreams, by name.
    #[serde(default)]
    pub upstreams: routes::UpstreamsConfig,
    /// Which requests go to which upstreams.
    #[serde(default)]
    pub route: Vec<routes::RouteConfig>,
    #[serde(default)]
    pub server: server::Config,
    #[serde(default)]
    pub proxy: proxy::Config,
    #[serde(default)]
    pub log: log::Config,
    #[serde(default)]
    pub reload: reload::Config,
    #[serde(default)]
    pub auth: auth::Config,
    #[serde(default)]
    pub admin: admin::Config,
    #[serde(default)]
    pub limits: limits::Config,
}

/// A file named in the config, as it was read.
pub type FileRead = (PathBuf, Vec<u8>);

/// The text of a config file, kept so that a span anywhere in it can be named by line and column.
pub struct ConfigFile {
    pub path: PathBuf,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}:{line}:{column}: {message}")]
    At {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            message: format!("cannot read the config file: {e}"),
        })?;
        Ok(Self {
            path: path.to_owned(),
            text,
        })
    }

    /// Another TOML file the config names (the tokens file), for its errors to point into.
    pub fn new(path: PathBuf, text: String) -> Self {
        Self { path, text }
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn parse(&self) -> Result<Config, ConfigError> {
        let config: Config = self.deserialize()?;
        self.validate(&config)?;
        Ok(config)
    }

    /// The whole file as `T`; an error names the place in this file where it went wrong.
    pub fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(&self.text).map_err(|e| {
            let message = e.message().trim_end().to_owned();
            match e.span() {
                Some(span) => self.error_at(span, message),
                None => ConfigError::File {
                    path: self.path.clone(),
                    message,
                },
            }
        })
    }

    /// Checks that need more than one value at a time.
    fn validate(&self, config: &Config) -> Result<(), ConfigError> {
        let mut key_files = std::iter::once(&config.upstream)
            .chain(config.upstreams.values())
            .filter_map(|u| u.key_files.first());
        if config.auth.mode == auth::Mode::Passthrough
            && let Some(first) = key_files.next()
        {
            return Err(self.error_at(
                first.span(),
                "key_files are the proxy's own keys, for [auth] mode = \"tokens\"; \
                 in passthrough mode the clients' keys go upstream",
            ));
        }
        let tls_listen = config.tls.iter().flat_map(|t| t.listen.iter());
        let all: Vec<&Spanned<SocketAddr>> = config.listen.iter().chain(tls_listen).collect();
        if all.is_empty() {
            return Err(ConfigError::File {
                path: self.path.clone(),
                message: "no listener: `listen` (or `tls.listen`) needs at least one address"
                    .into(),
            });
        }
        for (i, addr) in all.iter().enumerate() {
            if all[..i]
                .iter()
                .any(|earlier| earlier.get_ref() == addr.get_ref())
            {
                return Err(self.error_at(
                    addr.span(),
                    format!("the address {} is listed twice", addr.get_ref()),
                ));
            }
        }
        self.validate_admin(config, &all)
    }

    /// An admin address is never a proxy listener's socket, nor listed twice.
    fn validate_admin(
        &self,
        config: &Config,
        proxy: &[&Spanned<SocketAddr>],
    ) -> Result<(), ConfigError> {
        let admin = &config.admin.listen;
        for (i, addr) in admin.iter().enumerate() {
            let a = *addr.get_ref();
            if let Some(clash) = proxy.iter().find(|p| same_socket(*p.get_ref(), a)) {
                return Err(self.error_at(
                    addr.span(),
                    format!(
                        "the admin address {a} is the socket of the proxy listener {}: give the admin listener an address of its own",
                        clash.get_ref()
                    ),
                ));
            }
            if admin[..i].iter().any(|earlier| *earlier.get_ref() == a) {
                return Err(self.error_at(addr.span(), format!("the address {a} is listed twice")));
            }
        }
        Ok(())
    }

    pub fn error_at(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        ConfigError::At {
            path: self.path.clone(),
            line,
            column,
            message: message.into(),
        }
    }

    /// A path named in the config, relative paths taken from the config file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        match self.path.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    /// Reads a file named at `key`; an error points at the key's value.
    pub fn read_named(&self, key: &Spanned<PathBuf>) -> Result<(PathBuf, Vec<u8>), ConfigError> {
        let path = self.resolve(key.get_ref());
        match std::fs::read(&path) {
            Ok(bytes) => Ok((path, bytes)),
            Err(e) => {
                Err(self.error_at(key.span(), format!("cannot read {}: {e}", path.display())))
            }
        }
    }

    /// A secret file (see `read_secret`) as `parse` takes it, and the file as read; what is wrong
    /// is said by `parse`, never by quoting the file.
    pub fn read_secret_as<T>(
        &self,
        key: &Spanned<PathBuf>,
        what: &str,
        parse: impl FnOnce(&[u8]) -> Result<T, &'static str>,
    ) -> Result<(T, FileRead), ConfigError> {
        let (path, bytes) = self.read_secret(key, what)?;
        let value = parse(&bytes).map_err(|problem| {
            self.error_at(key.span(), format!("{what} {}: {problem}", path.display()))
        })?;
        Ok((value, (path, bytes)))
    }

    /// Reads a secret (a key, a password) named at `key`, refusing a file that others than its
    /// owner may read; a relative path is looked up in `$CREDENTIALS_DIRECTORY` when systemd
    /// passes credentials, and a credential is taken as systemd made it. `what` names the file
    /// in errors ("the key file").
    pub fn read_secret(
        &self,
        key: &Spanned<PathBuf>,
        what: &str,
    ) -> Result<(PathBuf, Vec<u8>), ConfigError> {
        use std::os::unix::fs::MetadataExt;
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        let path = match &credentials {
            Some(dir) if key.get_ref().is_relative() => dir.join(key.get_ref()),
            _ => self.resolve(key.get_ref()),
        };
        let fail = |message: String| self.error_at(key.span(), message);
        let is_credential = credentials
            .as_deref()
            .is_some_and(|dir| path.starts_with(dir));
        let meta = std::fs::metadata(&path)
            .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
        if !is_credential && meta.mode() & 0o077 != 0 {
            return Err(fail(format!(
                "{what} {} may be read by others than its owner (mode {:o}): \
                 chmod 600 it, or pass it as a systemd credential (LoadCredential=)",
                path.display(),
                meta.mode() & 0o777
            )));
        }
        let bytes = std::fs::read(&path)
            .map_err(|e| fail(format!("cannot read {}: {e}", path.display())))?;
        Ok((path, bytes))
    }
}

/// Whether two listen addresses would be one socket: the same port (not 0) on the same address,
/// or on the same family where either is the unspecified address.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `bytes` with each `%XX` escape decoded once; a `%` that starts no escape stays as it is.
pub fn percent_decoded(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes.get(i..i + 3) {
            Some([b'%', high, low]) => hex(*high).zip(hex(*low)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// Days from 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A duration written as `"250ms"`, `"30s"`, `"5m"`, `"2h"` or `"1d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
            format!("{text:?} has no unit: write e.g. \"30s\", \"5m\", \"250ms\"")
        })?;
        let (number, unit) = text.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a duration: write e.g. \"30s\", \"5m\""))?;
        let millis = match unit.trim() {
            "ms" => Some(n),
            "s" => n.checked_mul(1_000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?}: use ms, s, m, h or d"
                ));
            }
        }
        .ok_or_else(|| format!("{text:?} is too long"))?;
        Ok(Self(std::time::Duration::from_millis(millis)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            ms if ms % 3_600_000 == 0 && ms > 0 => write!(f, "{}h", ms / 3_600_000),
            ms if ms % 60_000 == 0 && ms > 0 => write!(f, "{}m", ms / 60_000),
            ms if ms % 1_000 == 0 => write!(f, "{}s", ms / 1_000),
            ms => write!(f, "{ms}ms"),
        }
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Duration::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A duration that must be more than zero: a zero timeout would refuse everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeout(pub std::time::Duration);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let Duration(duration) = Duration::deserialize(d)?;
        if duration.is_zero() {
            return Err(serde::de::Error::custom("a timeout must be longer than 0s"));
        }
        Ok(Self(duration))
    }
}

impl Timeout {
    pub const fn secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }
}

/// A size in bytes: a whole number, or a string such as `"64KiB"`, `"512MiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("{text:?} is not a size: write e.g. \"64KiB\", \"512MiB\""))?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?}: use B, KB, KiB, MB, MiB, GB or GiB"
                ));
            }
        };
        n.checked_mul(factor)
            .map(Self)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let size = match Raw::deserialize(d)? {
            Raw::Number(n) => u64::try_from(n)
                .map(ByteSize)
                .map_err(|_| "a size cannot be negative".to_owned()),
            Raw::Text(text) => ByteSize::parse(&text),
        }
        .map_err(serde::de::Error::custom)?;
        if size.0 == 0 {
            return Err(serde::de::Error::custom("a size limit must be more than 0"));
        }
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        ConfigFile {
            path: PathBuf::from("/etc/openai-proxy/config.toml"),
            text: text.to_owned(),
        }
        .parse()
    }

    #[test]
    fn listen_alone_is_a_whole_config() {
        let config = parse("listen = [\"127.0.0.1:8080\", \"[::1]:8080\"]\n").unwrap();
        assert_eq!(config.listen.len(), 2);
        assert_eq!(config.upstream, upstream::Config::default());
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let err =
            parse("listen = [\"127.0.0.1:8080\"]\n[upstream]\nconnect_timeout = \"10 parsecs\"\n")
                .unwrap_err()
                .to_string();
        assert!(
            err.starts_with("/etc/openai-proxy/config.toml:3:19: "),
            "{err}"
        );
        assert!(err.contains("parsecs"), "{err}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_errors() {
        let err = parse("listen = [\"127.0.0.1:8080\"]\nlisten_port = 3\n").unwrap_err();
        assert!(err.to_string().contains(":2:1: "), "{err}");
        assert!(err.to_string().contains("listen_port"), "{err}");
        let err = parse("listen = \"127.0.0.1:8080\"\n").unwrap_err();
        assert!(err.to_string().contains(":1:10: "), "{err}");
        let err = parse("listen = [\"127.0.0.1:99999\"]\n").unwrap_err();
        assert!(err.to_string().contains(":1:11: "), "{err}");
    }

    #[test]
    fn impossible_values_are_errors() {
        let err = parse("listen = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n").unwrap_err();
        assert!(err.to_string().contains(":1:26: "), "{err}");
        assert!(parse("listen = []\n").is_err());
        let err =
            parse("listen = [\"127.0.0.1:1\"]\n[server]\nmax_request_body = 0\n").unwrap_err();
        assert!(err.to_string().contains(":3:20: "), "{err}");
        let err = parse("listen = [\"127.0.0.1:1\"]\n[upstream]\nconnect_timeout = \"0s\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("longer than 0s"), "{err}");
    }

    #[test]
    fn an_admin_address_is_never_a_proxy_socket() {
        let config =
            parse("listen = [\"127.0.0.1:8080\"]\n[admin]\nlisten = [\"127.0.0.1:9901\"]\n")
                .unwrap();
        assert_eq!(config.admin.listen.len(), 1);
        let err = parse("listen = [\"127.0.0.1:8080\"]\n[admin]\nlisten = [\"127.0.0.1:8080\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(":3:11: "), "{err}");
        assert!(err.contains("proxy listener 127.0.0.1:8080"), "{err}");
        let err = parse("listen = [\"0.0.0.0:8080\"]\n[admin]\nlisten = [\"127.0.0.1:8080\"]\n")
            .unwrap_err();
        assert!(
            err.to_string().contains("proxy listener 0.0.0.0:8080"),
            "{err}"
        );
        let err = parse(
            "listen = [\"127.0.0.1:1\"]\n[admin]\nlisten = [\"127.0.0.1:2\", \"127.0.0.1:2\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
        assert!(parse("listen = [\"127.0.0.1:0\"]\n[admin]\nlisten = [\"127.0.0.1:0\"]\n").is_ok());
        assert!(
            parse("listen = [\"[::]:8080\"]\n[admin]\nlisten = [\"127.0.0.1:8080\"]\n").is_ok()
        );
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(Duration::parse("250ms").unwrap().0.as_millis(), 250);
        assert_eq!(Duration::parse("5m").unwrap().0.as_secs(), 300);
        assert!(Duration::parse("5").is_err());
        assert!(Duration::parse("5 weeks").is_err());
        assert_eq!(Duration::parse("90s").unwrap().to_string(), "90s");
        assert_eq!(ByteSize::parse("512MiB").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("10KB").unwrap().0, 10_000);
        assert!(ByteSize::parse("10 furlongs").is_err());
    }
}
