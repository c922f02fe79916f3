//! `[upstream]` (and each `[upstreams.NAME]`): where requests go, and how they get there.

use std::path::PathBuf;

use http::Uri;
use http::uri::Scheme;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use super::Timeout;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub url: UpstreamUrl,
    /// Host header and TLS server name; the url's host when unset.
    pub host: Option<HostName>,
    /// Extra trust roots, besides the system store.
    pub ca_file: Option<Spanned<PathBuf>>,
    pub connect_timeout: Timeout,
    /// From sending a request to its response headers. Reasoning models may think for minutes
    /// before a non-streamed answer starts, so this is long.
    pub response_timeout: Timeout,
    /// The longest silence inside a request or response body.
    pub idle_timeout: Timeout,
    pub pool_idle_timeout: Timeout,
    pub pool_max_idle: usize,
    pub http2: bool,
    /// How long the url's host's addresses are reused before they are looked up again.
    pub dns_refresh: Timeout,
    /// The egress proxy connections to the upstream go through; none: straight.
    pub proxy: Option<Spanned<ProxyUrl>>,
    /// The egress proxy's password, for the user its url names.
    pub proxy_password_file: Option<Spanned<PathBuf>>,
    /// The header the proxy's own key goes in, bare (Azure's `api-key`); unset: Authorization,
    /// as `Bearer KEY`.
    pub key_header: Option<Spanned<String>>,
    /// Tokens mode: the proxy's own keys for this upstream, used in turn (instead of
    /// `[auth] upstream_key_file`).
    pub key_files: Vec<Spanned<PathBuf>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            url: UpstreamUrl::parse("https://api.openai.com").expect("the default url parses"),
            host: None,
            ca_file: None,
            connect_timeout: Timeout::secs(10),
            response_timeout: Timeout::secs(15 * 60),
            idle_timeout: Timeout::secs(5 * 60),
            pool_idle_timeout: Timeout::secs(90),
            pool_max_idle: 256,
            http2: true,
            dns_refresh: Timeout::secs(30),
            proxy: None,
            proxy_password_file: None,
            key_header: None,
            key_files: Vec::new(),
        }
    }
}

/// `scheme://host[:port][/base/path]`, checked when the config is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub base_path: String,
    text: String,
}

impl UpstreamUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: Uri = text
            .parse()
            .map_err(|e| format!("{text:?} is not a URL: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("https") => Scheme::HTTPS,
            Some("http") => Scheme::HTTP,
            _ => {
                return Err(format!(
                    "{text:?}: the upstream url must start with https:// or http://"
                ));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{text:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{text:?}: credentials do not belong in the url"));
        }
        if uri.query().is_some() {
            return Err(format!("{text:?}: the upstream url cannot have a query"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority
            .port_u16()
            .unwrap_or(if scheme == Scheme::HTTPS { 443 } else { 80 });
        Ok(Self {
            scheme,
            host: host.to_owned(),
            port,
            base_path: uri.path().trim_end_matches('/').to_owned(),
            text: text.to_owned(),
        })
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        UpstreamUrl::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A DNS name or IP address usable both as a Host header and as a TLS server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostName(String);

impl HostName {
    fn parse(text: &str) -> Result<Self, String> {
        ServerName::try_from(text).map_err(|_| format!("{text:?} is not a valid host name"))?;
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for HostName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        HostName::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// `http://`, `https://`, `socks5://` or `socks5h://`, an optional user, a host and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub kind: ProxyKind,
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    Http,
    Https,
    /// The upstream's name is resolved here, and the proxy is given an address.
    Socks5,
    /// The proxy is given the upstream's name, and resolves it.
    Socks5h,
}

impl ProxyUrl {
    /// Errors never quote the url: it may hold a password.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: Uri = text
            .parse()
            .map_err(|_| "the proxy is not a URL: write e.g. \"http://host:3128\"".to_owned())?;
        let (kind, default_port) = match uri.scheme_str() {
            Some("http") => (ProxyKind::Http, 80),
            Some("https") => (ProxyKind::Https, 443),
            Some("socks5") => (ProxyKind::Socks5, 1080),
            Some("socks5h") => (ProxyKind::Socks5h, 1080),
            _ => {
                return Err(
                    "the proxy url must start with http://, https://, socks5:// or socks5h://"
                        .into(),
                );
            }
        };
        let authority = uri.authority().ok_or("the proxy url has no host")?;
        let user = match authority.as_str().rsplit_once('@') {
            Some((info, _)) if info.contains(':') => {
                return Err("the proxy password does not belong in the url: \
                     write it to a file named by proxy_password_file"
                    .into());
            }
            Some((user, _)) => Some(
                String::from_utf8(super::percent_decoded(user.as_bytes()))
                    .map_err(|_| "the proxy user is not UTF-8")?,
            ),
            None => None,
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err("the proxy url is a host and port: no path, no query".into());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        Ok(Self {
            kind,
            user,
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(default_port),
        })
    }

    pub fn is_socks(&self) -> bool {
        matches!(self.kind, ProxyKind::Socks5 | ProxyKind::Socks5h)
    }

    /// `host:port`, as messages name the proxy.
    pub fn address(&self) -> String {
        format!("{}:{}", bracket_ipv6(&self.host), self.port)
    }
}

/// Without the user: for `STATUS=` and `openai-proxy check`.
impl std::fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = match self.kind {
            ProxyKind::Http => "http",
            ProxyKind::Https => "https",
            ProxyKind::Socks5 => "socks5",
            ProxyKind::Socks5h => "socks5h",
        };
        write!(f, "{scheme}://{}", self.address())
    }
}

impl<'de> Deserialize<'de> for ProxyUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ProxyUrl::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A host as it goes before `:port`: an IPv6 address in brackets.
pub fn bracket_ipv6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts() {
        let url = UpstreamUrl::parse("https://example.test:8443/openai/").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("example.test", 8443));
        assert_eq!(url.base_path, "/openai");
        let url = UpstreamUrl::parse("https://[::1]").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 443));
        assert!(UpstreamUrl::parse("ftp://x").is_err());
        assert!(UpstreamUrl::parse("https://u:p@x").is_err());
        assert!(UpstreamUrl::parse("https://x/?a=b").is_err());
    }

    #[test]
    fn proxy_urls() {
        let url = ProxyUrl::parse("socks5h://me%40corp@127.0.0.1:1080").unwrap();
        assert_eq!(url.user.as_deref(), Some("me@corp"));
        assert_eq!(url.to_string(), "socks5h://127.0.0.1:1080");
        let url = ProxyUrl::parse("http://[::1]").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 80));
        assert_eq!(url.user, None);
        assert_eq!(url.address(), "[::1]:80");
        let inline = ProxyUrl::parse("http://user:hunter2@proxy:3128").unwrap_err();
        assert!(inline.contains("proxy_password_file"), "{inline}");
        assert!(!inline.contains("hunter2"), "{inline}");
        assert!(ProxyUrl::parse("ftp://proxy:21").is_err());
        assert!(ProxyUrl::parse("http://proxy:3128/path").is_err());
        assert!(ProxyUrl::parse("http://proxy:3128?a=b").is_err());
    }
}
