//! The upstream: where requests go, and the verified TLS connections, pooled per worker, that
//! take them there.
//!
//! This file is the upstream's public face: its config section, the files it reads (`Files`),
//! and `Upstream`, which builds the rest and sends requests. The parts:
//! - `pool`: one worker's connections, and where each request goes (`checkout`);
//! - `load`: the requests in flight on an HTTP/2 connection;
//! - `dial`: opening a connection (TCP or through `egress`, TLS, HTTP/2 or HTTP/1.1 by ALPN);
//! - `tls`: the client TLS config and its ALPN connectors;
//! - `errors`: what went wrong, as the `ProxyError` that names where;
//! - `body`: the response body, holding its connection until it ends;
//! - `http1`: the HTTP/1.1 client; `egress`: the egress proxy; `resolve`: the host's addresses.

mod body;
mod dial;
mod egress;
mod errors;
pub mod http1;
mod load;
mod pool;
mod resolve;
mod tls;

use std::sync::{Arc, Weak};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use rustls::pki_types::ServerName;

use crate::body::RequestBody;
pub use crate::config::upstream::Config;
use crate::config::upstream::bracket_ipv6;
use crate::config::{ConfigError, ConfigFile, FileRead};
use crate::error::ProxyError;
use crate::headers::Exchange;
use crate::workers;

pub use body::UpstreamBody;
use dial::{Dialer, Protocols};
use egress::Egress;
pub use egress::Secret;
use errors::{failure, tls_error};
use pool::{Pool, Ready};
use tls::{Tls, client_tls};

/// The egress proxy `config` names, if any; an `https://` one is verified with `tls`'s roots.
fn egress(
    config: &Config,
    files: &Files,
    tls: &rustls::ClientConfig,
    file: &ConfigFile,
) -> Result<Option<Egress>, ConfigError> {
    let Some(proxy) = &config.proxy else {
        return Ok(None);
    };
    let password = files.proxy_password.as_ref();
    Egress::new(proxy.get_ref(), password, tls, config.dns_refresh.0)
        .map(Some)
        .map_err(|message| file.error_at(proxy.span(), message))
}

/// The files an upstream's config names, as read for a build.
#[derive(Debug, Default, PartialEq)]
pub struct Files {
    pub ca_pem: Option<Vec<u8>>,
    pub proxy_password: Option<Secret>,
}

impl Files {
    /// Reads them, and returns each with its contents too, for the file watcher.
    pub fn read(config: &Config, file: &ConfigFile) -> Result<(Self, Vec<FileRead>), ConfigError> {
        let mut read = Vec::new();
        let ca_pem = match &config.ca_file {
            Some(key) => {
                let (path, bytes) = file.read_named(key)?;
                read.push((path, bytes.clone()));
                Some(bytes)
            }
            None => None,
        };
        let proxy_password = match &config.proxy_password_file {
            Some(key) => {
                if config
                    .proxy
                    .as_ref()
                    .is_none_or(|p| p.get_ref().user.is_none())
                {
                    return Err(file.error_at(
                        key.span(),
                        "proxy_password_file needs a proxy url with a user: \"http://user@host:port\"",
                    ));
                }
                let (password, password_read) =
                    file.read_secret_as(key, "the proxy password file", password_line)?;
                read.push(password_read);
                Some(password)
            }
            None => None,
        };
        let files = Self {
            ca_pem,
            proxy_password,
        };
        Ok((files, read))
    }
}

/// The password is the file's one line; what is wrong is said without quoting any of it.
fn password_line(bytes: &[u8]) -> Result<Secret, &'static str> {
    let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err("it is empty");
    }
    if line.contains(&b'\n') {
        return Err("it holds more than one line");
    }
    Ok(Secret::new(line.to_vec()))
}

/// How often a request that never left (its connection closed just before) is tried again.
const MAX_RETRIES: u32 = 3;

/// A built upstream. Rebuilding one costs a trust-store load and empties the pool, so a reload
/// that leaves the upstream's config and CA file as they were keeps the old one.
pub struct Upstream {
    config: Config,
    files: Files,
    /// Per worker thread, so that a request and its upstream connection share a thread.
    pools: Vec<Arc<Pool>>,
    dialer: Arc<Dialer>,
    scheme: Scheme,
    /// Sent as :authority over HTTP/2 and as the Host header over HTTP/1.1 (never both: some
    /// servers refuse a request that has both).
    authority: Authority,
    host_header: HeaderValue,
}

impl Upstream {
    pub fn build(
        config: &Config,
        file: &ConfigFile,
        files: Files,
        workers: usize,
        previous: Option<&Arc<Upstream>>,
    ) -> Result<Arc<Upstream>, ConfigError> {
        if let Some(previous) = previous
            && previous.config == *config
            && previous.files == files
            && previous.pools.len() == workers.max(1)
        {
            return Ok(previous.clone());
        }
        let tls = client_tls(config, file, files.ca_pem.as_deref())?;
        let egress = egress(config, &files, &tls, file)?;
        let url = &config.url;
        let host = config
            .host
            .as_ref()
            .map_or(url.host.as_str(), |h| h.as_str());
        let server_name = ServerName::try_from(host.to_owned()).map_err(|_| ConfigError::File {
            path: file.path.clone(),
            message: format!("{host:?} is not a valid TLS server name"),
        })?;
        // Exactly `host`, never with the url's port: the connection goes where the url says
        // (see Dialer), and the Host header (HTTP/1.1) or :authority (HTTP/2) says `host`.
        let authority_text = bracket_ipv6(host);
        let authority: Authority = authority_text.parse().map_err(|_| ConfigError::File {
            path: file.path.clone(),
            message: format!("{authority_text:?} is not a valid upstream authority"),
        })?;
        let host_header = HeaderValue::from_str(authority.as_str())
            .expect("an authority is a valid header value");
        let tls = (url.scheme == Scheme::HTTPS).then(|| Tls::new(&tls, config.http2, server_name));
        let dialer = Arc::new(Dialer::new(config, tls, egress));
        let pools = (0..workers.max(1))
            .map(|_| Arc::new(Pool::new(config, dialer.clone())))
            .collect();
        Ok(Arc::new(Upstream {
            config: config.clone(),
            files,
            pools,
            dialer,
            scheme: url.scheme.clone(),
            authority,
            host_header,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Opens a connection on each worker ahead of the first request, so that the first request
    /// after a start or a reload doesn't wait for a TLS handshake. A worker that has one already
    /// opens none; a failure is only logged, and requests dial again.
    pub fn preconnect(&self, workers: &[tokio::runtime::Handle]) {
        for (index, worker) in workers.iter().enumerate() {
            let pool = &self.pools[index % self.pools.len()];
            let Some(connecting) = pool.preconnect() else {
                continue;
            };
            worker.spawn(async move {
                if let Err(error) = connecting.await {
                    tracing::debug!(%error, "could not connect to the upstream ahead of requests");
                }
            });
        }
    }

    /// Connections open and carrying no request, across the workers' pools: for a scrape, which
    /// takes each pool's lock for a moment.
    pub fn connections_idle(&self) -> usize {
        self.pools.iter().map(|pool| pool.connections_idle()).sum()
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

    /// Sends a request. The response body holds the connection it came on (or its HTTP/2
    /// stream) until it ends; a switch of protocols comes with the upstream's side of the
    /// switched connection.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
        exchange: Exchange,
    ) -> Result<(Response<UpstreamBody>, Option<http1::Upgraded>), ProxyError> {
        let timeout = self.config.response_timeout.0;
        let sending = async {
            if exchange == Exchange::Upgrade {
                // Boxed, as dialing is below: what is rare should not make every request's
                // state larger, since that state is moved as a whole.
                Box::pin(self.send_upgrade(request)).await
            } else {
                self.send_pooled(request).await.map(|r| (r, None))
            }
        };
        tokio::time::timeout(timeout, sending)
            .await
            .unwrap_or(Err(ProxyError::UpstreamTimeout(timeout)))
    }

    /// Over a connection of its own: WebSocket upgrades cannot ride an HTTP/2 connection, and
    /// an upgraded connection never comes back.
    async fn send_upgrade(
        &self,
        request: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Option<http1::Upgraded>), ProxyError> {
        let conn = self.dialer.dial_http1().await?;
        let mut outgoing = http1::Outgoing::new(request, &self.host_header, Exchange::Upgrade);
        match http1::exchange(conn, &mut outgoing, &Weak::new()).await {
            Ok((response, upgraded)) => Ok((response.map(UpstreamBody::http1), upgraded)),
            Err(http1::Failure::Stale(error) | http1::Failure::Failed(error)) => Err(error),
        }
    }

    /// Over a connection of this worker's pool. A request that never left, or that met a
    /// kept-alive connection the upstream had closed meanwhile, goes again: not its fault.
    async fn send_pooled(
        &self,
        request: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let pool = &self.pools[workers::current() % self.pools.len()];
        // The request as HTTP/2 takes it, until it goes out over HTTP/1.1 and becomes `outgoing`.
        let mut request = Some(request);
        let mut outgoing = None;
        let mut retries = 0;
        loop {
            // Once written out for HTTP/1.1 (and found a stale connection), it stays HTTP/1.1.
            let protocols = match outgoing {
                Some(_) => Protocols::Http1Only,
                None => Protocols::Any,
            };
            let conn = match pool.ready(protocols).await? {
                Ready::Stream(mut sender, in_flight) => {
                    let unsent = request
                        .take()
                        .expect("HTTP/2 is offered only to a request not yet sent over HTTP/1.1");
                    match sender.try_send_request(unsent).await {
                        Ok(response) => {
                            return Ok(response.map(|body| UpstreamBody::http2(body, in_flight)));
                        }
                        Err(mut e) => match e.take_message() {
                            // Never sent: the connection had just closed.
                            Some(unsent) if retries < MAX_RETRIES => {
                                retries += 1;
                                request = Some(unsent);
                                continue;
                            }
                            _ => return Err(failure(e.error())),
                        },
                    }
                }
                Ready::Http1(conn) => conn,
            };
            let out = match (&mut outgoing, request.take()) {
                (Some(out), _) => out,
                (None, Some(request)) => outgoing.insert(http1::Outgoing::new(
                    request,
                    &self.host_header,
                    Exchange::Plain,
                )),
                (None, None) => unreachable!("a request is either unsent or outgoing"),
            };
            match http1::exchange(conn, out, &Arc::downgrade(pool)).await {
                Ok((response, _)) => return Ok(response.map(UpstreamBody::http1)),
                Err(http1::Failure::Stale(_)) if retries < MAX_RETRIES => retries += 1,
                Err(http1::Failure::Stale(error) | http1::Failure::Failed(error)) => {
                    return Err(error);
                }
            }
        }
    }
}
