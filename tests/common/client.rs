//! An HTTP client of the proxy (hyper's, HTTP/1.1 or HTTP/2), and the requests tests send.

use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn http2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

pub async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> Answer {
    let response = client.request(request).await.expect("the proxy answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the body arrives").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The client's own OpenAI key, as `post_json` and `stream_chat` send it.
pub const CLIENT_KEY: &str = "sk-test-SECRET-KEY-123";

pub fn post_json(url: &str, body: serde_json::Value) -> Request<Full<Bytes>> {
    post_json_as(url, body, Some(CLIENT_KEY))
}

/// A JSON POST with `bearer` as its key or token, or no Authorization at all.
pub fn post_json_as(
    url: &str,
    body: serde_json::Value,
    bearer: Option<&str>,
) -> Request<Full<Bytes>> {
    let mut request = Request::post(url).header("content-type", "application/json");
    if let Some(bearer) = bearer {
        request = request.header("authorization", format!("Bearer {bearer}"));
    }
    request
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// A chat completion request (`chat()`) with `token` as its bearer.
pub fn chat_with_token(url: &str, token: &str) -> Request<Full<Bytes>> {
    post_json_as(url, chat(), Some(token))
}

/// A one-message chat completion request body for gpt-4o-mini.
pub fn chat() -> serde_json::Value {
    chat_for("gpt-4o-mini")
}

/// A one-message chat completion request body for `model`.
pub fn chat_for(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// A GET through the proxy; the status, or None if the connection failed.
pub async fn status(client: &HttpClient, url: &str) -> Option<StatusCode> {
    let request = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    let response = client.request(request).await.ok()?;
    let status = response.status();
    response.into_body().collect().await.ok()?;
    Some(status)
}

/// A streamed chat completion through the proxy; returns when each event arrived.
pub async fn stream_chat(
    client: &HttpClient,
    url: &str,
    id: &str,
    events: u64,
    gap_ms: u64,
) -> Vec<Instant> {
    let request = Request::post(url)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test-SECRET-KEY-123")
        .header("x-test-stream", id)
        .header("x-test-events", events.to_string())
        .header("x-test-gap-ms", gap_ms.to_string())
        .body(Full::new(Bytes::from(
            serde_json::json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        )))
        .unwrap();
    let response = client.request(request).await.expect("the stream starts");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    let mut pending = String::new();
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the stream is not cut");
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.push_str(std::str::from_utf8(data).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            if event.contains("[DONE]") {
                done = true;
            } else if event.contains("tok") {
                arrivals.push(Instant::now());
            }
        }
    }
    assert!(done, "the stream ended with [DONE]");
    assert_eq!(arrivals.len() as u64, events, "every event arrived");
    arrivals
}
