//! Which headers cross the proxy.

use http::Version;
use http::header::{self, HeaderMap, HeaderName};

pub use crate::config::percent_decoded;

/// Meaningful for one connection only (RFC 9110 §7.6.1), so never forwarded. (A match on the
/// name rather than a list of HeaderNames: it looks at the length first, and runs for every
/// field of every request and response.)
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "proxy-authorization"
    )
}

/// Headers that tell the upstream who the client is.
fn is_client_identity(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-forwarded-for"
            | "x-real-ip"
            | "forwarded"
            | "via"
            | "cf-connecting-ip"
            | "true-client-ip"
            | "x-client-ip"
            | "x-forwarded-host"
            // Not identity, but as easily trusted by a server behind: they override the path
            // that admission looked at.
            | "x-original-url"
            | "x-rewrite-url"
    )
}

/// A WebSocket upgrade's fields: `Upgrade: websocket`, alone, and `Connection` listing
/// `upgrade`. (Whether the method is GET is the caller's to check.) Any other protocol, h2c
/// included, is no upgrade here: its fields are dropped as hop-by-hop, as nginx does.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let mut upgrade = headers.get_all(header::UPGRADE).iter();
    let websocket = upgrade
        .next()
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    websocket && upgrade.next().is_none() && has_token(headers, header::CONNECTION, "upgrade")
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one Host, and an HTTP/1.0 one at most one;
/// its value is an authority without user info (nginx answers 400 otherwise, as here).
pub fn check_host(headers: &HeaderMap, version: Version) -> Result<(), &'static str> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let Some(host) = hosts.next() else {
        return if version == Version::HTTP_11 {
            Err("no Host field")
        } else {
            Ok(())
        };
    };
    if hosts.next().is_some() {
        return Err("more than one Host field");
    }
    let valid = !host.is_empty()
        && !host.as_bytes().contains(&b'@')
        && http::uri::Authority::try_from(host.as_bytes()).is_ok();
    if valid { Ok(()) } else { Err("invalid Host") }
}

/// Whether any of the comma-separated fields `name` lists `token`.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| lists(v, token))
}

/// Whether a comma-separated field value lists `token` (ASCII case aside).
pub fn lists(value: &header::HeaderValue, token: &str) -> bool {
    tokens(value).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The tokens of a comma-separated field value, trimmed, without allocating.
fn tokens(value: &header::HeaderValue) -> impl Iterator<Item = &[u8]> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// What a request asks of its connection: an exchange of a request and a response, or a switch
/// to another protocol (a WebSocket), which needs a connection of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchange {
    Plain,
    Upgrade,
}

impl Exchange {
    /// `Upgrade` where `upgrade` holds.
    pub fn upgrade_if(upgrade: bool) -> Self {
        if upgrade { Self::Upgrade } else { Self::Plain }
    }
}

/// Drops hop-by-hop headers, and the ones `Connection` names. An upgrade keeps
/// `Connection: upgrade` and `Upgrade`, which the next hop needs to agree to it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, exchange: Exchange) {
    let upgrade = exchange == Exchange::Upgrade;
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(tokens)
            .filter(|t| !(upgrade && t.eq_ignore_ascii_case(b"upgrade")))
            // from_bytes lowers the case, as header names are matched.
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    remove_where(headers, |name| {
        is_hop_by_hop(name) || (!upgrade && name == header::UPGRADE)
    });
    if upgrade {
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("upgrade"),
        );
    }
}

pub fn strip_client_identity(headers: &mut HeaderMap) {
    remove_where(headers, is_client_identity);
}

/// One pass over the names present, which most requests and responses have few of and none to
/// remove; looking up every unwanted name in turn hashed each one, every time.
fn remove_where(headers: &mut HeaderMap, unwanted: impl Fn(&HeaderName) -> bool) {
    let found: Vec<HeaderName> = headers.keys().filter(|n| unwanted(n)).cloned().collect();
    for name in found {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn hop_by_hop_and_named_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic xyz"),
            ("authorization", "Bearer sk-test"),
            ("content-type", "application/json"),
        ]);
        strip_hop_by_hop(&mut h, Exchange::Plain);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "content-type"]);
    }

    #[test]
    fn an_upgrade_keeps_what_it_needs() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "abc"),
        ]);
        assert!(is_websocket_upgrade(&h));
        strip_hop_by_hop(&mut h, Exchange::Upgrade);
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["sec-websocket-key"], "abc");
        let h2c = map(&[("connection", "Upgrade"), ("upgrade", "h2c")]);
        assert!(!is_websocket_upgrade(&h2c));
    }

    #[test]
    fn host_fields() {
        assert!(check_host(&map(&[("host", "api.example:8080")]), Version::HTTP_11).is_ok());
        assert!(check_host(&map(&[("host", "[::1]:80")]), Version::HTTP_11).is_ok());
        assert!(check_host(&map(&[]), Version::HTTP_10).is_ok());
        assert!(check_host(&map(&[]), Version::HTTP_11).is_err());
        assert!(check_host(&map(&[("host", "a"), ("host", "a")]), Version::HTTP_11).is_err());
        assert!(check_host(&map(&[("host", "")]), Version::HTTP_11).is_err());
        assert!(check_host(&map(&[("host", "u@h")]), Version::HTTP_11).is_err());
        assert!(check_host(&map(&[("host", "a/b")]), Version::HTTP_11).is_err());
    }
}
