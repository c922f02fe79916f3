//! The admin listener: metrics that match the traffic sent, checked by promtool and scraped by a
//! real Prometheus; health endpoints through a drain; the listener following reloads.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

const SECOND: Duration = Duration::from_secs(1);

/// The proxy in front of the fake upstream, with an admin listener on a free port.
async fn proxy_with_admin() -> (Pki, FakeUpstream, Proxy, SocketAddr) {
    let (pki, upstream, proxy) = proxy_and_upstream("[admin]\nlisten = [\"127.0.0.1:0\"]\n").await;
    let admin = admin_addr(&proxy, 0).await;
    (pki, upstream, proxy, admin)
}

/// The address the `nth` admin listener the proxy logged is bound to.
async fn admin_addr(proxy: &Proxy, nth: usize) -> SocketAddr {
    eventually(10 * SECOND, "the admin listener", || {
        let logs = proxy.logs();
        let line = logs
            .lines()
            .filter(|l| l.contains("admin listening"))
            .nth(nth)?;
        line.split("local=")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
    .await
}

async fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Answer {
    let mut request = Request::get(format!("http://{addr}{path}"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    send(
        &http_client(),
        request.body(Full::new(Bytes::new())).unwrap(),
    )
    .await
}

async fn metrics(admin: SocketAddr) -> String {
    let answer = get(admin, "/metrics", None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    String::from_utf8(answer.body.to_vec()).unwrap()
}

/// The value of the sample written exactly `series` (name and labels), or 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.parse().unwrap())
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) is installed");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A streamed completion of `events` events; returns the response once its headers are in.
async fn start_stream(
    client: &HttpClient,
    proxy: &Proxy,
    events: u64,
) -> http::Response<hyper::body::Incoming> {
    let request = Request::post(proxy.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test-SECRET-KEY-123")
        .header("x-test-events", events.to_string())
        .header("x-test-gap-ms", "10")
        .body(Full::new(Bytes::from(stream_body())))
        .unwrap();
    let response = client.request(request).await.expect("the stream starts");
    assert_eq!(response.status(), StatusCode::OK);
    response
}

fn stream_body() -> String {
    serde_json::json!({"model": "gpt-4o-mini", "stream": true, "messages": []}).to_string()
}

async fn streams_open(admin: SocketAddr) -> f64 {
    sample(&metrics(admin).await, "openai_proxy_streams_open")
}

#[tokio::test]
async fn counters_match_the_traffic_sent() {
    bounded(60, async {
        let (_pki, _upstream, proxy, admin) = proxy_with_admin().await;
        let client = http_client();
        let (mut sent_in, mut got_out) = (0usize, 0usize);
        for _ in 0..5 {
            let request = post_json(&proxy.url("/v1/chat/completions"), chat());
            sent_in += request
                .body()
                .clone()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .len();
            let answer = send(&client, request).await;
            assert_eq!(answer.status, StatusCode::OK);
            got_out += answer.body.len();
        }
        for _ in 0..3 {
            let request = Request::get(proxy.url("/not-openai"))
                .body(Full::default())
                .unwrap();
            let answer = send(&client, request).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND);
            got_out += answer.body.len();
        }
        let answer = send(
            &client,
            Request::get(proxy.url("/v1/error"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
        got_out += answer.body.len();

        // A stream held open shows in the gauge, and leaves it when it ends.
        let response = start_stream(&client, &proxy, 20).await;
        eventually_async(10 * SECOND, "the stream in the gauge", || async move {
            (streams_open(admin).await == 1.0).then_some(())
        })
        .await;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.ends_with(b"data: [DONE]\n\n"));
        got_out += body.len();
        eventually_async(10 * SECOND, "the stream out of the gauge", || async move {
            (streams_open(admin).await == 0.0).then_some(())
        })
        .await;

        let text = metrics(admin).await;
        promtool_check(&text);
        let requests =
            |labels: &str| sample(&text, &format!("openai_proxy_requests_total{{{labels}}}"));
        assert_eq!(
            requests(r#"route="/v1/",method="POST",status_class="2xx""#),
            6.0,
            "{text}"
        );
        assert_eq!(
            requests(r#"route="other",method="GET",status_class="4xx""#),
            3.0,
            "{text}"
        );
        assert_eq!(
            requests(r#"route="/v1/",method="GET",status_class="4xx""#),
            1.0,
            "{text}"
        );
        let count = sample(
            &text,
            r#"openai_proxy_request_duration_seconds_count{route="/v1/"}"#,
        );
        assert_eq!(count, 7.0, "{text}");
        let ttfb = r#"openai_proxy_time_to_first_byte_seconds_bucket{route="/v1/",le="+Inf"}"#;
        assert_eq!(sample(&text, ttfb), 7.0, "{text}");
        let bytes_out = sample(&text, r#"openai_proxy_sent_bytes_total{route="/v1/"}"#)
            + sample(&text, r#"openai_proxy_sent_bytes_total{route="other"}"#);
        assert_eq!(bytes_out, got_out as f64, "{text}");
        let bytes_in = sample(&text, r#"openai_proxy_received_bytes_total{route="/v1/"}"#);
        assert_eq!(bytes_in, (sent_in + stream_body().len()) as f64, "{text}");
        assert_eq!(sample(&text, "openai_proxy_websockets_open"), 0.0);
        assert!(
            sample(&text, "openai_proxy_upstream_connects_total") >= 1.0,
            "{text}"
        );
        assert!(
            sample(&text, "openai_proxy_upstream_tls_handshakes_total") >= 1.0,
            "{text}"
        );
        assert!(
            sample(&text, "openai_proxy_upstream_connections_open") >= 1.0,
            "{text}"
        );
        assert_eq!(
            sample(&text, "openai_proxy_upstream_connect_failures_total"),
            0.0
        );
        // Under the upstream that answered; the 404s of paths not forwarded went to none.
        let by_upstream = |class: &str| {
            let series = format!(
                "openai_proxy_upstream_requests_total{{upstream=\"default\",status_class=\"{class}\"}}"
            );
            sample(&text, &series)
        };
        assert_eq!(by_upstream("2xx"), 6.0, "{text}");
        assert_eq!(by_upstream("4xx"), 1.0, "{text}");
        assert_eq!(sample(&text, "openai_proxy_limits_backend_unavailable"), 0.0);
        assert_eq!(sample(&text, "openai_proxy_config_generation"), 1.0);
        assert_eq!(
            sample(
                &text,
                &format!(
                    "openai_proxy_build_info{{version=\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                )
            ),
            1.0
        );
        // The key the client sent is in no metric.
        assert!(!text.contains("SECRET"));

        let open = get(
            admin,
            "/metrics",
            Some("application/openmetrics-text; version=1.0.0"),
        )
        .await;
        assert!(
            open.headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        let open = String::from_utf8(open.body.to_vec()).unwrap();
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(
            open.contains("# TYPE openai_proxy_requests counter\n"),
            "{open}"
        );
        assert!(open.contains("# TYPE openai_proxy_build info\n"), "{open}");
    })
    .await;
}

#[tokio::test]
async fn health_status_and_unknown_paths() {
    bounded(30, async {
        let (_pki, _upstream, proxy, admin) = proxy_with_admin().await;
        let healthz = get(admin, "/healthz", None).await;
        assert_eq!(healthz.status, StatusCode::OK);
        let readyz = get(admin, "/readyz", None).await;
        assert_eq!(readyz.status, StatusCode::OK);
        assert_eq!(readyz.json()["status"], "ready");

        let status = get(admin, "/status", None).await;
        assert_eq!(status.status, StatusCode::OK);
        let status = status.json();
        assert_eq!(status["generation"], 1);
        let listener = proxy.http.unwrap().to_string();
        assert_eq!(status["listeners"][0]["address"], listener.as_str());
        assert_eq!(status["listeners"][0]["tls"], false);
        assert_eq!(status["admin_listeners"][0], admin.to_string().as_str());
        let url = status["upstreams"][0]["url"].as_str().unwrap();
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
        assert!(status["last_reload"].is_null());
        // The same facts as STATUS=.
        let notified = proxy.notify.messages().concat();
        let line = status["status"].as_str().unwrap();
        assert!(
            notified.contains(&format!("STATUS={line}")),
            "{line}\n{notified}"
        );

        // Anything else: 404 in OpenAI's error shape; the proxy's paths are not served here.
        for path in ["/", "/v1/models", "/metricsx"] {
            let answer = get(admin, path, None).await;
            assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
            assert_eq!(answer.json()["error"]["code"], "path_not_allowed");
        }
    })
    .await;
}

#[tokio::test]
async fn readyz_is_503_while_a_drain_waits_for_a_stream() {
    bounded(60, async {
        let (_pki, _upstream, mut proxy, admin) = proxy_with_admin().await;
        let client = http_client();
        // Unread, the stream stays in flight: the upstream waits for room to send.
        let response = start_stream(&client, &proxy, 200).await;
        proxy.signal("TERM");
        eventually_async(10 * SECOND, "/readyz to say 503", || async move {
            let answer = get(admin, "/readyz", None).await;
            (answer.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
        })
        .await;
        assert_eq!(
            get(admin, "/readyz", None).await.json()["status"],
            "draining"
        );
        assert_eq!(get(admin, "/healthz", None).await.status, StatusCode::OK);
        assert_eq!(
            streams_open(admin).await,
            1.0,
            "the stream is still in flight"
        );
        assert!(proxy.child.try_wait().unwrap().is_none());
        // The stream finishes whole; then the proxy exits, and its admin listener with it.
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.ends_with(b"data: [DONE]\n\n"));
        assert_eq!(proxy.wait_exit(10 * SECOND).code(), Some(0));
        assert!(tokio::net::TcpStream::connect(admin).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn the_admin_listener_follows_reloads() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        // Reloads on SIGHUP alone, so that each write is loaded exactly once.
        let config = |admin: &str| {
            let extra = format!("[admin]\nlisten = [\"{admin}\"]\n[reload]\nwatch_files = false\n");
            basic_config(&upstream, &pki, &extra)
        };
        let mut proxy = Proxy::start(&config("127.0.0.1:0"));
        let first = admin_addr(&proxy, 0).await;

        // A broken config changes nothing, and says why.
        proxy.write_config("listen = [\"127.0.0.1:0\"]\n[admin]\nlisten = [\"nonsense\"]\n");
        proxy.signal("HUP");
        let answer = eventually_async(10 * SECOND, "the failed reload in /status", || async move {
            let status = get(first, "/status", None).await.json();
            (status["last_reload"]["result"] == "failure").then_some(status)
        })
        .await;
        assert!(
            answer["last_reload"]["error"]
                .as_str()
                .unwrap()
                .contains("config.toml:3:")
        );
        assert_eq!(answer["generation"], 1);

        // Moved: the new address serves, the old one is closed.
        let skip = proxy.notify.messages().len();
        proxy.write_config(&config("127.0.0.2:0"));
        proxy.signal("HUP");
        proxy.wait_ready(skip);
        let second = admin_addr(&proxy, 1).await;
        assert_eq!(second.ip().to_string(), "127.0.0.2");
        let text = metrics(second).await;
        assert_eq!(
            sample(&text, "openai_proxy_config_generation"),
            2.0,
            "{text}"
        );
        assert_eq!(
            sample(&text, r#"openai_proxy_reloads_total{result="success"}"#),
            1.0
        );
        assert_eq!(
            sample(&text, r#"openai_proxy_reloads_total{result="failure"}"#),
            1.0
        );
        let loaded = sample(
            &text,
            "openai_proxy_config_last_reload_success_timestamp_seconds",
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        assert!((now.as_secs_f64() - loaded).abs() < 60.0, "{loaded}");
        eventually_async(
            10 * SECOND,
            "the old admin address to close",
            || async move {
                tokio::net::TcpStream::connect(first)
                    .await
                    .is_err()
                    .then_some(())
            },
        )
        .await;

        // The proxy refuses an admin address that is a proxy socket.
        let proxy_addr = "127.0.0.1:8080";
        let output = Command::new(BIN)
            .args(["check", "--config"])
            .arg(
                write_temp(&format!(
                    "listen = [\"{proxy_addr}\"]\n[admin]\nlisten = [\"{proxy_addr}\"]\n"
                ))
                .path()
                .join("config.toml"),
            )
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("is the socket of the proxy listener"),
            "{stderr}"
        );
    })
    .await;
}

fn write_temp(config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), config).unwrap();
    dir
}

/// A Prometheus server of the test's own, scraping `target` every second.
struct Prometheus {
    daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: openai-proxy\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let mut command = Command::new("prometheus");
        command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        Self {
            daemon: Daemon::spawn(command, port).await,
            _dir: dir,
        }
    }

    /// The value of an instant PromQL query whose answer is one number, if it has one yet.
    async fn query(&self, promql: &str) -> Option<f64> {
        let url = format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.daemon.port,
            encode(promql)
        );
        let request = Request::get(url).body(Full::new(Bytes::new())).unwrap();
        let answer = http_client().request(request).await.ok()?;
        let body = answer.into_body().collect().await.ok()?.to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
        json["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    fn log(&self) -> String {
        self.daemon.output()
    }
}

fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn prometheus_scrapes_the_admin_listener() {
    bounded(90, async {
        let (_pki, _upstream, proxy, admin) = proxy_with_admin().await;
        let prometheus = Prometheus::start(admin).await;
        let client = http_client();
        for _ in 0..7 {
            let answer = send(
                &client,
                post_json(&proxy.url("/v1/chat/completions"), chat()),
            )
            .await;
            assert_eq!(answer.status, StatusCode::OK);
        }
        let query = r#"sum(openai_proxy_requests_total{route="/v1/",status_class="2xx"})"#;
        let server = &prometheus;
        let seen = eventually_async(
            60 * SECOND,
            "Prometheus to count the requests",
            || async move { server.query(query).await.filter(|&n| n == 7.0) },
        )
        .await;
        assert_eq!(seen, 7.0);
        let up = prometheus.query(r#"up{job="openai-proxy"}"#).await;
        assert_eq!(up, Some(1.0), "{}", prometheus.log());
        let generation = prometheus.query("openai_proxy_config_generation").await;
        assert_eq!(generation, Some(1.0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_passes_the_admin_socket_to_the_successor() {
    bounded(60, async {
        let (_pki, _upstream, mut proxy, admin) = proxy_with_admin().await;
        let old_pid = proxy.child.id();
        let stored = proxy.notify.messages().concat();
        assert!(stored.contains("FDNAME=admin-127.0.0.1-0"), "{stored}");
        let client = http_client();
        // Held unread, so that the old process is still draining it after the handover.
        let response = start_stream(&client, &proxy, 200).await;
        let seen = proxy.notify.messages().len();
        proxy.signal("USR2");
        let (named, new_pid) = proxy.notify.wait_main_pid(seen, 10 * SECOND);
        let _successor = Successor(new_pid);
        proxy.wait_ready(named + 1);
        // The same admin address, answered by the successor alone: ready, not draining.
        eventually_async(
            10 * SECOND,
            "the successor on the admin socket",
            || async move {
                let status = get(admin, "/status", None).await.json();
                (status["pid"] == new_pid).then_some(())
            },
        )
        .await;
        for _ in 0..10 {
            let status = get(admin, "/status", None).await.json();
            assert_eq!(status["pid"], new_pid, "{status}");
            assert_eq!(get(admin, "/readyz", None).await.status, StatusCode::OK);
        }
        assert!(
            proxy.child.try_wait().unwrap().is_none(),
            "{old_pid} still drains"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert!(body.ends_with(b"data: [DONE]\n\n"));
        assert_eq!(proxy.wait_exit(10 * SECOND).code(), Some(0));
        assert_eq!(get(admin, "/healthz", None).await.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn a_websocket_shows_in_its_gauge_while_open() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    bounded(30, async {
        let (_pki, _upstream, proxy, admin) = proxy_with_admin().await;
        let url = format!("ws://{}/v1/realtime?model=m", proxy.http.unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        let open =
            |admin| async move { sample(&metrics(admin).await, "openai_proxy_websockets_open") };
        assert_eq!(open(admin).await, 1.0);
        ws.close(None).await.unwrap();
        eventually_async(
            10 * SECOND,
            "the WebSocket out of the gauge",
            || async move { (open(admin).await == 0.0).then_some(()) },
        )
        .await;
        let text = metrics(admin).await;
        let upgrade =
            r#"openai_proxy_requests_total{route="/v1/",method="GET",status_class="1xx"}"#;
        assert_eq!(sample(&text, upgrade), 1.0, "{text}");
    })
    .await;
}

#[tokio::test]
async fn a_down_upstream_counts_connect_failures_and_shows_in_status() {
    bounded(30, async {
        let proxy = Proxy::start(&format!(
            "{}[admin]\nlisten = [\"127.0.0.1:0\"]\n",
            down_upstream_config("")
        ));
        let admin = admin_addr(&proxy, 0).await;
        let client = http_client();
        for _ in 0..3 {
            let answer = send(
                &client,
                post_json(&proxy.url("/v1/chat/completions"), chat()),
            )
            .await;
            assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        }
        let text = metrics(admin).await;
        let failures = sample(&text, "openai_proxy_upstream_connect_failures_total");
        // Each request dials, besides any connection opened ahead of requests.
        assert!(failures >= 3.0, "{text}");
        assert_eq!(sample(&text, "openai_proxy_upstream_connects_total"), 0.0);
        assert_eq!(sample(&text, "openai_proxy_upstream_connections_open"), 0.0);
        let bad_gateway =
            r#"openai_proxy_requests_total{route="/v1/",method="POST",status_class="5xx"}"#;
        assert_eq!(sample(&text, bad_gateway), 3.0, "{text}");
        let status = get(admin, "/status", None).await.json();
        assert_eq!(status["upstreams"][0]["state"], "down", "{status}");
    })
    .await;
}

/// The proxy in tokens mode with these `[[token]]` tables and `extra` config, and an admin
/// listener.
async fn tokens_proxy_with_admin(
    upstream: &FakeUpstream,
    pki: &Pki,
    extra: &str,
    tokens: &str,
) -> (Proxy, SocketAddr) {
    let extra = format!("{extra}\n[admin]\nlisten = [\"127.0.0.1:0\"]\n");
    let proxy = start_tokens_with(upstream, pki, &extra, tokens, ProxyOptions::default());
    let admin = admin_addr(&proxy, 0).await;
    (proxy, admin)
}

/// The usage object the fake upstream answers with (`x-test-usage`).
const USAGE: &str = r#"{"prompt_tokens": 120, "completion_tokens": 45, "total_tokens": 165,
    "prompt_tokens_details": {"cached_tokens": 100},
    "completion_tokens_details": {"reasoning_tokens": 30}}"#;

async fn chat_as(client: &HttpClient, proxy: &Proxy, token: &str, model: &str) -> Answer {
    let url = proxy.url("/v1/chat/completions");
    let mut request = post_json_as(&url, chat_for(model), Some(token));
    let usage = USAGE.replace('\n', "").parse().unwrap();
    request.headers_mut().insert("x-test-usage", usage);
    send(client, request).await
}

#[tokio::test]
async fn tokens_by_token_model_and_kind_and_limit_refusals() {
    bounded(90, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let (alice, bob) = (issue("alice"), issue("bob"));
        let tokens = format!("{}requests_per_minute = 2\n{}", alice.table, bob.table);
        let (proxy, admin) = tokens_proxy_with_admin(&upstream, &pki, "", &tokens).await;
        let client = http_client();
        wait_for_room_in_minute(Duration::from_secs(20));
        for _ in 0..2 {
            let answer = chat_as(&client, &proxy, &alice.token, "gpt-4o-mini").await;
            assert_eq!(answer.status, StatusCode::OK);
        }
        let refused = chat_as(&client, &proxy, &alice.token, "gpt-4o-mini").await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
        let answer = chat_as(&client, &proxy, &bob.token, "gpt-4.1-nano").await;
        assert_eq!(answer.status, StatusCode::OK);

        let series = |token: &str, model: &str, kind: &str| {
            format!(
                "openai_proxy_openai_tokens_total{{token=\"{token}\",model=\"{model}\",kind=\"{kind}\"}}"
            )
        };
        let bobs_last = series("bob", "gpt-4.1-nano", "reasoning");
        let text = eventually_async(10 * SECOND, "bob's tokens", || {
            let bobs_last = bobs_last.clone();
            async move {
                let text = metrics(admin).await;
                (sample(&text, &bobs_last) > 0.0).then_some(text)
            }
        })
        .await;
        promtool_check(&text);
        let expected = [
            ("alice", "gpt-4o-mini", [240.0, 90.0, 200.0, 60.0]),
            ("bob", "gpt-4.1-nano", [120.0, 45.0, 100.0, 30.0]),
        ];
        for (token, model, figures) in expected {
            for (kind, figure) in ["prompt", "completion", "cached", "reasoning"]
                .into_iter()
                .zip(figures)
            {
                let series = series(token, model, kind);
                assert_eq!(sample(&text, &series), figure, "{series}\n{text}");
            }
        }
        assert!(!text.contains(r#"token="alice",model="gpt-4.1-nano""#), "{text}");
        let refusals = |token: &str, limit: &str| {
            let series =
                format!("openai_proxy_limit_refusals_total{{token=\"{token}\",limit=\"{limit}\"}}");
            sample(&text, &series)
        };
        assert_eq!(refusals("alice", "requests_per_minute"), 1.0, "{text}");
        assert_eq!(refusals("bob", "requests_per_minute"), 0.0, "{text}");
        assert_eq!(refusals("alice", "max_concurrent"), 0.0, "{text}");
        // The tokens themselves are in no metric.
        assert!(!text.contains(&alice.token) && !text.contains(&bob.token));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_counts_its_retry_and_the_request_under_the_upstream_that_answered() {
    bounded(30, async {
        let pki = Pki::new();
        let default = FakeUpstream::start(&pki, Alpn::Both).await;
        let second = FakeUpstream::start(&pki, Alpn::Both).await;
        // The first answers /v1/unavailable with a 503; the second, under /alt, with a 200.
        let proxy = Proxy::start(&format!(
            "{}{}[[route]]\npaths = [\"/v1/unavailable\"]\nupstreams = [\"default\", \"second\"]\n",
            basic_config(&default, &pki, "[admin]\nlisten = [\"127.0.0.1:0\"]\n"),
            second.named_toml(&pki, "second", "/alt")
        ));
        let admin = admin_addr(&proxy, 0).await;
        let answer = send(
            &http_client(),
            post_json(&proxy.url("/v1/unavailable"), chat()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert_eq!(answer.headers["x-openai-proxy-upstream"], "second");

        let answered =
            r#"openai_proxy_upstream_requests_total{upstream="second",status_class="2xx"}"#;
        let text = eventually_async(10 * SECOND, "the request counted", || async move {
            let text = metrics(admin).await;
            (sample(&text, answered) == 1.0).then_some(text)
        })
        .await;
        promtool_check(&text);
        let retries = |upstream: &str, reason: &str| {
            let series = format!(
                "openai_proxy_upstream_retries_total{{upstream=\"{upstream}\",reason=\"{reason}\"}}"
            );
            sample(&text, &series)
        };
        assert_eq!(retries("default", "status"), 1.0, "{text}");
        assert_eq!(retries("default", "unreachable"), 0.0, "{text}");
        assert_eq!(retries("second", "status"), 0.0, "{text}");
        let failovers = r#"openai_proxy_upstream_failovers_total{upstream="default"}"#;
        assert_eq!(sample(&text, failovers), 1.0, "{text}");
        // The 503 the client never saw is counted as a retry, not as a request of its own.
        let first =
            r#"openai_proxy_upstream_requests_total{upstream="default",status_class="5xx"}"#;
        assert_eq!(sample(&text, first), 0.0, "{text}");
    })
    .await;
}
