//! The egress proxy the upstream is reached through when `upstream.proxy` is set: an HTTP proxy
//! spoken to over TCP or TLS (a CONNECT request, with Basic proxy authentication), or a SOCKS5
//! server (RFC 1928, with RFC 1929's username and password). Either yields a tunnel to the
//! upstream's host and port, over which the upstream's own TLS runs end to end.
//!
//! The proxy's password comes from `proxy_password_file`, never from the url, and appears in no
//! message: an error names the proxy by host and port and says what it answered.

use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use rustls::pki_types::ServerName;
use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::resolve::Resolver;
use crate::config::upstream::{ProxyKind as Kind, ProxyUrl};
use crate::error::ProxyError;

/// Bytes that must not be shown: the proxy's credentials, or a header made of them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(hidden)")
    }
}

/// A connection to the upstream's host and port, directly or through an egress proxy (a TLS
/// one: an `https://` HTTP proxy). The upstream's own TLS, if any, runs over it.
pub enum Link {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A built egress proxy: where it is, how to speak to it, and the credentials it is given.
pub struct Egress {
    url: ProxyUrl,
    /// The proxy's host and port, as addresses.
    resolver: Arc<Resolver>,
    /// For an `https://` proxy: TLS to the proxy, verified with the upstream's trust roots.
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// `Proxy-Authorization`'s value for an HTTP proxy; `user` and `password` for SOCKS5.
    credentials: Option<(String, Secret)>,
    authorization: Option<Secret>,
}

impl Egress {
    pub fn new(
        url: &ProxyUrl,
        password: Option<&Secret>,
        tls: &rustls::ClientConfig,
        dns_refresh: Duration,
    ) -> Result<Self, String> {
        let tls = match url.kind {
            Kind::Https => {
                let name = ServerName::try_from(url.host.clone())
                    .map_err(|_| format!("{:?} is not a valid TLS server name", url.host))?;
                let mut tls = tls.clone();
                tls.alpn_protocols = vec![b"http/1.1".to_vec()];
                Some((tokio_rustls::TlsConnector::from(Arc::new(tls)), name))
            }
            _ => None,
        };
        let password = password.map_or(&[][..], |p| &p.0[..]);
        if url.is_socks() && password.len() > 255 {
            return Err("a SOCKS5 password is at most 255 bytes".into());
        }
        let credentials = url
            .user
            .clone()
            .map(|user| (user, Secret(password.to_vec())));
        let authorization = credentials.as_ref().map(|(user, password)| {
            let mut pair = user.as_bytes().to_vec();
            pair.push(b':');
            pair.extend_from_slice(&password.0);
            let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
            Secret(format!("Basic {encoded}").into_bytes())
        });
        if let Some((user, _)) = &credentials
            && url.is_socks()
            && (user.is_empty() || user.len() > 255)
        {
            return Err("a SOCKS5 user is 1 to 255 bytes".into());
        }
        Ok(Self {
            resolver: Resolver::new(&url.host, url.port, dns_refresh),
            url: url.clone(),
            tls,
            credentials,
            authorization,
        })
    }

    /// A tunnel through the proxy to the host and port `target` looks up (which only
    /// `socks5://` does here). Bounded by the caller's connect timeout.
    pub async fn connect(&self, target: &Arc<Resolver>) -> Result<Link, ProxyError> {
        match self.url.kind {
            Kind::Http | Kind::Https => {
                let mut link = self.open().await?;
                self.http_connect(&mut link, target).await?;
                Ok(link)
            }
            Kind::Socks5h => {
                let mut link = self.open().await?;
                let address = match target.host().parse::<IpAddr>() {
                    Ok(ip) => Address::Ip(ip),
                    Err(_) => Address::Name(target.host()),
                };
                self.socks5(&mut link, &address, target.port())
                    .await
                    .map_err(|e| self.socks5_failure(e, target))?;
                Ok(link)
            }
            Kind::Socks5 => self.socks5_resolved(target).await,
        }
    }

    /// `socks5://`: the upstream's addresses, tried in turn until the proxy reaches one.
    async fn socks5_resolved(&self, target: &Arc<Resolver>) -> Result<Link, ProxyError> {
        let addrs = target
            .addrs()
            .await
            .map_err(ProxyError::UpstreamUnreachable)?;
        let mut last = None;
        for addr in addrs.iter() {
            let mut link = self.open().await?;
            match self
                .socks5(&mut link, &Address::Ip(addr.ip()), addr.port())
                .await
            {
                Ok(()) => return Ok(link),
                Err(error @ Socks5Error::Reply(_)) => last = Some(error),
                Err(error) => return Err(self.socks5_failure(error, target)),
            }
        }
        Err(match last {
            Some(error) => self.socks5_failure(error, target),
            None => ProxyError::UpstreamUnreachable("no address to connect to".into()),
        })
    }

    /// The connect timeout ran out on the way through the proxy.
    pub fn timed_out(&self, limit: Duration) -> ProxyError {
        self.failed(format_args!(
            "gave no connection to the upstream within {limit:?}"
        ))
    }

    fn failed(&self, what: impl std::fmt::Display) -> ProxyError {
        ProxyError::EgressProxy(format!("egress proxy {} {what}", self.url.address()))
    }

    /// TCP to the proxy, then TLS for an `https://` proxy.
    async fn open(&self) -> Result<Link, ProxyError> {
        let unreachable = |what: String| self.failed(format_args!("is unreachable: {what}"));
        let addrs = self.resolver.addrs().await.map_err(unreachable)?;
        let mut last = io::Error::from(io::ErrorKind::AddrNotAvailable);
        let mut tcp = None;
        for &addr in addrs.iter() {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let tcp = tcp.ok_or_else(|| unreachable(last.kind().to_string()))?;
        socket_options(&tcp).map_err(|e| unreachable(format!("tcp socket options: {e}")))?;
        let Some((connector, name)) = &self.tls else {
            return Ok(Link::Tcp(tcp));
        };
        match connector.connect(name.clone(), tcp).await {
            Ok(tls) => Ok(Link::Tls(Box::new(tls))),
            Err(e) => Err(self.failed(format_args!(
                "failed TLS: {}",
                super::tls_error(&e).map_or_else(|| e.kind().to_string(), ToString::to_string)
            ))),
        }
    }

    /// Asks an HTTP proxy for a tunnel, and reads its answer's head, exactly.
    async fn http_connect(&self, link: &mut Link, target: &Resolver) -> Result<(), ProxyError> {
        let authority = format!("{}:{}", super::bracket_ipv6(target.host()), target.port());
        let mut head =
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n").into_bytes();
        if let Some(Secret(authorization)) = &self.authorization {
            head.extend_from_slice(b"Proxy-Authorization: ");
            head.extend_from_slice(authorization);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let lost = |e: io::Error| {
            self.failed(format_args!(
                "lost the connection during CONNECT: {}",
                e.kind()
            ))
        };
        link.write_all(&head).await.map_err(lost)?;
        link.flush().await.map_err(lost)?;
        let answer = read_head(link).await.map_err(lost)?;
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut fields);
        let parsed = response.parse(&answer);
        let (Ok(httparse::Status::Complete(_)), Some(code)) = (parsed, response.code) else {
            return Err(self.failed("answered CONNECT with something that is not HTTP"));
        };
        if (200..300).contains(&code) {
            return Ok(());
        }
        let reason: String = response
            .reason
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(100)
            .collect();
        Err(self.failed(format_args!("refused CONNECT: {code} {reason}")))
    }

    /// RFC 1928's greeting, RFC 1929's authentication when a user is set, then the CONNECT.
    async fn socks5(
        &self,
        link: &mut Link,
        address: &Address<'_>,
        port: u16,
    ) -> Result<(), Socks5Error> {
        let method = if self.credentials.is_some() { 2 } else { 0 };
        link.write_all(&[5, 1, method]).await?;
        let mut chosen = [0u8; 2];
        link.read_exact(&mut chosen).await?;
        match chosen {
            [5, m] if m == method => {}
            [5, 0xff] => {
                return Err(Socks5Error::Said(
                    "accepts none of the authentication methods offered".into(),
                ));
            }
            _ => return Err(Socks5Error::Said("does not speak SOCKS5".into())),
        }
        if let Some((user, Secret(password))) = &self.credentials {
            let mut auth = vec![1, user.len() as u8];
            auth.extend_from_slice(user.as_bytes());
            auth.push(password.len() as u8);
            auth.extend_from_slice(password);
            link.write_all(&auth).await?;
            let mut status = [0u8; 2];
            link.read_exact(&mut status).await?;
            if status[1] != 0 {
                return Err(Socks5Error::Said(
                    "refused the user name or password".into(),
                ));
            }
        }
        let mut request = vec![5, 1, 0];
        match address {
            Address::Ip(IpAddr::V4(ip)) => {
                request.push(1);
                request.extend_from_slice(&ip.octets());
            }
            Address::Ip(IpAddr::V6(ip)) => {
                request.push(4);
                request.extend_from_slice(&ip.octets());
            }
            Address::Name(name) => {
                let name = u8::try_from(name.len()).map_err(|_| {
                    Socks5Error::Said("cannot be given a host name over 255 bytes".into())
                })?;
                request.push(3);
                request.push(name);
            }
        }
        if let Address::Name(name) = address {
            request.extend_from_slice(name.as_bytes());
        }
        request.extend_from_slice(&port.to_be_bytes());
        link.write_all(&request).await?;
        read_socks5_reply(link).await
    }

    fn socks5_failure(&self, error: Socks5Error, target: &Resolver) -> ProxyError {
        match error {
            Socks5Error::Io(e) => self.failed(format_args!(
                "lost the connection during the SOCKS5 handshake: {}",
                e.kind()
            )),
            Socks5Error::Said(what) => self.failed(what),
            Socks5Error::Reply(code) => self.failed(format_args!(
                "could not connect to {}:{}: {} (SOCKS5 reply {code})",
                super::bracket_ipv6(target.host()),
                target.port(),
                socks5_reply(code)
            )),
        }
    }
}

enum Address<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

enum Socks5Error {
    Io(io::Error),
    /// What the proxy did, in words.
    Said(String),
    /// A CONNECT reply other than success.
    Reply(u8),
}

impl From<io::Error> for Socks5Error {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Reads a CONNECT reply whole (its bound address too), so that what follows is the upstream's.
async fn read_socks5_reply(link: &mut Link) -> Result<(), Socks5Error> {
    let mut reply = [0u8; 4];
    link.read_exact(&mut reply).await?;
    if reply[0] != 5 {
        return Err(Socks5Error::Said("does not speak SOCKS5".into()));
    }
    if reply[1] != 0 {
        return Err(Socks5Error::Reply(reply[1]));
    }
    let address = match reply[3] {
        1 => 4,
        4 => 16,
        3 => usize::from(link.read_u8().await?),
        _ => return Err(Socks5Error::Said("sent a malformed SOCKS5 reply".into())),
    };
    let mut bound = vec![0u8; address + 2];
    link.read_exact(&mut bound).await?;
    Ok(())
}

/// RFC 1928's reply codes.
fn socks5_reply(code: u8) -> &'static str {
    match code {
        1 => "general SOCKS server failure",
        2 => "connection not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unknown reply",
    }
}

/// The longest answer to CONNECT that is read.
const MAX_CONNECT_ANSWER: usize = 16 << 10;

/// Reads up to the blank line that ends an HTTP head, a byte at a time: what follows belongs to
/// the tunnel, and a proxy's answer is a few hundred bytes.
async fn read_head(link: &mut Link) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_CONNECT_ANSWER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "answer too long",
            ));
        }
        head.push(link.read_u8().await?);
    }
    Ok(head)
}

pub fn socket_options(tcp: &TcpStream) -> io::Result<()> {
    let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(60));
    tcp.set_nodelay(true)?;
    SockRef::from(tcp).set_tcp_keepalive(&keepalive)
}

impl AsyncRead for Link {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Tcp(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        assert_eq!(
            format!("{:?}", Secret::new(b"hunter2".to_vec())),
            "Secret(hidden)"
        );
    }
}
