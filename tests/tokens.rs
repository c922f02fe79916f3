//! Tokens mode ([auth] mode = "tokens"): the proxy holds the OpenAI key, clients send tokens it
//! issued (`openai-proxy token new`). The fake upstream records what reached it, so each test
//! can tell that the key went up, that the token never did, and that a refused request never
//! left the proxy.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio_tungstenite::tungstenite::Message;

/// A fake upstream and the proxy in tokens mode in front of it, with these `[[token]]` tables.
/// (The Pki is kept: a reload reads its CA file again.)
async fn setup(tokens: &str, env: &[(&str, &str)]) -> (Pki, FakeUpstream, Proxy) {
    let pki = Pki::new();
    let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
    let proxy = start_tokens(&upstream, &pki, tokens, env);
    (pki, upstream, proxy)
}

/// A request with a model that the token allows went up byte for byte with the key; one with a
/// model it does not allow got 403 and nothing went up.
fn assert_model_outcome(
    upstream: &FakeUpstream,
    before: usize,
    answer: &Answer,
    allowed: bool,
    body: &Bytes,
) {
    if allowed {
        assert_eq!(answer.status, StatusCode::OK);
        let seen = upstream.last();
        assert!(seen.body == *body, "the body went byte for byte");
        assert_eq!(
            seen.headers["authorization"],
            format!("Bearer {UPSTREAM_KEY}")
        );
    } else {
        assert_error(answer, StatusCode::FORBIDDEN, "model_not_allowed");
        assert_eq!(upstream.received().len(), before, "nothing went upstream");
    }
}

fn assert_error(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(
        answer.status,
        status,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let error = &answer.json()["error"];
    assert_eq!(error["code"], code, "{error}");
    assert_eq!(error["type"], "invalid_request_error", "{error}");
}

/// No header the upstream saw holds the token, in any form.
fn assert_no_token(seen: &Received, token: &str) {
    for (name, value) in &seen.headers {
        assert!(
            !String::from_utf8_lossy(value.as_bytes()).contains(token),
            "the upstream saw the token in {name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_the_key_and_never_the_token() {
    bounded(30, async {
        let alice = issue("alice");
        let (_pki, upstream, proxy) = setup(&alice.table, &[]).await;
        for (i, client) in [http_client(), http2_client()].iter().enumerate() {
            let mut request = post_json_as(
                &proxy.url("/v1/chat/completions"),
                chat_for("gpt-4o-mini"),
                Some(&alice.token),
            );
            request
                .headers_mut()
                .insert("openai-organization", "org-client".parse().unwrap());
            let sent = request.body().clone();
            let answer = send(client, request).await;
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(answer.json()["model"], "gpt-4o-mini");
            let received = upstream.received();
            assert_eq!(received.len(), i + 1);
            let seen = &received[i];
            assert_eq!(
                seen.headers["authorization"],
                format!("Bearer {UPSTREAM_KEY}")
            );
            assert_eq!(
                seen.headers["openai-organization"], "org-proxy",
                "the proxy's organization, not the client's"
            );
            assert_no_token(seen, &alice.token);
            let sent = http_body_util::BodyExt::collect(sent).await.unwrap();
            assert_eq!(seen.body, sent.to_bytes(), "the body went unchanged");
        }
        eventually(
            Duration::from_secs(5),
            "the access log names the token",
            || {
                let logs = proxy.logs();
                (logs.matches("token=alice").count() == 2).then_some(())
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_unknown_or_expired_token_gets_401_and_nothing_goes_upstream() {
    bounded(30, async {
        let alice = issue("alice");
        let old = issue("old");
        let expired = old.table.replace(
            "# expires = 2027-01-01T00:00:00Z",
            "expires = 2020-01-01T00:00:00Z",
        );
        let (_pki, upstream, proxy) = setup(&format!("{}{expired}", alice.table), &[]).await;
        let url = proxy.url("/v1/chat/completions");
        let unknown = issue("nobody");
        let client = http_client();
        let cases = [
            ("no token", None),
            ("a token it did not issue", Some(unknown.token.as_str())),
            (
                "the client's own OpenAI key",
                Some("sk-test-SECRET-UPSTREAM_KEY-123"),
            ),
            ("an expired token", Some(old.token.as_str())),
            ("the key itself", Some(UPSTREAM_KEY)),
        ];
        for (what, token) in cases {
            let answer = send(&client, post_json_as(&url, chat_for("gpt-4o-mini"), token)).await;
            assert_error(&answer, StatusCode::UNAUTHORIZED, "invalid_api_key");
            if let Some(token) = token {
                assert!(
                    !String::from_utf8_lossy(&answer.body).contains(token),
                    "{what}: the error repeats what was sent"
                );
            }
        }
        let basic = Request::get(proxy.url("/v1/models"))
            .header("authorization", format!("Basic {}", alice.token))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_error(
            &send(&client, basic).await,
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
        );
        assert!(
            upstream.received().is_empty(),
            "nothing reached the upstream"
        );
        // And the valid token is let in: the refusals above were about the tokens.
        let answer = send(
            &client,
            post_json_as(&url, chat_for("gpt-4o"), Some(&alice.token)),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    })
    .await;
}

/// A token limited to some models: `carol`.
fn limited(issued: &Issued) -> String {
    issued.table.replace(
        "# models = [\"gpt-4o-mini\", \"gpt-4.1*\"]",
        "models = [\"gpt-4o-mini\", \"gpt-4.1*\", \"whisper-1\"]",
    )
}

/// A chat request whose `model` comes after a `messages` array of more than 1 MiB.
fn long_chat(model: &str) -> Bytes {
    let mut body = String::from("{\"messages\":[");
    let line = format!(
        "{{\"role\":\"user\",\"content\":\"{}\"}},",
        "x".repeat(1000)
    );
    while body.len() < (1 << 20) + 1000 {
        body.push_str(&line);
    }
    body.push_str(&format!(
        "{{\"role\":\"user\",\"content\":\"the model is {model}\"}}],\"model\":\"{model}\"}}"
    ));
    Bytes::from(body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_outside_the_tokens_list_gets_403_even_after_1_mib_of_messages() {
    bounded(30, async {
        let carol = issue("carol");
        let (_pki, upstream, proxy) = setup(&limited(&carol), &[]).await;
        let url = proxy.url("/v1/chat/completions");
        for client in [http_client(), http2_client()] {
            for (model, allowed) in [("gpt-4.1-nano", true), ("gpt-4o", false)] {
                let before = upstream.received().len();
                let body = long_chat(model);
                let request = Request::post(&url)
                    .header("content-type", "application/json")
                    .header("authorization", format!("Bearer {}", carol.token))
                    .body(Full::new(body.clone()))
                    .unwrap();
                let answer = send(&client, request).await;
                assert_model_outcome(&upstream, before, &answer, allowed, &body);
                if !allowed {
                    let message = answer.json()["error"]["message"].clone();
                    assert!(message.as_str().unwrap().contains("gpt-4o"), "{message}");
                }
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_list_shows_only_the_tokens_models() {
    bounded(30, async {
        let (alice, carol) = (issue("alice"), issue("carol"));
        let tokens = format!("{}{}", alice.table, limited(&carol));
        let (_pki, upstream, proxy) = setup(&tokens, &[]).await;
        let client = http_client();
        let list = |token: &str| {
            Request::get(proxy.url("/v1/models"))
                .header("authorization", format!("Bearer {token}"))
                .header("accept-encoding", "gzip")
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        let ids = |answer: &Answer| -> Vec<String> {
            assert_eq!(answer.status, StatusCode::OK);
            answer.json()["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let all = ids(&send(&client, list(&alice.token)).await);
        assert_eq!(all, ["gpt-4o-mini", "gpt-4o", "gpt-4.1-nano", "whisper-1"]);
        let answer = send(&client, list(&carol.token)).await;
        assert_eq!(ids(&answer), ["gpt-4o-mini", "gpt-4.1-nano", "whisper-1"]);
        assert_eq!(
            answer.headers["content-length"],
            answer.body.len().to_string()
        );
        let one = |model: &str| {
            Request::get(proxy.url(&format!("/v1/models/{model}")))
                .header("authorization", format!("Bearer {}", carol.token))
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        let before = upstream.received().len();
        let answer = send(&client, one("gpt-4o")).await;
        assert_error(&answer, StatusCode::FORBIDDEN, "model_not_allowed");
        assert_eq!(upstream.received().len(), before);
        assert_eq!(
            send(&client, one("gpt-4o-mini")).await.status,
            StatusCode::OK
        );
    })
    .await;
}

/// A transcription upload: the audio file first, then the `model` field, as the Node SDK orders
/// its form.
fn transcription(model: &str) -> (String, Bytes) {
    let boundary = "----openai-proxy-test-boundary";
    let mut body = Vec::new();
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n").as_bytes());
    body.extend((0..300_000u32).map(|i| (i % 251) as u8));
    body.extend_from_slice(
        format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n--{boundary}--\r\n")
            .as_bytes(),
    );
    (
        format!("multipart/form-data; boundary={boundary}"),
        Bytes::from(body),
    )
}

/// A file upload names no model: a model-limited token's upload goes through unread, even one
/// larger than what the proxy reads ahead of other requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_upload_larger_than_the_read_ahead_goes_through_for_a_limited_token() {
    bounded(60, async {
        let carol = issue("carol");
        let (_pki, upstream, proxy) = setup(&limited(&carol), &[]).await;
        let boundary = "----openai-proxy-test-boundary";
        let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.jsonl\"\r\n\r\n").into_bytes();
        body.resize(body.len() + (33 << 20), b'x');
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        let body = Bytes::from(body);
        let request = Request::post(proxy.url("/v1/files"))
            .header("content-type", format!("multipart/form-data; boundary={boundary}"))
            .header("authorization", format!("Bearer {}", carol.token))
            .body(Full::new(body.clone()))
            .unwrap();
        let answer = send(&http_client(), request).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        let seen = upstream.last();
        assert!(seen.uri.ends_with("/v1/files"), "{}", seen.uri);
        assert_eq!(seen.body.len(), body.len(), "the upload went up whole");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_with_an_allowed_and_a_refused_model() {
    bounded(30, async {
        let carol = issue("carol");
        let (_pki, upstream, proxy) = setup(&limited(&carol), &[]).await;
        let client = http_client();
        for (model, allowed) in [("whisper-1", true), ("gpt-4o-transcribe", false)] {
            let before = upstream.received().len();
            let (content_type, body) = transcription(model);
            let request = Request::post(proxy.url("/v1/audio/transcriptions"))
                .header("content-type", content_type)
                .header("authorization", format!("Bearer {}", carol.token))
                .body(Full::new(body.clone()))
                .unwrap();
            let answer = send(&client, request).await;
            assert_model_outcome(&upstream, before, &answer, allowed, &body);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_removed_from_the_file_is_refused_within_a_second() {
    bounded(30, async {
        let (alice, bob) = (issue("alice"), issue("bob"));
        let tokens = format!("{}{}", alice.table, bob.table);
        let (_pki, _upstream, proxy) = setup(&tokens, &[]).await;
        let tokens_path = proxy.dir.path().join("tokens.toml");
        let url = proxy.url("/v1/chat/completions");
        let client = http_client();
        let status = |token: &str| {
            let request = post_json_as(&url, chat_for("gpt-4o-mini"), Some(token));
            let client = client.clone();
            async move { send(&client, request).await.status }
        };
        assert_eq!(status(&bob.token).await, StatusCode::OK);

        replace_file(&tokens_path, &alice.table);
        let removed = Instant::now();
        while status(&bob.token).await != StatusCode::UNAUTHORIZED {
            assert!(
                removed.elapsed() < Duration::from_secs(1),
                "bob's token still let in a second after it was removed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("bob refused {:?} after the edit", removed.elapsed());
        assert_eq!(status(&alice.token).await, StatusCode::OK);

        // A broken file is refused whole, with its place named; the running set keeps serving.
        let messages = proxy.notify.messages().len();
        replace_file(
            &tokens_path,
            &format!(
                "{}{}",
                alice.table, "[[token]]\nname = \"eve\"\nsha256 = \"00\"\n"
            ),
        );
        let at = proxy
            .notify
            .wait_for(messages, Duration::from_secs(5), "a failed reload", |m| {
                m.contains("last reload FAILED")
            });
        let status_line = &proxy.notify.messages()[at];
        let line = alice.table.lines().count() + 3;
        assert!(
            status_line.contains(&format!("tokens.toml:{line}:10: sha256 is 64 hex digits")),
            "{status_line}"
        );
        assert_eq!(status(&alice.token).await, StatusCode::OK);
        assert_eq!(status(&bob.token).await, StatusCode::UNAUTHORIZED);
        let check = std::process::Command::new(BIN)
            .arg("check")
            .arg("--config")
            .arg(&proxy.config_path)
            .output()
            .unwrap();
        assert!(!check.status.success());
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert!(
            stderr.contains(&format!("tokens.toml:{line}:10: ")),
            "{stderr}"
        );
    })
    .await;
}

#[test]
fn a_key_file_others_may_read_is_refused_unless_systemd_made_it() {
    let dir = tempfile::tempdir().unwrap();
    let alice = issue("alice");
    std::fs::write(dir.path().join("tokens.toml"), &alice.table).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("listen = [\"127.0.0.1:0\"]\n{TOKENS_AUTH}"),
    )
    .unwrap();
    let check = |env: Option<&Path>| {
        let mut command = std::process::Command::new(BIN);
        command.arg("check").arg("--config").arg(&config);
        command.env_remove("CREDENTIALS_DIRECTORY");
        if let Some(dir) = env {
            command.env("CREDENTIALS_DIRECTORY", dir);
        }
        let out = command.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(UPSTREAM_KEY), "the key was printed: {text}");
        (out.status.success(), text)
    };
    write_key(dir.path(), 0o644);
    let (ok, text) = check(None);
    assert!(!ok, "{text}");
    assert!(
        text.contains("may be read by others than its owner (mode 644)"),
        "{text}"
    );
    assert!(text.contains("config.toml:4:21: "), "{text}");

    write_key(dir.path(), 0o600);
    let (ok, text) = check(None);
    assert!(ok, "{text}");

    // A credential: the relative name is looked up in $CREDENTIALS_DIRECTORY, whatever its mode.
    std::fs::remove_file(dir.path().join("openai-key")).unwrap();
    let (ok, text) = check(None);
    assert!(!ok, "{text}");
    let credentials = tempfile::tempdir().unwrap();
    write_key(credentials.path(), 0o440);
    let (ok, text) = check(Some(credentials.path()));
    assert!(ok, "{text}");
}

/// A WebSocket through the proxy and the answer to its handshake, or why it failed.
type Handshake = Result<
    (
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
>;

/// A Realtime WebSocket as a browser opens it: the token as a subprotocol.
async fn realtime(proxy: &Proxy, token: &str) -> Handshake {
    let protocols = format!("realtime, openai-insecure-api-key.{token}, openai-beta.realtime-v1");
    realtime_offering(proxy, &protocols).await
}

/// A Realtime WebSocket offering these subprotocols.
async fn realtime_offering(proxy: &Proxy, protocols: &str) -> Handshake {
    let url = format!(
        "ws://{}/v1/realtime?model=gpt-4o-realtime-preview",
        proxy.http.unwrap()
    );
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().unwrap());
    tokio_tungstenite::connect_async(request).await
}

/// An upstream that selects the subprotocol carrying the key (the fake one selects the first
/// offered) does not show the key to the client: the client sees its own token's entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_selects_the_key_subprotocol_does_not_show_the_key() {
    bounded(20, async {
        let alice = issue("alice");
        let (_pki, upstream, proxy) = setup(&alice.table, &[]).await;
        let offered = format!("openai-insecure-api-key.{}, realtime", alice.token);
        let (ws, response) = realtime_offering(&proxy, &offered)
            .await
            .expect("upgrade through the proxy");
        let selected = response.headers()["sec-websocket-protocol"]
            .to_str()
            .unwrap();
        assert!(
            !selected.contains(UPSTREAM_KEY),
            "the key reached the client: {selected}"
        );
        assert_eq!(selected, format!("openai-insecure-api-key.{}", alice.token));
        let seen = upstream.last();
        assert!(
            seen.headers["sec-websocket-protocol"]
                .to_str()
                .unwrap()
                .starts_with(&format!("openai-insecure-api-key.{UPSTREAM_KEY}"))
        );
        drop(ws);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_websocket_with_the_token_as_a_subprotocol() {
    bounded(20, async {
        let alice = issue("alice");
        let (_pki, upstream, proxy) = setup(&alice.table, &[]).await;
        let (mut ws, response) = realtime(&proxy, &alice.token)
            .await
            .expect("upgrade through the proxy");
        assert_eq!(response.headers()["sec-websocket-protocol"], "realtime");
        ws.send(Message::text("{\"type\":\"session.update\"}"))
            .await
            .unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text("{\"type\":\"session.update\"}")
        );
        ws.close(None).await.unwrap();
        let seen = upstream.last();
        assert_eq!(
            seen.headers["sec-websocket-protocol"],
            format!("realtime, openai-insecure-api-key.{UPSTREAM_KEY}, openai-beta.realtime-v1")
        );
        assert_no_token(&seen, &alice.token);

        let unknown = issue("nobody");
        match realtime(&proxy, &unknown.token).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            }
            other => panic!("expected a 401, got {:?}", other.map(|(_, r)| r)),
        }
        assert_eq!(
            upstream.received().len(),
            1,
            "the refused one never went up"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_and_the_tokens_never_reach_the_log_even_at_trace_level() {
    bounded(40, async {
        let (alice, carol, nobody) = (issue("alice"), issue("carol"), issue("nobody"));
        let tokens = format!("{}{}", alice.table, limited(&carol));
        let (_pki, _upstream, proxy) = setup(&tokens, &[("RUST_LOG", "trace")]).await;
        let url = proxy.url("/v1/chat/completions");
        for client in [http_client(), http2_client()] {
            for (token, model, status) in [
                (&alice.token, "gpt-4o", StatusCode::OK),
                (&carol.token, "gpt-4o", StatusCode::FORBIDDEN),
                (&nobody.token, "gpt-4o", StatusCode::UNAUTHORIZED),
            ] {
                let answer = send(&client, post_json_as(&url, chat_for(model), Some(token))).await;
                assert_eq!(answer.status, status);
            }
        }
        let (mut ws, _) = realtime(&proxy, &alice.token).await.unwrap();
        ws.send(Message::text("hello")).await.unwrap();
        ws.next().await.unwrap().unwrap();
        ws.close(None).await.unwrap();
        proxy.signal("HUP");
        let logs = eventually(Duration::from_secs(5), "the reload's log line", || {
            let logs = proxy.logs();
            logs.contains("config reloaded").then_some(logs)
        })
        .await;
        assert!(logs.lines().count() > 50, "trace logging is on");
        assert!(logs.contains("token=carol"), "the log names the tokens");
        let notify = proxy.notify.messages().join("\n");
        for secret in [UPSTREAM_KEY, &alice.token, &carol.token, &nobody.token] {
            assert!(!logs.contains(secret), "a secret reached the log");
            assert!(!notify.contains(secret), "a secret reached systemd");
        }
    })
    .await;
}
