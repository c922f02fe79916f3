//! The proxy's client side seen from an attacker's: raw bytes over real sockets (HTTP/2 frames
//! written by hand, or a real HTTP/2 client where a whole exchange is needed), each test one
//! abuse that must not hold a connection, reach the upstream or cost memory.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
/// A HEADERS frame on stream 1 whose block never ends (END_STREAM without END_HEADERS): its
/// HPACK block is `:method GET`, `:scheme http`, `:path /`, and a CONTINUATION is due.
const OPEN_HEADER_BLOCK: &[u8] = &[0, 0, 3, 1, 0x1, 0, 0, 0, 1, 0x82, 0x86, 0x84];

/// Reads and discards until the peer closes; the time that took. Fails after `within`.
async fn closed_within(stream: &mut (impl AsyncRead + Unpin), within: Duration) -> Duration {
    let started = Instant::now();
    let mut sink = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_all)
        .await
        .unwrap_or_else(|_| panic!("the connection was still open after {within:?}"));
    started.elapsed()
}

/// A TLS client connection to the proxy's TLS listener offering only `alpn`.
async fn tls_connect(
    proxy: &Proxy,
    pki: &Pki,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut config = (*pki.client).clone();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(proxy.https.expect("a TLS listener"))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

fn tls_config(upstream: &FakeUpstream, pki: &Pki, server: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:0\"]\n[tls]\nlisten = [\"127.0.0.2:0\"]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[server]\n{server}\n{}",
        pki.cert_pem.display(),
        pki.key_pem.display(),
        upstream.upstream_toml(pki)
    )
}

const SHORT_TIMEOUTS: &str = "header_read_timeout = \"1s\"\nkeepalive_timeout = \"1s\"";

/// Opens an h2c and a TLS-h2 connection, sends `frames` on each, and checks that the proxy
/// closes both within a few seconds and no sooner than its 1 s timeout; nothing goes upstream.
async fn both_closed_after(frames: &[&[u8]]) {
    let pki = Pki::new();
    let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
    let proxy = Proxy::start(&tls_config(&upstream, &pki, SHORT_TIMEOUTS));
    let mut h2c = connect(&proxy).await;
    let mut tls = tls_connect(&proxy, &pki, b"h2").await;
    for frame in frames {
        h2c.write_all(frame).await.unwrap();
        tls.write_all(frame).await.unwrap();
    }
    let took = closed_within(&mut h2c, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(800), "closed after {took:?}");
    closed_within(&mut tls, Duration::from_secs(5)).await;
    assert!(upstream.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_connection_that_sends_only_its_preface_is_closed() {
    bounded(30, both_closed_after(&[PREFACE, EMPTY_SETTINGS])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_header_block_that_never_ends_is_closed() {
    bounded(
        30,
        both_closed_after(&[PREFACE, EMPTY_SETTINGS, OPEN_HEADER_BLOCK]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_connection_is_sent_goaway_and_closed_after_its_keepalive() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let server = "header_read_timeout = \"5s\"\nkeepalive_timeout = \"1s\"";
        let proxy = Proxy::start(&tls_config(&upstream, &pki, server));
        let tcp = connect(&proxy).await;
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tcp),
        )
        .await
        .unwrap();
        let connection = tokio::spawn(connection);
        let request = http::Request::get(proxy.url("/v1/models"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        drop(response);
        let idle_from = Instant::now();
        // The proxy's GOAWAY ends the client's connection task without an error.
        tokio::time::timeout(Duration::from_secs(5), connection)
            .await
            .expect("the idle connection was closed")
            .unwrap()
            .expect("closed gracefully");
        assert!(idle_from.elapsed() >= Duration::from_millis(900));
    })
    .await;
}

fn error_code(response: &str) -> String {
    let error: serde_json::Value = serde_json::from_str(body_of(response))
        .unwrap_or_else(|e| panic!("an OpenAI-shaped error ({e}): {response}"));
    error["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_dot_segments_and_slashes_do_not_climb_out_of_the_prefix() {
    bounded(30, async {
        let (_pki, upstream, proxy) = proxy_and_upstream("").await;
        for path in [
            "/v1/..%2fadmin",
            "/v1/%2e%2e%2fadmin",
            "/v1/%2E%2E%2Fadmin",
            "/v1/.%2e%2fadmin",
            "/v1/..%5cadmin",
            "/v1/models/..%2F..%2Fadmin",
        ] {
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n");
            let response = exchange(&proxy, request.as_bytes()).await;
            assert!(response.starts_with("HTTP/1.1 404 "), "{path}: {response}");
            assert_eq!(error_code(&response), "path_not_allowed", "{path}");
        }
        assert!(upstream.received().is_empty(), "{:?}", upstream.received());
        // An encoded slash that stays inside the prefix is no climb.
        let request =
            "GET /v1/files/a%2Fb.jsonl HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n";
        let response = exchange(&proxy, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    })
    .await;
}

type WebSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn open_websocket(proxy: &Proxy) -> WebSocket {
    let url = format!("ws://{}/v1/realtime", proxy.http.unwrap());
    let (ws, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade through the proxy");
    assert_eq!(response.status(), 101);
    ws
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnels_count_against_max_connections() {
    bounded(30, async {
        let (_pki, _upstream, proxy) = proxy_and_upstream("[server]\nmax_connections = 2").await;
        let _first = open_websocket(&proxy).await;
        let _second = open_websocket(&proxy).await;
        let request = b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n";
        let response = exchange(&proxy, request).await;
        assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
        assert_eq!(error_code(&response), "proxy_overloaded");
        assert!(response.contains("connection: close\r\n"), "{response}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_tunnel_is_closed_after_the_idle_timeout() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let config = basic_config(&upstream, &pki, "")
            .replace("[upstream]\n", "[upstream]\nidle_timeout = \"1s\"\n");
        let proxy = Proxy::start(&config);
        let mut ws = open_websocket(&proxy).await;
        use futures_util::{SinkExt, StreamExt};
        let text = tokio_tungstenite::tungstenite::Message::text("still here");
        ws.send(text.clone()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), text);
        let idle_from = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(_)) = ws.next().await {}
        })
        .await;
        assert!(ended.is_ok(), "the idle tunnel was still open after 5 s");
        assert!(idle_from.elapsed() >= Duration::from_millis(900));
    })
    .await;
}

/// Connections over the limit cost no request head's worth of memory: they are answered
/// before their heads are read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_heads_over_max_connections_do_not_grow_memory() {
    bounded(60, async {
        let (_pki, _upstream, proxy) = proxy_and_upstream("[server]\nmax_connections = 10").await;
        let pid = proxy.child.id();
        // A request through first, so that what a request allocates once is in the baseline.
        let ok = exchange(
            &proxy,
            b"GET /v1/models HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200 "), "{ok}");
        let idle = vm_rss_kib(pid);
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nX-Pad: {}",
            "a".repeat(63 << 10)
        );
        let mut held = Vec::new();
        for _ in 0..1500 {
            let mut stream = connect(&proxy).await;
            // Unfinished: no blank line ends the head. The proxy may close before it is all
            // written, which the attacker does not mind.
            let _ = stream.write_all(head.as_bytes()).await;
            held.push(stream);
        }
        // The proxy reads what it reads in its own time: RSS is sampled for a while after.
        let watch_until = Instant::now() + Duration::from_secs(3);
        let mut peak = 0;
        while Instant::now() < watch_until {
            peak = peak.max(vm_rss_kib(pid));
            assert!(
                peak < idle + 8 * 1024,
                "RSS went from {idle} KiB idle to {peak} KiB with 1,500 unfinished heads"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("RSS {idle} KiB idle, {peak} KiB at most with 1,500 unfinished heads");
        drop(held);
    })
    .await;
}
