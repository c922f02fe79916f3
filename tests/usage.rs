//! Token usage read from the upstream's answers as they pass: the access log line of each
//! request carries the exact figures and model, and the client gets the upstream's bytes as
//! they were sent.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio_tungstenite::tungstenite::Message;

/// What the scripted upstream answers every request with: these chunks, in turn.
#[derive(Clone)]
struct Script {
    content_type: &'static str,
    encoding: Option<&'static str>,
    chunks: Vec<Bytes>,
}

impl Script {
    fn new(content_type: &'static str, body: impl AsRef<[u8]>, pieces: usize) -> Self {
        // Cut at odd places: inside keys, strings and numbers.
        let body = body.as_ref();
        let size = body.len().div_ceil(pieces).max(1);
        let chunks = body.chunks(size).map(Bytes::copy_from_slice).collect();
        Self {
            content_type,
            encoding: None,
            chunks,
        }
    }

    fn body(&self) -> Bytes {
        self.chunks.concat().into()
    }
}

/// An upstream that answers every request with its script, each chunk a frame of its own, and
/// keeps the request heads and bodies it got.
struct Scripted {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    _server: TlsServer,
}

impl Scripted {
    async fn start(pki: &Pki, script: Script) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let kept = received.clone();
        let server = TlsServer::start(pki.server.clone(), move |stream, _| {
            let (kept, script) = (kept.clone(), script.clone());
            serve_http(stream, move |request| {
                answer(request, kept.clone(), script.clone())
            })
        })
        .await;
        Self {
            addr: server.addr,
            received,
            _server: server,
        }
    }

    fn config(&self, pki: &Pki, extra: &str) -> String {
        format!(
            "listen = [\"127.0.0.1:0\"]\n{extra}\n[upstream]\nurl = \"https://127.0.0.1:{}\"\nhost = \"api.openai.com\"\nca_file = \"{}\"\n",
            self.addr.port(),
            pki.ca_pem.display()
        )
    }

    fn last_body(&self) -> (HeaderMap, Bytes) {
        self.received.lock().unwrap().last().cloned().unwrap()
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    kept: Arc<Mutex<Vec<(HeaderMap, Bytes)>>>,
    script: Script,
) -> Response<UpBody> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    kept.lock().unwrap().push((parts.headers, body));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    tokio::spawn(async move {
        for chunk in script.chunks {
            if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                return;
            }
            // Shapes the stream (each chunk its own read at the proxy); no test waits on it.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut response = Response::builder().header("content-type", script.content_type);
    if let Some(encoding) = script.encoding {
        response = response.header("content-encoding", encoding);
    }
    response
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

/// The fields of the access log line of request `id`, once it is written.
async fn access_fields(proxy: &Proxy, id: &str) -> HashMap<String, String> {
    let needle = format!("request_id={id}");
    let line = eventually(Duration::from_secs(10), "the access log line", || {
        proxy
            .logs()
            .lines()
            .find(|l| l.contains(&needle) && l.contains(" duration_ms="))
            .map(str::to_owned)
    })
    .await;
    line.split_whitespace()
        .filter_map(|word| word.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Checks the usage fields of a line exactly: the figures (prompt, completion, cached,
/// reasoning), or `usage=` with the reason they are not known; and the model.
fn assert_usage(
    fields: &HashMap<String, String>,
    figures: Option<[u64; 4]>,
    unknown: Option<&str>,
    model: Option<&str>,
) {
    let names = [
        "prompt_tokens",
        "completion_tokens",
        "cached_tokens",
        "reasoning_tokens",
    ];
    for (i, name) in names.iter().enumerate() {
        let expected = figures.map(|f| f[i].to_string());
        assert_eq!(fields.get(*name), expected.as_ref(), "{name} in {fields:?}");
    }
    assert_eq!(
        fields.get("usage").map(String::as_str),
        unknown,
        "{fields:?}"
    );
    assert_eq!(fields.get("model").map(String::as_str), model, "{fields:?}");
}

/// Posts `body` to `path` through a proxy in front of an upstream that answers `script`;
/// checks that the client got the upstream's bytes, and returns the access log fields.
async fn through_proxy(
    script: Script,
    path: &str,
    body: serde_json::Value,
    http2: bool,
) -> HashMap<String, String> {
    let pki = Pki::new();
    let upstream = Scripted::start(&pki, script.clone()).await;
    let proxy = Proxy::start(&upstream.config(&pki, ""));
    let client = if http2 { http2_client() } else { http_client() };
    let mut request = post_json(&proxy.url(path), body);
    // As the SDKs send it: the upstream may compress whatever it answers.
    let accepted = http::HeaderValue::from_static("gzip, deflate, br");
    request.headers_mut().insert("accept-encoding", accepted);
    let answer = send(&client, request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        upstream.last_body().0["accept-encoding"],
        "gzip, deflate, br"
    );
    assert_eq!(
        answer.body,
        script.body(),
        "the client got the upstream's bytes"
    );
    let id = answer.headers["x-proxy-request-id"].to_str().unwrap();
    access_fields(&proxy, id).await
}

const CHAT: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":"The \"usage\" key: {\"prompt_tokens\": 999}"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1234,"completion_tokens":567,"total_tokens":1801,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":320,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"system_fingerprint":"fp_1"}"#;

const RESPONSES: &str = r#"{"id":"resp_1","object":"response","created_at":1,"status":"completed","model":"o4-mini-2025-04-16","output":[{"type":"reasoning","id":"rs_1","summary":[]},{"type":"message","id":"msg_1","role":"assistant","content":[{"type":"output_text","text":"Four.","annotations":[]}]}],"usage":{"input_tokens":75,"input_tokens_details":{"cached_tokens":0},"output_tokens":1186,"output_tokens_details":{"reasoning_tokens":1152},"total_tokens":1261}}"#;

const EMBEDDINGS: &str = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292,0.015797347]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_are_counted_exactly_over_http1_and_http2() {
    bounded(60, async {
        let cases = [
            (
                "/v1/chat/completions",
                CHAT,
                [1234, 567, 1024, 320],
                "gpt-4o-2024-08-06",
            ),
            (
                "/v1/responses",
                RESPONSES,
                [75, 1186, 0, 1152],
                "o4-mini-2025-04-16",
            ),
            (
                "/v1/embeddings",
                EMBEDDINGS,
                [8, 0, 0, 0],
                "text-embedding-3-small",
            ),
        ];
        for (path, body, figures, model) in cases {
            for http2 in [false, true] {
                let script = Script::new("application/json", body, 7);
                let request = serde_json::json!({"model": "m", "input": "x"});
                let fields = through_proxy(script, path, request, http2).await;
                assert_usage(&fields, Some(figures), None, Some(model));
            }
        }
    })
    .await;
}

fn chat_chunk(content: &str) -> String {
    format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
    )
}

const RESPONSES_SSE: &str = concat!(
    "event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"status\":\"in_progress\",\"model\":\"gpt-4.1-2025-04-14\",\"output\":[],\"usage\":null}}\n\n",
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":1,\"delta\":\"Hi\"}\n\n",
    "event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":2,\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"model\":\"gpt-4.1-2025-04-14\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hi\"}]}],\"usage\":{\"input_tokens\":37,\"input_tokens_details\":{\"cached_tokens\":12},\"output_tokens\":11,\"output_tokens_details\":{\"reasoning_tokens\":3},\"total_tokens\":48}}}\n\n",
);

/// A streamed chat completion's last chunk (asked for with `stream_options.include_usage`) and
/// a streamed Responses call's `response.completed` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_answers_are_counted_from_their_usage_events() {
    bounded(30, async {
        let mut chat = chat_chunk("Hel") + &chat_chunk("lo");
        chat.push_str("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":17,\"completion_tokens\":2,\"total_tokens\":19,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0}}}\n\ndata: [DONE]\n\n");
        let cases = [
            ("/v1/chat/completions", chat.as_str(), 9, false, [17, 2, 0, 0], "gpt-4o-mini-2024-07-18"),
            ("/v1/responses", RESPONSES_SSE, 11, true, [37, 11, 12, 3], "gpt-4.1-2025-04-14"),
        ];
        for (path, stream, pieces, http2, figures, model) in cases {
            let script = Script::new("text/event-stream; charset=utf-8", stream, pieces);
            let request = serde_json::json!({"model": "m", "stream": true,
                "stream_options": {"include_usage": true}});
            let fields = through_proxy(script, path, request, http2).await;
            assert_usage(&fields, Some(figures), None, Some(model));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_usage_or_a_compressed_body_is_logged_as_unknown() {
    bounded(30, async {
        let stream = chat_chunk("Hi") + "data: [DONE]\n\n";
        let script = Script::new("text/event-stream", &stream, 3);
        let request = serde_json::json!({"model": "gpt-4o-mini", "stream": true});
        let fields = through_proxy(script, "/v1/chat/completions", request, false).await;
        assert_usage(
            &fields,
            None,
            Some("unknown"),
            Some("gpt-4o-mini-2024-07-18"),
        );

        // An encoding not decoded: passed on unread, as it came.
        let mut script = Script::new("application/json", b"\x28\xb5\x2f\xfdzstd", 2);
        script.encoding = Some("zstd");
        let fields = through_proxy(script, "/v1/embeddings", serde_json::json!({}), true).await;
        assert_usage(&fields, None, Some("compressed"), None);

        // Not the gzip it says it is: passed on as it came all the same.
        let mut script = Script::new("application/json", b"{\"not\": \"gzip\"}", 2);
        script.encoding = Some("gzip");
        let fields = through_proxy(script, "/v1/embeddings", serde_json::json!({}), false).await;
        assert_usage(&fields, None, Some("corrupt"), None);

        // An answer with no usage to show is not metered: no usage field at all.
        let script = Script::new("application/json", EMBEDDINGS, 1);
        let fields = through_proxy(script, "/v1/moderations", serde_json::json!({}), false).await;
        assert_usage(&fields, None, None, None);
    })
    .await;
}

/// Collects what an encoder writes, a chunk per flush: what a compressing server sends.
#[derive(Default)]
struct Flushed {
    chunks: Vec<Bytes>,
    pending: Vec<u8>,
}

impl std::io::Write for &mut Flushed {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if !self.pending.is_empty() {
            let chunk = std::mem::take(&mut self.pending);
            self.chunks.push(chunk.into());
        }
        Ok(())
    }
}

/// An upstream's answer compressed as `encoding` says (`deflate-raw`: deflate without zlib's
/// wrapping, sent as `deflate` as some servers do), its compressor flushed after each piece.
fn compressed(content_type: &'static str, encoding: &'static str, pieces: &[&str]) -> Script {
    use std::io::Write;
    let mut out = Flushed::default();
    let level = flate2::Compression::fast();
    let mut encoder: Box<dyn Write + '_> = match encoding {
        "gzip" => Box::new(flate2::write::GzEncoder::new(&mut out, level)),
        "deflate" => Box::new(flate2::write::ZlibEncoder::new(&mut out, level)),
        "deflate-raw" => Box::new(flate2::write::DeflateEncoder::new(&mut out, level)),
        "br" => Box::new(brotli::CompressorWriter::new(&mut out, 4096, 4, 20)),
        _ => unreachable!("{encoding}"),
    };
    for piece in pieces {
        encoder.write_all(piece.as_bytes()).unwrap();
        encoder.flush().unwrap();
    }
    // Dropped, the encoder writes the stream's end.
    drop(encoder);
    (&mut out).flush().unwrap();
    Script {
        content_type,
        encoding: Some(encoding.trim_end_matches("-raw")),
        chunks: out.chunks,
    }
}

/// What the SDKs ask for (`Accept-Encoding: gzip, deflate, br`) and what comes back: the
/// figures are read from the decoded text, and the client gets the compressed bytes the
/// upstream sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_answers_are_decoded_for_their_figures() {
    bounded(90, async {
        let mut chat = chat_chunk("Hel") + &chat_chunk("lo");
        chat.push_str("data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[],\"usage\":{\"prompt_tokens\":17,\"completion_tokens\":2,\"total_tokens\":19,\"prompt_tokens_details\":{\"cached_tokens\":5},\"completion_tokens_details\":{\"reasoning_tokens\":0}}}\n\ndata: [DONE]\n\n");
        let events: Vec<&str> = chat.split_inclusive("\n\n").collect();
        for (i, encoding) in ["gzip", "deflate", "deflate-raw", "br"].into_iter().enumerate() {
            let http2 = i % 2 == 1;
            let script = compressed("application/json", encoding, &[CHAT]);
            let request = serde_json::json!({"model": "gpt-4o"});
            let fields = through_proxy(script, "/v1/chat/completions", request, http2).await;
            let figures = Some([1234, 567, 1024, 320]);
            assert_usage(&fields, figures, None, Some("gpt-4o-2024-08-06"));

            let script = compressed("text/event-stream; charset=utf-8", encoding, &events);
            assert!(script.chunks.len() >= events.len(), "{encoding}: a chunk per event");
            let request = serde_json::json!({"model": "gpt-4o-mini", "stream": true,
                "stream_options": {"include_usage": true}});
            let fields = through_proxy(script, "/v1/chat/completions", request, !http2).await;
            let model = Some("gpt-4o-mini-2024-07-18");
            assert_usage(&fields, Some([17, 2, 5, 0]), None, model);
        }
    })
    .await;
}

fn response_done(input: u64, output: u64, cached: u64) -> String {
    serde_json::json!({
        "type": "response.done", "event_id": "event_1",
        "response": {"object": "realtime.response", "id": "resp_1", "status": "completed",
            "output": [{"type": "message", "content": [{"type": "audio", "transcript": "Hi"}]}],
            "usage": {"total_tokens": input + output, "input_tokens": input, "output_tokens": output,
                "input_token_details": {"cached_tokens": cached, "text_tokens": input - cached, "audio_tokens": 0},
                "output_token_details": {"text_tokens": output, "audio_tokens": 0}}}
    })
    .to_string()
}

/// The fake upstream echoes what the client sends: the client sends what a Realtime server
/// would, and the proxy reads it on its way back down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_realtime_session_is_counted_from_its_response_done_events() {
    bounded(30, async {
        let (_pki, _upstream, proxy) = proxy_and_upstream("").await;
        let url = format!(
            "ws://{}/v1/realtime?model=gpt-4o-realtime-preview",
            proxy.http.unwrap()
        );
        let (mut ws, response) = tokio_tungstenite::connect_async(url).await.unwrap();
        let id = response.headers()["x-proxy-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let events = [
            r#"{"type":"session.created","event_id":"e0","session":{"id":"sess_1","object":"realtime.session","model":"gpt-4o-realtime-preview-2024-12-17"}}"#.to_owned(),
            response_done(120, 45, 64),
            r#"{"type":"rate_limits.updated","rate_limits":[]}"#.to_owned(),
            response_done(300, 80, 0),
        ];
        for event in &events {
            ws.send(Message::text(event.as_str())).await.unwrap();
            let echoed = ws.next().await.unwrap().unwrap();
            assert_eq!(echoed, Message::text(event.as_str()), "unchanged");
        }
        assert!(
            !proxy.logs().contains(&format!("request_id={id}")),
            "the line is written when the session ends"
        );
        ws.close(None).await.unwrap();
        drop(ws);
        let fields = access_fields(&proxy, &id).await;
        assert_eq!(fields["status"], "101");
        assert_usage(
            &fields,
            Some([420, 125, 64, 0]),
            None,
            Some("gpt-4o-realtime-preview-2024-12-17"),
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_asks_for_the_usage_chunk_only_where_it_is_missing() {
    bounded(30, async {
        let pki = Pki::new();
        let script = Script::new("application/json", CHAT, 1);
        let upstream = Scripted::start(&pki, script).await;
        let on = Proxy::start(&upstream.config(&pki, "[limits]\nstream_usage = true\n"));
        let client = http_client();
        let sent =
            r#"{"model":"gpt-4o-mini", "stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let request = Request::post(on.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(sent.as_bytes())))
            .unwrap();
        assert_eq!(send(&client, request).await.status, StatusCode::OK);
        let (headers, body) = upstream.last_body();
        let expected = format!(
            r#"{{"stream_options":{{"include_usage":true}},{}"#,
            &sent[1..]
        );
        assert_eq!(body, expected.as_bytes());
        assert_eq!(headers["content-length"], expected.len().to_string());

        // Already asked (or declined), not streamed, or another path: as it came.
        let unchanged = [
            (
                "/v1/chat/completions",
                serde_json::json!({"stream": true, "stream_options": {"include_usage": false}}),
            ),
            ("/v1/chat/completions", serde_json::json!({"stream": false})),
            ("/v1/responses", serde_json::json!({"stream": true})),
        ];
        for (path, json) in unchanged {
            let answer = send(&client, post_json(&on.url(path), json.clone())).await;
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(upstream.last_body().1, json.to_string());
        }

        // Off by default.
        let off = Proxy::start(&upstream.config(&pki, ""));
        let json = serde_json::json!({"stream": true, "model": "gpt-4o-mini"});
        let answer = send(
            &client,
            post_json(&off.url("/v1/chat/completions"), json.clone()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(upstream.last_body().1, json.to_string());
    })
    .await;
}
