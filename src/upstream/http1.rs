//! HTTP/1.1 to the upstream. Ours rather than hyper's, for the reasons the client side is ours
//! (src/http1.rs): a request is written, and its response read, by the task of the client
//! connection it came on, with no connection task and no channel between them, and the response
//! body is read straight off the upstream connection by whoever relays it. That is nginx's shape,
//! and it costs a request fewer instructions and fewer task wake-ups than hyper's client.
//!
//! A connection belongs to one request at a time: taken from the pool, written, read, and put
//! back by the response body once it has been read to its end. A body dropped before its end
//! closes the connection, since where the next response would start is then unknown.

use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http::{header, response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::Pool;
use crate::body::{BodyError, RequestBody};
use crate::error::ProxyError;
use crate::framing::{self, BODY_READ, Broken, Decoder, Framing, MAX_HEADERS, Spans};
use crate::headers;
use crate::http1::{Io, Rewind};

/// An upstream connection: TCP, or TLS over TCP.
pub type Stream = Box<dyn Io>;

/// The upstream's side of a connection that switched protocols (a WebSocket), with what the
/// upstream had already sent after its 101 put back in front.
pub type Upgraded = Rewind<Stream>;

/// The largest response head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Room made for each read of a response head.
const HEAD_READ: usize = 8 << 10;
/// How much of a request body is kept to send it again on another connection, should the one it
/// went on turn out to have been closed by the upstream just before.
const REPLAY_LIMIT: usize = 64 << 10;

pub(super) struct Connection {
    io: Stream,
    /// Read from the connection and not yet used.
    buf: BytesMut,
    /// Has waited in the pool: the upstream may have closed it meanwhile.
    was_idle: bool,
    /// While it carries a request, it counts among its pool's busy connections (`Pool::busy`).
    pub busy: Option<Arc<()>>,
}

impl Connection {
    pub fn new(io: Stream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            was_idle: false,
            busy: None,
        }
    }

    /// Whether an idle connection can carry a request: the upstream has neither closed it nor
    /// sent anything unasked. Nothing waits on an idle connection, so this looks without waiting.
    /// One that passes is marked as having been idle: the upstream may still close it at any
    /// moment, and then a request that got no answer on it may go again.
    pub fn is_usable(&mut self) -> bool {
        self.was_idle = true;
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        let mut read = ReadBuf::uninit(&mut probe);
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut read)
            .is_pending()
    }
}

/// A request on its way: its head, written out once, and its body, whose first bytes are kept
/// so that the request can go again.
pub(super) struct Outgoing {
    head: Vec<u8>,
    framing: Framing,
    body: RequestBody,
    body_done: bool,
    /// The body frames sent so far; None once more was sent than is kept.
    replay: Option<Vec<Bytes>>,
    /// Bytes of body taken so far, checked against a declared length.
    body_taken: u64,
    /// Means the same done twice (Go's rule: GET, HEAD, OPTIONS, TRACE, or an idempotency key).
    idempotent: bool,
    head_method: bool,
    upgrade: bool,
}

impl Outgoing {
    /// `request` carries the upstream's path (origin form) and no Host field; `host` is the one
    /// to send.
    pub fn new(request: Request<RequestBody>, host: &HeaderValue, upgrade: bool) -> Self {
        let (parts, body) = request.into_parts();
        let mut idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        let mut head = Vec::with_capacity(512);
        head.extend_from_slice(parts.method.as_str().as_bytes());
        head.push(b' ');
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        head.extend_from_slice(path.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        head.extend_from_slice(host.as_bytes());
        head.extend_from_slice(b"\r\n");
        let mut declared = None;
        for (name, value) in &parts.headers {
            if name == header::CONTENT_LENGTH {
                // Checked when the request was admitted; a repeat is the same length.
                declared = value.to_str().ok().and_then(|v| v.parse::<u64>().ok());
            }
            // Looked for here rather than looked up: a lookup by a name given as text parses
            // and hashes it first, for every request.
            idempotent |= matches!(name.as_str(), "idempotency-key" | "x-idempotency-key");
            framing::write_field(&mut head, name, value);
        }
        let framing = if let Some(n) = declared {
            Framing::Length(n)
        } else if body.is_end_stream() {
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                head.extend_from_slice(b"content-length: 0\r\n");
            }
            Framing::Empty
        } else if let Some(n) = body.size_hint().exact() {
            let _ = write!(head, "content-length: {n}\r\n");
            Framing::Length(n)
        } else {
            head.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        };
        head.extend_from_slice(b"\r\n");
        Self {
            head,
            framing,
            body_done: !framing.has_body(),
            body,
            replay: Some(Vec::new()),
            body_taken: 0,
            idempotent,
            head_method: parts.method == Method::HEAD,
            upgrade,
        }
    }

    /// Appends a body frame to `wire`, framed for this hop.
    fn frame_into(&self, wire: &mut Vec<u8>, data: &[u8]) {
        if self.framing == Framing::Chunked {
            let _ = write!(wire, "{:x}\r\n", data.len());
            wire.extend_from_slice(data);
            wire.extend_from_slice(b"\r\n");
        } else {
            wire.extend_from_slice(data);
        }
    }

    /// Takes a body frame to send: counted, and kept to send again if there is room.
    fn take(&mut self, data: &Bytes) -> Result<(), ProxyError> {
        self.body_taken += data.len() as u64;
        if let Framing::Length(declared) = self.framing
            && self.body_taken > declared
        {
            return Err(ProxyError::ClientBody(
                "the request body is longer than its Content-Length".into(),
            ));
        }
        match self.replay.as_mut() {
            Some(frames) if self.body_taken <= REPLAY_LIMIT as u64 => frames.push(data.clone()),
            _ => self.replay = None,
        }
        Ok(())
    }

    /// The body has ended: it must have been as long as it said.
    fn end(&mut self) -> Result<(), ProxyError> {
        self.body_done = true;
        match self.framing {
            Framing::Length(declared) if self.body_taken != declared => {
                Err(ProxyError::ClientBody(
                    "the request body is shorter than its Content-Length".into(),
                ))
            }
            _ => Ok(()),
        }
    }

    fn end_into(&self, wire: &mut Vec<u8>) {
        if self.framing == Framing::Chunked {
            wire.extend_from_slice(b"0\r\n\r\n");
        }
    }
}

/// Why a request got no response.
pub(super) enum Failure {
    /// The upstream closed the (reused) connection under the request before answering, and the
    /// request can go again on another, since all of its body that was sent is still at hand.
    Stale(ProxyError),
    Failed(ProxyError),
}

/// Sends the request over `conn` and reads the response head. The response body carries the
/// connection on, and puts it back in `pool` once read to its end.
pub(super) async fn exchange(
    mut conn: Connection,
    out: &mut Outgoing,
    pool: &Weak<Pool>,
) -> Result<(Response<ResponseBody>, Option<Upgraded>), Failure> {
    let mut written = false;
    let (sent, write_failed) = match send(&mut conn, out, &mut written).await {
        Ok(sent) => (sent, None),
        Err(Sending::Body(error)) => return Err(Failure::Failed(error)),
        // It may have answered and closed without reading the rest: look for that answer.
        Err(Sending::Io(error)) => (Sent::Answered, Some(error)),
    };
    let head = match read_head(&mut conn, out).await {
        Ok(head) => head,
        Err(Reading::Closed(error)) => {
            let error = write_failed.map_or(error, |e| io_failure(&e));
            // Gone without a word, after waiting in the pool: most likely closed by the
            // upstream as idle just as the request went out. It goes again only if the upstream
            // cannot have acted on it: none of it was written, or doing it twice means the same.
            let again = conn.was_idle && out.replay.is_some() && (!written || out.idempotent);
            return Err(if again {
                Failure::Stale(error)
            } else {
                Failure::Failed(error)
            });
        }
        Err(Reading::Failed(error)) => return Err(Failure::Failed(error)),
    };
    let mut response = Response::new(());
    *response.status_mut() = head.status;
    *response.version_mut() = head.version;
    *response.headers_mut() = head.headers;
    let (parts, ()) = response.into_parts();
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        let Connection { io, buf, .. } = conn;
        let upgraded = Rewind::new(buf.freeze(), io);
        return Ok((ResponseBody::ended(parts), Some(upgraded)));
    }
    let keep = head.keep_alive && matches!(sent, Sent::Whole);
    Ok((
        ResponseBody::new(parts, conn, head.framing, keep, pool),
        None,
    ))
}

/// How sending a request ended.
enum Sent {
    Whole,
    /// The upstream began to answer (or closed) before all of the body was sent.
    Answered,
}

enum Sending {
    Body(ProxyError),
    Io(io::Error),
}

/// Writes the request: head and whatever of the body is ready in one write, then the rest as it
/// arrives, watching all the while for an early answer.
async fn send(
    conn: &mut Connection,
    out: &mut Outgoing,
    written: &mut bool,
) -> Result<Sent, Sending> {
    let mut wire = Vec::with_capacity(out.head.len() + 1024);
    wire.extend_from_slice(&out.head);
    for frame in out.replay.iter().flatten() {
        out.frame_into(&mut wire, frame);
    }
    if out.body_done {
        if out.framing.has_body() {
            out.end_into(&mut wire);
        }
        return write(conn, &wire, written).await;
    }
    loop {
        // Whatever is ready now joins the pending write; whatever is not yet is awaited only
        // after that write.
        let ready_now =
            std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut out.body).poll_frame(cx))).await;
        let frame = match ready_now {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !wire.is_empty() {
                    if let Sent::Answered = write(conn, &wire, written).await? {
                        return Ok(Sent::Answered);
                    }
                    wire.clear();
                }
                match next_frame_or_answer(conn, &mut out.body).await {
                    Some(frame) => frame,
                    None => return Ok(Sent::Answered),
                }
            }
        };
        match frame {
            None => {
                out.end().map_err(Sending::Body)?;
                out.end_into(&mut wire);
                return write(conn, &wire, written).await;
            }
            Some(Err(error)) => return Err(Sending::Body(error.to_proxy_error())),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                out.take(&data).map_err(Sending::Body)?;
                if data.len() >= BODY_READ && out.framing != Framing::Chunked {
                    // Large: written from where it lies rather than copied.
                    for bytes in [&wire[..], &data[..]] {
                        if let Sent::Answered = write(conn, bytes, written).await? {
                            return Ok(Sent::Answered);
                        }
                    }
                    wire.clear();
                } else {
                    out.frame_into(&mut wire, &data);
                }
            }
        }
    }
}

/// Writes and flushes `bytes`. While the upstream is not reading, what it sends is read: an
/// upstream that answers early (a 413, a 401) may stop reading and still wait for us to read.
async fn write(conn: &mut Connection, bytes: &[u8], written: &mut bool) -> Result<Sent, Sending> {
    let mut at = 0;
    std::future::poll_fn(|cx| {
        loop {
            let step = if at < bytes.len() {
                Pin::new(&mut conn.io).poll_write(cx, &bytes[at..])
            } else {
                Pin::new(&mut conn.io).poll_flush(cx).map_ok(|()| 0)
            };
            match step {
                Poll::Ready(Ok(0)) if at == bytes.len() => return Poll::Ready(Ok(Sent::Whole)),
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(Sending::Io(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => {
                    at += n;
                    *written = true;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(Sending::Io(error))),
                Poll::Pending => return poll_answer(conn, cx).map(|()| Ok(Sent::Answered)),
            }
        }
    })
    .await
}

/// The body's next frame, or None if the upstream starts answering (or closes) first.
async fn next_frame_or_answer(
    conn: &mut Connection,
    body: &mut RequestBody,
) -> Option<Option<Result<Frame<Bytes>, BodyError>>> {
    std::future::poll_fn(|cx| {
        if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) {
            return Poll::Ready(Some(frame));
        }
        poll_answer(conn, cx).map(|()| None)
    })
    .await
}

/// Reads what the upstream sends while the request is still going out. Ready once it has begun
/// its answer, or closed, or failed: reading the response head then says which. Interim (1xx)
/// responses are passed over, since an upstream that sends them still wants the body.
fn poll_answer(conn: &mut Connection, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        if answer_begun(&mut conn.buf) {
            return Poll::Ready(());
        }
        conn.buf.reserve(HEAD_READ);
        match ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut conn.io),
            cx,
            &mut conn.buf
        )) {
            Ok(1..) => {}
            Ok(0) | Err(_) => return Poll::Ready(()),
        }
    }
}

/// Drops whole interim heads off the front of `buf`, and says whether what is left begins a
/// final response (or something that is not a response at all).
fn answer_begun(buf: &mut BytesMut) -> bool {
    let interim = |code: u16| (100..200).contains(&code) && code != 101;
    loop {
        if buf.is_empty() {
            return false;
        }
        let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut fields,
        );
        match (parsed, response.code) {
            (Ok(httparse::Status::Complete(length)), Some(code)) if interim(code) => {
                let _ = buf.split_to(length);
            }
            // The status line is not all there yet, or says nothing final yet.
            (Ok(httparse::Status::Partial), None) => return false,
            (Ok(httparse::Status::Partial), Some(code)) if interim(code) => return false,
            _ => return true,
        }
    }
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
}

enum Reading {
    /// The connection ended before any of a response arrived.
    Closed(ProxyError),
    Failed(ProxyError),
}

/// Reads the response head, passing over interim (1xx) responses other than a 101.
async fn read_head(conn: &mut Connection, out: &Outgoing) -> Result<Head, Reading> {
    let protocol = |what: String| Reading::Failed(ProxyError::UpstreamProtocol(what));
    let mut received = !conn.buf.is_empty();
    loop {
        if !conn.buf.is_empty() {
            match parse_head(&mut conn.buf, out) {
                Ok(Some(head))
                    if head.status.is_informational()
                        && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    continue;
                }
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(error) => return Err(protocol(error.to_owned())),
            }
        }
        if conn.buf.len() > MAX_HEAD {
            return Err(protocol(format!(
                "the response head is larger than {MAX_HEAD} bytes"
            )));
        }
        conn.buf.reserve(HEAD_READ);
        match conn.io.read_buf(&mut conn.buf).await {
            Ok(0) if received => {
                return Err(protocol("the connection closed mid response head".into()));
            }
            Ok(0) => {
                return Err(Reading::Closed(ProxyError::UpstreamProtocol(
                    "the connection closed before the response".into(),
                )));
            }
            Ok(_) => received = true,
            Err(error) if received => return Err(Reading::Failed(io_failure(&error))),
            Err(error) => return Err(Reading::Closed(io_failure(&error))),
        }
    }
}

/// Parses a complete response head off the front of `buf`; None while it is incomplete.
fn parse_head(buf: &mut BytesMut, out: &Outgoing) -> Result<Option<Head>, &'static str> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let length = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    ) {
        // A head that arrived whole in one read is held to the limit too.
        Ok(httparse::Status::Complete(length)) if length > MAX_HEAD => {
            return Err("the response head is larger than 64 KiB");
        }
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("the response head does not parse as HTTP/1.1"),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or("invalid response status")?;
    let version = match response.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let spans = Spans::new(buf, response.headers)?;
    let head = buf.split_to(length).freeze();
    let (headers, noted) = spans.header_map(&head)?;
    if status == StatusCode::SWITCHING_PROTOCOLS && !out.upgrade {
        return Err("the upstream switched protocols unasked");
    }
    let framing = if framing::bodiless(out.head_method, status) {
        Framing::Empty
    } else if noted.framed {
        match framing::from_fields(&headers, version)? {
            Framing::Empty => Framing::Close,
            framing => framing,
        }
    } else {
        Framing::Close
    };
    let keep_alive = version == Version::HTTP_11
        && framing != Framing::Close
        && !(noted.connection && headers::has_token(&headers, header::CONNECTION, "close"));
    Ok(Some(Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    }))
}

/// An I/O failure on an upstream connection, as a TLS error when that is what it is.
fn io_failure(error: &io::Error) -> ProxyError {
    match super::tls_error(error) {
        Some(tls) => ProxyError::UpstreamTls(tls.to_string()),
        None => ProxyError::UpstreamProtocol(format!("upstream connection: {error}")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("the upstream closed the connection mid-body")]
    Truncated,
    #[error("malformed response body from the upstream: {0}")]
    Framing(&'static str),
    #[error("reading the response body: {0}")]
    Io(#[from] io::Error),
}

impl From<Broken> for ReadError {
    fn from(broken: Broken) -> Self {
        match broken {
            Broken::Truncated => Self::Truncated,
            Broken::Framing(what) => Self::Framing(what),
            Broken::Io(error) => Self::Io(error),
        }
    }
}

/// A response body read straight off its upstream connection.
pub struct ResponseBody {
    /// None once the body has ended (or failed).
    conn: Option<Connection>,
    decoder: Decoder,
    /// Whether the connection can carry another request once this body has ended.
    keep: bool,
    pool: Weak<Pool>,
}

impl ResponseBody {
    fn new(
        parts: response::Parts,
        conn: Connection,
        framing: Framing,
        keep: bool,
        pool: &Weak<Pool>,
    ) -> Response<Self> {
        let mut body = Self {
            conn: Some(conn),
            decoder: Decoder::new(framing),
            keep,
            pool: pool.clone(),
        };
        if body.decoder.is_done() {
            body.finish();
        }
        Response::from_parts(parts, body)
    }

    fn ended(parts: response::Parts) -> Response<Self> {
        let body = Self {
            conn: None,
            decoder: Decoder::new(Framing::Empty),
            keep: false,
            pool: Weak::new(),
        };
        Response::from_parts(parts, body)
    }

    /// The body has been read to its end: the connection goes back to the pool, unless it
    /// cannot carry another request.
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Bytes after the body were never asked for: the connection is out of step.
        if self.keep
            && conn.buf.is_empty()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.put_idle(conn);
        }
    }

    fn fail(&mut self, error: ReadError) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        let this = self.get_mut();
        let Some(Connection { io, buf, .. }) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(framing::poll_piece(&mut this.decoder, buf, io, cx)) {
            Ok(Some(data)) => {
                // Back to the pool before the last bytes are relayed, to be ready for the
                // client's next request.
                if this.decoder.is_done() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            // A body that ends with its connection leaves none to keep (`keep` is false).
            Ok(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Err(broken) => this.fail(broken.into()),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() || self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.conn {
            None => SizeHint::with_exact(0),
            Some(_) => self.decoder.size_hint(),
        }
    }
}
