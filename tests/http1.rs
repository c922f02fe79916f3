//! The proxy's own HTTP/1.1 server, spoken to byte by byte over real sockets: framing both ways,
//! pipelining, HTTP/1.0, `Expect: 100-continue`, keep-alive, and the OpenAI-shaped answers to
//! requests that do not parse. (The SDK tests and tests/forwarding.rs cover it with real clients.)

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;

fn post(path: &str, body: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer sk-test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_do_not_parse_get_an_openai_shaped_error() {
    bounded(30, async {
        let proxy = Proxy::start(&down_upstream_config(""));
        let cases: [(&str, &[u8], &str); 5] = [
            (
                "a header line without a colon",
                b"GET /v1/models HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
                "400",
            ),
            (
                "both framings (request smuggling)",
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "400",
            ),
            (
                "two different lengths",
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
                "400",
            ),
            (
                "a coding the proxy cannot frame",
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
                "400",
            ),
            ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "400"),
        ];
        for (what, request, status) in cases {
            let response = exchange(&proxy, request).await;
            assert!(
                response.starts_with(&format!("HTTP/1.1 {status} ")),
                "{what}: {response}"
            );
            assert!(response.contains("connection: close\r\n"), "{what}: {response}");
            assert!(response.contains("x-proxy-request-id: "), "{what}: {response}");
            let error: serde_json::Value = serde_json::from_str(body_of(&response)).unwrap();
            assert_eq!(error["error"]["code"], "malformed_request", "{what}");
            assert_eq!(error["error"]["type"], "invalid_request_error", "{what}");
        }

        let huge = format!(
            "GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(70 << 10)
        );
        let response = exchange(&proxy, huge.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
        let error: serde_json::Value = serde_json::from_str(body_of(&response)).unwrap();
        assert_eq!(error["error"]["code"], "request_headers_too_large");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_request_body_arrives_whole() {
    bounded(30, async {
        let (_pki, upstream, proxy) = proxy_and_upstream("").await;
        // Odd chunk sizes, an extension, upper-case hex and a trailer.
        let (a, rest) = CHAT.split_at(7);
        let (b, c) = rest.split_at(30);
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             {:x}\r\n{a}\r\n{:X};ext=1\r\n{b}\r\n{:x}\r\n{c}\r\n0\r\nX-Trailer: t\r\n\r\n",
            a.len(),
            b.len(),
            c.len()
        );
        // Sent in pieces that cut through the framing, as a slow client's writes arrive.
        let mut stream = connect(&proxy).await;
        for piece in request.as_bytes().chunks(5) {
            stream.write_all(piece).await.unwrap();
            stream.flush().await.unwrap();
        }
        let response = read_to_close(&mut stream).await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        assert!(body_of(&response).contains("chat.completion"), "{response}");
        assert_eq!(upstream.last().body, CHAT.as_bytes());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    bounded(30, async {
        let (_pki, _upstream, proxy) = proxy_and_upstream("").await;
        let request = format!(
            "{}{}",
            post("/v1/embeddings", "{}", ""),
            post("/v1/chat/completions", CHAT, "Connection: close\r\n")
        );
        let response = exchange(&proxy, request.as_bytes()).await;
        let embedding = response.find("\"embedding\"").expect("the first answer");
        let chat = response.find("chat.completion").expect("the second answer");
        assert!(embedding < chat, "{response}");
        assert_eq!(response.matches("HTTP/1.1 200 ").count(), 2, "{response}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_head_and_expect_continue() {
    bounded(30, async {
        let (_pki, upstream, proxy) = proxy_and_upstream("").await;

        // HTTP/1.0 without keep-alive: answered in 1.0 and closed.
        let request = post("/v1/chat/completions", CHAT, "").replace("HTTP/1.1", "HTTP/1.0");
        let response = exchange(&proxy, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.0 200 "), "{response}");
        assert!(!response.contains("transfer-encoding"), "{response}");
        assert!(body_of(&response).contains("chat.completion"), "{response}");

        // HEAD: the head alone, and the connection goes on to the next request.
        let request = "HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let response = exchange(&proxy, request.as_bytes()).await;
        let (head_answer, get_answer) = response
            .split_once("\r\n\r\n")
            .expect("a complete first head");
        assert!(head_answer.starts_with("HTTP/1.1 "), "{response}");
        assert!(get_answer.starts_with("HTTP/1.1 "), "no body after HEAD: {response}");

        // Expect: 100-continue: the client waits for the interim answer before its body.
        let mut stream = connect(&proxy).await;
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            CHAT.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let interim = read_until(&mut stream, "\r\n\r\n").await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(CHAT.as_bytes()).await.unwrap();
        let response = read_to_close(&mut stream).await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        assert!(
            !upstream.last().headers.contains_key("expect"),
            "the expectation was this hop's"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_alive_connections_serve_many_requests_then_close_when_idle() {
    bounded(30, async {
        let (_pki, _upstream, proxy) =
            proxy_and_upstream("[server]\nkeepalive_timeout = \"300ms\"").await;
        let mut stream = connect(&proxy).await;
        for _ in 0..20 {
            stream
                .write_all(post("/v1/chat/completions", CHAT, "").as_bytes())
                .await
                .unwrap();
            // Content-Length framing: the answer ends where its length says.
            let head = read_until(&mut stream, "\r\n\r\n").await;
            assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .expect("a length")
                .trim()
                .parse()
                .unwrap();
            let mut body = body_of(&head).as_bytes().to_vec();
            while body.len() < length {
                let mut chunk = [0u8; 4096];
                let n = stream.read(&mut chunk).await.unwrap();
                assert!(n > 0);
                body.extend_from_slice(&chunk[..n]);
            }
            assert_eq!(body.len(), length);
        }
        // Idle past keepalive_timeout: the proxy closes it.
        let rest = read_to_close(&mut stream).await;
        assert_eq!(rest, "");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_closing_connection_still_ends_properly() {
    bounded(30, async {
        let (_pki, _upstream, proxy) = proxy_and_upstream("").await;
        let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#;
        let request = post(
            "/v1/chat/completions",
            body,
            "Connection: close\r\nx-test-events: 3\r\nx-test-gap-ms: 10\r\n",
        );
        let response = exchange(&proxy, request.as_bytes()).await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        assert!(
            response.contains("transfer-encoding: chunked\r\n"),
            "{response}"
        );
        assert!(response.contains("connection: close\r\n"), "{response}");
        assert!(response.contains("data: [DONE]"), "{response}");
        // The last chunk says the body is whole; without it a client sees a cut stream.
        assert!(response.ends_with("\r\n0\r\n\r\n"), "{response}");
    })
    .await;
}
