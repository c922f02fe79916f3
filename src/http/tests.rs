//! The codec over an in-memory connection, both ways: requests written as the upstream client
//! writes them (head fields, `write_framing`, `Encoder` and `pump`) are read by the server loop
//! (`server::serve`), and its responses are read as the upstream client reads them
//! (`head::parse_response`, `WireBody`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

use super::framing::Peer;
use super::head::{self, Asked};
use super::server::{self, Handler, Served};
use super::{Activity, BoxIo, Carrier, Encoder, Framing, IncomingBody, Outlet, WireBody, pump};
use crate::drain;
use crate::error::ProxyError;

/// Every wait of these tests is bounded by this.
const BOUND: Duration = Duration::from_secs(10);

/// A body of set pieces, its size known or not.
struct Pieces {
    pieces: VecDeque<Bytes>,
    exact: bool,
}

impl Pieces {
    fn new(pieces: &[&'static [u8]], exact: bool) -> Self {
        let pieces = pieces.iter().map(|p| Bytes::from_static(p)).collect();
        Self { pieces, exact }
    }

    fn split(bytes: Bytes, exact: bool) -> Self {
        let mut bytes = bytes;
        let first = bytes.split_to(bytes.len() / 2);
        Self {
            pieces: VecDeque::from([first, bytes]),
            exact,
        }
    }
}

impl Body for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.pieces.pop_front().map(|p| Ok(Frame::data(p))))
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact {
            true => SizeHint::with_exact(self.pieces.iter().map(|p| p.len() as u64).sum()),
            false => SizeHint::default(),
        }
    }
}

/// Answers each request with its own body, framed as its `x-reply` field asks: `length` (a
/// known size) or anything else (unknown). A body that fails to read is answered 400, with the
/// error's text.
struct Echo {
    drain: drain::Watch,
    activity: Activity,
}

impl Handler for Echo {
    type Body = Pieces;

    async fn call(&self, request: Request<IncomingBody>) -> Response<Pieces> {
        let exact = request
            .headers()
            .get("x-reply")
            .is_some_and(|v| v == "length");
        match request.into_body().collect().await {
            Ok(body) => Response::new(Pieces::split(body.to_bytes(), exact)),
            Err(error) => {
                let mut response = Response::new(Pieces::split(error.to_string().into(), true));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                response
            }
        }
    }

    fn refuse(&self, error: ProxyError) -> Response<Pieces> {
        error.into_response(|body| Pieces::split(body, true))
    }

    fn client(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    fn drain(&self) -> &drain::Watch {
        &self.drain
    }

    fn activity(&self) -> &Activity {
        &self.activity
    }
}

fn settings() -> server::Settings {
    server::Settings {
        header_read_timeout: BOUND,
        keepalive_timeout: BOUND,
        max_header_size: 64 << 10,
        max_request_body: 1 << 20,
    }
}

/// The client's end of a connection, its other end served by `Echo`.
struct Client {
    conn: Conn,
    writer: WriteHalf<DuplexStream>,
    _drain: drain::Drain,
}

fn connect() -> Client {
    let (near, far) = tokio::io::duplex(64 << 10);
    let drain = drain::Drain::new();
    let echo = Echo {
        drain: drain.signal().watch().expect("not draining"),
        activity: Activity::default(),
    };
    tokio::spawn(async move {
        let io: BoxIo = Box::new(far);
        let deadline = tokio::time::Instant::now() + BOUND;
        let served = server::serve(io, &settings(), &echo, true, deadline).await;
        assert!(matches!(served, Served::Closed));
    });
    let (half, writer) = tokio::io::split(near);
    let conn = Conn {
        half,
        buf: BytesMut::new(),
    };
    Client {
        conn,
        writer,
        _drain: drain,
    }
}

/// The read side of the client's end, and what was read from it and not yet used.
struct Conn {
    half: ReadHalf<DuplexStream>,
    buf: BytesMut,
}

impl Carrier for &mut Conn {
    type Io = ReadHalf<DuplexStream>;
    const PEER: Peer = Peer::Upstream;

    fn wire(&mut self) -> (&mut ReadHalf<DuplexStream>, &mut BytesMut) {
        (&mut self.half, &mut self.buf)
    }

    fn finish(self) {}
}

/// Writes a body straight onto the client's end.
struct Plain<'a>(&'a mut WriteHalf<DuplexStream>);

impl<B: Body<Data = Bytes, Error: Send> + Send> Outlet<B> for Plain<'_> {
    type Stop = std::io::Error;

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all(bytes).await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().await
    }

    async fn next_frame(
        &mut self,
        mut body: Pin<&mut B>,
    ) -> std::io::Result<Option<Result<Frame<Bytes>, B::Error>>> {
        Ok(body.frame().await)
    }
}

impl Client {
    /// Sends a POST with `body`, framed as its size hint says, as the upstream client does.
    async fn send(&mut self, reply: &'static str, body: Pieces) {
        let mut out = b"POST /v1/echo HTTP/1.1\r\nhost: proxy\r\n".to_vec();
        let value = http::HeaderValue::from_static(reply);
        head::write_field(&mut out, &http::HeaderName::from_static("x-reply"), &value);
        let framing = body
            .size_hint()
            .exact()
            .map_or(Framing::Chunked, Framing::Length);
        head::write_framing(&mut out, framing);
        out.extend_from_slice(b"\r\n");
        let mut encoder = Encoder::new(framing, out);
        let body = std::pin::pin!(body);
        let pumped = pump(body, &mut encoder, &mut Plain(&mut self.writer)).await;
        assert!(matches!(pumped, Ok(None)));
    }

    /// Sends `wire` as it is, and reads the response to it.
    async fn answer(&mut self, wire: &[u8]) -> (head::ResponseHead, Vec<u8>) {
        self.writer.write_all(wire).await.unwrap();
        tokio::time::timeout(BOUND, self.receive()).await.unwrap()
    }

    /// Reads one response, as the upstream client does: its head, and its body whole.
    async fn receive(&mut self) -> (head::ResponseHead, Vec<u8>) {
        let asked = Asked {
            head_method: false,
            upgrade: false,
        };
        let head = loop {
            if let Some(head) = head::parse_response(&mut self.conn.buf, asked).unwrap() {
                break head;
            }
            let read = self.conn.half.read_buf(&mut self.conn.buf).await.unwrap();
            assert!(read > 0, "closed before a response head");
        };
        let body = WireBody::new(&mut self.conn, head.framing);
        let body = body.collect().await.unwrap().to_bytes().to_vec();
        (head, body)
    }

    async fn exchange(
        &mut self,
        reply: &'static str,
        body: Pieces,
    ) -> (head::ResponseHead, Vec<u8>) {
        tokio::time::timeout(BOUND, async {
            self.send(reply, body).await;
            self.receive().await
        })
        .await
        .expect("answered in time")
    }
}

#[tokio::test]
async fn lengths_and_chunks_cross_both_ways_on_one_connection() {
    let mut client = connect();
    for (reply, request_exact) in [("length", true), ("chunked", true), ("length", false)] {
        let request = Pieces::new(&[b"hello ", b"world"], request_exact);
        let (head, body) = client.exchange(reply, request).await;
        assert_eq!(head.status, StatusCode::OK);
        let framing = match reply {
            "length" => Framing::Length(11),
            _ => Framing::Chunked,
        };
        assert_eq!(head.framing, framing);
        assert!(head.keep_alive);
        assert_eq!(body, b"hello world");
    }
    let (head, body) = client.exchange("chunked", Pieces::new(&[], false)).await;
    assert_eq!((head.framing, body.len()), (Framing::Chunked, 0));
}

#[tokio::test]
async fn chunk_extensions_and_trailers_are_read_and_dropped() {
    let mut client = connect();
    let (head, body) = client.answer(b"POST /v1/echo HTTP/1.1\r\nhost: proxy\r\ntransfer-encoding: chunked\r\nx-reply: length\r\n\r\n5;ext=1\r\nhello\r\n0\r\nx-trailer: v\r\n\r\n").await;
    assert_eq!(
        (head.framing, &body[..]),
        (Framing::Length(5), &b"hello"[..])
    );
    assert!(head.keep_alive);
}

#[tokio::test]
async fn an_http_1_0_answer_of_unknown_length_runs_to_the_close() {
    let mut client = connect();
    let (head, body) = client
        .answer(b"POST /v1/echo HTTP/1.0\r\ncontent-length: 4\r\nx-reply: chunked\r\n\r\nbody")
        .await;
    assert_eq!(head.version, http::Version::HTTP_10);
    assert_eq!((head.framing, &body[..]), (Framing::Close, &b"body"[..]));
    assert!(!head.keep_alive);
}

#[tokio::test]
async fn a_broken_chunk_fails_the_request_body_with_the_client_side_text() {
    let mut client = connect();
    let wire = b"POST /v1/echo HTTP/1.1\r\nhost: proxy\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n";
    let (head, body) = client.answer(wire).await;
    assert_eq!(head.status, StatusCode::BAD_REQUEST);
    assert_eq!(body, b"malformed chunked encoding: bad chunk size");
    // The body was not read to its end: the connection ends after the answer.
    let mut rest = Vec::new();
    let closed = client.conn.half.read_to_end(&mut rest);
    tokio::time::timeout(BOUND, closed).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_malformed_head_is_refused_in_openai_shape_and_the_connection_closed() {
    for (wire, refusal) in [
        (&b"GET /v1/x HTTP/1.1\r\n\r\n"[..], "no Host field"),
        (b"get /v1/x HTTP/1.1\r\nhost: p\r\n\r\n", "invalid method"),
        (
            b"POST /v1/x HTTP/1.1\r\nhost: p\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
            "more than one Content-Length",
        ),
        (
            b"\x16\x03\x01\x02\x00\x01",
            "the request head does not parse as HTTP/1.1",
        ),
    ] {
        let mut client = connect();
        let (head, body) = client.answer(wire).await;
        let expected = ProxyError::Malformed(refusal);
        assert_eq!(head.status, expected.status());
        assert_eq!(body, expected.body());
        assert_eq!(head.headers["connection"], "close");
        assert!(!head.keep_alive);
        let mut rest = Vec::new();
        let closed = client.conn.half.read_to_end(&mut rest);
        tokio::time::timeout(BOUND, closed).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_response_cut_short_fails_with_the_upstream_side_text() {
    let (near, mut far) = tokio::io::duplex(1024);
    far.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
        .await
        .unwrap();
    drop(far);
    let (half, _writer) = tokio::io::split(near);
    let mut conn = Conn {
        half,
        buf: BytesMut::new(),
    };
    conn.half.read_buf(&mut conn.buf).await.unwrap();
    let asked = Asked {
        head_method: false,
        upgrade: false,
    };
    let head = head::parse_response(&mut conn.buf, asked).unwrap().unwrap();
    let error = WireBody::new(&mut conn, head.framing)
        .collect()
        .await
        .expect_err("cut short");
    assert_eq!(
        error.to_string(),
        "the upstream closed the connection mid-body"
    );
}
