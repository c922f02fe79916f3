//! The upstream: where requests go, and the pooled, verified TLS client that takes them there.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

use crate::body::RequestBody;
use crate::config::{ConfigError, ConfigFile, Timeout};
use crate::error::ProxyError;
use crate::workers;

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

type Connector = HttpsConnector<HttpConnector<ConnectTo>>;

/// A built upstream. Rebuilding one costs a trust-store load and empties the pool, so a reload
/// that leaves the upstream's config and CA file as they were keeps the old one.
pub struct Upstream {
    config: Config,
    ca_pem: Option<Vec<u8>>,
    /// Per worker thread, so that a request and its upstream connection share a thread.
    pools: Vec<WorkerPool>,
    connector: Connector,
    /// HTTP/1.1 only and unpooled: WebSocket upgrades cannot ride an HTTP/2 connection.
    upgrade_client: Arc<Client<Connector, RequestBody>>,
    scheme: Scheme,
    /// The URI authority sent upstream, from which hyper makes the Host header over HTTP/1.1 and
    /// :authority over HTTP/2 (never both: some servers refuse a request that has both).
    authority: Authority,
}

impl Upstream {
    pub fn build(
        config: &Config,
        file: &ConfigFile,
        ca_pem: Option<Vec<u8>>,
        workers: usize,
        previous: Option<&Arc<Upstream>>,
    ) -> Result<Arc<Upstream>, ConfigError> {
        if let Some(previous) = previous
            && previous.config == *config
            && previous.ca_pem == ca_pem
            && previous.pools.len() == workers.max(1)
        {
            return Ok(previous.clone());
        }
        let tls = client_tls(config, file, ca_pem.as_deref())?;
        let url = &config.url;
        let host = config
            .host
            .as_ref()
            .map_or(url.host.as_str(), |h| h.0.as_str());
        let server_name = ServerName::try_from(host.to_owned()).map_err(|_| ConfigError::File {
            path: file.path.clone(),
            message: format!("{host:?} is not a valid TLS server name"),
        })?;
        // Exactly `host`, never with the url's port: the connection goes where the url says
        // (see ConnectTo), and the Host header (HTTP/1.1) or :authority (HTTP/2) says `host`.
        let authority_text = bracket_ipv6(host);
        let authority: Authority = authority_text.parse().map_err(|_| ConfigError::File {
            path: file.path.clone(),
            message: format!("{authority_text:?} is not a valid upstream authority"),
        })?;
        let connect_to = ConnectTo {
            host: Arc::from(url.host.as_str()),
            port: url.port,
        };
        let connector = |alpn_h2: bool| {
            let mut http = HttpConnector::new_with_resolver(connect_to.clone());
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_connect_timeout(Some(config.connect_timeout.0));
            http.set_keepalive(Some(std::time::Duration::from_secs(60)));
            let builder = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls.clone())
                .https_or_http()
                .with_server_name_resolver(FixedServerNameResolver::new(server_name.clone()));
            if alpn_h2 {
                builder.enable_all_versions().wrap_connector(http)
            } else {
                builder.enable_http1().wrap_connector(http)
            }
        };
        let connector_for_pools = connector(config.http2);
        let pools = (0..workers.max(1))
            .map(|_| WorkerPool {
                lanes: Mutex::new(vec![Lane::new(config, &connector_for_pools)]),
            })
            .collect();
        let upgrade_client = Arc::new(
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build(connector(false)),
        );
        Ok(Arc::new(Upstream {
            config: config.clone(),
            ca_pem,
            pools,
            connector: connector_for_pools,
            upgrade_client,
            scheme: url.scheme.clone(),
            authority,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The upstream URI for a client's path and query, under the url's base path.
    pub fn uri(&self, client: &Uri) -> Uri {
        let base = &self.config.url.base_path;
        let path_and_query = match client.path_and_query() {
            // Shares the client's bytes: no copy, no second parse.
            Some(pq) if base.is_empty() => pq.clone(),
            pq => {
                let pq = pq.map_or("/", PathAndQuery::as_str);
                PathAndQuery::try_from(format!("{base}{pq}"))
                    .expect("a valid path under a valid base path is valid")
            }
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .expect("scheme, authority and path are each valid")
    }

    /// Sends a request; the response comes with the mark of the connection it occupies, to be
    /// held until its body ends.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
        upgrade: bool,
    ) -> Result<(Response<Incoming>, Option<InFlight>), ProxyError> {
        let (client, in_flight) = if upgrade {
            (self.upgrade_client.clone(), None)
        } else {
            self.lane()
        };
        let timeout = self.config.response_timeout.0;
        match tokio::time::timeout(timeout, client.request(request)).await {
            Ok(Ok(response)) => Ok((response, in_flight)),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(ProxyError::UpstreamTimeout(timeout)),
        }
    }
}

impl Upstream {
    /// The least busy client of this worker; over HTTP/2, a new one (and so a new connection)
    /// when every connection already carries its share of streams.
    fn lane(&self) -> (Arc<Client<Connector, RequestBody>>, Option<InFlight>) {
        let pool = &self.pools[workers::current() % self.pools.len()];
        let mut lanes = pool.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if !self.config.http2 {
            // HTTP/1.1 connections carry one request each; the one pool opens as many as needed.
            return (lanes[0].client.clone(), None);
        }
        let (index, busiest) = lanes
            .iter()
            .enumerate()
            .map(|(i, lane)| (i, lane.in_flight.load(Ordering::Relaxed)))
            .min_by_key(|&(_, in_flight)| in_flight)
            .expect("a pool has a lane");
        let index = if busiest >= STREAMS_PER_CONNECTION {
            lanes.push(Lane::new(&self.config, &self.connector));
            lanes.len() - 1
        } else {
            index
        };
        let lane = &lanes[index];
        lane.in_flight.fetch_add(1, Ordering::Relaxed);
        (lane.client.clone(), Some(InFlight(lane.in_flight.clone())))
    }
}

/// How many requests one HTTP/2 connection carries before another is opened. Upstreams cap the
/// streams of a connection (nginx at 128, Cloudflare at 256); a request past the cap would wait
/// for a stream to end, and an SSE stream can last minutes.
const STREAMS_PER_CONNECTION: usize = 100;

struct WorkerPool {
    lanes: Mutex<Vec<Lane>>,
}

/// A client with a pool of its own: over HTTP/2 that is one multiplexed connection.
struct Lane {
    /// In an Arc: cloning a Client clones its connector, which costs more than a request should.
    client: Arc<Client<Connector, RequestBody>>,
    in_flight: Arc<AtomicUsize>,
}

impl Lane {
    fn new(config: &Config, connector: &Connector) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout.0)
            .pool_max_idle_per_host(config.pool_max_idle)
            .http2_adaptive_window(true)
            .build(connector.clone());
        Self {
            client: Arc::new(client),
            in_flight: Arc::default(),
        }
    }
}

/// Counts a request against its connection's share until dropped with the response body.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn bracket_ipv6(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

/// Names where a failed request went wrong, from the error's chain of causes.
fn classify(error: &hyper_util::client::legacy::Error) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(body) = e.downcast_ref::<crate::body::BodyError>() {
            return body.to_proxy_error();
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return ProxyError::UpstreamTls(tls.to_string());
        }
        source = cause(e);
    }
    // Not hyper's "client error (Connect)" wrapper, which means nothing to an SDK user.
    let detail = std::error::Error::source(error).map_or_else(|| error.to_string(), chain);
    if error.is_connect() {
        ProxyError::UpstreamUnreachable(detail)
    } else {
        ProxyError::UpstreamProtocol(detail)
    }
}

/// The next error in the chain. An io::Error's source() skips the error it wraps (which may
/// itself be an io::Error wrapping a rustls::Error), so step into it instead.
fn cause<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    match error
        .downcast_ref::<io::Error>()
        .and_then(io::Error::get_ref)
    {
        Some(inner) => Some(inner),
        None => error.source(),
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn client_tls(
    config: &Config,
    file: &ConfigFile,
    ca_pem: Option<&[u8]>,
) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    // A damaged certificate in the system store is skipped, as every TLS client does.
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let (Some(pem), Some(key)) = (ca_pem, &config.ca_file) {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| {
                file.error_at(
                    key.span(),
                    format!("{}: bad PEM: {e}", key.get_ref().display()),
                )
            })?;
            roots.add(cert).map_err(|e| {
                file.error_at(
                    key.span(),
                    format!("{}: unusable CA certificate: {e}", key.get_ref().display()),
                )
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(file.error_at(
                key.span(),
                format!("{} holds no PEM certificate", key.get_ref().display()),
            ));
        }
    }
    if roots.is_empty() {
        return Err(ConfigError::File {
            path: file.path.clone(),
            message: "no trust roots: the system store is empty and no upstream.ca_file is set"
                .into(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}

/// Resolves every name to the url's host, so that the URI can carry the Host the upstream
/// expects while the connection goes where the url says (like `curl --connect-to`).
#[derive(Clone)]
struct ConnectTo {
    host: Arc<str>,
    port: u16,
}

impl tower_service::Service<Name> for ConnectTo {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        let (host, port) = (self.host.clone(), self.port);
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((&*host, port)).await?.collect();
            Ok(addrs.into_iter())
        })
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
}
