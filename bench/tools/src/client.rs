//! One HTTP/1.1 client connection, plain or TLS, to a loopback address and nowhere else.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::Full;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

/// Where a client connects, and how: parsed once, shared by every connection.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Origin form (`/v1/...`): the request line a client that is not talking to a forward proxy
    /// sends; a reverse proxy rightly refuses the absolute form.
    pub path: Uri,
    /// The Host header: the URL's authority, or the TLS server name when one is given.
    pub host: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
}

impl Target {
    /// `url` must name a loopback IP: load goes to this machine only.
    pub fn new(url: &str, ca: Option<&str>, server_name: Option<&str>) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
        let authority = uri.authority().ok_or("the url has no host")?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("{url:?}: http:// or https:// only")),
        };
        let ip: std::net::IpAddr = authority
            .host()
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .map_err(|_| format!("{url:?}: the host must be a loopback IP address"))?;
        if !ip.is_loopback() {
            return Err(format!("{url:?}: load goes to loopback addresses only"));
        }
        let port = authority
            .port_u16()
            .unwrap_or(if https { 443 } else { 80 });
        let addr = SocketAddr::new(ip, port);
        let tls = if https {
            let ca = ca.ok_or("an https url needs --ca")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).map_err(|e| format!("--ca: {e}"))? {
                roots
                    .add(cert.map_err(|e| format!("--ca: {e}"))?)
                    .map_err(|e| format!("--ca: {e}"))?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = server_name.unwrap_or(authority.host()).to_owned();
            let name = ServerName::try_from(name).map_err(|e| format!("server name: {e}"))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        let host = match (&tls, server_name) {
            (Some(_), Some(name)) => name.to_owned(),
            _ => authority.as_str().to_owned(),
        };
        let path = uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e| format!("{url:?}: {e}"))?;
        Ok(Self {
            addr,
            path,
            host,
            tls,
        })
    }

    /// Connects and shakes hands; the connection is driven by a task of its own until it closes.
    pub async fn connect(&self) -> Result<Connection, String> {
        let tcp = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, task) = match &self.tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                (sender, tokio::spawn(async move { conn.await.is_ok() }))
            }
            None => {
                let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
                (sender, tokio::spawn(async move { conn.await.is_ok() }))
            }
        };
        Ok(Connection { sender, task })
    }

    /// A chat completion request, as an SDK sends it.
    pub fn request(&self, body: &str) -> Request<Full<Bytes>> {
        Request::post(self.path.clone())
            .header(header::HOST, &self.host)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::AUTHORIZATION, format!("Bearer {}", crate::API_KEY))
            .header(header::USER_AGENT, "benchtool/0.1")
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("static parts are valid")
    }
}

pub struct Connection {
    pub sender: SendRequest<Full<Bytes>>,
    /// Ends when the connection closes: `true` for a clean close.
    pub task: tokio::task::JoinHandle<bool>,
}
