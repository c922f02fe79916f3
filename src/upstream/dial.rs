//! Opening connections to the upstream: TCP (or a tunnel through the egress proxy), TLS, then
//! HTTP/2 or HTTP/1.1 as ALPN decides, all within the connect timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::egress::{self, Egress, Link};
use super::errors::{failure, tls_failure};
use super::tls::Tls;
use super::{Config, http1, resolve};
use crate::body::RequestBody;
use crate::error::ProxyError;

/// The protocols a new connection may speak: HTTP/2 or HTTP/1.1, as ALPN settles, or HTTP/1.1
/// only (for a request already written out for HTTP/1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocols {
    Any,
    Http1Only,
}

/// Opens connections to the upstream: TCP to the url's host and port, TLS with the configured
/// host as server name (like `curl --connect-to`), then HTTP/2 or HTTP/1.1 as ALPN decides.
pub(super) struct Dialer {
    /// The url's host and port, as addresses to connect to.
    resolver: Arc<resolve::Resolver>,
    /// None for an http:// upstream.
    tls: Option<Tls>,
    /// The proxy every connection goes through, when there is one.
    egress: Option<Egress>,
    pub offers_h2: bool,
    connect_timeout: Duration,
    http2: http2::Builder<TokioExecutor>,
}

pub(super) enum Connected {
    Http1(http1::Connection),
    Http2(http2::SendRequest<RequestBody>),
}

enum Transport {
    Plain(Link),
    Tls(Box<tokio_rustls::client::TlsStream<Link>>),
}

impl Dialer {
    /// To the url of `config`; `tls` is None for an http:// one.
    pub fn new(config: &Config, tls: Option<Tls>, egress: Option<Egress>) -> Self {
        let url = &config.url;
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .max_header_list_size(64 << 10);
        Self {
            resolver: resolve::Resolver::new(&url.host, url.port, config.dns_refresh.0),
            // http:// means HTTP/1.1: no prior-knowledge HTTP/2.
            offers_h2: config.http2 && tls.is_some(),
            tls,
            egress,
            connect_timeout: config.connect_timeout.0,
            http2,
        }
    }

    pub async fn dial(&self) -> Result<Connected, ProxyError> {
        match self.transport(Protocols::Any).await? {
            Transport::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                Ok(Connected::Http2(self.handshake(TokioIo::new(tls)).await?))
            }
            Transport::Tls(tls) => Ok(Connected::Http1(http1::Connection::new(tls))),
            Transport::Plain(link) => Ok(Connected::Http1(http1::Connection::new(Box::new(link)))),
        }
    }

    /// HTTP/2 over `io`, whose connection task is counted among the upstream's open ones.
    pub async fn handshake<T>(&self, io: T) -> Result<http2::SendRequest<RequestBody>, ProxyError>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (sender, connection) = self.http2.handshake(io).await.map_err(|e| failure(&e))?;
        let open = crate::metrics::Open::upstream_connection();
        tokio::spawn(async move {
            let _open = open;
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream HTTP/2 connection failed");
            }
        });
        Ok(sender)
    }

    /// An HTTP/1.1 connection, whatever the upstream would prefer: for upgrades, which cannot
    /// ride HTTP/2, and for the pool of HTTP/1.1 connections.
    pub async fn dial_http1(&self) -> Result<http1::Connection, ProxyError> {
        let io: http1::Stream = match self.transport(Protocols::Http1Only).await? {
            Transport::Tls(tls) => tls,
            Transport::Plain(link) => Box::new(link),
        };
        Ok(http1::Connection::new(io))
    }

    /// TCP (or a tunnel through the egress proxy), then TLS for https://, both within the
    /// connect timeout.
    async fn transport(&self, protocols: Protocols) -> Result<Transport, ProxyError> {
        let limit = self.connect_timeout;
        let transport = tokio::time::timeout(limit, self.connect(protocols))
            .await
            .unwrap_or_else(|_| {
                Err(match &self.egress {
                    Some(egress) => egress.timed_out(limit),
                    None => ProxyError::UpstreamUnreachable(format!(
                        "connect timed out after {limit:?}"
                    )),
                })
            });
        crate::metrics::upstream_dialed(match &transport {
            Ok(transport) => Ok(matches!(transport, Transport::Tls(_))),
            Err(_) => Err(()),
        });
        transport
    }

    async fn connect(&self, protocols: Protocols) -> Result<Transport, ProxyError> {
        let link = match &self.egress {
            Some(egress) => egress.connect(&self.resolver).await?,
            None => Link::Tcp(self.tcp().await?),
        };
        let Some(tls) = &self.tls else {
            return Ok(Transport::Plain(link));
        };
        let connector = match protocols {
            Protocols::Any => &tls.pooled,
            Protocols::Http1Only => &tls.http1,
        };
        match connector.connect(tls.server_name.clone(), link).await {
            Ok(stream) => {
                let session = stream.get_ref().1;
                tracing::debug!(
                    alpn = ?session.alpn_protocol().map(String::from_utf8_lossy),
                    handshake = ?session.handshake_kind(),
                    "upstream connection opened"
                );
                Ok(Transport::Tls(Box::new(stream)))
            }
            Err(e) => Err(tls_failure(&e)),
        }
    }

    async fn tcp(&self) -> Result<TcpStream, ProxyError> {
        let unreachable = ProxyError::UpstreamUnreachable;
        let addrs = self.resolver.addrs().await.map_err(unreachable)?;
        let tcp = match connect_any(&addrs).await {
            Ok(tcp) => tcp,
            Err(failed) => match self.resolver.after_failure(&addrs).await {
                Some(moved) => connect_any(&moved).await.map_err(unreachable)?,
                None => return Err(unreachable(failed)),
            },
        };
        egress::socket_options(&tcp)
            .map_err(|e| unreachable(format!("tcp socket options: {e}")))?;
        Ok(tcp)
    }
}

/// A TCP connection to the first of `addrs` that takes one; else why the last one did not.
async fn connect_any(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last = None;
    for &addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(format!("tcp connect to {addr}: {e}")),
        }
    }
    Err(last.unwrap_or_else(|| "no address to connect to".to_owned()))
}
