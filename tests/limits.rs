//! Per-token limits ([limits] and the [[token]] tables): a request over a limit is answered 429
//! in OpenAI's shape with its rate-limit headers, and nothing of it reaches the upstream.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

/// The proxy in tokens mode before the fake upstream, with `limits` after the [auth] table and
/// these `[[token]]` tables.
fn start_limited(upstream: &FakeUpstream, pki: &Pki, limits: &str, tokens: &str) -> Proxy {
    start_tokens_with(upstream, pki, limits, tokens, ProxyOptions::default())
}

/// Options that give the proxy `dir` as its state directory, as systemd's StateDirectory= does.
fn in_state(dir: &Path) -> ProxyOptions {
    let dir = dir.to_str().unwrap().to_owned();
    ProxyOptions {
        env: vec![("STATE_DIRECTORY".into(), dir)],
        ..Default::default()
    }
}

/// A token's `[[token]]` table with these limit lines added.
fn with_limits(issued: &Issued, lines: &str) -> String {
    format!("{}{lines}\n", issued.table)
}

/// A 429 from the proxy itself, in OpenAI's shape, naming `limit`.
fn assert_limited(answer: &Answer, limit: &str) {
    assert_eq!(
        answer.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let error = &answer.json()["error"];
    assert_eq!(error["code"], "rate_limit_exceeded", "{error}");
    let message = error["message"].as_str().unwrap();
    assert!(message.contains(limit), "{message}");
    let retry: u64 = answer.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&retry), "Retry-After {retry}");
}

#[tokio::test]
async fn requests_per_minute_refuses_with_openai_headers_and_nothing_upstream() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let alice = issue("alice");
        let bob = issue("bob");
        let tokens = format!(
            "{}{}",
            alice.table,
            with_limits(&bob, "requests_per_minute = 3")
        );
        let proxy = start_limited(
            &upstream,
            &pki,
            "[limits]\nrequests_per_minute = 2\n",
            &tokens,
        );
        let client = http_client();
        let url = proxy.url("/v1/chat/completions");
        wait_for_room_in_minute(Duration::from_secs(15));
        for _ in 0..2 {
            let answer = send(&client, chat_with_token(&url, &alice.token)).await;
            assert_eq!(answer.status, StatusCode::OK);
        }
        let before = upstream.received().len();
        let refused = send(&client, chat_with_token(&url, &alice.token)).await;
        assert_limited(&refused, "requests per minute");
        assert_eq!(upstream.received().len(), before, "nothing went upstream");
        let h = &refused.headers;
        assert_eq!(h["x-ratelimit-limit-requests"], "2");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        let reset = h["x-ratelimit-reset-requests"].to_str().unwrap();
        assert!(reset.ends_with('s') && reset.len() <= 4, "{reset}");
        assert_eq!(refused.json()["error"]["type"], "requests");
        assert!(h.contains_key("x-proxy-request-id"));

        // A reload keeps the counts: alice is still over her limit in generation 2.
        let seen = proxy.notify.messages().len();
        proxy.signal("HUP");
        proxy
            .notify
            .wait_for(seen, Duration::from_secs(5), "generation 2", |m| {
                m.contains("READY=1") && m.contains("generation 2")
            });
        let refused = send(&client, chat_with_token(&url, &alice.token)).await;
        assert_limited(&refused, "requests per minute");

        // Bob's own limit (3) stands over the default (2); he is counted apart from alice.
        for _ in 0..3 {
            let answer = send(&client, chat_with_token(&url, &bob.token)).await;
            assert_eq!(answer.status, StatusCode::OK);
        }
        let refused = send(&client, chat_with_token(&url, &bob.token)).await;
        assert_limited(&refused, "requests per minute");
        assert_eq!(refused.headers["x-ratelimit-limit-requests"], "3");
    })
    .await;
}

#[tokio::test]
async fn max_concurrent_counts_streams_and_websockets_until_they_end() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let carol = issue("carol");
        let proxy = start_limited(
            &upstream,
            &pki,
            "",
            &with_limits(&carol, "max_concurrent = 1"),
        );
        let client = http_client();
        let url = proxy.url("/v1/chat/completions");

        // A stream in flight holds the one place.
        let body = serde_json::json!({"model": "gpt-4o-mini", "stream": true, "messages": []});
        let stream = Request::post(&url)
            .header("authorization", format!("Bearer {}", carol.token))
            .header("x-test-events", "3")
            .header("x-test-gap-ms", "300")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = client.request(stream).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let before = upstream.received().len();
        let refused = send(&client, chat_with_token(&url, &carol.token)).await;
        assert_limited(&refused, "max_concurrent");
        assert_eq!(refused.headers["retry-after"], "1");
        assert_eq!(upstream.received().len(), before, "nothing went upstream");
        // Once the stream has ended, the place is free again.
        response.into_body().collect().await.unwrap();
        let answer = eventually_ok(&client, &url, &carol.token).await;
        assert_eq!(answer.status, StatusCode::OK);

        // A WebSocket holds it for as long as it is open.
        let ws_url = format!(
            "ws://{}/v1/realtime?model=gpt-4o-realtime",
            proxy.http.unwrap()
        );
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(ws_url)
                .unwrap();
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", carol.token).parse().unwrap(),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let refused = send(&client, chat_with_token(&url, &carol.token)).await;
        assert_limited(&refused, "max_concurrent");
        ws.close(None).await.unwrap();
        let answer = eventually_ok(&client, &url, &carol.token).await;
        assert_eq!(answer.status, StatusCode::OK);
    })
    .await;
}

/// Sends a chat request until it is let in (a place given back frees a moment after the client
/// has seen the end).
async fn eventually_ok(client: &HttpClient, url: &str, token: &str) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = send(client, chat_with_token(url, token)).await;
        if answer.status != StatusCode::TOO_MANY_REQUESTS {
            return answer;
        }
        assert!(Instant::now() < deadline, "still refused after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends chat requests until one is refused; returns the refusal. The fake upstream reports 11
/// tokens (5 + 6) for each; a request's tokens are charged when its answer has ended, a moment
/// after the client read it, so one more request may pass before the charge is seen.
async fn until_refused(client: &HttpClient, url: &str, token: &str) -> Answer {
    for _ in 0..20 {
        let answer = send(client, chat_with_token(url, token)).await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            return answer;
        }
        assert_eq!(answer.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no request was refused");
}

#[tokio::test]
async fn tokens_per_minute_is_charged_from_the_upstreams_usage() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let dave = issue("dave");
        let proxy = start_limited(
            &upstream,
            &pki,
            "[limits]\ntokens_per_minute = 11\n",
            &dave.table,
        );
        let client = http_client();
        let url = proxy.url("/v1/chat/completions");
        wait_for_room_in_minute(Duration::from_secs(15));
        let first = send(&client, chat_with_token(&url, &dave.token)).await;
        assert_eq!(first.status, StatusCode::OK);
        let refused = until_refused(&client, &url, &dave.token).await;
        assert!(upstream.received().len() <= 2, "at most one more went up");
        assert_limited(&refused, "tokens per minute");
        assert_eq!(refused.json()["error"]["type"], "tokens");
        assert_eq!(refused.headers["x-ratelimit-limit-tokens"], "11");
        assert_eq!(refused.headers["x-ratelimit-remaining-tokens"], "0");
    })
    .await;
}

#[tokio::test]
async fn the_days_quota_survives_a_restart() {
    bounded(40, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let erin = issue("erin");
        let state = tempfile::tempdir().unwrap();
        let start = || {
            let limits = "[limits]\ntokens_per_day = 11\n";
            start_tokens_with(&upstream, &pki, limits, &erin.table, in_state(state.path()))
        };
        let client = http_client();
        let mut proxy = start();
        let url = proxy.url("/v1/chat/completions");
        let refused = until_refused(&client, &url, &erin.token).await;
        assert_limited(&refused, "tokens per day");
        let went_up = upstream.received().len();
        proxy.signal("TERM");
        assert!(proxy.wait_exit(Duration::from_secs(10)).success());
        assert!(state.path().join("limits.json").exists());

        let proxy = start();
        let url = proxy.url("/v1/chat/completions");
        let refused = send(&client, chat_with_token(&url, &erin.token)).await;
        assert_limited(&refused, "tokens per day");
        assert_eq!(upstream.received().len(), went_up, "nothing more went up");
        let reset = refused.headers["x-ratelimit-reset-tokens"]
            .to_str()
            .unwrap();
        assert!(
            reset.contains('h') || reset.contains('m'),
            "until midnight: {reset}"
        );
    })
    .await;
}

/// `openai-proxy check` on a config (and tokens file) in `dir`: its stderr when it fails.
fn check_fails(dir: &Path, config: &str, tokens: &str) -> String {
    write_key(dir, 0o600);
    std::fs::write(dir.join("tokens.toml"), tokens).unwrap();
    let (passed, words) = check_in(dir, config);
    assert!(!passed, "{words}");
    words
}

#[test]
fn broken_limits_are_refused_with_their_place() {
    let dir = tempfile::tempdir().unwrap();
    let listen = "listen = [\"127.0.0.1:0\"]\n";
    let tokens_mode = format!("{listen}{TOKENS_AUTH}");
    let limited = with_limits(&issue("alice"), "max_concurrent = 0");
    // (config, tokens file, what the error says)
    let cases = [
        (
            format!("{listen}[limits]\nrequests_per_minute = 5\n"),
            String::new(),
            "need [auth] mode = \"tokens\"",
        ),
        (
            format!("{tokens_mode}[limits]\ntokens_per_day = -1\n"),
            String::new(),
            "config.toml:8:18: ",
        ),
        (
            format!("{tokens_mode}[limits]\nbackend = \"memcached://x\"\n"),
            String::new(),
            "config.toml:8:11: ",
        ),
        (
            tokens_mode.clone(),
            limited,
            "tokens.toml:7:18: a limit is a whole number above 0",
        ),
    ];
    for (config, tokens, expected) in cases {
        let error = check_fails(dir.path(), &config, &tokens);
        assert!(error.contains(expected), "{error}");
    }
}

// The Redis backend ([limits] backend = "redis://…"): a real redis-server, started here on a free
// port, shared by two proxies; killed and stopped mid-test, with on_backend_error "allow" and
// "deny".

/// A redis-server of its own, without persistence, killed when dropped.
struct Redis(Daemon);

impl Redis {
    async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    async fn start_on(port: u16) -> Self {
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"]);
        Self(Daemon::spawn(command, port).await)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.0.port)
    }

    fn signal(&self, signal: &str) {
        self.0.signal(signal);
    }

    fn kill(self) -> u16 {
        self.0.kill()
    }
}

/// Sends requests until one is answered `status`.
async fn until_status(
    client: &HttpClient,
    proxy: &Proxy,
    token: &str,
    status: StatusCode,
) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = ask(client, proxy, token).await;
        if answer.status == status {
            return answer;
        }
        assert!(Instant::now() < deadline, "no {status} within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for `text` in the proxy's log (written before its answer, read a moment later), then
/// checks that it is there once.
async fn logged_once(proxy: &Proxy, text: &str) {
    let count = || proxy.logs().matches(text).count();
    eventually(Duration::from_secs(5), text, || (count() > 0).then_some(())).await;
    assert_eq!(count(), 1, "{text:?} once: {}", proxy.logs());
}

/// A chat request of `token`'s through `proxy`, and its answer.
async fn ask(client: &HttpClient, proxy: &Proxy, token: &str) -> Answer {
    send(
        client,
        chat_with_token(&proxy.url("/v1/chat/completions"), token),
    )
    .await
}

/// A redis-server, the fake upstream, and a token of `name` limited by these `[limits]` lines
/// (after the backend line pointing at the Redis).
struct RedisSetup {
    redis: Redis,
    pki: Pki,
    upstream: FakeUpstream,
    issued: Issued,
    limits: String,
}

impl RedisSetup {
    async fn new(name: &str, limits: &str) -> Self {
        let redis = Redis::start().await;
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let limits = format!("[limits]\nbackend = \"{}\"\n{limits}\n", redis.url());
        Self {
            redis,
            pki,
            upstream,
            issued: issue(name),
            limits,
        }
    }

    fn proxy(&self) -> Proxy {
        start_limited(&self.upstream, &self.pki, &self.limits, &self.issued.table)
    }
}

#[tokio::test]
async fn two_proxies_on_one_redis_share_one_limit() {
    bounded(30, async {
        let setup = RedisSetup::new("alice", "requests_per_minute = 3").await;
        let (one, two) = (setup.proxy(), setup.proxy());
        let token = &setup.issued.token;
        let client = http_client();
        wait_for_room_in_minute(Duration::from_secs(15));
        for proxy in [&one, &two, &one] {
            assert_eq!(ask(&client, proxy, token).await.status, StatusCode::OK);
        }
        for proxy in [&two, &one] {
            let refused = ask(&client, proxy, token).await;
            assert_limited(&refused, "requests per minute");
            assert_eq!(refused.headers["x-ratelimit-limit-requests"], "3");
            assert_eq!(refused.headers["x-ratelimit-remaining-requests"], "0");
        }
        assert_eq!(setup.upstream.received().len(), 3, "only three went up");
    })
    .await;
}

#[tokio::test]
async fn two_proxies_admitting_at_once_stop_at_the_shared_limit_exactly() {
    bounded(60, async {
        // 200 a minute: each proxy is granted admissions ahead (up to 6) while the minute has
        // room, one at a time near its end.
        let setup = RedisSetup::new("erin", "requests_per_minute = 200").await;
        let proxies = [setup.proxy(), setup.proxy()];
        let urls: Vec<String> = proxies
            .iter()
            .map(|p| p.url("/v1/chat/completions"))
            .collect();
        wait_for_room_in_minute(Duration::from_secs(25));
        // 16 clients at once, 20 requests each, every other one to each proxy: 320 in all.
        let mut clients = tokio::task::JoinSet::new();
        for n in 0..16 {
            let (urls, token) = (urls.clone(), setup.issued.token.clone());
            clients.spawn(async move {
                let client = http_client();
                let mut statuses = Vec::new();
                for i in 0..20 {
                    let url = &urls[(n + i) % 2];
                    statuses.push(send(&client, chat_with_token(url, &token)).await.status);
                }
                statuses
            });
        }
        let statuses: Vec<StatusCode> = clients.join_all().await.concat();
        let count = |status| statuses.iter().filter(|s| **s == status).count();
        assert_eq!(count(StatusCode::OK), 200, "{statuses:?}");
        assert_eq!(count(StatusCode::TOO_MANY_REQUESTS), 120, "{statuses:?}");
        assert_eq!(setup.upstream.received().len(), 200, "only 200 went up");
    })
    .await;
}

#[tokio::test]
async fn a_token_far_from_its_limits_does_not_wait_for_redis_and_one_near_them_does() {
    bounded(40, async {
        let setup = RedisSetup::new(
            "far",
            "redis_timeout = \"2s\"\nrequests_per_minute = 100000",
        )
        .await;
        let near = issue("near");
        let tokens = format!(
            "{}{}",
            setup.issued.table,
            with_limits(&near, "requests_per_minute = 2")
        );
        let proxy = start_limited(&setup.upstream, &setup.pki, &setup.limits, &tokens);
        let client = http_client();
        let far = &setup.issued.token;
        wait_for_room_in_minute(Duration::from_secs(15));
        // Each token's first request waits for Redis, which tells the proxy where it stands.
        assert_eq!(ask(&client, &proxy, far).await.status, StatusCode::OK);
        assert_eq!(
            ask(&client, &proxy, &near.token).await.status,
            StatusCode::OK
        );

        // Stopped, Redis answers nothing. A request that waited for it would take the whole
        // redis_timeout (2 s); the far token's are answered well within it.
        setup.redis.signal("STOP");
        for _ in 0..3 {
            let started = Instant::now();
            let answer = ask(&client, &proxy, far).await;
            assert_eq!(answer.status, StatusCode::OK);
            let took = started.elapsed();
            assert!(took < Duration::from_secs(1), "waited for Redis: {took:?}");
        }
        // The near token (1 of 2 used) waits for Redis's own check, then on_backend_error
        // ("allow") decides.
        let started = Instant::now();
        let answer = ask(&client, &proxy, &near.token).await;
        assert_eq!(answer.status, StatusCode::OK);
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(2), "did not wait: {took:?}");
        logged_once(&proxy, "limits backend (Redis) unreachable").await;

        // Back: Redis counted the near token's stalled check, so it is at its limit now.
        setup.redis.signal("CONT");
        let refused =
            until_status(&client, &proxy, &near.token, StatusCode::TOO_MANY_REQUESTS).await;
        assert_limited(&refused, "requests per minute");
        assert_eq!(refused.headers["x-ratelimit-limit-requests"], "2");
    })
    .await;
}

#[tokio::test]
async fn redis_killed_with_allow_lets_requests_through_and_is_logged_once() {
    bounded(40, async {
        let setup = RedisSetup::new(
            "bob",
            "on_backend_error = \"allow\"\nrequests_per_minute = 1",
        )
        .await;
        let proxy = setup.proxy();
        let token = &setup.issued.token;
        let client = http_client();
        wait_for_room_in_minute(Duration::from_secs(20));
        assert_eq!(ask(&client, &proxy, token).await.status, StatusCode::OK);
        let refused = ask(&client, &proxy, token).await;
        assert_limited(&refused, "requests per minute");

        let port = setup.redis.kill();
        for _ in 0..5 {
            let answer = ask(&client, &proxy, token).await;
            assert_eq!(answer.status, StatusCode::OK, "allowed while Redis is down");
        }
        let unreachable = "limits backend (Redis) unreachable";
        logged_once(&proxy, unreachable).await;
        proxy
            .notify
            .wait_for(0, Duration::from_secs(5), "STATUS shows it", |m| {
                m.contains("STATUS=") && m.contains("limits backend (Redis) UNREACHABLE")
            });

        // Back (empty): counting again, and the recovery is logged once.
        let _redis = Redis::start_on(port).await;
        let refused = until_status(&client, &proxy, token, StatusCode::TOO_MANY_REQUESTS).await;
        assert_limited(&refused, "requests per minute");
        logged_once(&proxy, "reachable again").await;
        logged_once(&proxy, unreachable).await;
        let last = proxy.notify.messages().last().cloned().unwrap();
        assert!(!last.contains("UNREACHABLE"), "{last}");
    })
    .await;
}

#[tokio::test]
async fn redis_stalled_or_killed_with_deny_refuses_within_the_timeout() {
    bounded(40, async {
        let setup = RedisSetup::new(
            "carol",
            "on_backend_error = \"deny\"\nredis_timeout = \"50ms\"\nrequests_per_minute = 100",
        )
        .await;
        let proxy = setup.proxy();
        let token = &setup.issued.token;
        let client = http_client();
        assert_eq!(ask(&client, &proxy, token).await.status, StatusCode::OK);

        // Stopped, Redis keeps its connection open and answers nothing: each request waits the
        // timeout at most.
        setup.redis.signal("STOP");
        let went_up = setup.upstream.received().len();
        for _ in 0..3 {
            let started = Instant::now();
            let answer = ask(&client, &proxy, token).await;
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{:?}",
                started.elapsed()
            );
            assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(answer.json()["error"]["code"], "limits_unavailable");
        }
        assert_eq!(setup.upstream.received().len(), went_up, "nothing went up");
        logged_once(&proxy, "limits backend (Redis) unreachable").await;

        setup.redis.signal("CONT");
        until_status(&client, &proxy, token, StatusCode::OK).await;
        logged_once(&proxy, "reachable again").await;

        // Killed: refused at once, not after a connect timeout.
        setup.redis.kill();
        let started = Instant::now();
        let answer = ask(&client, &proxy, token).await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(started.elapsed() < Duration::from_secs(1));
    })
    .await;
}

/// `openai-proxy usage --config CONFIG ARGS…`: its table.
fn usage_table(config: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .arg("usage")
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("STATE_DIRECTORY")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The cells of the table's line for `token` and `model`, if there is one.
fn usage_line(table: &str, token: &str, model: &str) -> Option<Vec<String>> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .find(|cells| cells.len() == 7 && cells[0] == token && cells[1] == model)
}

#[tokio::test]
async fn usage_is_recorded_per_token_and_model_and_printed() {
    bounded(40, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let (alice, bob) = (issue("alice"), issue("bob"));
        let tokens = format!("{}{}", alice.table, bob.table);
        let mut proxy = start_limited(&upstream, &pki, "", &tokens);
        let client = http_client();
        for token in [&alice.token, &alice.token, &bob.token] {
            assert_eq!(ask(&client, &proxy, token).await.status, StatusCode::OK);
        }
        let embeddings = Request::post(proxy.url("/v1/embeddings"))
            .header("authorization", format!("Bearer {}", alice.token))
            .body(Full::new(Bytes::from_static(
                b"{\"model\":\"text-embedding-3-small\",\"input\":\"x\"}",
            )))
            .unwrap();
        assert_eq!(send(&client, embeddings).await.status, StatusCode::OK);
        // Stopping writes the state file the command reads.
        proxy.signal("TERM");
        assert!(proxy.wait_exit(Duration::from_secs(10)).success());

        let table = usage_table(&proxy.config_path, &[]);
        assert!(table.starts_with("TOKEN"), "{table}");
        // requests, prompt, completion, cached, reasoning
        let chat = usage_line(&table, "alice", "gpt-4o-mini").expect(&table);
        assert_eq!(chat[2..], ["2", "10", "12", "0", "0"], "{table}");
        let embed = usage_line(&table, "alice", "text-embedding-3-small").expect(&table);
        assert_eq!(embed[2..], ["1", "3", "0", "0", "0"], "{table}");
        assert!(
            usage_line(&table, "bob", "gpt-4o-mini").is_some(),
            "{table}"
        );

        let alone = usage_table(&proxy.config_path, &["--token", "bob"]);
        assert!(
            usage_line(&alone, "alice", "gpt-4o-mini").is_none(),
            "{alone}"
        );
        let future = usage_table(&proxy.config_path, &["--since", "2999-01-01"]);
        assert_eq!(future.lines().count(), 1, "the header alone: {future}");
    })
    .await;
}

#[tokio::test]
async fn usage_in_redis_is_printed_from_redis() {
    bounded(40, async {
        let setup = RedisSetup::new("dora", "").await;
        let proxy = setup.proxy();
        let client = http_client();
        for _ in 0..3 {
            let answer = ask(&client, &proxy, &setup.issued.token).await;
            assert_eq!(answer.status, StatusCode::OK);
        }
        // Recorded without waiting for Redis: read until all three are there.
        let line = eventually(Duration::from_secs(10), "three requests in Redis", || {
            let table = usage_table(&proxy.config_path, &["--token", "dora"]);
            usage_line(&table, "dora", "gpt-4o-mini").filter(|cells| cells[2] == "3")
        })
        .await;
        assert_eq!(line[2..], ["3", "15", "18", "0", "0"]);
    })
    .await;
}

#[tokio::test]
async fn a_handover_passes_the_days_counts_to_the_successor() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let frank = issue("frank");
        let state = tempfile::tempdir().unwrap();
        let limits = "[limits]\ntokens_per_day = 11\n";
        let mut proxy = start_tokens_with(
            &upstream,
            &pki,
            limits,
            &frank.table,
            in_state(state.path()),
        );
        let url = proxy.url("/v1/chat/completions");
        let refused = until_refused(&http_client(), &url, &frank.token).await;
        assert_limited(&refused, "tokens per day");
        let went_up = upstream.received().len();

        let seen = proxy.notify.messages().len();
        proxy.signal("USR2");
        let (named, pid) = proxy.notify.wait_main_pid(seen, Duration::from_secs(40));
        let _successor = Successor(pid);
        proxy.wait_ready(named + 1);

        // A new connection reaches the successor, which knows the day's tokens are spent.
        let refused = send(&http_client(), chat_with_token(&url, &frank.token)).await;
        assert_limited(&refused, "tokens per day");
        assert_eq!(upstream.received().len(), went_up, "nothing more went up");
    })
    .await;
}
