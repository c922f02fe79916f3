//! The fake OpenAI upstreams: TLS servers that record what they receive and answer as OpenAI
//! would (JSON, SSE streams, a WebSocket echo), or as a test's script says.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::Pki;

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
    server: TlsServer,
}

/// The last request an upstream recorded; fails if there is none.
pub fn last_of<T: Clone>(recorded: &Mutex<Vec<T>>) -> T {
    recorded
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("the upstream received a request")
}

/// A response body of the fake upstreams.
pub type UpBody = BoxBody<Bytes, Infallible>;

/// A TLS listener on a fresh 127.0.0.1 port that hands each connection, once its handshake is
/// done, to a handler of its own, with its index (counting from 1 in the order the TCP
/// connections were accepted). Stops accepting when dropped.
pub struct TlsServer {
    pub addr: SocketAddr,
    /// TCP connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsServer {
    pub async fn start<F, Fut>(tls: Arc<rustls::ServerConfig>, handler: F) -> Self
    where
        F: Fn(TlsStream<TcpStream>, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let accepted = Arc::new(AtomicUsize::new(0));
        let (counter, handler) = (accepted.clone(), Arc::new(handler));
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let index = counter.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = tcp.set_nodelay(true);
                let (acceptor, handler) = (acceptor.clone(), handler.clone());
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        handler(stream, index).await;
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }
}

/// Serves HTTP/1.1 (with upgrades) or HTTP/2 on `io`, each request answered by `answer`.
pub async fn serve_http<I, F, Fut>(io: I, answer: F)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + 'static,
    Fut: Future<Output = Response<UpBody>> + Send + 'static,
{
    let service = service_fn(move |request| {
        let answered = answer(request);
        async move { Ok::<_, Infallible>(answered.await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await;
}

impl FakeUpstream {
    pub async fn start(pki: &Pki, alpn: Alpn) -> Self {
        let mut tls = (*pki.server).clone();
        tls.alpn_protocols = match alpn {
            Alpn::Both => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            Alpn::Http1Only => vec![b"http/1.1".to_vec()],
        };
        let received = Arc::new(Mutex::new(Vec::new()));
        let sent_events = Arc::new(Mutex::new(HashMap::new()));
        let (rec, sent) = (received.clone(), sent_events.clone());
        let server = TlsServer::start(Arc::new(tls), move |stream, connection| {
            let (_, session) = stream.get_ref();
            let sni = session.server_name().map(str::to_owned);
            let alpn = session
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            let (rec, sent) = (rec.clone(), sent.clone());
            serve_http(stream, move |req| {
                let ctx = (
                    rec.clone(),
                    sent.clone(),
                    sni.clone(),
                    alpn.clone(),
                    connection,
                );
                upstream_route(req, ctx)
            })
        })
        .await;
        Self {
            addr: server.addr,
            received,
            sent_events,
            server,
        }
    }

    /// TLS connections accepted so far.
    pub fn connections_opened(&self) -> usize {
        self.server.accepted.load(Ordering::SeqCst)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn last(&self) -> Received {
        last_of(&self.received)
    }

    /// `[upstreams.NAME]` pointing here, under the base path `base`.
    pub fn named_toml(&self, pki: &Pki, name: &str, base: &str) -> String {
        format!(
            "[upstreams.{name}]\nurl = \"https://127.0.0.1:{}{base}\"\nhost = \"api.openai.com\"\nca_file = \"{}\"\n",
            self.addr.port(),
            pki.ca_pem.display()
        )
    }

    /// The `[upstream]` section that points the proxy here, with Host and SNI api.openai.com.
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
    let headers = parts.headers;
    if let Some(refusal) = refusal_for_key(&headers) {
        return refusal;
    }
    if let Some(delay) = header(&headers, "x-test-delay-headers-ms") {
        tokio::time::sleep(Duration::from_millis(delay.parse().unwrap())).await;
    }
    canned_answer(&path, &headers, body, sent)
}

/// A request header as text, if it is there.
fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A key the test says to refuse: 429 with Retry-After (or 401), as OpenAI answers.
fn refusal_for_key(headers: &HeaderMap) -> Option<Response<UpBody>> {
    let key_is = |name: &str| {
        header(headers, name)
            .is_some_and(|key| header(headers, "authorization") == Some(format!("Bearer {key}")))
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
        return Some(response);
    }
    if key_is("x-test-401-for-key") {
        return Some(json_response(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                "param": null, "code": "invalid_api_key"}}),
        ));
    }
    None
}

/// What the fake OpenAI answers at `path`: chat completions (JSON or SSE), embeddings, file
/// uploads, the model list, errors, and odd heads; anything else echoes its path and size.
fn canned_answer(
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
    sent: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
) -> Response<UpBody> {
    match path {
        "/v1/chat/completions" => chat_completion(headers, &body, sent),
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

/// A chat completion: an SSE stream of `x-test-events` events `x-test-gap-ms` apart when the
/// request asks to stream, else one JSON answer with `x-test-usage` as its usage, if given.
fn chat_completion(
    headers: &HeaderMap,
    body: &[u8],
    sent: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
) -> Response<UpBody> {
    let header = |name: &str| header(headers, name);
    let number =
        |name: &str, default: u64| header(name).and_then(|v| v.parse().ok()).unwrap_or(default);
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
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
