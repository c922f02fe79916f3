//! Several upstreams (`[upstreams.NAME]`) and `[[route]]`s: each request reaches the fake
//! upstream its route names, by model or by path, says which answered, and logs it.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;

/// The `[upstreams.NAME]` table that points at `upstream`, with `extra` keys.
fn named_toml(name: &str, upstream: &FakeUpstream, pki: &Pki, extra: &str) -> String {
    upstream.named_toml(pki, name, "") + extra
}

const ROUTES: &str = "[[route]]\nmodels = [\"gpt-4o*\"]\nupstreams = [\"second\"]\n\
                      [[route]]\npaths = [\"/v1/embeddings\"]\nupstreams = [\"second\"]\n";

/// Sends `request` and checks which upstream the proxy says answered.
async fn answered_by(client: &HttpClient, request: Request<Full<Bytes>>, name: &str) {
    let answer = send(client, request).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(answer.headers["x-openai-proxy-upstream"], name);
}

/// What `upstream` received, a line each: the path and the body's model.
fn paths(upstream: &FakeUpstream) -> Vec<String> {
    upstream
        .received()
        .iter()
        .map(|r| {
            let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
            format!(
                "{} {}",
                r.uri.parse::<http::Uri>().unwrap().path(),
                body["model"].as_str().unwrap_or("-")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_upstream_their_route_names() {
    bounded(30, async {
        let pki = Pki::new();
        let default = FakeUpstream::start(&pki, Alpn::Both).await;
        let second = FakeUpstream::start(&pki, Alpn::Both).await;
        let config = format!(
            "{}{}{ROUTES}",
            basic_config(&default, &pki, ""),
            named_toml("second", &second, &pki, "")
        );
        let proxy = Proxy::start(&config);
        let client = http_client();
        let chat_url = proxy.url("/v1/chat/completions");

        // By model: a JSON body's model, after a long messages array too.
        answered_by(
            &client,
            post_json(&chat_url, chat_for("gpt-4o-mini")),
            "second",
        )
        .await;
        let mut long = chat_for("gpt-3.5-turbo");
        long["messages"] = serde_json::json!(vec![
            serde_json::json!({"role": "user", "content": "x".repeat(1000)});
            50
        ]);
        long["model"] = "gpt-4o".into();
        answered_by(&client, post_json(&chat_url, long), "second").await;
        answered_by(
            &client,
            post_json(&chat_url, chat_for("gpt-3.5-turbo")),
            "default",
        )
        .await;
        // A stream goes where its model says, and flows.
        stream_chat(&client, &chat_url, "routed", 3, 5).await;
        // By path.
        let embeddings = serde_json::json!({"model": "text-embedding-3-small", "input": "hi"});
        answered_by(
            &client,
            post_json(&proxy.url("/v1/embeddings"), embeddings),
            "second",
        )
        .await;
        // No route matches: the default.
        let models = Request::get(proxy.url("/v1/models"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        answered_by(&client, models, "default").await;

        assert_eq!(
            paths(&second),
            [
                "/v1/chat/completions gpt-4o-mini",
                "/v1/chat/completions gpt-4o",
                "/v1/chat/completions gpt-4o-mini",
                "/v1/embeddings text-embedding-3-small"
            ]
        );
        assert_eq!(
            paths(&default),
            ["/v1/chat/completions gpt-3.5-turbo", "/v1/models -"]
        );
        eventually(
            Duration::from_secs(5),
            "access lines naming the upstream",
            || {
                let logs = proxy.logs();
                (logs.matches("upstream=second").count() == 4
                    && logs.matches("upstream=default").count() == 2)
                    .then_some(())
            },
        )
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_goes_in_the_upstreams_key_header() {
    bounded(30, async {
        let pki = Pki::new();
        let default = FakeUpstream::start(&pki, Alpn::Both).await;
        let azure = FakeUpstream::start(&pki, Alpn::Both).await;
        let alice = issue("alice");
        let config = format!(
            "{}{}[[route]]\npaths = [\"/v1/embeddings\"]\nupstreams = [\"azure\"]\n",
            basic_config(&default, &pki, TOKENS_AUTH),
            named_toml("azure", &azure, &pki, "key_header = \"api-key\"\n")
        );
        let proxy = Proxy::start_in(tokens_dir(&alice.table), &config, ProxyOptions::default());
        let client = http_client();
        let with_token = |path: &str, body: serde_json::Value| {
            post_json_as(&proxy.url(path), body, Some(&alice.token))
        };
        let embeddings = serde_json::json!({"model": "text-embedding-3-small", "input": "hi"});
        answered_by(&client, with_token("/v1/embeddings", embeddings), "azure").await;
        let seen = azure.last();
        assert_eq!(seen.headers["api-key"], UPSTREAM_KEY);
        assert!(seen.headers.get("authorization").is_none());
        answered_by(
            &client,
            with_token("/v1/chat/completions", chat_for("gpt-4o")),
            "default",
        )
        .await;
        let seen = default.last();
        assert_eq!(
            seen.headers["authorization"],
            format!("Bearer {UPSTREAM_KEY}")
        );
        assert!(seen.headers.get("api-key").is_none());
    })
    .await;
}

/// A token limited to some models, with routes by model: the model its check reads routes the
/// request, and a model it may not use is refused before any upstream sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_model_check_and_routes_by_model_agree() {
    bounded(30, async {
        let pki = Pki::new();
        let default = FakeUpstream::start(&pki, Alpn::Both).await;
        let second = FakeUpstream::start(&pki, Alpn::Both).await;
        let alice = issue("alice");
        let table = format!("{}models = [\"gpt-4o*\", \"gpt-3.5-turbo\"]\n", alice.table);
        let config = format!(
            "{}{}{ROUTES}",
            basic_config(&default, &pki, TOKENS_AUTH),
            named_toml("second", &second, &pki, "")
        );
        let proxy = Proxy::start_in(tokens_dir(&table), &config, ProxyOptions::default());
        let client = http_client();
        let chat_url = proxy.url("/v1/chat/completions");
        let chat = |model: &str| post_json_as(&chat_url, chat_for(model), Some(&alice.token));
        answered_by(&client, chat("gpt-4o-mini"), "second").await;
        answered_by(&client, chat("gpt-3.5-turbo"), "default").await;
        let refused = send(&client, chat("o1")).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{:?}", refused.body);
        assert_eq!(paths(&second), ["/v1/chat/completions gpt-4o-mini"]);
        assert_eq!(paths(&default), ["/v1/chat/completions gpt-3.5-turbo"]);
    })
    .await;
}

#[test]
fn a_route_to_an_unknown_upstream_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = check_in(
        dir.path(),
        "listen = [\"127.0.0.1:0\"]\n[upstreams.azure]\nurl = \"https://127.0.0.1:1\"\n\
         [[route]]\nmodels = [\"gpt-4o*\"]\nupstreams = [\"azure\", \"nowhere\"]\n",
    );
    assert!(!ok);
    assert!(text.contains("config.toml:6:23: "), "{text}");
    assert!(text.contains("no upstream is named \"nowhere\""), "{text}");
}
