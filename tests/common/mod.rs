//! The parts every integration test uses: a CA made for the test, a fake OpenAI upstream that
//! records what it receives, the real proxy binary as a child process, and a notify socket that
//! records what the proxy tells systemd.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const BIN: &str = env!("CARGO_BIN_EXE_openai-proxy");

/// Bounds a whole test: a hang fails instead of blocking CI.
pub async fn bounded<F: std::future::Future>(seconds: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(seconds), f)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {seconds}s"))
}

/// Polls `check` until it returns Some, failing after `timeout`.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub struct Pki {
    pub dir: TempDir,
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

impl Pki {
    /// A CA, and a certificate it signed for api.openai.com, localhost and 127.0.0.1.
    pub fn new() -> Self {
        Self::with_names(&["api.openai.com", "localhost"])
    }

    pub fn with_names(names: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "openai-proxy test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let mut leaf =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.2".parse().unwrap()));
        let leaf_key = KeyPair::generate().unwrap();
        let cert = leaf.signed_by(&leaf_key, &ca).unwrap();
        let ca_pem = dir.path().join("ca.pem");
        let cert_pem = dir.path().join("cert.pem");
        let key_pem = dir.path().join("key.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        std::fs::write(&key_pem, leaf_key.serialize_pem()).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            dir,
            ca_pem,
            cert_pem,
            key_pem,
            server: Arc::new(server),
            client: Arc::new(client),
        }
    }
}

/// What the fake upstream received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub uri: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// Which of the upstream's connections it came on, counting from 1.
    pub connection: usize,
}

impl Received {
    /// The Host the upstream saw: the Host header, or HTTP/2's :authority.
    pub fn host(&self) -> String {
        match self.headers.get("host") {
            Some(h) => h.to_str().unwrap().to_owned(),
            None => self
                .uri
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.authority().map(|a| a.to_string()))
                .unwrap_or_default(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    Both,
    Http1Only,
}

pub struct FakeUpstream {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Received>>>,
    /// When each SSE event left the upstream, by stream id (the `x-test-stream` header).
    pub sent_events: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
    /// TLS connections accepted so far.
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type UpBody = BoxBody<Bytes, Infallible>;

impl FakeUpstream {
    pub async fn start(pki: &Pki, alpn: Alpn) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tls = (*pki.server).clone();
        tls.alpn_protocols = match alpn {
            Alpn::Both => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::Http1Only => vec![b"http/1.1".to_vec()],
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let received = Arc::new(Mutex::new(Vec::new()));
        let sent_events = Arc::new(Mutex::new(HashMap::new()));
        let (rec, sent) = (received.clone(), sent_events.clone());
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let connection = accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let acceptor = acceptor.clone();
                let (rec, sent) = (rec.clone(), sent.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let (_, session) = stream.get_ref();
                    let sni = session.server_name().map(str::to_owned);
                    let alpn = session
                        .alpn_protocol()
                        .map(|p| String::from_utf8_lossy(p).into_owned());
                    let service = service_fn(move |req| {
                        let ctx = (
                            rec.clone(),
                            sent.clone(),
                            sni.clone(),
                            alpn.clone(),
                            connection,
                        );
                        async move { Ok::<_, Infallible>(upstream_route(req, ctx).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            received,
            sent_events,
            connections,
            task,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn last(&self) -> Received {
        self.received()
            .last()
            .cloned()
            .expect("the upstream received a request")
    }

    /// The `[upstream]` section that points the proxy here, with Host and SNI api.openai.com.
    /// TLS connections accepted so far.
    pub fn connections_opened(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `[upstreams.NAME]` pointing here, under the base path `base`.
    pub fn named_toml(&self, pki: &Pki, name: &str, base: &str) -> String {
        format!(
            "[upstreams.{name}]\nurl = \"https://127.0.0.1:{}{base}\"\nhost = \"api.openai.com\"\nca_file = \"{}\"\n",
            self.addr.port(),
            pki.ca_pem.display()
        )
    }

    pub fn upstream_toml(&self, pki: &Pki) -> String {
        format!(
            "[upstream]\nurl = \"https://127.0.0.1:{}\"\nhost = \"api.openai.com\"\nca_file = \"{}\"\n",
            self.addr.port(),
            pki.ca_pem.display()
        )
    }
}

fn full(body: impl Into<Bytes>) -> UpBody {
    Full::new(body.into()).boxed()
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<UpBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-request-id", "req_upstream_123")
        .body(full(value.to_string()))
        .unwrap()
}

type Ctx = (
    Arc<Mutex<Vec<Received>>>,
    Arc<Mutex<HashMap<String, Vec<Instant>>>>,
    Option<String>,
    Option<String>,
    usize,
);

async fn upstream_route(
    mut req: Request<Incoming>,
    (rec, sent, sni, alpn, connection): Ctx,
) -> Response<UpBody> {
    let path = req.uri().path().to_owned();
    if path == "/v1/realtime" {
        return websocket_echo(&mut req, &rec, sni, alpn, connection);
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    rec.lock().unwrap().push(Received {
        method: parts.method.clone(),
        uri: parts.uri.to_string(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: body.clone(),
        sni,
        alpn,
        connection,
    });
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let number =
        |name: &str, default: u64| header(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    // A key the test says to refuse: 429 with Retry-After (or 401), as OpenAI answers.
    let key_is = |name: &str| {
        header(name).is_some_and(|key| header("authorization") == Some(format!("Bearer {key}")))
    };
    if key_is("x-test-429-for-key") {
        let mut response = json_response(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({"error": {"message": "Rate limit reached", "type": "requests",
                "param": null, "code": "rate_limit_exceeded"}}),
        );
        response
            .headers_mut()
            .insert("retry-after", http::HeaderValue::from_static("30"));
        return response;
    }
    if key_is("x-test-401-for-key") {
        return json_response(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                "param": null, "code": "invalid_api_key"}}),
        );
    }
    if let Some(delay) = header("x-test-delay-headers-ms") {
        tokio::time::sleep(Duration::from_millis(delay.parse().unwrap())).await;
    }
    match path.as_str() {
        "/v1/chat/completions" => {
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let model = request["model"]
                .as_str()
                .unwrap_or("gpt-4o-mini")
                .to_owned();
            if request["stream"].as_bool() == Some(true) {
                let events = number("x-test-events", 5);
                let gap = Duration::from_millis(number("x-test-gap-ms", 20));
                let id = header("x-test-stream").unwrap_or_default();
                sse_response(model, events, gap, id, sent)
            } else {
                json_response(
                    StatusCode::OK,
                    serde_json::json!({
                        "id": "chatcmpl-test", "object": "chat.completion", "created": 1_700_000_000,
                        "model": model,
                        "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": "Hello from the fake upstream."}}],
                        // The test's own usage object (x-test-usage, JSON), else a small one.
                        "usage": header("x-test-usage")
                            .and_then(|usage| serde_json::from_str(&usage).ok())
                            .unwrap_or(serde_json::json!(
                                {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
                            ))
                    }),
                )
            }
        }
        "/v1/embeddings" => json_response(
            StatusCode::OK,
            serde_json::json!({
                "object": "list", "model": "text-embedding-3-small",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 0.125]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3}
            }),
        ),
        "/v1/files" => {
            let text = String::from_utf8_lossy(&body);
            let filename = text
                .split("filename=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or("unknown")
                .to_owned();
            json_response(
                StatusCode::OK,
                serde_json::json!({
                    "id": "file-test123", "object": "file", "bytes": body.len(),
                    "created_at": 1_700_000_000, "filename": filename, "purpose": "fine-tune",
                    "status": "processed"
                }),
            )
        }
        "/v1/models" => {
            let data: Vec<serde_json::Value> = ["gpt-4o-mini", "gpt-4o", "gpt-4.1-nano", "whisper-1"]
                .map(|id| serde_json::json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "openai"}))
                .into();
            json_response(
                StatusCode::OK,
                serde_json::json!({"object": "list", "data": data}),
            )
        }
        "/v1/error" => json_response(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({
                "error": {"message": "Rate limit reached (upstream's own words)", "type": "requests",
                          "param": null, "code": "rate_limit_exceeded"}
            }),
        ),
        "/v1/unavailable" => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "error": {"message": "The server is overloaded", "type": "server_error",
                          "param": null, "code": null}
            }),
        ),
        "/v1/huge-head" => Response::builder()
            .header("x-huge", "h".repeat(70 << 10))
            .body(full("huge"))
            .unwrap(),
        "/v1/hop" => Response::builder()
            .header("content-type", "text/plain")
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic nope")
            .body(full("hop"))
            .unwrap(),
        _ => json_response(
            StatusCode::OK,
            serde_json::json!({"path": path, "bytes": body.len()}),
        ),
    }
}

fn sse_response(
    model: String,
    events: u64,
    gap: Duration,
    id: String,
    sent: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
) -> Response<UpBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        for i in 0..events {
            tokio::time::sleep_until(start + gap * i as u32).await;
            let chunk = serde_json::json!({
                "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1_700_000_000,
                "model": model,
                "choices": [{"index": 0, "delta": {"content": format!("tok{i} ")}, "finish_reason": null}]
            });
            sent.lock()
                .unwrap()
                .entry(id.clone())
                .or_default()
                .push(Instant::now());
            if tx
                .send(Ok(Frame::data(Bytes::from(format!("data: {chunk}\n\n")))))
                .await
                .is_err()
            {
                return;
            }
        }
        let done = serde_json::json!({
            "id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": model, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]
        });
        let _ = tx
            .send(Ok(Frame::data(Bytes::from(format!(
                "data: {done}\n\ndata: [DONE]\n\n"
            )))))
            .await;
    });
    let stream = tokio_stream_from(rx);
    Response::builder()
        .header("content-type", "text/event-stream; charset=utf-8")
        .header("cache-control", "no-cache")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

fn websocket_echo(
    req: &mut Request<Incoming>,
    rec: &Arc<Mutex<Vec<Received>>>,
    sni: Option<String>,
    alpn: Option<String>,
    connection: usize,
) -> Response<UpBody> {
    rec.lock().unwrap().push(Received {
        method: req.method().clone(),
        uri: req.uri().to_string(),
        version: req.version(),
        headers: req.headers().clone(),
        body: Bytes::new(),
        sni,
        alpn,
        connection,
    });
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return json_response(
            StatusCode::BAD_REQUEST,
            serde_json::json!({"error": "not a websocket"}),
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let protocol = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|p| p.trim().to_owned());
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            tokio_tungstenite::tungstenite::protocol::Role::Server,
            None,
        )
        .await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() {
                break;
            }
            if ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", accept);
    // Like OpenAI's Realtime API: the first subprotocol offered (`realtime`) is the one spoken.
    if let Some(first) = protocol {
        response = response.header("sec-websocket-protocol", first);
    }
    response.body(full(Bytes::new())).unwrap()
}

/// A unix datagram socket standing in for systemd's NOTIFY_SOCKET; keeps every message.
pub struct NotifySocket {
    pub path: PathBuf,
    messages: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl NotifySocket {
    pub fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let messages = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = socket.recv(&mut buf) {
                let (lock, cvar) = &*sink;
                lock.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                cvar.notify_all();
            }
        });
        Self { path, messages }
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until some message after the first `skip` satisfies `f`; returns its index.
    pub fn wait_for(
        &self,
        skip: usize,
        timeout: Duration,
        what: &str,
        f: impl Fn(&str) -> bool,
    ) -> usize {
        let (lock, cvar) = &*self.messages;
        let deadline = Instant::now() + timeout;
        let mut messages = lock.lock().unwrap();
        loop {
            if let Some(i) = messages.iter().skip(skip).position(|m| f(m)) {
                return skip + i;
            }
            let now = Instant::now();
            if now >= deadline {
                let got = messages.clone();
                drop(messages);
                panic!("timed out waiting for a notify message: {what}; got {got:#?}");
            }
            messages = cvar.wait_timeout(messages, deadline - now).unwrap().0;
        }
    }
}

/// The real proxy binary, started with a config written for the test.
pub struct Proxy {
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub notify: NotifySocket,
    pub child: Child,
    pub logs: Arc<Mutex<Vec<String>>>,
    /// The addresses the proxy reported in its READY status, by scheme.
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
}

pub struct ProxyOptions {
    pub env: Vec<(String, String)>,
    pub wait_ready: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            env: Vec::new(),
            wait_ready: true,
        }
    }
}

impl Proxy {
    pub fn start(config: &str) -> Self {
        Self::start_with(config, ProxyOptions::default())
    }

    pub fn start_with(config: &str, options: ProxyOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        Self::spawn(dir, config_path, options)
    }

    /// The command that runs the proxy binary at `bin` with `config_path`, in an environment of
    /// its own: none of the test runner's logging, journal, sockets or watchdog.
    pub fn command(bin: &Path, config_path: &Path) -> Command {
        let mut command = Command::new(bin);
        command
            .arg("--config")
            .arg(config_path)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("LISTEN_FDS")
            .env_remove("WATCHDOG_USEC");
        command
    }

    pub fn spawn(dir: TempDir, config_path: PathBuf, options: ProxyOptions) -> Self {
        let mut command = Self::command(Path::new(BIN), &config_path);
        for (k, v) in &options.env {
            command.env(k, v);
        }
        Self::spawn_command(dir, config_path, command, options.wait_ready)
    }

    /// Runs `command` (the proxy, or something that execs it) with the test's notify socket.
    pub fn spawn_command(
        dir: TempDir,
        config_path: PathBuf,
        mut command: Command,
        wait_ready: bool,
    ) -> Self {
        let notify = NotifySocket::new(dir.path());
        command
            .env("NOTIFY_SOCKET", &notify.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut proxy = Self {
            dir,
            config_path,
            notify,
            child,
            logs,
            http: None,
            https: None,
        };
        if wait_ready {
            proxy.wait_ready(0);
        }
        proxy
    }

    /// Waits for a READY=1 after message `skip` and reads the bound addresses from its STATUS.
    pub fn wait_ready(&mut self, skip: usize) -> usize {
        let index = self
            .notify
            .wait_for(skip, Duration::from_secs(15), "READY=1", |m| {
                m.lines().any(|l| l == "READY=1")
            });
        let message = &self.notify.messages()[index];
        let status = message
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .expect("READY comes with a STATUS")
            .to_owned();
        self.http = addr_after(&status, "http://");
        self.https = addr_after(&status, "https://");
        index
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http.expect("a plain listener"))
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not exit within {timeout:?}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- proxy logs ---\n{}\n--- notify ---\n{:#?}",
                self.logs(),
                self.notify.messages()
            );
        }
    }
}

fn addr_after(status: &str, scheme: &str) -> Option<SocketAddr> {
    status
        .split([' ', ',', ';'])
        .find_map(|word| word.strip_prefix(scheme))
        .and_then(|a| a.parse().ok())
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn http2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Answer {
    let response = client.request(request).await.expect("the proxy answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the body arrives").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub fn post_json(url: &str, body: serde_json::Value) -> Request<Full<Bytes>> {
    Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test-SECRET-KEY-123")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// `openai-proxy check` on `config`, written as config.toml in `dir`: whether it passed, and
/// what it printed.
pub fn check_in(dir: &Path, config: &str) -> (bool, String) {
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A config whose upstream is a loopback port nothing listens on.
pub fn down_upstream_config(extra_upstream: &str) -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    format!(
        "listen = [\"127.0.0.1:0\"]\n[upstream]\nurl = \"https://127.0.0.1:{port}\"\nhost = \"api.openai.com\"\n{extra_upstream}"
    )
}

/// A plain listener and the fake upstream, as most tests want them.
pub fn basic_config(upstream: &FakeUpstream, pki: &Pki, extra: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:0\"]\n{extra}\n{}",
        upstream.upstream_toml(pki)
    )
}

/// `config` (with an `[upstream]` table) offering HTTP/2 to the upstream, or not.
pub fn with_http2(config: &str, http2: bool) -> String {
    config.replace("[upstream]\n", &format!("[upstream]\nhttp2 = {http2}\n"))
}

/// A streamed chat completion through the proxy; returns when each event arrived.
pub async fn stream_chat(
    client: &HttpClient,
    url: &str,
    id: &str,
    events: u64,
    gap_ms: u64,
) -> Vec<Instant> {
    let request = Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test-SECRET-KEY-123")
        .header("x-test-stream", id)
        .header("x-test-events", events.to_string())
        .header("x-test-gap-ms", gap_ms.to_string())
        .body(Full::new(Bytes::from(
            serde_json::json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        )))
        .unwrap();
    let response = client.request(request).await.expect("the stream starts");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    let mut pending = String::new();
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the stream is not cut");
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.push_str(std::str::from_utf8(data).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            if event.contains("[DONE]") {
                done = true;
            } else if event.contains("tok") {
                arrivals.push(Instant::now());
            }
        }
    }
    assert!(done, "the stream ended with [DONE]");
    assert_eq!(arrivals.len() as u64, events, "every event arrived");
    arrivals
}

// Raw HTTP/1.1 spoken to the proxy's plain listener.

/// How long a raw read waits for what it expects.
const RAW_WAIT: Duration = Duration::from_secs(10);

pub async fn connect(proxy: &Proxy) -> TcpStream {
    let url = proxy.url("");
    TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Sends `request` and reads until the proxy closes the connection.
pub async fn exchange(proxy: &Proxy, request: &[u8]) -> String {
    let mut stream = connect(proxy).await;
    stream.write_all(request).await.unwrap();
    read_to_close(&mut stream).await
}

pub async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(RAW_WAIT, stream.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until `text` has arrived; returns everything read so far.
pub async fn read_until(stream: &mut TcpStream, text: &str) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    while find(&out, text.as_bytes()).is_none() {
        let n = tokio::time::timeout(RAW_WAIT, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{text:?} within {RAW_WAIT:?}; got {:?}",
                    String::from_utf8_lossy(&out)
                )
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{e} before {text:?}; got {:?}",
                    String::from_utf8_lossy(&out)
                )
            });
        assert!(
            n > 0,
            "closed before {text:?}: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response with a Content-Length body (or none) from a kept-alive connection;
/// returns it whole.
pub async fn read_response(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(RAW_WAIT, stream.read(&mut buf))
            .await
            .expect("a response within the wait")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        if bytes.len() >= end + 4 + length {
            return text;
        }
    }
}

/// What follows a raw response's head.
pub fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The fake upstream (both ALPNs) and the proxy in front of it on a plain listener, with `extra`
/// before the `[upstream]` table (a `[server]` table, say).
pub async fn proxy_and_upstream(extra: &str) -> (Pki, FakeUpstream, Proxy) {
    let pki = Pki::new();
    let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
    let proxy = Proxy::start(&basic_config(&upstream, &pki, extra));
    (pki, upstream, proxy)
}

// Tokens mode ([auth] mode = "tokens").

/// The proxy's own OpenAI key, as the key file holds it.
pub const UPSTREAM_KEY: &str = "sk-proj-UPSTREAM-SECRET-KEY-42";
pub const TOKENS_AUTH: &str = "[auth]\nmode = \"tokens\"\nupstream_key_file = \"openai-key\"\ntokens_file = \"tokens.toml\"\norganization = \"org-proxy\"\n";

/// A token made by `openai-proxy token new NAME`, and the `[[token]]` table it printed.
pub struct Issued {
    pub token: String,
    pub table: String,
}

pub fn issue(name: &str) -> Issued {
    let out = std::process::Command::new(BIN)
        .args(["token", "new", name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (token, table) = text.split_once('\n').unwrap();
    assert!(token.starts_with("op-"), "{token}");
    Issued {
        token: token.to_owned(),
        table: table.to_owned(),
    }
}

/// Waits until at least `room` is left in the current UTC minute, so that a test's requests
/// all fall in one minute's window of a per-minute limit.
pub fn wait_for_room_in_minute(room: Duration) {
    let left = |now: std::time::SystemTime| {
        let millis = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        Duration::from_millis(60_000 - millis % 60_000)
    };
    while left(std::time::SystemTime::now()) < room {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes a file whole under a temporary name, then renames it over the old one, as careful
/// tools do (the watcher settles such a change in 0.1 s).
pub fn replace_file(path: &Path, contents: &str) {
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

pub fn write_key(dir: &Path, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("openai-key");
    std::fs::write(&path, format!("{UPSTREAM_KEY}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// The real proxy in tokens mode, its key file and tokens file beside its config.
pub fn start_tokens(
    upstream: &FakeUpstream,
    pki: &Pki,
    tokens: &str,
    env: &[(&str, &str)],
) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    write_key(dir.path(), 0o600);
    std::fs::write(dir.path().join("tokens.toml"), tokens).unwrap();
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, basic_config(upstream, pki, TOKENS_AUTH)).unwrap();
    let options = ProxyOptions {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    Proxy::spawn(dir, config_path, options)
}

// Handovers.

/// Ends a process the test did not start itself (the successor) when the test ends.
pub struct Successor(pub u32);

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(self.0.to_string())
            .status();
    }
}

/// The PID a notify message names the main process.
pub fn main_pid(message: &str) -> u32 {
    message
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {message:?}"))
}
