//! The forwarding proxy over real sockets: a fake OpenAI upstream with a CA made here, the real
//! binary in between, real HTTP/1.1, HTTP/2, TLS and WebSocket clients.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, Version};
use http_body_util::Full;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_post_round_trip_with_host_and_sni_of_openai() {
    bounded(30, async {
        for (alpn, http2) in [
            (Alpn::Both, true),
            (Alpn::Both, false),
            (Alpn::Http1Only, true),
        ] {
            let pki = Pki::new();
            let upstream = FakeUpstream::start(&pki, alpn).await;
            let proxy = Proxy::start(&with_http2(&basic_config(&upstream, &pki, ""), http2));
            for client in [http_client(), http2_client()] {
                let answer = send(
                    &client,
                    post_json(&proxy.url("/v1/chat/completions?x=1"), chat()),
                )
                .await;
                assert_eq!(answer.status, StatusCode::OK);
                assert_eq!(answer.json()["object"], "chat.completion");
                assert_eq!(
                    answer.headers["x-request-id"], "req_upstream_123",
                    "OpenAI's id is relayed"
                );
                assert_eq!(answer.headers["x-proxy-request-id"].len(), 16);
                let seen = upstream.last();
                assert_eq!(seen.sni.as_deref(), Some("api.openai.com"));
                assert!(seen.host() == "api.openai.com", "Host was {}", seen.host());
                assert!(
                    seen.uri.ends_with("/v1/chat/completions?x=1"),
                    "{}",
                    seen.uri
                );
                assert_eq!(
                    seen.headers["authorization"],
                    "Bearer sk-test-SECRET-KEY-123"
                );
                assert_eq!(seen.headers["content-type"], "application/json");
                assert_eq!(
                    serde_json::from_slice::<serde_json::Value>(&seen.body).unwrap(),
                    chat()
                );
                // HTTP/2 only when configured and offered, and then for what finds no HTTP/1.1
                // connection ready.
                if alpn == Alpn::Http1Only || !http2 {
                    assert_eq!(seen.version, Version::HTTP_11);
                }
                if seen.version == Version::HTTP_11 {
                    assert_eq!(seen.headers["host"], "api.openai.com");
                } else {
                    // :authority alone: nginx, for one, refuses a request with both.
                    assert!(!seen.headers.contains_key("host"));
                }
            }
            // Once both access lines are in, nothing of these requests is still to be logged.
            let logs = eventually(Duration::from_secs(5), "the access log lines", || {
                let logs = proxy.logs();
                (logs.matches("POST /v1/chat/completions 200").count() >= 2).then_some(logs)
            })
            .await;
            assert!(!logs.contains("SECRET"), "the key never reaches the log");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_base_path_is_prefixed() {
    bounded(20, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let config = format!(
            "listen = [\"127.0.0.1:0\"]\n[upstream]\nurl = \"https://127.0.0.1:{}/openai/\"\nhost = \"api.openai.com\"\nca_file = \"{}\"\n",
            upstream.addr.port(),
            pki.ca_pem.display()
        );
        let proxy = Proxy::start(&config);
        let answer = send(&http_client(), post_json(&proxy.url("/v1/embeddings"), chat())).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(upstream.last().uri.ends_with("/openai/v1/embeddings"), "{}", upstream.last().uri);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sse_event_reaches_the_client_within_50ms() {
    bounded(30, async {
        let (_pki, upstream, proxy) = proxy_and_upstream("").await;
        for (client, id) in [(http_client(), "h1"), (http2_client(), "h2")] {
            let arrivals =
                stream_chat(&client, &proxy.url("/v1/chat/completions"), id, 5, 200).await;
            let sent = upstream.sent_events.lock().unwrap()[id].clone();
            assert_eq!(sent.len(), 5);
            for (i, (sent, arrived)) in sent.iter().zip(&arrivals).enumerate() {
                let lag = arrived.duration_since(*sent);
                assert!(
                    lag < Duration::from_millis(50),
                    "event {i} via {id} took {lag:?}"
                );
            }
            // The events really were spread out: nothing was held back and released at once.
            assert!(arrivals[4].duration_since(arrivals[0]) >= Duration::from_millis(750));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    bounded(20, async {
        let (_pki, upstream, proxy) = proxy_and_upstream("").await;
        let url = format!(
            "ws://{}/v1/realtime?model=gpt-4o-realtime-preview",
            proxy.http.unwrap()
        );
        let request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                .unwrap();
        let (mut ws, response) = tokio_tungstenite::connect_async(request)
            .await
            .expect("upgrade through the proxy");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        for text in ["{\"type\":\"session.update\"}", "second message"] {
            ws.send(Message::text(text)).await.unwrap();
            let echoed = ws.next().await.unwrap().unwrap();
            assert_eq!(echoed, Message::text(text));
        }
        ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::binary(vec![1u8, 2, 3])
        );
        ws.close(None).await.unwrap();
        let seen = upstream.last();
        assert_eq!(seen.uri, "/v1/realtime?model=gpt-4o-realtime-preview");
        assert_eq!(seen.version, Version::HTTP_11, "upgrades go over HTTP/1.1");
        assert_ne!(seen.alpn.as_deref(), Some("h2"));
        assert_eq!(seen.headers["host"], "api.openai.com");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_and_client_identity_headers_are_removed() {
    bounded(20, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Http1Only).await;
        let proxy = Proxy::start(&basic_config(&upstream, &pki, ""));
        let request = Request::post(proxy.url("/v1/hop"))
            .header("connection", "x-client-hop")
            .header("x-client-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic c2VjcmV0")
            .header("proxy-connection", "keep-alive")
            .header("x-forwarded-for", "10.1.2.3")
            .header("x-real-ip", "10.1.2.3")
            .header("forwarded", "for=10.1.2.3")
            .header("via", "1.1 corp-proxy")
            .header("cf-connecting-ip", "10.1.2.3")
            .header("openai-organization", "org-123")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let answer = send(&http_client(), request).await;
        assert_eq!(answer.status, StatusCode::OK);
        let seen = upstream.last();
        for gone in [
            "x-client-hop",
            "keep-alive",
            "proxy-authorization",
            "proxy-connection",
            "x-forwarded-for",
            "x-real-ip",
            "forwarded",
            "via",
            "cf-connecting-ip",
            "te",
            "upgrade",
        ] {
            assert!(
                !seen.headers.contains_key(gone),
                "{gone} reached the upstream"
            );
        }
        assert_eq!(seen.headers["openai-organization"], "org-123");
        for gone in ["x-upstream-hop", "keep-alive", "proxy-authorization"] {
            assert!(
                !answer.headers.contains_key(gone),
                "{gone} reached the client"
            );
        }
        assert_eq!(&answer.body[..], b"hop");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_identity_passes_only_when_the_config_asks() {
    bounded(20, async {
        let (_pki, upstream, proxy) =
            proxy_and_upstream("[proxy]\nforward_client_identity = true\n").await;
        let mut request = post_json(&proxy.url("/v1/x"), chat());
        request
            .headers_mut()
            .insert("x-forwarded-for", "10.1.2.3".parse().unwrap());
        request
            .headers_mut()
            .insert("via", "1.1 corp".parse().unwrap());
        send(&http_client(), request).await;
        let seen = upstream.last();
        assert_eq!(seen.headers["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
        assert_eq!(seen.headers["via"], "1.1 corp");
    })
    .await;
}

/// Sends raw bytes and returns the raw answer, for requests no well-behaved client would make.
fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
        if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.ends_with(b"}") {
            break;
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_an_open_proxy() {
    bounded(20, async {
        let (_pki, upstream, proxy) = proxy_and_upstream("").await;
        let addr = proxy.http.unwrap();
        let cases = [
            ("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", "403", "proxy_request_refused"),
            ("GET http://example.com/v1/models HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n", "403", "proxy_request_refused"),
            ("GET /admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "404", "path_not_allowed"),
            ("GET /v1/../admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "404", "path_not_allowed"),
            ("GET /v1/%2e%2e/admin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "404", "path_not_allowed"),
            ("GET /v1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "404", "path_not_allowed"),
        ];
        for (request, status, code) in cases {
            let answer = raw(addr, request);
            assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{request:?} got {answer}");
            assert!(answer.contains(&format!("\"code\":\"{code}\"")), "{request:?} got {answer}");
            assert!(answer.contains("\"type\":\"invalid_request_error\""), "{answer}");
        }
        assert!(upstream.received().is_empty(), "nothing refused reached the upstream");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_502_in_openai_shape_within_the_connect_timeout() {
    bounded(20, async {
        let config = down_upstream_config("connect_timeout = \"2s\"\n");
        let proxy = Proxy::start(&config);
        let started = Instant::now();
        let answer = send(
            &http_client(),
            post_json(&proxy.url("/v1/chat/completions"), chat()),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        let error = &answer.json()["error"];
        assert_eq!(error["code"], "upstream_unreachable");
        assert_eq!(error["type"], "upstream_error");
        assert!(error["param"].is_null());
        assert!(
            error["message"].as_str().unwrap().contains("connect"),
            "{error}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_upstream_certificate_is_a_502_tls_error() {
    bounded(20, async {
        let pki = Pki::new();
        let other_ca = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let config = format!(
            "listen = [\"127.0.0.1:0\"]\n[upstream]\nurl = \"https://127.0.0.1:{}\"\nhost = \"api.openai.com\"\nca_file = \"{}\"\n",
            upstream.addr.port(),
            other_ca.ca_pem.display()
        );
        let proxy = Proxy::start(&config);
        let answer = send(&http_client(), post_json(&proxy.url("/v1/chat/completions"), chat())).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        assert_eq!(answer.json()["error"]["code"], "upstream_tls_error", "{}", answer.json());
        assert!(upstream.received().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_headers_give_504() {
    bounded(20, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let proxy = Proxy::start(
            &basic_config(&upstream, &pki, "")
                .replace("[upstream]\n", "[upstream]\nresponse_timeout = \"300ms\"\n"),
        );
        let mut request = post_json(&proxy.url("/v1/chat/completions"), chat());
        request
            .headers_mut()
            .insert("x-test-delay-headers-ms", "3000".parse().unwrap());
        let answer = send(&http_client(), request).await;
        assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(answer.json()["error"]["code"], "upstream_timeout");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_relayed_unchanged() {
    bounded(20, async {
        let (_pki, _upstream, proxy) = proxy_and_upstream("").await;
        let answer = send(&http_client(), post_json(&proxy.url("/v1/error"), chat())).await;
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            answer.json()["error"]["message"],
            "Rate limit reached (upstream's own words)"
        );
        assert_eq!(answer.headers["x-request-id"], "req_upstream_123");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_body_gives_413() {
    bounded(20, async {
        let (_pki, _upstream, proxy) = proxy_and_upstream("[server]\nmax_request_body = \"1KiB\"\n").await;
        // Declared too large: refused before anything is read or sent.
        let big = Request::post(proxy.url("/v1/files"))
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::from(vec![b'x'; 2048])))
            .unwrap();
        let answer = send(&http_client(), big).await;
        assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(answer.json()["error"]["code"], "request_too_large");
        // Undeclared (chunked) and too large: cut while streaming, still a 413 (several times:
        // over HTTP/2 the body's failure and the reset stream race each other).
        for _ in 0..5 {
            let chunked = raw(
                proxy.http.unwrap(),
                &format!(
                    "POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
                    "y".repeat(2048)
                ),
            );
            assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
            assert!(chunked.contains("request_too_large"), "{chunked}");
        }
        // Exactly at the limit passes.
        let fits = Request::post(proxy.url("/v1/files"))
            .body(Full::new(Bytes::from(vec![b'x'; 1024])))
            .unwrap();
        let answer = send(&http_client(), fits).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.json()["bytes"], 1024);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_speaks_h2_and_http11() {
    bounded(20, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let extra = format!(
            "[tls]\nlisten = [\"127.0.0.2:0\"]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            pki.cert_pem.display(),
            pki.key_pem.display()
        );
        let proxy = Proxy::start(&basic_config(&upstream, &pki, &extra));
        let https = proxy.https.expect("a TLS listener");
        for h2 in [true, false] {
            let builder = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*pki.client).clone())
                .https_only();
            let connector = if h2 {
                builder.enable_http2().build()
            } else {
                builder.enable_http1().build()
            };
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .http2_only(h2)
                    .build(connector);
            let request = post_json(&format!("https://{https}/v1/chat/completions"), chat());
            let response = client.request(request).await.expect("TLS to the proxy");
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                response.version(),
                if h2 {
                    Version::HTTP_2
                } else {
                    Version::HTTP_11
                }
            );
        }
    })
    .await;
}

#[test]
fn check_accepts_good_configs_and_explains_bad_ones() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        (
            out.status.code(),
            text(&out.stdout),
            text(&out.stderr),
            path,
        )
    };
    let (code, stdout, _, _) = check("listen = [\"127.0.0.1:8080\"]\n");
    assert_eq!(code, Some(0));
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout}");
    assert!(
        stdout.contains("is valid") && stdout.contains("https://api.openai.com"),
        "{stdout}"
    );

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/etc/openai-proxy/config.toml");
    let out = std::process::Command::new(BIN)
        .args(["check", "--config", shipped])
        .output()
        .unwrap();
    assert!(out.status.success(), "the shipped config is valid: {out:?}");

    let with_tls = format!(
        "listen = [\"127.0.0.1:8080\"]\n[tls]\nlisten = [\"[::1]:8443\"]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.cert_pem.display(),
        pki.key_pem.display()
    );
    assert_eq!(check(&with_tls).0, Some(0));

    let bad = [
        (
            "listen = [\"127.0.0.1:8080\"]\n[upstream]\nurll = \"https://x\"\n",
            ":3:1: ",
            "urll",
        ),
        (
            "listen = [\"127.0.0.1:8080\"]\n[server]\ndrain_timeout = 30\n",
            ":3:17: ",
            "string",
        ),
        (
            "listen = [\"127.0.0.1:8080\"]\n[upstream]\nconnect_timeout = \"soon\"\n",
            ":3:19: ",
            "soon",
        ),
        (
            "listen = [\"127.0.0.1:80800\"]\n",
            ":1:11: ",
            "socket address",
        ),
        ("listen = [\"127.0.0.1:8080\"\n", ":1:", "TOML"),
        (
            "listen = [\"127.0.0.1:8080\"]\n[tls]\nlisten = [\"127.0.0.1:8443\"]\ncert_file = \"/nonexistent/cert.pem\"\nkey_file = \"/nonexistent/key.pem\"\n",
            ":4:13: ",
            "/nonexistent/cert.pem",
        ),
        (
            "listen = [\"127.0.0.1:8080\"]\n[upstream]\nca_file = \"/etc/hostname\"\n",
            ":3:11: ",
            "no PEM certificate",
        ),
    ];
    for (text, location, words) in bad {
        let (code, _, stderr, path) = check(text);
        assert_eq!(code, Some(1), "{text:?} should fail");
        let expected = format!("{}{location}", path.display());
        assert!(
            stderr.contains(&expected),
            "{text:?}: expected {expected:?} in {stderr}"
        );
        assert!(
            stderr.to_lowercase().contains(&words.to_lowercase()),
            "{text:?}: expected {words:?} in {stderr}"
        );
    }
    let (code, _, stderr, _) = check("");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("listen"), "{stderr}");
}

#[test]
fn version_and_help() {
    let out = std::process::Command::new(BIN)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("openai-proxy {}", env!("CARGO_PKG_VERSION"))
    );
    let out = std::process::Command::new(BIN)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("check"));
    let out = std::process::Command::new(BIN)
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_never_logged_even_at_trace_level() {
    bounded(30, async {
        let pki = Pki::new();
        for alpn in [Alpn::Both, Alpn::Http1Only] {
            let upstream = FakeUpstream::start(&pki, alpn).await;
            let proxy = Proxy::start_with(
                &basic_config(&upstream, &pki, ""),
                ProxyOptions {
                    env: vec![("RUST_LOG".into(), "trace".into())],
                    ..Default::default()
                },
            );
            for client in [http_client(), http2_client()] {
                let mut request = post_json(&proxy.url("/v1/chat/completions"), chat());
                request
                    .headers_mut()
                    .insert("x-api-key", "sk-test-SECRET-KEY-123".parse().unwrap());
                assert_eq!(send(&client, request).await.status, StatusCode::OK);
                let mut refused = post_json(&proxy.url("/nope"), chat());
                refused.headers_mut().insert(
                    "proxy-authorization",
                    "Basic SECRET-KEY-PROXY".parse().unwrap(),
                );
                assert_eq!(send(&client, refused).await.status, StatusCode::NOT_FOUND);
            }
            let logs = eventually(5 * Duration::from_secs(1), "trace logs", || {
                let logs = proxy.logs();
                logs.contains("/nope").then_some(logs)
            })
            .await;
            assert!(logs.lines().count() > 50, "trace logging is on");
            assert!(!logs.contains("SECRET"), "a key reached the log");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_still_reads_the_body_the_client_is_sending() {
    bounded(20, async {
        let config = down_upstream_config("");
        let proxy = Proxy::start(&config);
        let mut stream = std::net::TcpStream::connect(proxy.http.unwrap()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let head = "POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n";
        for round in 0..2 {
            stream.write_all(head.as_bytes()).unwrap();
            // The 502 comes before the body has been sent...
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            while !answer.ends_with(b"}") {
                let n = stream.read(&mut buf).unwrap();
                assert!(n > 0, "round {round}: connection closed before the answer");
                answer.extend_from_slice(&buf[..n]);
            }
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 502"), "round {round}: {answer}");
            assert!(answer.contains("upstream_unreachable"), "{answer}");
            // ...and the body can still be sent whole, then the connection serves again.
            stream
                .write_all(&vec![b'z'; 1_000_000])
                .unwrap_or_else(|e| panic!("round {round}: the proxy stopped reading: {e}"));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_streams_than_one_http2_connection_carries_do_not_wait() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        // One worker: its pool alone must grow past one HTTP/2 connection.
        let proxy = Proxy::start(&one_pool_config(&upstream, &pki, true));
        let url = proxy.url("/v1/chat/completions");
        // All over one HTTP/2 connection to the proxy, to keep the test's own load light.
        let client = http2_client();
        let started = Instant::now();
        let streams: Vec<_> = (0..250)
            .map(|i| {
                let (url, client) = (url.clone(), client.clone());
                tokio::spawn(async move {
                    stream_chat(&client, &url, &format!("many-{i}"), 3, 1000).await
                })
            })
            .collect();
        for stream in streams {
            let arrivals = stream.await.expect("every stream completes");
            // A stream queued behind a full connection would wait for one to end: 2s or more.
            let first = arrivals[0].duration_since(started);
            assert!(
                first < Duration::from_millis(1500),
                "a stream waited {first:?} for its first event"
            );
        }
        let connections = upstream.connections_opened();
        assert!(
            connections >= 3,
            "250 streams at 100 a connection need 3 connections, saw {connections}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_get_503_and_are_closed() {
    bounded(20, async {
        let (_pki, _upstream, proxy) = proxy_and_upstream("[server]\nmax_connections = 1\n").await;
        let addr = proxy.http.unwrap();
        // One keep-alive connection, held by hand so that no client pool opens another.
        let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = "GET /v1/a HTTP/1.1\r\nHost: x\r\n\r\n";
        tokio::io::AsyncWriteExt::write_all(&mut first, request.as_bytes())
            .await
            .unwrap();
        assert!(read_response(&mut first).await.starts_with("HTTP/1.1 200"));
        // A second one, while the first is open, is over the limit.
        let answer = raw(addr, "GET /v1/b HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("\"code\":\"proxy_overloaded\""), "{answer}");
        assert!(
            answer.to_lowercase().contains("connection: close"),
            "{answer}"
        );
        // The first still serves.
        tokio::io::AsyncWriteExt::write_all(&mut first, request.as_bytes())
            .await
            .unwrap();
        assert!(read_response(&mut first).await.starts_with("HTTP/1.1 200"));
    })
    .await;
}

/// The config for one worker (so one upstream pool) with `upstream.http2` as given.
fn one_pool_config(upstream: &FakeUpstream, pki: &Pki, http2: bool) -> String {
    with_http2(
        &basic_config(upstream, pki, "[server]\nworkers = 1\n"),
        http2,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused() {
    bounded(60, async {
        let pki = Pki::new();
        for (alpn, http2) in [
            (Alpn::Both, true),
            (Alpn::Both, false),
            (Alpn::Http1Only, true),
        ] {
            let upstream = FakeUpstream::start(&pki, alpn).await;
            let proxy = Proxy::start(&one_pool_config(&upstream, &pki, http2));
            let client = http_client();
            for _ in 0..20 {
                let request = post_json(&proxy.url("/v1/chat/completions"), chat());
                assert_eq!(send(&client, request).await.status, StatusCode::OK);
            }
            let connections = upstream.connections_opened();
            let h2 = alpn == Alpn::Both && http2;
            // With HTTP/2: the one opened ahead, which takes the first request, and the
            // HTTP/1.1 one opened meanwhile, which takes the rest.
            let most = if h2 { 2 } else { 1 };
            assert!(
                connections <= most,
                "alpn h2 {h2}: {connections} connections"
            );
            let received = upstream.received();
            if !h2 {
                assert!(received.iter().all(|r| r.version == Version::HTTP_11));
            } else {
                assert_eq!(received.last().unwrap().version, Version::HTTP_11);
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_share_one_http2_connection() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let proxy = Proxy::start(&one_pool_config(&upstream, &pki, true));
        let client = http2_client();
        let url = proxy.url("/v1/chat/completions");
        let requests: Vec<_> = (0..30)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move { send(&client, post_json(&url, chat())).await.status })
            })
            .collect();
        for request in requests {
            assert_eq!(request.await.unwrap(), StatusCode::OK);
        }
        // One HTTP/2 connection that the waiting requests shared (besides it, the pool opens
        // HTTP/1.1 connections for the requests to come).
        let h2: std::collections::HashSet<_> = upstream
            .received()
            .iter()
            .filter(|r| r.version == Version::HTTP_2)
            .map(|r| r.connection)
            .collect();
        assert_eq!(h2.len(), 1, "the waiting requests shared one connect");
    })
    .await;
}

/// A stream of 100 events `gap_ms` apart, once its first event has come; the rest is the
/// caller's to read or drop.
async fn stream_begun(url: &str, gap_ms: u64) -> hyper::body::Incoming {
    let request = Request::post(url)
        .header("x-test-events", "100")
        .header("x-test-gap-ms", gap_ms.to_string())
        .body(Full::new(Bytes::from(
            serde_json::json!({"model": "m", "stream": true}).to_string(),
        )))
        .unwrap();
    let response = http_client().request(request).await.unwrap();
    let mut body = response.into_body();
    let first = http_body_util::BodyExt::frame(&mut body).await;
    assert!(first.is_some_and(|f| f.is_ok()), "the stream's first event");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_dropped_half_read_does_not_poison_the_http1_pool() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Http1Only).await;
        let proxy = Proxy::start(&one_pool_config(&upstream, &pki, false));
        let url = proxy.url("/v1/chat/completions");
        for round in 0..3 {
            drop(stream_begun(&url, 10).await);
            // The rest of that stream must not reach these requests.
            let client = http_client();
            for _ in 0..5 {
                let answer = send(&client, post_json(&url, chat())).await;
                assert_eq!(answer.status, StatusCode::OK, "round {round}");
                assert_eq!(answer.json()["object"], "chat.completion");
            }
        }
        let connections = upstream.connections_opened();
        // Each dropped stream costs its connection; the others are reused. A request that
        // overlaps the stream still dying may have a spare opened for the next (one per round).
        assert!(connections <= 3 + 1 + 3, "{connections} connections");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_the_next_request_finds_a_spare_upstream_connection_ready() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Http1Only).await;
        let config = one_pool_config(&upstream, &pki, false) + "[log]\nlevel = \"debug\"\n";
        let proxy = Proxy::start(&config);
        let url = proxy.url("/v1/chat/completions");
        // Two streams held open: a load of two, each on a connection of its own.
        let mut streams = Vec::new();
        for _ in 0..2 {
            streams.push(stream_begun(&url, 100).await);
        }
        let busy: std::collections::HashSet<_> =
            upstream.received().iter().map(|r| r.connection).collect();
        assert_eq!(busy.len(), 2);
        // The second left no connection idle, so a third opens before anyone asks for it.
        eventually(Duration::from_secs(10), "a spare connection", || {
            proxy
                .logs()
                .contains("a spare upstream connection is ready")
                .then_some(())
        })
        .await;
        assert_eq!(upstream.connections_opened(), 3);
        // The next request goes on it: no handshake in its way.
        let answer = send(&http_client(), post_json(&url, chat())).await;
        assert_eq!(answer.status, StatusCode::OK);
        let carried_on = upstream.last().connection;
        assert!(
            carried_on <= 3 && !busy.contains(&carried_on),
            "carried on connection {carried_on}, busy {busy:?}"
        );
        drop(streams);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_are_closed_after_the_pool_idle_timeout() {
    bounded(30, async {
        let pki = Pki::new();
        // HTTP/1.1 either way: configured so, or the upstream refusing HTTP/2.
        for (alpn, http2) in [(Alpn::Both, false), (Alpn::Http1Only, true)] {
            let upstream = FakeUpstream::start(&pki, alpn).await;
            let config = one_pool_config(&upstream, &pki, http2).replace(
                "[upstream]\n",
                "[upstream]\npool_idle_timeout = \"300ms\"\n",
            );
            let proxy = Proxy::start(&config);
            let client = http_client();
            let url = proxy.url("/v1/chat/completions");
            for pause in [0, 100, 1000] {
                tokio::time::sleep(Duration::from_millis(pause)).await;
                assert_eq!(
                    send(&client, post_json(&url, chat())).await.status,
                    StatusCode::OK
                );
            }
            let connections = upstream.connections_opened();
            assert_eq!(
                connections, 2,
                "http2 {http2}: kept over 100ms, closed over 1s"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_open_ahead_of_the_requests_that_need_them() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let connections = || upstream.connections_opened();
        // At start, each worker connects before any request arrives.
        let proxy = Proxy::start(&basic_config(&upstream, &pki, "[server]\nworkers = 2\n"));
        eventually(Duration::from_secs(10), "a connection per worker", || {
            (connections() == 2).then_some(())
        })
        .await;
        assert!(upstream.received().is_empty());
        drop(proxy);

        // Under load, the next connection opens while the busiest still has room: 80 streams
        // on one worker fit one connection (100), yet a second is already there.
        let before = connections();
        let proxy = Proxy::start(&basic_config(&upstream, &pki, "[server]\nworkers = 1\n"));
        let url = proxy.url("/v1/chat/completions");
        let client = http2_client();
        let streams: Vec<_> = (0..80)
            .map(|i| {
                let (url, client) = (url.clone(), client.clone());
                tokio::spawn(async move {
                    stream_chat(&client, &url, &format!("ahead-{i}"), 3, 1000).await
                })
            })
            .collect();
        eventually(Duration::from_secs(10), "a second connection", || {
            (connections() >= before + 2).then_some(())
        })
        .await;
        for stream in streams {
            stream.await.expect("every stream completes");
        }
    })
    .await;
}

fn lookups(proxy: &Proxy) -> usize {
    proxy.logs().matches("looked up the upstream host").count()
}

/// The url's host named rather than given as an IP (`localhost`: /etc/hosts, no name server),
/// logging at debug level.
fn named_host_config(upstream: &FakeUpstream, pki: &Pki, dns_refresh: &str) -> String {
    one_pool_config(upstream, pki, false)
        .replace("https://127.0.0.1:", "https://localhost:")
        .replace(
            "[upstream]\n",
            &format!("[upstream]\ndns_refresh = \"{dns_refresh}\"\n"),
        )
        + "[log]\nlevel = \"debug\"\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_upstream_connections_reuse_the_hosts_addresses_instead_of_looking_it_up_again() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Http1Only).await;
        let proxy = Proxy::start(&named_host_config(&upstream, &pki, "30s"));
        let url = proxy.url("/v1/chat/completions");
        // Streams held open at once, each on a connection of its own.
        let mut streams = Vec::new();
        for _ in 0..3 {
            streams.push(stream_begun(&url, 100).await);
        }
        assert!(upstream.connections_opened() >= 3);
        assert_eq!(lookups(&proxy), 1, "{}", proxy.logs());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_host_is_looked_up_again_once_its_addresses_are_due_for_refresh() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Http1Only).await;
        let proxy = Proxy::start(&named_host_config(&upstream, &pki, "500ms"));
        let url = proxy.url("/v1/chat/completions");
        // Due after 500 ms, the lookup runs in the background of the next connection. Were it
        // left until the addresses may no longer serve (ten times as long), a connection would
        // look the host up itself, 5 s in.
        let deadline = Instant::now() + Duration::from_secs(4);
        // Each stream held open makes the next request open a connection.
        let mut streams = Vec::new();
        while lookups(&proxy) < 2 {
            assert!(
                Instant::now() < deadline,
                "no second lookup in 4 s: {}",
                proxy.logs()
            );
            streams.push(stream_begun(&url, 100).await);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // More connections go on working with the new answer.
        streams.push(stream_begun(&url, 100).await);
        drop(streams);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_host_that_no_address_of_answers_is_looked_up_again_at_once() {
    bounded(30, async {
        // Nothing listens at the addresses `localhost` resolves to: the upstream is down, or has
        // moved since it was looked up.
        let config = down_upstream_config("").replace("https://127.0.0.1:", "https://localhost:")
            + "[server]\nworkers = 1\n[log]\nlevel = \"debug\"\n";
        let proxy = Proxy::start(&config);
        // The connection opened ahead of requests fails, and has the host looked up again.
        let before = eventually(Duration::from_secs(10), "a second lookup", || {
            let n = lookups(&proxy);
            (n >= 2).then_some(n)
        })
        .await;
        // So does a request's, well within the addresses' 30 s.
        let answer = send(
            &http_client(),
            post_json(&proxy.url("/v1/chat/completions"), chat()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        // The log line may reach the test a moment after the answer does.
        eventually(Duration::from_secs(5), "the request's lookup", || {
            (lookups(&proxy) > before).then_some(())
        })
        .await;
    })
    .await;
}
