//! The proxy's HTTP/1.1 client side, against a raw upstream: a TLS listener (ALPN http/1.1
//! only) that reads the request bytes off the socket and writes exactly the response bytes each
//! test chooses. Framings (chunked, by length, by close), connection reuse and closing, interim
//! responses, malformed and cut responses, early answers, HEAD, upgrades, and the request as the
//! upstream sees it. These pin behaviour, not the client that implements it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const KEY: &str = "Bearer sk-test-SECRET-KEY-123";
const WAIT: Duration = Duration::from_secs(10);

/// The send and receive queues (bytes) of the established TCP connections on 127.0.0.1 that
/// `wanted(local port, remote port)` picks, from /proc/net/tcp: what the kernel holds that one
/// side has not yet read, or could not yet send.
fn tcp_queues(wanted: impl Fn(u16, u16) -> bool) -> Vec<(u64, u64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |address: &str| u16::from_str_radix(address.split(':').nth(1).unwrap(), 16).unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state, queues) = (fields[1], fields[2], fields[3], fields[4]);
            if state != "01" || !wanted(port(local), port(remote)) {
                return None;
            }
            let (tx, rx) = queues.split_once(':').unwrap();
            Some((
                u64::from_str_radix(tx, 16).unwrap(),
                u64::from_str_radix(rx, 16).unwrap(),
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The client side.

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header("authorization", KEY)
        .body(Full::default())
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The cases.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_response_cut_anywhere_arrives_exactly() {
    bounded(30, async {
        let pki = Pki::new();
        let body = r#"{"id":"chatcmpl-chunked","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"pieces"}}]}"#;
        let (a, rest) = body.split_at(7);
        let (b, c) = rest.split_at(0x1a);
        // An extension, upper-case hex, a two-digit size, and trailer fields after the last chunk.
        let chunked = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
             {:x};x=y\r\n{a}\r\n{:X}\r\n{b}\r\n{:x}\r\n{c}\r\n0\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n",
            a.len(),
            b.len(),
            c.len()
        );
        let upstream = RawUpstream::start(&pki, move |mut conn| {
            let chunked = chunked.clone();
            async move {
                while let Some(seen) = conn.read_request().await {
                    if seen.path() == "/v1/chunked" {
                        // Three bytes at a time: through the size lines, the data, the trailers.
                        conn.write_in_pieces(&chunked, 3).await;
                    } else {
                        conn.write(answer_to(&seen)).await;
                    }
                }
            }
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let client = http_client();

        let answer = send(&client, get(&proxy.url("/v1/chunked"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(std::str::from_utf8(&answer.body).unwrap(), body);

        // The whole message was consumed, trailers included: the connection carries the next.
        let answer = send(&client, get(&proxy.url("/v1/after"))).await;
        assert_eq!(&answer.body[..], b"answer to /v1/after");
        let seen = upstream.seen();
        assert_eq!(seen.len(), 2);
        assert!(seen.iter().all(|s| s.conn == 1), "{seen:#?}");
        assert_eq!(upstream.connections(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_delimited_response_arrives_whole_and_the_next_request_dials_anew() {
    bounded(30, async {
        let pki = Pki::new();
        let body: String = (0..20_000).map(|i| format!("{i},")).collect();
        let upstream_body = body.clone();
        let upstream = RawUpstream::start(&pki, move |mut conn| {
            let body = upstream_body.clone();
            async move {
                while let Some(seen) = conn.read_request().await {
                    if seen.path() != "/v1/until-close" {
                        conn.write(answer_to(&seen)).await;
                        continue;
                    }
                    // Neither Content-Length nor Transfer-Encoding: the body ends with the
                    // connection.
                    conn.write("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                        .await;
                    conn.write_in_pieces(&body, 7000).await;
                    conn.close().await;
                    return;
                }
            }
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let client = http_client();

        let answer = send(&client, get(&proxy.url("/v1/until-close"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body.len(), body.len());
        assert!(answer.body == body.as_bytes(), "the body arrived whole");

        let answer = send(&client, get(&proxy.url("/v1/after"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(&answer.body[..], b"answer to /v1/after");
        assert_eq!(upstream.last().conn, 2, "on a new connection");
        assert_eq!(upstream.connections(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_responses_share_one_kept_alive_connection() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = RawUpstream::start(&pki, |conn| serve(conn, answer_to)).await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let client = http_client();
        for (i, path) in ["/v1/one", "/v1/two", "/v1/three"].iter().enumerate() {
            let url = proxy.url(path);
            let request = if i == 1 {
                post_json(&url, serde_json::from_str(CHAT).unwrap())
            } else {
                get(&url)
            };
            let answer = send(&client, request).await;
            assert_eq!(answer.status, StatusCode::OK);
            assert_eq!(answer.body, format!("answer to {path}").as_bytes());
        }
        let seen = upstream.seen();
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|s| s.conn == 1), "{seen:#?}");
        assert_eq!(upstream.connections(), 1, "one kept-alive connection");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_close_from_the_upstream_is_honoured() {
    bounded(30, async {
        let pki = Pki::new();
        // The upstream says close but keeps the connection open and would serve another request
        // on it: only the proxy's own reading of the field keeps it from reusing it.
        let upstream = RawUpstream::start(&pki, |conn| {
            serve(conn, |seen| {
                if seen.path() == "/v1/first" {
                    response(
                        "200 OK",
                        "Content-Type: text/plain\r\nConnection: close\r\n",
                        "first",
                    )
                } else {
                    answer_to(seen)
                }
            })
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let client = http_client();

        let answer = send(&client, get(&proxy.url("/v1/first"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(&answer.body[..], b"first");

        let answer = send(&client, get(&proxy.url("/v1/second"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(&answer.body[..], b"answer to /v1/second");
        assert_eq!(upstream.last().conn, 2, "the second request dialled anew");
        assert_eq!(upstream.connections(), 2);
        upstream
            .wait_ended(1, "the proxy to close the connection it was told to")
            .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_after_each_response_costs_no_request() {
    bounded(60, async {
        let pki = Pki::new();
        // Keep-alive as far as the response says, and closed right after it all the same.
        let upstream = RawUpstream::start(&pki, |mut conn| async move {
            if let Some(seen) = conn.read_request().await {
                let body = format!("{} bytes on connection {}", seen.body.len(), seen.conn);
                conn.write(response("200 OK", "Content-Type: text/plain\r\n", &body))
                    .await;
                conn.close().await;
            }
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let client = http_client();
        let chat: serde_json::Value = serde_json::from_str(CHAT).unwrap();
        for round in 0..20 {
            let request = post_json(&proxy.url("/v1/chat/completions"), chat.clone());
            let answer = send(&client, request).await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "round {round}: {}",
                String::from_utf8_lossy(&answer.body)
            );
            assert!(
                answer
                    .body
                    .starts_with(format!("{} bytes", chat.to_string().len()).as_bytes()),
                "round {round}: {}",
                String::from_utf8_lossy(&answer.body)
            );
            let seen = upstream.last();
            assert_eq!(seen.body, chat.to_string().as_bytes(), "round {round}");
        }
        assert_eq!(
            upstream.seen().len(),
            20,
            "each request reached the upstream once"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_responses_are_passed_over_for_the_final_one() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = RawUpstream::start(&pki, |mut conn| async move {
            while let Some(seen) = conn.read_request().await {
                if seen.path() == "/v1/hints" {
                    conn.write("HTTP/1.1 100 Continue\r\n\r\n").await;
                    conn.write(
                        "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n",
                    )
                    .await;
                    conn.write(ok("the final answer")).await;
                } else {
                    conn.write(answer_to(&seen)).await;
                }
            }
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let client = http_client();

        let answer = send(&client, get(&proxy.url("/v1/hints"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(&answer.body[..], b"the final answer");
        assert!(
            !answer.headers.contains_key("link"),
            "an interim response's fields are not the final one's"
        );

        // Nothing of the interim responses is left to be taken for the next response.
        let answer = send(&client, get(&proxy.url("/v1/after"))).await;
        assert_eq!(&answer.body[..], b"answer to /v1/after");
        assert_eq!(upstream.last().conn, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_response_head_is_a_502_in_openai_shape() {
    bounded(30, async {
        let pki = Pki::new();
        let malformed: [&[u8]; 4] = [
            b"HTTP/1.1 abc\r\nContent-Length: 2\r\n\r\nhi",
            b"HTTP/1.1 200 OK\r\nA header line without a colon\r\nContent-Length: 2\r\n\r\nhi",
            b"SMTP/1.0 220 mail.example.com ESMTP\r\n\r\n",
            b"\x16\x03\x03\x00\x02\x02\x28\xff\xfe\r\n\r\n",
        ];
        // After the bad bytes the upstream keeps the connection open: a proxy that took them
        // for the start of a response would wait, not answer.
        let upstream = RawUpstream::start(&pki, move |mut conn| async move {
            while let Some(seen) = conn.read_request().await {
                match seen.path().strip_prefix("/v1/bad/") {
                    Some(n) => conn.write(malformed[n.parse::<usize>().unwrap()]).await,
                    None => conn.write(answer_to(&seen)).await,
                }
            }
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let client = http_client();
        for n in 0..malformed.len() {
            let answer = send(&client, get(&proxy.url(&format!("/v1/bad/{n}")))).await;
            assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "case {n}");
            assert_eq!(answer.headers["content-type"], "application/json");
            let error = &answer.json()["error"];
            assert!(error["message"].is_string(), "case {n}: {error}");
            assert_eq!(error["type"], "upstream_error", "case {n}");
            assert_eq!(error["code"], "upstream_error", "case {n}");
            assert!(error["param"].is_null(), "case {n}");
            let conn = upstream.last().conn;
            upstream
                .wait_ended(conn, "the proxy to close the connection that failed")
                .await;

            let answer = send(&client, get(&proxy.url("/v1/good"))).await;
            assert_eq!(answer.status, StatusCode::OK, "after case {n}");
            assert_eq!(&answer.body[..], b"answer to /v1/good");
            assert_ne!(upstream.last().conn, conn, "not on the failed connection");
        }
    })
    .await;
}

/// The client's side of an upload the upstream refuses early: the head, then `size` bytes of
/// body (by length, or chunked), written from a task of its own while the answer is read.
async fn upload_refused_early(proxy: &Proxy, path: &str, size: usize, chunked: bool) -> String {
    let stream = connect(proxy).await;
    let (mut reader, mut writer) = stream.into_split();
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_owned()
    } else {
        format!("Content-Length: {size}")
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: {KEY}\r\nContent-Type: application/octet-stream\r\n{framing}\r\n\r\n"
    );
    let sending = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        let piece = vec![b'x'; 64 << 10];
        for _ in 0..size / piece.len() {
            if chunked {
                writer
                    .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                    .await?;
            }
            writer.write_all(&piece).await?;
            if chunked {
                writer.write_all(b"\r\n").await?;
            }
        }
        if chunked {
            writer.write_all(b"0\r\n\r\n").await?;
        }
        std::io::Result::Ok(())
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 16 << 10];
    // Until the whole JSON body (it ends with "}") or the end of the connection.
    while !(find(&out, b"\r\n\r\n").is_some() && out.ends_with(b"}")) {
        match tokio::time::timeout(WAIT, reader.read(&mut buf)).await {
            Ok(Ok(n @ 1..)) => out.extend_from_slice(&buf[..n]),
            Ok(Ok(0)) => break,
            Ok(Err(e)) => {
                out.extend_from_slice(format!("\n[read error: {e}]").as_bytes());
                break;
            }
            Err(_) => panic!(
                "no answer within {WAIT:?}; got {:?}",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    sending.abort();
    String::from_utf8_lossy(&out).into_owned()
}

const TOO_LARGE: &str = r#"{"error":{"message":"the upstream says: too large","type":"invalid_request_error","param":null,"code":"upstream_says_too_large"}}"#;

/// Answers /v1/uploads/* with 413 as soon as the head is in, without reading the body, then
/// closes: lingering when the path ends in /linger, at once otherwise.
async fn refuse_uploads(mut conn: Conn) {
    while let Some(mut seen) = conn.read_head().await {
        if seen.path().starts_with("/v1/uploads/") {
            conn.record(&seen);
            if seen.path().ends_with("/hold") {
                // Answered only once the proxy cannot send more: the window here is full and the
                // proxy holds a megabyte it cannot send, so its writes have stalled.
                let port = conn.stream.get_ref().0.local_addr().unwrap().port();
                eventually(WAIT, "the proxy's writes to stall", || {
                    let unread = tcp_queues(|local, _| local == port);
                    let unsent = tcp_queues(|_, remote| remote == port);
                    let stalled = unread.iter().any(|&(_, rx)| rx >= 64 << 10)
                        && unsent.iter().any(|&(tx, _)| tx >= 1 << 20);
                    stalled.then_some(())
                })
                .await;
            }
            let refusal = response(
                "413 Payload Too Large",
                "Content-Type: application/json\r\nConnection: close\r\n",
                TOO_LARGE,
            );
            conn.write(refusal).await;
            if seen.path().ends_with("/linger") {
                conn.linger_close().await;
            } else if seen.path().ends_with("/hold") {
                // Neither reads the rest nor closes: the proxy's writes stall.
                tokio::time::sleep(WAIT).await;
            } else {
                conn.close().await;
            }
            return;
        }
        if conn.read_body(&mut seen).await.is_none() {
            return;
        }
        conn.record(&seen);
        conn.write(answer_to(&seen)).await;
    }
}

/// The upstream's own 413, relayed to the client whole.
fn assert_the_upstreams_413(answer: &str, case: &str) {
    assert!(answer.starts_with("HTTP/1.1 413 "), "{case}: {answer}");
    assert_eq!(
        body_of(answer),
        TOO_LARGE,
        "{case}: the upstream's own answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_reaches_the_client_when_the_upstream_lingers() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = RawUpstream::start(&pki, refuse_uploads).await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        for chunked in [false, true] {
            let answer = upload_refused_early(&proxy, "/v1/uploads/linger", 4 << 20, chunked).await;
            assert_the_upstreams_413(&answer, &format!("chunked {chunked}"));
            let answer = send(&http_client(), get(&proxy.url("/v1/after"))).await;
            assert_eq!(answer.status, StatusCode::OK, "chunked {chunked}");
        }
    })
    .await;
}

/// The upstream closes with the body still arriving, so the proxy's next write fails (EPIPE, the
/// kernel having had a reset) while the 413 and the close_notify already sit in its receive
/// buffer, readable: a client that reads them after the failed write gets the 413 every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_reaches_the_client_when_the_upstream_closes_at_once() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = RawUpstream::start(&pki, refuse_uploads).await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        for round in 0..5 {
            for chunked in [false, true] {
                let answer =
                    upload_refused_early(&proxy, "/v1/uploads/abrupt", 4 << 20, chunked).await;
                assert_the_upstreams_413(&answer, &format!("round {round}, chunked {chunked}"));
                let answer = send(&http_client(), get(&proxy.url("/v1/after"))).await;
                assert_eq!(answer.status, StatusCode::OK, "chunked {chunked}");
            }
        }
    })
    .await;
}

/// The upstream answers and then neither reads the rest of the body nor closes: the proxy,
/// stalled writing the body, must notice the answer rather than wait for its response timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_413_reaches_the_client_when_the_upstream_stops_reading() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = RawUpstream::start(&pki, refuse_uploads).await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        for chunked in [false, true] {
            let answer = upload_refused_early(&proxy, "/v1/uploads/hold", 16 << 20, chunked).await;
            assert_the_upstreams_413(&answer, &format!("chunked {chunked}"));
        }
    })
    .await;
}

/// An unasked `100 Continue` while the body is still coming is passed over, and the rest of the
/// body still goes: the upstream that sent it is waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interim_response_mid_body_does_not_stop_the_body() {
    bounded(30, async {
        let pki = Pki::new();
        let continued = Arc::new(tokio::sync::Notify::new());
        let told = continued.clone();
        let upstream = RawUpstream::start(&pki, move |mut conn| {
            let told = told.clone();
            async move {
                while let Some(mut seen) = conn.read_head().await {
                    conn.write("HTTP/1.1 100 Continue\r\n\r\n").await;
                    // Told once the proxy has read the 100 off its socket (and so has acted on
                    // it), so that the rest of the body reaches the proxy only after that.
                    let port = conn.stream.get_ref().0.local_addr().unwrap().port();
                    eventually(WAIT, "the proxy to read the 100", || {
                        let unread = tcp_queues(|_, remote| remote == port);
                        unread.iter().all(|&(_, rx)| rx == 0).then_some(())
                    })
                    .await;
                    told.notify_one();
                    if conn.read_body(&mut seen).await.is_none() {
                        return;
                    }
                    conn.record(&seen);
                    conn.write(ok(&format!("{} bytes", seen.body.len()))).await;
                }
            }
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let mut stream = connect(&proxy).await;
        let half = "x".repeat(1000);
        stream
            .write_all(
                format!(
                    "POST /v1/files HTTP/1.1\r\nHost: proxy\r\nAuthorization: {KEY}\r\nContent-Length: 2000\r\n\r\n{half}"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        // The rest only once the 100 has gone out, so that it reaches the proxy mid-body.
        tokio::time::timeout(WAIT, continued.notified())
            .await
            .expect("the upstream got the request head");
        stream.write_all(half.as_bytes()).await.unwrap();
        let answer = read_until(&mut stream, "2000 bytes").await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert!(!answer.contains("100 Continue"), "the interim stays here");
        assert_eq!(upstream.last().body.len(), 2000);
    })
    .await;
}

/// A reused connection that closes without a word after taking a request: a GET goes again on
/// another connection, a POST does not, since the upstream may have acted on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_safe_to_repeat_go_again_on_a_connection_lost_unanswered() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = RawUpstream::start(&pki, |mut conn| async move {
            let mut answered = 0;
            while let Some(seen) = conn.read_request().await {
                if seen.path() == "/v1/lost" && answered > 0 {
                    conn.close().await;
                    return;
                }
                conn.write(answer_to(&seen)).await;
                answered += 1;
            }
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let client = http_client();
        let lost = |seen: &[Seen]| seen.iter().filter(|s| s.path() == "/v1/lost").count();

        let answer = send(&client, get(&proxy.url("/v1/first"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        let answer = send(&client, get(&proxy.url("/v1/lost"))).await;
        assert_eq!(answer.status, StatusCode::OK, "the GET went again");
        assert_eq!(&answer.body[..], b"answer to /v1/lost");
        assert_eq!(lost(&upstream.seen()), 2);

        let post = |path: &str| {
            Request::post(proxy.url(path))
                .header("authorization", KEY)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
                .unwrap()
        };
        let answer = send(&client, post("/v1/first")).await;
        assert_eq!(answer.status, StatusCode::OK);
        let answer = send(&client, post("/v1/lost")).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_GATEWAY,
            "the POST did not go again"
        );
        assert_eq!(answer.json()["error"]["type"], "upstream_error");
        assert_eq!(
            lost(&upstream.seen()),
            3,
            "the POST reached the upstream once"
        );

        // With an idempotency key, the upstream makes a repeat harmless: it goes again.
        let answer = send(&client, post("/v1/first")).await;
        assert_eq!(answer.status, StatusCode::OK);
        let mut keyed = post("/v1/lost");
        keyed
            .headers_mut()
            .insert("idempotency-key", "chat-42".parse().unwrap());
        let answer = send(&client, keyed).await;
        assert_eq!(answer.status, StatusCode::OK, "the keyed POST went again");
        assert_eq!(lost(&upstream.seen()), 5);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_response_with_a_length_has_no_body() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = RawUpstream::start(&pki, |conn| {
            serve(conn, |seen| {
                if seen.request_line.starts_with("HEAD ") {
                    // The length a GET would have had, and no body.
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n"
                        .to_owned()
                } else {
                    answer_to(seen)
                }
            })
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let client = http_client();

        let request = Request::head(proxy.url("/v1/models"))
            .header("authorization", KEY)
            .body(Full::default())
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), send(&client, request))
            .await
            .expect("the HEAD answer comes at once, no body awaited");
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.headers["content-length"], "1234");
        assert!(answer.body.is_empty());
        assert_eq!(upstream.last().request_line, "HEAD /v1/models HTTP/1.1");

        let answer = send(&client, get(&proxy.url("/v1/models"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(&answer.body[..], b"answer to /v1/models");
        assert_eq!(upstream.last().conn, 1, "the connection went on after the HEAD");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_request_body_reaches_the_upstream_exactly() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = RawUpstream::start(&pki, |conn| serve(conn, answer_to)).await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let body = format!(
            r#"{{"model":"gpt-4o-mini","input":"{}"}}"#,
            "0123456789abcdef".repeat(10_000)
        );
        let mut pieces = Vec::new();
        let mut rest = body.as_str();
        for size in [1, 10, 1000, 70_000] {
            let (piece, after) = rest.split_at(size);
            pieces.push(piece);
            rest = after;
        }
        pieces.push(rest);

        let mut stream = connect(&proxy).await;
        let head = format!(
            "POST /v1/embeddings HTTP/1.1\r\nHost: proxy\r\nAuthorization: {KEY}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        for piece in &pieces {
            stream.write_all(chunk(piece).as_bytes()).await.unwrap();
            stream.flush().await.unwrap();
        }
        stream.write_all(b"0\r\n\r\n").await.unwrap();
        let answer = read_to_close(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
        assert_eq!(body_of(&answer), "answer to /v1/embeddings");

        let seen = upstream.last();
        assert!(seen.body == body.as_bytes(), "the body arrived exactly");
        if !seen.chunked {
            assert_eq!(
                seen.header("content-length"),
                Some(body.len().to_string().as_str())
            );
        }
        assert!(
            !(seen.chunked && seen.header("content-length").is_some()),
            "one framing: {:?}",
            seen.headers
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_response_body_is_cut_for_the_client() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = RawUpstream::start(&pki, |mut conn| async move {
            while let Some(seen) = conn.read_request().await {
                if seen.path() == "/v1/short" {
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n";
                    conn.write(format!("{head}{}", "y".repeat(100))).await;
                    conn.close().await;
                    return;
                }
                conn.write(answer_to(&seen)).await;
            }
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));

        let response = http_client()
            .request(get(&proxy.url("/v1/short")))
            .await
            .expect("the head arrives");
        assert_eq!(response.status(), StatusCode::OK);
        match response.into_body().collect().await {
            Err(_) => {}
            Ok(body) => {
                let body = body.to_bytes();
                assert!(body.len() < 1000, "{} bytes of 1000 promised", body.len());
            }
        }

        let answer = send(&http_client(), get(&proxy.url("/v1/after"))).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(&answer.body[..], b"answer to /v1/after");
        assert_eq!(upstream.last().conn, 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_are_relayed_as_they_come() {
    bounded(30, async {
        let pki = Pki::new();
        let go = Arc::new(tokio::sync::Notify::new());
        let upstream_go = go.clone();
        let upstream = RawUpstream::start(&pki, move |mut conn| {
            let go = upstream_go.clone();
            async move {
                if conn.read_request().await.is_none() {
                    return;
                }
                conn.write(format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n{}",
                    chunk("data: {\"n\":1}\n\n")
                ))
                .await;
                go.notified().await;
                conn.write(format!("{}0\r\n\r\n", chunk("data: {\"n\":2}\n\ndata: [DONE]\n\n")))
                    .await;
                let _ = conn.read_request().await;
            }
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));

        let request = post_json(
            &proxy.url("/v1/chat/completions"),
            serde_json::json!({"model": "gpt-4o-mini", "stream": true}),
        );
        let response = http_client().request(request).await.expect("the stream starts");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let mut body = response.into_body();
        let mut got = String::new();
        while !got.contains("\n\n") {
            let frame = tokio::time::timeout(WAIT, body.frame())
                .await
                .unwrap_or_else(|_| {
                    panic!("the first event before the second is sent; got {got:?}")
                })
                .expect("the stream goes on")
                .expect("the stream is not cut");
            if let Some(data) = frame.data_ref() {
                got.push_str(std::str::from_utf8(data).unwrap());
            }
        }
        assert_eq!(got, "data: {\"n\":1}\n\n");

        go.notify_one();
        let rest = body.collect().await.expect("the stream ends whole").to_bytes();
        got.push_str(std::str::from_utf8(&rest).unwrap());
        assert_eq!(got, "data: {\"n\":1}\n\ndata: {\"n\":2}\n\ndata: [DONE]\n\n");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_the_bytes_that_came_with_the_101() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = RawUpstream::start(&pki, |mut conn| async move {
            if conn.read_request().await.is_none() {
                return;
            }
            // The switch and the first bytes of the new protocol, in one write.
            conn.write(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello-from-upstream",
            )
            .await;
            conn.echo().await;
        })
        .await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));

        let mut stream = connect(&proxy).await;
        stream
            .write_all(
                format!(
                    "GET /v1/realtime?model=gpt-4o-realtime-preview HTTP/1.1\r\nHost: proxy\r\nAuthorization: {KEY}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let got = read_until(&mut stream, "hello-from-upstream").await;
        let (head, after) = got.split_once("\r\n\r\n").expect("a head first");
        assert!(head.starts_with("HTTP/1.1 101 "), "{got}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("\r\nupgrade: websocket"), "{got}");
        assert!(head.contains("\r\nconnection: upgrade"), "{got}");
        assert_eq!(after, "hello-from-upstream");

        stream.write_all(b"ping-from-client").await.unwrap();
        let echoed = read_until(&mut stream, "ping-from-client").await;
        assert_eq!(echoed, "ping-from-client");

        let seen = upstream.last();
        assert_eq!(
            seen.request_line,
            "GET /v1/realtime?model=gpt-4o-realtime-preview HTTP/1.1"
        );
        assert_eq!(seen.header_all("host"), ["api.openai.com"]);
        assert_eq!(seen.header("upgrade"), Some("websocket"));
        assert!(
            seen.header("connection")
                .is_some_and(|c| c.to_ascii_lowercase().contains("upgrade")),
            "{:?}",
            seen.headers
        );
        assert_eq!(seen.header("sec-websocket-key"), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(seen.header("authorization"), Some(KEY));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_sees_origin_form_its_host_and_no_hop_by_hop_fields() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = RawUpstream::start(&pki, |conn| serve(conn, answer_to)).await;
        let proxy = Proxy::start(&upstream.proxy_config(&pki));
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: proxy.internal:8080\r\nAuthorization: {KEY}\r\nContent-Type: application/json\r\n\
             Connection: Foo, close, X-Named-Hop\r\nFoo: 1\r\nX-Named-Hop: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
             X-Kept: kept\r\nContent-Length: {}\r\n\r\n{CHAT}",
            CHAT.len()
        );
        let mut stream = connect(&proxy).await;
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_to_close(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");

        let seen = upstream.last();
        assert_eq!(seen.request_line, "POST /v1/chat/completions HTTP/1.1");
        assert_eq!(seen.header_all("host"), ["api.openai.com"]);
        assert_eq!(seen.header_all("authorization"), [KEY]);
        assert_eq!(seen.header("content-type"), Some("application/json"));
        assert_eq!(seen.header("x-kept"), Some("kept"));
        for gone in ["foo", "x-named-hop", "keep-alive", "te"] {
            assert!(
                seen.header(gone).is_none(),
                "{gone} reached the upstream: {:?}",
                seen.headers
            );
        }
        // The client's Connection field is its own; one of the proxy's may only manage this hop.
        for connection in seen.header_all("connection") {
            for token in connection.split(',').map(|t| t.trim().to_ascii_lowercase()) {
                assert!(
                    token == "keep-alive" || token == "close",
                    "Connection: {connection}"
                );
            }
        }
        assert_eq!(seen.body, CHAT.as_bytes());
    })
    .await;
}
