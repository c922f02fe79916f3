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

/// Each request, sent alone on a connection, is answered `status` with `code`, and the
/// connection then closes.
async fn all_refused(proxy: &Proxy, status: &str, code: &str, cases: &[(&str, &[u8])]) {
    for (what, request) in cases {
        let response = exchange(proxy, request).await;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {response}"
        );
        assert_eq!(error_code(&response), code, "{what}");
        assert!(
            response.contains("connection: close\r\n"),
            "{what}: {response}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_duplicated_or_invalid_host_is_400() {
    bounded(30, async {
        let (_pki, upstream, proxy) = proxy_and_upstream("").await;
        let cases: [(&str, &[u8]); 5] = [
            ("no Host", b"GET /v1/models HTTP/1.1\r\n\r\n"),
            (
                "two Hosts",
                b"GET /v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            ),
            (
                "an empty Host",
                b"GET /v1/models HTTP/1.1\r\nHost: \r\n\r\n",
            ),
            (
                "a Host with user info",
                b"GET /v1/models HTTP/1.1\r\nHost: user@evil\r\n\r\n",
            ),
            (
                "a Host that is no authority",
                b"GET /v1/models HTTP/1.1\r\nHost: a b/c\r\n\r\n",
            ),
        ];
        all_refused(&proxy, "400", "malformed_request", &cases).await;
        assert!(upstream.received().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_case_methods_and_repeated_content_length_are_400() {
    bounded(30, async {
        let (_pki, upstream, proxy) = proxy_and_upstream("").await;
        let cases: [(&str, &[u8]); 2] = [
            ("a lower-case method", b"get /v1/models HTTP/1.1\r\nHost: p\r\n\r\n"),
            (
                "the same Content-Length twice",
                b"POST /v1/x HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nhi",
            ),
        ];
        all_refused(&proxy, "400", "malformed_request", &cases).await;
        assert!(upstream.received().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_100_continue_before_a_413_that_the_length_decides() {
    bounded(30, async {
        let (_pki, upstream, proxy) =
            proxy_and_upstream("[server]\nmax_request_body = 1024").await;
        let mut stream = connect(&proxy).await;
        let head = "POST /v1/files HTTP/1.1\r\nHost: p\r\nExpect: 100-continue\r\nContent-Length: 4096\r\n\r\n";
        stream.write_all(head.as_bytes()).await.unwrap();
        let response = read_until(&mut stream, "\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 413 "), "{response}");
        assert!(upstream.received().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_413_and_a_bad_chunk_400_close_the_connection() {
    bounded(30, async {
        let (_pki, _upstream, proxy) =
            proxy_and_upstream("[server]\nmax_request_body = 1024").await;
        let too_large: &[u8] =
            b"POST /v1/files HTTP/1.1\r\nHost: p\r\nContent-Length: 4096\r\n\r\n";
        all_refused(&proxy, "413", "request_too_large", &[("413", too_large)]).await;
        let bad_chunk: &[u8] =
            b"POST /v1/files HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        all_refused(
            &proxy,
            "400",
            "client_body_error",
            &[("bad chunk", bad_chunk)],
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_and_chunk_extensions_count_against_a_limit() {
    bounded(30, async {
        let (_pki, _upstream, proxy) = proxy_and_upstream("").await;
        let line = format!("x-t: {}\r\n", "t".repeat(4000));
        let trailers = format!(
            "POST /v1/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n{}\r\n",
            line.repeat(20)
        );
        let extension = format!("1;e={}\r\na\r\n", "e".repeat(4000));
        let extensions = format!(
            "POST /v1/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n{}0\r\n\r\n",
            extension.repeat(20)
        );
        let cases: [(&str, &[u8]); 2] = [
            ("80 KB of trailers", trailers.as_bytes()),
            ("80 KB of chunk extensions", extensions.as_bytes()),
        ];
        all_refused(&proxy, "400", "client_body_error", &cases).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_websocket_get_upgrades_pass_others_lose_their_upgrade() {
    bounded(30, async {
        let (_pki, upstream, proxy) = proxy_and_upstream("").await;
        let request = b"GET /v1/models HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n";
        let mut stream = connect(&proxy).await;
        stream.write_all(request).await.unwrap();
        let response = read_until(&mut stream, "\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        let seen = upstream.last();
        assert!(seen.headers.get("upgrade").is_none(), "{:?}", seen.headers);

        let request = b"DELETE /v1/realtime HTTP/1.1\r\nHost: p\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let mut stream = connect(&proxy).await;
        stream.write_all(request).await.unwrap();
        let response = read_until(&mut stream, "\r\n\r\n").await;
        assert!(!response.starts_with("HTTP/1.1 101 "), "{response}");
        let seen = upstream.last();
        assert_eq!(seen.method, "DELETE");
        assert!(seen.headers.get("upgrade").is_none(), "{:?}", seen.headers);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_and_host_override_headers_are_not_forwarded() {
    bounded(30, async {
        let (_pki, upstream, proxy) = proxy_and_upstream("").await;
        let request = b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Forwarded-Host: evil\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\nConnection: close\r\n\r\n";
        let response = exchange(&proxy, request).await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        let seen = upstream.last();
        for name in ["x-forwarded-host", "x-original-url", "x-rewrite-url"] {
            assert!(seen.headers.get(name).is_none(), "{name} went upstream");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_first_head_is_due_once_header_read_timeout_after_the_accept() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let proxy = Proxy::start(&tls_config(&upstream, &pki, "header_read_timeout = \"2s\""));
        let accepted = Instant::now();
        let mut tls = tls_connect(&proxy, &pki, b"http/1.1").await;
        // A slow client: the first bytes of its head late, the rest never.
        tokio::time::sleep_until((accepted + Duration::from_millis(1500)).into()).await;
        tls.write_all(b"GET /v1/models HTTP/1.1\r\n").await.unwrap();
        closed_within(&mut tls, Duration::from_secs(5)).await;
        let took = accepted.elapsed();
        assert!(
            took < Duration::from_millis(2900),
            "closed {took:?} after the accept"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_does_not_show_the_upstream_address() {
    bounded(30, async {
        let config = down_upstream_config("");
        let port = config
            .split("127.0.0.1:")
            .nth(2)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let proxy = Proxy::start(&config);
        let request = b"GET /v1/models HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n";
        let response = exchange(&proxy, request).await;
        assert!(response.starts_with("HTTP/1.1 502 "), "{response}");
        assert!(
            body_of(&response).contains("could not connect to the upstream"),
            "{response}"
        );
        assert!(!body_of(&response).contains(port), "{response}");
        assert!(!body_of(&response).contains("127.0.0.1"), "{response}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_response_head_over_64_kib_is_502() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Http1Only).await;
        let proxy = Proxy::start(&basic_config(&upstream, &pki, ""));
        let request = b"GET /v1/huge-head HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n";
        let response = exchange(&proxy, request).await;
        assert!(
            response.starts_with("HTTP/1.1 502 "),
            "{}",
            &response[..200.min(response.len())]
        );
    })
    .await;
}
