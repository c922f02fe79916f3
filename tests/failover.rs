//! Failover between the upstreams a route names: before any byte of the response has reached
//! the client, a failed connection, a reset or a 429/502/503/504 moves the request to the next
//! upstream; once a response has begun, nothing is sent again.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

/// A fake upstream on a runtime of its own, so that killing it closes its listener and every
/// connection it has at once, as a crashed server would.
struct Killable {
    runtime: Option<tokio::runtime::Runtime>,
    upstream: FakeUpstream,
}

impl Killable {
    async fn start(pki: &Arc<Pki>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let pki = pki.clone();
        let upstream = runtime
            .spawn(async move { FakeUpstream::start(&pki, Alpn::Both).await })
            .await
            .unwrap();
        Self {
            runtime: Some(runtime),
            upstream,
        }
    }

    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The proxy with `default` first and `second` next for every path under `paths`.
fn start(
    default: &FakeUpstream,
    second: &FakeUpstream,
    pki: &Pki,
    base: &str,
    paths: &str,
) -> Proxy {
    Proxy::start(&format!(
        "{}{}[[route]]\npaths = [\"{paths}\"]\nupstreams = [\"default\", \"second\"]\n",
        basic_config(default, pki, ""),
        second.named_toml(pki, "second", base)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_moves_the_request_with_its_body_to_the_next_upstream() {
    bounded(30, async {
        let pki = Pki::new();
        let default = FakeUpstream::start(&pki, Alpn::Both).await;
        let second = FakeUpstream::start(&pki, Alpn::Both).await;
        // The fake upstream answers /v1/error with a 429; under /alt, the second answers 200.
        let proxy = start(&default, &second, &pki, "/alt", "/v1/error");
        let body = serde_json::json!({"model": "gpt-4o-mini", "input": "x".repeat(100_000)});
        let answer = send(
            &http_client(),
            post_json(&proxy.url("/v1/error"), body.clone()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert_eq!(answer.headers["x-openai-proxy-upstream"], "second");
        assert_eq!(default.received().len(), 1);
        let replayed = second.last();
        assert!(replayed.uri.ends_with("/alt/v1/error"), "{}", replayed.uri);
        assert_eq!(replayed.body, Bytes::from(body.to_string()));
        eventually(
            Duration::from_secs(5),
            "the access line with both tries",
            || {
                proxy
                    .logs()
                    .contains("upstream=default,second")
                    .then_some(())
            },
        )
        .await;
    })
    .await;
}

/// A body past the 8 MiB kept for replay goes to the first upstream alone, whatever it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_to_replay_is_not_sent_again() {
    bounded(30, async {
        let pki = Pki::new();
        let default = FakeUpstream::start(&pki, Alpn::Both).await;
        let second = FakeUpstream::start(&pki, Alpn::Both).await;
        let proxy = start(&default, &second, &pki, "/alt", "/v1/error");
        let body = serde_json::json!({"model": "gpt-4o-mini", "input": "x".repeat(9 << 20)});
        let answer = send(
            &http_client(),
            post_json(&proxy.url("/v1/error"), body.clone()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(answer.headers["x-openai-proxy-upstream"], "default");
        assert_eq!(default.last().body.len(), body.to_string().len());
        assert!(second.received().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_killed_under_load_fails_no_request() {
    bounded(60, async {
        let pki = Arc::new(Pki::new());
        let mut default = Killable::start(&pki).await;
        let second = FakeUpstream::start(&pki, Alpn::Both).await;
        let proxy = start(&default.upstream, &second, &pki, "", "/v1/");
        let url = proxy.url("/v1/chat/completions");
        let (done, failed, ok) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let clients: Vec<_> = (0..8)
            .map(|_| {
                let (url, done, failed, ok) =
                    (url.clone(), done.clone(), failed.clone(), ok.clone());
                tokio::spawn(async move {
                    let client = http_client();
                    while !done.load(Ordering::Relaxed) {
                        let answered = client.request(post_json(&url, chat())).await;
                        let whole = match answered {
                            Ok(response) if response.status() == StatusCode::OK => {
                                response.into_body().collect().await.is_ok()
                            }
                            _ => false,
                        };
                        let counter = if whole { &ok } else { &failed };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        eventually(
            Duration::from_secs(20),
            "load on the first upstream",
            || (ok.load(Ordering::Relaxed) >= 200).then_some(()),
        )
        .await;
        default.kill();
        let at_kill = ok.load(Ordering::Relaxed);
        eventually(
            Duration::from_secs(20),
            "load moved to the second upstream",
            || (second.received().len() >= 200).then_some(()),
        )
        .await;
        done.store(true, Ordering::Relaxed);
        for client in clients {
            client.await.unwrap();
        }
        assert!(ok.load(Ordering::Relaxed) >= at_kill + 200);
        assert_eq!(failed.load(Ordering::Relaxed), 0, "failed client requests");
        assert!(default.upstream.received().len() >= 200);
        // Its failures opened its circuit: it rests, and STATUS= says so.
        proxy.notify.wait_for(
            0,
            Duration::from_secs(5),
            "STATUS= naming the resting upstream",
            |m| m.contains("STATUS=") && m.contains("; resting: upstream default"),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_breaks_after_its_first_event_is_not_sent_again() {
    bounded(30, async {
        let pki = Arc::new(Pki::new());
        let mut default = Killable::start(&pki).await;
        let second = FakeUpstream::start(&pki, Alpn::Both).await;
        let proxy = start(&default.upstream, &second, &pki, "", "/v1/");
        let request = Request::post(proxy.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-test-SECRET-KEY-123")
            .header("x-test-events", "10")
            .header("x-test-gap-ms", "200")
            .body(Full::new(Bytes::from(
                serde_json::json!({"model": "gpt-4o-mini", "stream": true, "messages": []})
                    .to_string(),
            )))
            .unwrap();
        let response = http_client().request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-openai-proxy-upstream"], "default");
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(first.data_ref().unwrap()).contains("tok0"));
        default.kill();
        let mut rest = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                rest.push_str(&String::from_utf8_lossy(data));
            }
        }
        assert!(!rest.contains("[DONE]"), "the stream was cut: {rest}");
        assert!(!rest.contains("tok0"), "no event came twice: {rest}");
        assert!(
            second.received().is_empty(),
            "nothing went to the second upstream"
        );
        assert_eq!(default.upstream.received().len(), 1);
    })
    .await;
}

const KEY_A: &str = "sk-proj-KEY-A-0001";
const KEY_B: &str = "sk-proj-KEY-B-0002";
const KEY_C: &str = "sk-proj-KEY-C-0003";

/// Tokens mode with three keys for the default upstream, used in turn.
fn start_with_keys(upstream: &FakeUpstream, pki: &Pki, token: &Issued) -> Proxy {
    let dir = tokens_dir(&token.table);
    for (name, key) in [("key-a", KEY_A), ("key-b", KEY_B), ("key-c", KEY_C)] {
        write_with_mode(&dir.path().join(name), &format!("{key}\n"), 0o600);
    }
    let config = basic_config(upstream, pki, TOKENS_AUTH).replace(
        "[upstream]\n",
        "[upstream]\nkey_files = [\"key-a\", \"key-b\", \"key-c\"]\n",
    );
    Proxy::start_in(dir, &config, ProxyOptions::default())
}

/// The key a request reached the upstream with.
fn key_of(received: &Received) -> String {
    let bearer = received.headers["authorization"].to_str().unwrap();
    bearer.trim_start_matches("Bearer ").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_rests_its_key_and_a_401_sets_its_key_aside() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let alice = issue("alice");
        let proxy = start_with_keys(&upstream, &pki, &alice);
        let client = http_client();
        let request = |refuse: Option<(&str, &str)>| {
            let mut request = Request::post(proxy.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .header("authorization", format!("Bearer {}", alice.token));
            if let Some((header, key)) = refuse {
                request = request.header(header, key);
            }
            request
                .body(Full::new(Bytes::from(chat().to_string())))
                .unwrap()
        };
        // The keys go in turn: A first. A answers 429 with Retry-After: the request moves to B.
        let answer = send(&client, request(Some(("x-test-429-for-key", KEY_A)))).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        let keys: Vec<String> = upstream.received().iter().map(key_of).collect();
        assert_eq!(keys, [KEY_A, KEY_B]);
        // A rests for 30 s: the next requests use C and B only.
        for _ in 0..4 {
            let answer = send(&client, request(None)).await;
            assert_eq!(answer.status, StatusCode::OK);
        }
        let later: Vec<String> = upstream.received()[2..].iter().map(key_of).collect();
        assert!(!later.contains(&KEY_A.to_owned()), "{later:?}");
        // B refused (401): set aside; the request goes with C.
        let seen = upstream.received().len();
        let answer = send(&client, request(Some(("x-test-401-for-key", KEY_B)))).await;
        assert_eq!(answer.status, StatusCode::OK);
        let keys: Vec<String> = upstream.received()[seen..].iter().map(key_of).collect();
        assert_eq!(keys.last().unwrap(), KEY_C, "{keys:?}");
        let seen = upstream.received().len();
        for _ in 0..3 {
            send(&client, request(None)).await;
        }
        let keys: Vec<String> = upstream.received()[seen..].iter().map(key_of).collect();
        assert_eq!(keys, [KEY_C, KEY_C, KEY_C]);
        // STATUS= names the resting key and the one set aside by fingerprint.
        let status = |key: &str| {
            let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
            let print: String = digest.as_ref()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("key {print} of default")
        };
        let (a, b) = (status(KEY_A), status(KEY_B));
        proxy
            .notify
            .wait_for(0, Duration::from_secs(5), "STATUS= naming both keys", |m| {
                m.contains("STATUS=") && m.contains(&a) && m.contains(&b)
            });
        // Logged by fingerprint, never by the key.
        eventually(Duration::from_secs(5), "the 401 warning", || {
            proxy.logs().contains("set aside").then_some(())
        })
        .await;
        let logs = proxy.logs();
        assert!(logs.contains("rests after a 429"), "{logs}");
        let notices = proxy.notify.messages().join("\n");
        for key in [KEY_A, KEY_B, KEY_C, UPSTREAM_KEY] {
            assert!(!logs.contains(key), "{logs}");
            assert!(!notices.contains(key), "{notices}");
        }
    })
    .await;
}

#[test]
fn key_files_need_tokens_mode() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = check_in(
        dir.path(),
        "listen = [\"127.0.0.1:0\"]\n[upstream]\nkey_files = [\"key-a\"]\n",
    );
    assert!(!ok);
    assert!(text.contains("config.toml:3:14: "), "{text}");
    assert!(text.contains("mode = \"tokens\""), "{text}");
}
