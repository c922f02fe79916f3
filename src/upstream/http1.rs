//! HTTP/1.1 to the upstream, built from the codec the client side uses (src/http/): a request
//! is written, and its response read, by the task of the client connection it came on, with no
//! connection task and no channel between them, and the response body is read straight off the
//! upstream connection by whoever relays it. That is nginx's shape.
//!
//! A connection belongs to one request at a time: taken from the pool, written, read, and put
//! back by the response body once it has been read to its end. A body dropped before its end
//! closes the connection, since where the next response would start is then unknown.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::Pool;
use crate::body::{BodyError, RequestBody};
use crate::error::ProxyError;
use crate::headers::Exchange;
use crate::http::framing::Peer;
use crate::http::head::{self, Asked, MAX_RESPONSE_HEAD, ResponseHead};
use crate::http::{BoxIo, Carrier, Encoder, Framing, Outlet, Rewind, WireBody, pump};

/// An upstream connection: TCP, or TLS over TCP.
pub type Stream = BoxIo;

/// The upstream's side of a connection that switched protocols (a WebSocket), with what the
/// upstream had already sent after its 101 put back in front.
pub type Upgraded = Rewind<Stream>;

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
    /// Counted among the upstream's open connections while it lives.
    _open: crate::metrics::Open,
}

impl Connection {
    pub fn new(io: Stream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            was_idle: false,
            busy: None,
            _open: crate::metrics::Open::upstream_connection(),
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
    replay: Replay,
    /// Means the same done twice (Go's rule: GET, HEAD, OPTIONS, TRACE, or an idempotency key).
    idempotent: bool,
    asked: Asked,
}

/// The body as sent so far: counted, and its first frames kept to send again.
struct Replay {
    /// The body frames sent so far; None once more was sent than is kept.
    frames: Option<Vec<Bytes>>,
    /// Bytes of body taken so far, checked against a declared length.
    taken: u64,
    framing: Framing,
    /// The body has ended: all of it is in `frames`, if they are there.
    ended: bool,
}

impl Outgoing {
    /// `request` carries the upstream's path (origin form) and no Host field; `host` is the one
    /// to send.
    pub fn new(request: Request<RequestBody>, host: &HeaderValue, exchange: Exchange) -> Self {
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
            if name == http::header::CONTENT_LENGTH {
                // Checked when the request was admitted; a repeat is the same length.
                declared = value.to_str().ok().and_then(|v| v.parse::<u64>().ok());
            }
            // Looked for here rather than looked up: a lookup by a name given as text parses
            // and hashes it first.
            idempotent |= matches!(name.as_str(), "idempotency-key" | "x-idempotency-key");
            head::write_field(&mut head, name, value);
        }
        let framing = if let Some(n) = declared {
            Framing::Length(n)
        } else if body.is_end_stream() {
            if matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
                head::write_framing(&mut head, Framing::Length(0));
            }
            Framing::Empty
        } else {
            let framing = body
                .size_hint()
                .exact()
                .map_or(Framing::Chunked, Framing::Length);
            head::write_framing(&mut head, framing);
            framing
        };
        head.extend_from_slice(b"\r\n");
        Self {
            head,
            framing,
            body,
            replay: Replay {
                frames: Some(Vec::new()),
                taken: 0,
                framing,
                ended: !framing.has_body(),
            },
            idempotent,
            asked: Asked {
                head_method: parts.method == Method::HEAD,
                upgrade: exchange == Exchange::Upgrade,
            },
        }
    }
}

impl Replay {
    /// Takes a body frame to send: counted, and kept to send again if there is room.
    fn take(&mut self, data: &Bytes) -> Result<(), ProxyError> {
        self.taken += data.len() as u64;
        if let Framing::Length(declared) = self.framing
            && self.taken > declared
        {
            return Err(ProxyError::ClientBody(
                "the request body is longer than its Content-Length".into(),
            ));
        }
        match self.frames.as_mut() {
            Some(frames) if self.taken <= REPLAY_LIMIT as u64 => frames.push(data.clone()),
            _ => self.frames = None,
        }
        Ok(())
    }

    /// The body has ended: it must have been as long as it said.
    fn end(&mut self) -> Result<(), ProxyError> {
        self.ended = true;
        match self.framing {
            Framing::Length(declared) if self.taken != declared => Err(ProxyError::ClientBody(
                "the request body is shorter than its Content-Length".into(),
            )),
            _ => Ok(()),
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
        Ok(()) => (Sent::Whole, None),
        Err(Stop::Answered) => (Sent::Answered, None),
        Err(Stop::Body(error)) => return Err(Failure::Failed(error)),
        // It may have answered and closed without reading the rest: look for that answer.
        Err(Stop::Io(error)) => (Sent::Answered, Some(error)),
    };
    let head = match read_head(&mut conn, out).await {
        Ok(head) => head,
        Err(Reading::Closed(error)) => {
            let error = write_failed.map_or(error, |e| io_failure(&e));
            // Gone without a word, after waiting in the pool: most likely closed by the
            // upstream as idle just as the request went out. It goes again only if the upstream
            // cannot have acted on it: none of it was written, or doing it twice means the same.
            let again =
                conn.was_idle && out.replay.frames.is_some() && (!written || out.idempotent);
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
        return Ok((
            Response::from_parts(parts, ResponseBody::empty()),
            Some(upgraded),
        ));
    }
    let keep = head.keep_alive && matches!(sent, Sent::Whole);
    let pooled = Pooled {
        conn,
        keep,
        pool: pool.clone(),
    };
    let body = ResponseBody::new(pooled, head.framing);
    Ok((Response::from_parts(parts, body), None))
}

/// How sending a request ended.
enum Sent {
    Whole,
    /// The upstream began to answer (or closed) before all of the body was sent.
    Answered,
}

/// Why sending stopped before the request was whole.
enum Stop {
    /// The upstream began to answer, or closed.
    Answered,
    Body(ProxyError),
    Io(io::Error),
}

/// Writes the request: head and whatever of the body is ready in one write, then the rest as it
/// arrives, watching all the while for an early answer.
async fn send(conn: &mut Connection, out: &mut Outgoing, written: &mut bool) -> Result<(), Stop> {
    let mut encoder = Encoder::new(out.framing, out.head.clone());
    for frame in out.replay.frames.iter().flatten() {
        encoder.copy(frame.clone());
    }
    let ended = out.replay.ended;
    let mut outlet = ToUpstream {
        conn,
        replay: &mut out.replay,
        written,
    };
    if ended {
        encoder.end();
        return outlet.send(&encoder.out).await;
    }
    match pump(Pin::new(&mut out.body), &mut encoder, &mut outlet).await? {
        None => Ok(()),
        Some(error) => Err(Stop::Body(error.to_proxy_error())),
    }
}

/// The upstream's connection, as a request body is pumped onto it.
struct ToUpstream<'a> {
    conn: &'a mut Connection,
    replay: &'a mut Replay,
    /// Set once any of the request has been written.
    written: &'a mut bool,
}

impl ToUpstream<'_> {
    /// Writes and flushes `bytes`. While the upstream is not reading, what it sends is read: an
    /// upstream that answers early (a 413, a 401) may stop reading and still wait for us to
    /// read.
    async fn send(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        let mut at = 0;
        let Self { conn, written, .. } = self;
        std::future::poll_fn(|cx| {
            loop {
                let step = if at < bytes.len() {
                    Pin::new(&mut conn.io).poll_write(cx, &bytes[at..])
                } else {
                    Pin::new(&mut conn.io).poll_flush(cx).map_ok(|()| 0)
                };
                match step {
                    Poll::Ready(Ok(0)) if at == bytes.len() => return Poll::Ready(Ok(())),
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(Stop::Io(io::ErrorKind::WriteZero.into())));
                    }
                    Poll::Ready(Ok(n)) => {
                        at += n;
                        **written = true;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(Stop::Io(error))),
                    Poll::Pending => return poll_answer(conn, cx).map(|()| Err(Stop::Answered)),
                }
            }
        })
        .await
    }
}

impl Outlet<RequestBody> for ToUpstream<'_> {
    type Stop = Stop;

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        self.send(bytes).await
    }

    /// Every write is flushed already.
    async fn flush(&mut self) -> Result<(), Stop> {
        Ok(())
    }

    /// The body's next frame, unless the upstream starts answering (or closes) first.
    async fn next_frame(
        &mut self,
        mut body: Pin<&mut RequestBody>,
    ) -> Result<Option<Result<Frame<Bytes>, BodyError>>, Stop> {
        let conn = &mut *self.conn;
        std::future::poll_fn(|cx| {
            if let Poll::Ready(frame) = body.as_mut().poll_frame(cx) {
                return Poll::Ready(Ok(frame));
            }
            poll_answer(conn, cx).map(|()| Err(Stop::Answered))
        })
        .await
    }

    fn take(&mut self, data: &Bytes) -> Result<(), Stop> {
        self.replay.take(data).map_err(Stop::Body)
    }

    fn end(&mut self) -> Result<(), Stop> {
        self.replay.end().map_err(Stop::Body)
    }
}

/// Reads what the upstream sends while the request is still going out. Ready once it has begun
/// its answer, or closed, or failed: reading the response head then says which. Interim (1xx)
/// responses are passed over, since an upstream that sends them still wants the body.
fn poll_answer(conn: &mut Connection, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        if head::answer_begun(&mut conn.buf) {
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

enum Reading {
    /// The connection ended before any of a response arrived.
    Closed(ProxyError),
    Failed(ProxyError),
}

/// Reads the response head, passing over interim (1xx) responses other than a 101.
async fn read_head(conn: &mut Connection, out: &Outgoing) -> Result<ResponseHead, Reading> {
    let protocol = |what: String| Reading::Failed(ProxyError::UpstreamProtocol(what));
    let mut received = !conn.buf.is_empty();
    loop {
        if !conn.buf.is_empty() {
            match head::parse_response(&mut conn.buf, out.asked) {
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
        if conn.buf.len() > MAX_RESPONSE_HEAD {
            return Err(protocol(format!(
                "the response head is larger than {MAX_RESPONSE_HEAD} bytes"
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

/// An I/O failure on an upstream connection, as a TLS error when that is what it is.
fn io_failure(error: &io::Error) -> ProxyError {
    match super::tls_error(error) {
        Some(tls) => ProxyError::UpstreamTls(tls.to_string()),
        None => ProxyError::UpstreamProtocol(format!("upstream connection: {error}")),
    }
}

/// A response body read straight off its upstream connection.
pub type ResponseBody = WireBody<Pooled>;

/// What a response body holds: its connection, put back in the pool once the body has been
/// read to its end, if it can carry another request.
pub struct Pooled {
    conn: Connection,
    /// Whether the connection can carry another request once this body has ended.
    keep: bool,
    pool: Weak<Pool>,
}

impl Carrier for Pooled {
    type Io = Stream;
    const PEER: Peer = Peer::Upstream;

    fn wire(&mut self) -> (&mut Stream, &mut BytesMut) {
        (&mut self.conn.io, &mut self.conn.buf)
    }

    fn finish(self) {
        // Bytes after the body were never asked for: the connection is out of step.
        if self.keep
            && self.conn.buf.is_empty()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.put_idle(self.conn);
        }
    }
}

/// Property tests of the response side of the codec: a response read off an upstream
/// connection as `exchange` reads it (`read_head`, then the decoder its body uses), held to
/// RFC 9112 §6.3 and its head cross-checked against httparse on its own. The request side's are
/// in src/http/head.rs and src/http/framing.rs.
#[cfg(test)]
mod properties {
    use std::collections::VecDeque;
    use std::future::Future;
    use std::ops::Range;

    use proptest::prelude::*;

    use super::*;
    use crate::http::framing::tests::properties::chunked;
    use crate::http::framing::{self, Decoder};
    use crate::http::head::answer_begun;
    use http::Version;

    /// What the model and the checks need of a response to generate.
    #[derive(Debug, Clone)]
    struct Spec {
        /// Interim responses before the final one: their codes, and a framing field each may
        /// carry (which must not give them a body).
        interim: Vec<(u16, Option<&'static str>)>,
        version: &'static str,
        status: u16,
        fields: Vec<Field>,
        head_method: bool,
        upgrade: bool,
        body: Vec<u8>,
        /// How a chunked body is cut into chunks (sizes, taken in turn).
        chunk_sizes: Vec<usize>,
        extension: String,
        trailers: Vec<String>,
    }

    /// A Content-Length field's value, in terms of the body's real length n.
    #[derive(Debug, Clone, Copy)]
    enum Length {
        Exact,
        /// " n ": optional whitespace, which is not part of the value.
        Padded,
        LeadingZero,
        /// "n, n": the same length listed twice.
        Listed,
        TrailingComma,
        /// n + 1: a valid length, conflicting with Exact.
        Other,
        Plus,
        Minus,
        Hex,
        Blank,
        /// Over u64::MAX.
        Huge,
    }

    #[derive(Debug, Clone)]
    enum Field {
        Length(Length),
        /// A Transfer-Encoding value.
        Coding(&'static str),
        /// `Transfer-Encoding : chunked`, whitespace before the colon.
        SpacedCoding,
        Connection(&'static str),
        Other(String, String),
    }

    impl Field {
        fn line(&self, n: usize) -> String {
            match self {
                Self::Length(form) => format!("Content-Length: {}", form.value(n)),
                Self::Coding(coding) => format!("Transfer-Encoding: {coding}"),
                Self::SpacedCoding => "Transfer-Encoding : chunked".to_owned(),
                Self::Connection(tokens) => format!("Connection: {tokens}"),
                Self::Other(name, value) => format!("{name}: {value}"),
            }
        }
    }

    impl Length {
        fn value(self, n: usize) -> String {
            match self {
                Self::Exact => n.to_string(),
                Self::Padded => format!(" {n} "),
                Self::LeadingZero => format!("0{n}"),
                Self::Listed => format!("{n}, {n}"),
                Self::TrailingComma => format!("{n},"),
                Self::Other => (n + 1).to_string(),
                Self::Plus => format!("+{n}"),
                Self::Minus => format!("-{n}"),
                Self::Hex => format!("0x{n:x}"),
                Self::Blank => String::new(),
                Self::Huge => "99999999999999999999".to_owned(),
            }
        }
    }

    /// How RFC 9112 §6.3 has a response's body delimited.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Rfc {
        /// This framing and no other: the response must be read so.
        Framed(Framing),
        /// Read so, or refused: the RFC lets a recipient refuse it as ambiguous (both framing
        /// fields, a coding other than `chunked` alone, a length listed twice, whitespace
        /// before a colon, Transfer-Encoding in HTTP/1.0).
        MayRefuse(Framing),
        /// Must be refused.
        Invalid,
    }

    /// RFC 9112 §6.3's rules, in its order, written from the fields as generated rather than
    /// as the codec sees them.
    fn rfc_framing(spec: &Spec) -> Rfc {
        let unreadable = !matches!(spec.version, "HTTP/1.1" | "HTTP/1.0") || spec.status < 100;
        if unreadable || (spec.status == 101 && !spec.upgrade) {
            return Rfc::Invalid;
        }
        // Rule 1: HEAD, 1xx, 204 and 304 have no body, whatever their fields say.
        if spec.head_method || spec.status < 200 || matches!(spec.status, 204 | 304) {
            return Rfc::Framed(Framing::Empty);
        }
        let n = spec.body.len();
        let mut codings = Vec::new();
        let mut lengths = Vec::new();
        let mut clean = true;
        for field in &spec.fields {
            match field {
                Field::Coding(value) => codings.push(*value),
                // Read as if without the whitespace, which a proxy must remove (RFC 9112 §5.1).
                Field::SpacedCoding => {
                    clean = false;
                    codings.push("chunked");
                }
                Field::Length(form) => lengths.push(form.value(n)),
                _ => {}
            }
        }
        // Rules 3 and 4: Transfer-Encoding wins; chunked last is chunked, else to the close.
        if !codings.is_empty() {
            let list: Vec<&str> = codings
                .iter()
                .flat_map(|c| c.split(','))
                .map(str::trim)
                .collect();
            let framing = match list.iter().rev().find(|c| !c.is_empty()) {
                Some(last) if last.eq_ignore_ascii_case("chunked") => Framing::Chunked,
                _ => Framing::Close,
            };
            clean &= list.len() == 1 && lengths.is_empty() && spec.version == "HTTP/1.1";
            return if clean && framing == Framing::Chunked {
                Rfc::Framed(framing)
            } else {
                Rfc::MayRefuse(framing)
            };
        }
        if lengths.is_empty() {
            // Rule 8: a response with neither runs to the close.
            return Rfc::Framed(Framing::Close);
        }
        // Rules 5 and 6: every listed length must be digits and the same.
        let members: Vec<&str> = lengths
            .iter()
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .collect();
        let parsed: Vec<Option<u64>> = members
            .iter()
            .filter(|m| !m.is_empty())
            .map(|m| {
                m.bytes()
                    .all(|b| b.is_ascii_digit())
                    .then(|| m.parse().ok())
                    .flatten()
            })
            .collect();
        match parsed.first() {
            Some(Some(first)) if parsed.iter().all(|p| *p == Some(*first)) => {
                if members.len() == 1 {
                    Rfc::Framed(Framing::Length(*first))
                } else {
                    Rfc::MayRefuse(Framing::Length(*first))
                }
            }
            _ => Rfc::Invalid,
        }
    }

    /// Whether the connection may carry another response after this one (RFC 9112 §9.3), as
    /// the codec decides it: HTTP/1.1, no `close`, and a body that does not end with it.
    fn persists(spec: &Spec, framing: Framing) -> bool {
        let close = spec.fields.iter().any(|field| match field {
            Field::Connection(tokens) => tokens
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close")),
            _ => false,
        });
        spec.version == "HTTP/1.1" && !close && framing != Framing::Close
    }

    /// The body bytes `framing` delimits, for a body generated as `body`.
    fn delimited(framing: Framing, body: &[u8]) -> Vec<u8> {
        match framing {
            Framing::Empty => Vec::new(),
            Framing::Length(n) => {
                let mut body = body.to_vec();
                body.resize(n as usize, b'#');
                body
            }
            Framing::Chunked | Framing::Close => body.to_vec(),
        }
    }

    /// A response that follows on the same connection.
    const NEXT: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nNEXT";

    /// A response's bytes, and where its parts lie in them.
    struct Wire {
        bytes: Vec<u8>,
        /// Where each interim response starts.
        interims: Vec<usize>,
        /// The final response's head.
        head: Range<usize>,
        /// Where the final response ends (and NEXT, if there is one, starts).
        end: usize,
    }

    /// Writes `spec` out: its interim responses, its head, its body framed as RFC 9112 says the
    /// fields frame it, then NEXT unless the body runs to the close.
    fn wire(spec: &Spec) -> Wire {
        let mut bytes = Vec::new();
        let mut interims = Vec::new();
        for (code, field) in &spec.interim {
            interims.push(bytes.len());
            bytes.extend_from_slice(format!("HTTP/1.1 {code} Interim\r\n").as_bytes());
            if let Some(field) = field {
                bytes.extend_from_slice(format!("{field}\r\n").as_bytes());
            }
            bytes.extend_from_slice(b"\r\n");
        }
        let start = bytes.len();
        let status = format!("{} {:03} Final\r\n", spec.version, spec.status);
        bytes.extend_from_slice(status.as_bytes());
        for field in &spec.fields {
            bytes.extend_from_slice(format!("{}\r\n", field.line(spec.body.len())).as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        let head = start..bytes.len();
        let framing = match rfc_framing(spec) {
            Rfc::Framed(framing) | Rfc::MayRefuse(framing) => framing,
            Rfc::Invalid => Framing::Length(spec.body.len() as u64),
        };
        if framing == Framing::Chunked {
            let chunks = split(&spec.body, &spec.chunk_sizes);
            bytes.extend_from_slice(&chunked(&chunks, &spec.extension, &spec.trailers));
        } else {
            bytes.extend_from_slice(&delimited(framing, &spec.body));
        }
        let end = bytes.len();
        if framing != Framing::Close {
            bytes.extend_from_slice(NEXT);
        }
        Wire {
            bytes,
            interims,
            head,
            end,
        }
    }

    /// `body` cut into chunks of `sizes`, taken in turn.
    fn split(mut body: &[u8], sizes: &[usize]) -> Vec<Vec<u8>> {
        let mut chunks = Vec::new();
        for &size in sizes.iter().cycle() {
            if body.is_empty() {
                break;
            }
            let (chunk, rest) = body.split_at(size.min(body.len()));
            chunks.push(chunk.to_vec());
            body = rest;
        }
        chunks
    }

    /// The upstream's end of a connection: sends `pieces` in turn, then ends the stream (`eof`)
    /// or sends nothing more, ever.
    struct Script {
        pieces: VecDeque<Vec<u8>>,
        eof: bool,
    }

    impl AsyncRead for Script {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            match self.pieces.pop_front() {
                Some(mut piece) => {
                    let n = piece.len().min(buf.remaining());
                    buf.put_slice(&piece[..n]);
                    if n < piece.len() {
                        self.pieces.push_front(piece.split_off(n));
                    }
                    Poll::Ready(Ok(()))
                }
                None if self.eof => Poll::Ready(Ok(())),
                None => Poll::Pending,
            }
        }
    }

    impl AsyncWrite for Script {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A connection that receives `bytes` in pieces of `piece` (never empty ones, which would
    /// read as its end).
    fn connection(bytes: &[u8], piece: usize, eof: bool) -> Connection {
        let pieces = bytes.chunks(piece).map(<[u8]>::to_vec).collect();
        Connection::new(Box::new(Script { pieces, eof }))
    }

    fn outgoing(head_method: bool, upgrade: bool) -> Outgoing {
        let method = if head_method {
            Method::HEAD
        } else {
            Method::GET
        };
        let request = Request::builder()
            .method(method)
            .uri("/v1/models")
            .body(RequestBody::empty())
            .unwrap();
        Outgoing::new(
            request,
            &HeaderValue::from_static("upstream"),
            Exchange::upgrade_if(upgrade),
        )
    }

    /// Polls `future` once. A Script never waits on a waker, so Pending means that it wants
    /// bytes the script does not have: "need more".
    fn poll_once<F: Future>(future: F) -> Poll<F::Output> {
        std::pin::pin!(future).poll(&mut Context::from_waker(Waker::noop()))
    }

    /// Header fields as (lower-case name, value), sorted: a head's fields, whatever their order.
    type Fields = Vec<(String, Vec<u8>)>;

    /// A final response head as read: status, version, fields, framing, keep-alive.
    #[derive(Debug, Clone, PartialEq)]
    struct Seen {
        status: u16,
        version: Version,
        fields: Fields,
        framing: Framing,
        keep_alive: bool,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum End {
        /// Needs more bytes than have come.
        Waiting,
        Failed,
        /// The body has ended (or the protocol switched).
        Whole,
    }

    /// What was read of one response: its head, as much of its body as came, and how it ended.
    #[derive(Debug, Clone, PartialEq)]
    struct Transcript {
        head: Option<Seen>,
        body: Vec<u8>,
        end: End,
    }

    /// Reads one response off `conn` as `exchange` and `ResponseBody` do.
    fn read_one(conn: &mut Connection, out: &Outgoing) -> Transcript {
        let mut read = Transcript {
            head: None,
            body: Vec::new(),
            end: End::Failed,
        };
        let head = match poll_once(read_head(conn, out)) {
            Poll::Pending => {
                read.end = End::Waiting;
                return read;
            }
            Poll::Ready(Err(_)) => return read,
            Poll::Ready(Ok(head)) => head,
        };
        let mut fields: Vec<_> = (head.headers.iter())
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect();
        fields.sort();
        read.head = Some(Seen {
            status: head.status.as_u16(),
            version: head.version,
            fields,
            framing: head.framing,
            keep_alive: head.keep_alive,
        });
        if head.status == StatusCode::SWITCHING_PROTOCOLS {
            read.end = End::Whole;
            return read;
        }
        let mut decoder = Decoder::new(head.framing);
        let mut cx = Context::from_waker(Waker::noop());
        read.end = loop {
            let Connection { io, buf, .. } = conn;
            match framing::poll_piece(&mut decoder, buf, io, &mut cx) {
                Poll::Pending => break End::Waiting,
                Poll::Ready(Ok(Some(data))) => read.body.extend_from_slice(&data),
                Poll::Ready(Ok(None)) => break End::Whole,
                Poll::Ready(Err(_)) => break End::Failed,
            }
        };
        read
    }

    /// The final head as httparse alone reads it: status, version and sorted fields; None if it
    /// refuses it or finds it incomplete.
    fn httparse_head(head: &[u8]) -> Option<(u16, Version, Fields)> {
        let mut fields = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut fields);
        if response.parse(head) != Ok(httparse::Status::Complete(head.len())) {
            return None;
        }
        let version = match response.version? {
            0 => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let mut fields: Vec<_> = (response.headers.iter())
            .map(|f| (f.name.to_ascii_lowercase(), f.value.to_vec()))
            .collect();
        fields.sort();
        Some((response.code?, version, fields))
    }

    /// Framing fields, each kind of case often enough to be met in a run: clean ones (one
    /// Content-Length or `chunked`), one mutated, two lengths that may conflict, a coding with
    /// another framing field, or none at all.
    fn framing_fields() -> impl Strategy<Value = Vec<Field>> {
        use Length::*;
        // Valid lengths, then lists of them, then what is no length at all.
        let (valid, listed) = ([Exact, Padded, LeadingZero, Other], [Listed, TrailingComma]);
        let forms = [&valid[..], &listed, &[Plus, Minus, Hex, Blank, Huge]].concat();
        let length = prop::sample::select(forms).prop_map(Field::Length);
        let codings = vec![
            "chunked",
            "Chunked",
            "gzip, chunked",
            "chunked, gzip",
            "chunked, chunked",
            "chunked,",
            "gzip",
            "identity",
            "",
        ];
        let coding = prop::sample::select(codings).prop_map(Field::Coding);
        let mutated = prop_oneof![
            3 => length.clone(),
            3 => coding.clone(),
            1 => Just(Field::SpacedCoding),
        ];
        let maybe_same = prop::sample::select(vec![Exact, Other, LeadingZero, Listed]);
        let clean = prop::sample::select(vec![Field::Length(Exact), Field::Coding("chunked")]);
        prop_oneof![
            2 => clean.prop_map(|field| vec![field]),
            3 => mutated.prop_map(|field| vec![field]),
            1 => (maybe_same.clone(), maybe_same)
                .prop_map(|(a, b)| vec![Field::Length(a), Field::Length(b)]),
            1 => (coding.clone(), prop_oneof![length, coding]).prop_map(|(a, b)| vec![a, b]),
            1 => Just(Vec::new()),
        ]
    }

    fn other_field() -> impl Strategy<Value = Field> {
        let connection = prop_oneof![
            Just("close"),
            Just("Close"),
            Just("keep-alive"),
            Just("keep-alive, close"),
            Just("upgrade"),
        ];
        prop_oneof![
            connection.prop_map(Field::Connection),
            ("x-[a-z]{1,8}", "[!-~]([ -~]{0,14}[!-~])?").prop_map(|(n, v)| Field::Other(n, v)),
        ]
    }

    prop_compose! {
        fn fields()(
            framing in framing_fields(),
            other in prop::collection::vec(other_field(), 0..3),
        )(
            fields in Just([framing, other].concat()).prop_shuffle(),
        ) -> Vec<Field> {
            fields
        }
    }

    prop_compose! {
        fn spec()(
            interim in prop::collection::vec((
                prop_oneof![Just(100u16), Just(102), Just(103)],
                prop::option::of(prop_oneof![
                    Just("content-length: 5"), Just("transfer-encoding: chunked")]),
            ), 0..3),
            version in prop_oneof![12 => Just("HTTP/1.1"), 4 => Just("HTTP/1.0"), 1 => Just("HTTP/2.0")],
            status in prop_oneof![
                3 => Just(200u16),
                2 => prop::sample::select(vec![101, 204, 206, 304, 404, 502, 42]),
            ],
            fields in fields(),
            head_method in prop::bool::weighted(0.1),
            upgrade in any::<bool>(),
            body in prop::collection::vec(any::<u8>(), 0..40),
            chunk_sizes in prop::collection::vec(1usize..16, 1..6),
            extension in prop_oneof![Just(String::new()), "[a-z]{1,8}".prop_map(|e| format!(";{e}=1"))],
            trailers in prop::collection::vec("[a-z]{1,8}", 0..3),
        ) -> Spec {
            Spec { interim, version, status, fields, head_method, upgrade, body, chunk_sizes, extension, trailers }
        }
    }

    /// Checks one whole response, read in pieces of `piece`, against the model and httparse.
    fn check_framing(spec: &Spec, wire: &Wire, piece: usize) -> Result<(), TestCaseError> {
        let rfc = rfc_framing(spec);
        let reference = httparse_head(&wire.bytes[wire.head.clone()]);
        let mut conn = connection(&wire.bytes, piece, true);
        let read = read_one(&mut conn, &outgoing(spec.head_method, spec.upgrade));
        let Some(head) = read.head else {
            // Refused: only what httparse or the RFC lets a recipient refuse.
            prop_assert_eq!(read.end, End::Failed);
            let must_accept = matches!(rfc, Rfc::Framed(_)) && reference.is_some();
            prop_assert!(!must_accept, "refused, where RFC 9112 says {:?}", rfc);
            return Ok(());
        };
        let framing = match rfc {
            Rfc::Framed(framing) | Rfc::MayRefuse(framing) => framing,
            Rfc::Invalid => return Err(TestCaseError::fail("accepted invalid framing")),
        };
        let Some((status, version, fields)) = reference else {
            return Err(TestCaseError::fail("accepted a head httparse refuses"));
        };
        prop_assert_eq!(
            (head.status, head.version, &head.fields),
            (status, version, &fields)
        );
        prop_assert_eq!(head.framing, framing);
        prop_assert_eq!(head.keep_alive, persists(spec, framing));
        prop_assert_eq!(read.end, End::Whole);
        prop_assert_eq!(read.body, delimited(framing, &spec.body));
        if framing != Framing::Close && status != 101 {
            // The body ended where RFC 9112 says: the next response is read whole after it.
            let next = read_one(&mut conn, &outgoing(false, false));
            prop_assert_eq!(next.head.map(|h| h.status), Some(200));
            prop_assert_eq!((next.body, next.end), (b"NEXT".to_vec(), End::Whole));
        }
        Ok(())
    }

    /// Checks the response cut at `cut`, the connection then waiting or closed, against the
    /// whole response read the same way.
    fn check_cut(spec: &Spec, wire: &Wire, cut: usize, piece: usize) -> Result<(), TestCaseError> {
        let out = outgoing(spec.head_method, spec.upgrade);
        let whole = read_one(&mut connection(&wire.bytes, piece, true), &out);
        let cut_off = &wire.bytes[..cut];
        // Waiting: need more, or what the whole response reads as, so far; never another head,
        // never an error the whole response does not have.
        let waiting = read_one(&mut connection(cut_off, piece, false), &out);
        prop_assert!(waiting.end != End::Failed || whole.end == End::Failed);
        prop_assert!(waiting.head.is_none() || waiting.head == whole.head);
        prop_assert!(whole.body.starts_with(&waiting.body));
        let to_close = whole
            .head
            .as_ref()
            .is_some_and(|h| h.framing == Framing::Close);
        if whole.end == End::Whole && cut >= wire.end && !to_close {
            prop_assert_eq!(&waiting, &whole);
        } else if waiting.end == End::Whole {
            prop_assert_eq!(&waiting, &whole);
        }
        // Closed: a clean failure, unless the response had ended by then (a body that runs to
        // the close ends with it, as whatever part of it came).
        let closed = read_one(&mut connection(cut_off, piece, true), &out);
        prop_assert!(closed.end != End::Waiting);
        if closed.end == End::Whole {
            prop_assert_eq!(&closed.head, &whole.head);
            if to_close {
                prop_assert_eq!(&closed.body[..], &wire.bytes[wire.head.end.min(cut)..cut]);
            } else {
                prop_assert!(
                    cut >= wire.end && closed == whole,
                    "a cut response taken as whole"
                );
            }
        } else {
            prop_assert!(closed.head.is_none() || closed.head == whole.head);
        }
        Ok(())
    }

    /// Checks `answer_begun` at every cut of the interim responses and final head: whole interim
    /// heads are dropped, and the answer has begun once the final status line is there, never
    /// before any of it is.
    fn check_answer_begun(wire: &Wire) -> Result<(), TestCaseError> {
        let start = wire.head.start;
        let status_line = start
            + 2
            + (wire.bytes[start..].windows(2))
                .position(|w| w == b"\r\n")
                .unwrap();
        for cut in 0..=wire.head.end {
            let mut buf = BytesMut::from(&wire.bytes[..cut]);
            let begun = answer_begun(&mut buf);
            let from = if begun {
                start
            } else {
                // The last message boundary at or before the cut.
                let boundaries = wire.interims.iter().chain([&start]);
                *boundaries.filter(|&&at| at <= cut).max().unwrap_or(&0)
            };
            prop_assert!(!begun || cut > start, "begun at {} of an interim", cut);
            prop_assert!(
                begun || cut < status_line,
                "not begun at {} of a final",
                cut
            );
            prop_assert_eq!(&buf[..], &wire.bytes[from..cut], "cut at {}", cut);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every accepted response is read as RFC 9112 §6.3 frames it: its head as httparse
        /// reads it, its body as long as its framing fields say (none for HEAD, 1xx, 204 and
        /// 304), keep-alive only where the next response can be found, which is then read
        /// whole. Anything ambiguous may be refused; anything invalid must be.
        #[test]
        fn responses_are_framed_as_rfc_9112_says(spec in spec(), piece in 1usize..48) {
            check_framing(&spec, &wire(&spec), piece)?;
        }

        /// A response cut anywhere, then waiting or closed, is "need more" or a clean failure,
        /// never read differently from the whole response: a prefix of its body at most, taken
        /// as whole only if it had ended (or runs to the close).
        #[test]
        fn cut_responses_wait_or_fail(
            spec in spec(),
            cut in any::<prop::sample::Index>(),
            piece in 1usize..48,
        ) {
            let wire = wire(&spec);
            check_cut(&spec, &wire, cut.index(wire.bytes.len() + 1), piece)?;
        }

        /// While a request is still being sent, interim responses are passed over only whole,
        /// and the final answer counts as begun only once its status line is there.
        #[test]
        fn interim_responses_are_passed_over_whole(spec in spec()) {
            check_answer_begun(&wire(&spec))?;
        }
    }
}
