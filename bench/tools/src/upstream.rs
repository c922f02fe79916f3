//! The fake OpenAI API: TLS with ALPN h2 and http/1.1, as api.openai.com offers.
//!
//! `POST /v1/chat/completions` answers a fixed chat.completion, or, when the request asks for
//! `"stream": true`, `--events` chat.completion.chunk events `--interval-ms` apart on a fixed
//! schedule from the moment the request arrived, then `data: [DONE]`. Each chunk carries the
//! CLOCK_MONOTONIC time it was handed to the connection (`bench_sent_ns`), so the client can
//! tell how long the path took to deliver it, and the time its request arrived
//! (`bench_arrived_ns`).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpSocket;
use tokio::time::{Instant, Sleep};

use crate::args::Args;
use crate::monotonic_ns;

/// A non-streamed answer of about 600 bytes, shaped like the real one.
pub const COMPLETION: &str = include_str!("../../completion.json");

#[derive(Clone, Copy)]
struct Schedule {
    events: u32,
    interval: Duration,
}

pub fn run(argv: &[String]) -> Result<(), String> {
    let args = Args::parse(
        argv,
        &[
            "listen",
            "cert",
            "key",
            "events",
            "interval-ms",
            "threads",
            "max-streams",
        ],
    )?;
    let listen: SocketAddr = args
        .required("listen")?
        .parse()
        .map_err(|e| format!("--listen: {e}"))?;
    if !listen.ip().is_loopback() {
        return Err("the fake upstream listens on loopback only".into());
    }
    let schedule = Schedule {
        events: args.number("events", 20)?,
        interval: Duration::from_millis(args.number("interval-ms", 50)?),
    };
    let threads: usize = args.number("threads", 1)?;
    // nginx's default (http2_max_concurrent_streams 128): a real front end caps the streams of
    // one h2 connection, and a proxy that multiplexes onto h2 has to live with that.
    let max_streams: u32 = args.number("max-streams", 128)?;

    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(args.required("cert")?)
            .map_err(|e| format!("--cert: {e}"))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("--cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(args.required("key")?)
        .map_err(|e| format!("--key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    }
    .enable_all()
    .build()
    .map_err(|e| e.to_string())?;

    runtime.block_on(async move {
        // A proxy opening a thousand upstream connections at once must not overflow the
        // accept queue (tokio's default backlog is 1,024): a dropped SYN is retried after a
        // second, and that second would be charged to the proxy.
        let listener = (|| {
            let socket = if listen.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.bind(listen)?;
            socket.listen(4096)
        })()
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http1().timer(TokioTimer::new()).keep_alive(true);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(max_streams);
        let http = Arc::new(http);
        eprintln!("benchtool upstream: listening on https://{listen}");
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors: wait for some to close rather than spin.
                    eprintln!("benchtool upstream: accept: {error}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let http = http.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(move |req| answer(req, schedule));
                let _ = http.serve_connection(TokioIo::new(tls), service).await;
            });
        }
    })
}

async fn answer(
    request: Request<Incoming>,
    schedule: Schedule,
) -> Result<Response<Answer>, Infallible> {
    let arrived = Instant::now();
    let arrived_ns = monotonic_ns();
    if request.method() != Method::POST || request.uri().path() != "/v1/chat/completions" {
        let mut response = Response::new(Answer::whole(Bytes::from_static(
            br#"{"error":{"message":"not found","type":"invalid_request_error"}}"#,
        )));
        *response.status_mut() = StatusCode::NOT_FOUND;
        return Ok(response);
    }
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let builder = Response::builder().header("openai-processing-ms", "1");
    let response = if wants_stream(&body) {
        builder
            .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Answer::Stream(Box::new(Sse {
                schedule,
                start: arrived,
                arrived_ns,
                next: 0,
                sleep: None,
            })))
    } else {
        builder
            .header(header::CONTENT_TYPE, "application/json")
            .body(Answer::whole(Bytes::from_static(COMPLETION.as_bytes())))
    };
    Ok(response.expect("static headers are valid"))
}

fn wants_stream(body: &[u8]) -> bool {
    let compact: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    compact
        .windows(b"\"stream\":true".len())
        .any(|w| w == b"\"stream\":true")
}

enum Answer {
    Whole(Option<Bytes>),
    Stream(Box<Sse>),
}

impl Answer {
    fn whole(bytes: Bytes) -> Self {
        Self::Whole(Some(bytes))
    }
}

/// The stream as a body that wakes on its own timer: no task and no channel per stream.
struct Sse {
    schedule: Schedule,
    start: Instant,
    /// CLOCK_MONOTONIC when the request arrived, in every chunk (`bench_arrived_ns`): with the
    /// client's send time it splits the time to first event into the way there and the wait here.
    arrived_ns: u64,
    /// Events sent so far; `events` means `[DONE]` is next, `events + 1` that it has gone.
    next: u32,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Sse {
    fn chunk(&self, index: u32) -> Bytes {
        let last = index + 1 == self.schedule.events;
        let delta = if index == 0 {
            r#"{"role":"assistant","content":""}"#.to_owned()
        } else if last {
            "{}".to_owned()
        } else {
            format!(r#"{{"content":" token{index}"}}"#)
        };
        let finish = if last { r#""stop""# } else { "null" };
        Bytes::from(format!(
            "data: {{\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_06737a9306\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}],\"bench_seq\":{index},\"bench_arrived_ns\":{},\"bench_sent_ns\":{}}}\n\n",
            self.arrived_ns,
            monotonic_ns()
        ))
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let sse = match self.get_mut() {
            Answer::Whole(bytes) => return Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Answer::Stream(sse) => sse,
        };
        let events = sse.schedule.events;
        if sse.next > events {
            return Poll::Ready(None);
        }
        // Event k is due at start + k * interval, whatever the delays before it: a late event
        // does not push the later ones back. `[DONE]` follows the last event at once.
        let slot = sse.next.min(events.saturating_sub(1));
        let due = sse.start + sse.schedule.interval * slot;
        if due > Instant::now() {
            let sleep = sse
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if sleep.deadline() != due {
                sleep.as_mut().reset(due);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let index = sse.next;
        sse.next += 1;
        let bytes = if index < events {
            sse.chunk(index)
        } else {
            Bytes::from_static(b"data: [DONE]\n\n")
        };
        Poll::Ready(Some(Ok(Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Answer::Whole(bytes) => bytes.is_none(),
            Answer::Stream(sse) => sse.next > sse.schedule.events,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Answer::Whole(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Answer::Whole(None) => SizeHint::with_exact(0),
            Answer::Stream(_) => SizeHint::default(),
        }
    }
}
