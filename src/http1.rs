//! The HTTP/1.1 side of client connections. It is ours rather than hyper's for what a proxy in
//! front of SDKs needs: a kept-alive connection waiting for its next request holds no buffer
//! (hyper holds about 24 KiB per connection, idle or not), a request that cannot be parsed is
//! answered in OpenAI's error shape rather than with a bare 400, and a request costs fewer
//! instructions. HTTP/2, over TLS or in cleartext, stays with hyper.
//!
//! One task per connection reads a request head, hands the request to the proxy and writes the
//! response. A request body takes the read half of the connection with it and gives it back once
//! read to its end; a body left unread ends the connection, since the next request's start is
//! then unknown.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::oneshot;

use crate::access_log::RequestId;
use crate::body::{Inbound, ResponseBody};
use crate::error::ProxyError;
use crate::framing::{self, BODY_READ, Broken, Decoder, Framing, MAX_HEADERS, Noted, Spans, span};
use crate::headers;
use crate::proxy;

/// A client connection's byte stream: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub type ClientIo = Box<dyn Io>;

#[derive(Debug, Clone)]
pub struct Settings {
    /// For a request head to arrive once it has begun. (The first one is due a fixed time after
    /// the accept, handshake included: see `serve`.)
    pub header_read_timeout: Duration,
    /// For the next request on a kept-alive connection to begin.
    pub keepalive_timeout: Duration,
    pub max_header_size: usize,
    /// A body declared longer is refused without a `100 Continue`.
    pub max_request_body: u64,
}

/// How a connection left this module.
pub enum Served {
    Closed,
    /// The client sent HTTP/2's cleartext preface: the connection is hyper's now, with the bytes
    /// already read put back in front.
    Http2(Rewind<ClientIo>),
}

/// A read on the stack: what a connection waiting for a request head reads into.
const STACK_READ: usize = 4096;
/// How long a request body may go on arriving after its response was sent before the
/// connection is closed instead of kept (nginx's lingering_time).
const BODY_AFTER_RESPONSE: Duration = Duration::from_secs(30);
/// How long a connection accepted just before a drain has for its first request to arrive.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);
/// After an answer that ends the connection, how long to read and discard what the client is
/// still sending, so that closing does not reset the connection under the answer.
const LINGER: Duration = Duration::from_secs(2);
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub async fn serve(
    io: ClientIo,
    settings: &Settings,
    conn: &Arc<proxy::Connection>,
    cleartext: bool,
    first_request: tokio::time::Instant,
) -> Served {
    let (half, writer) = tokio::io::split(io);
    let mut halves = (
        Reader {
            half,
            buf: BytesMut::new(),
        },
        writer,
    );
    // One wait for the whole connection, rather than one made anew for each request.
    let mut draining = conn.drain.draining();
    let mut first = true;
    loop {
        let (mut reader, mut writer) = halves;
        if reader.buf.is_empty() {
            // Whatever capacity is left goes: an idle connection holds no buffer.
            reader.buf = BytesMut::new();
            conn.activity.set(proxy::Stage::Idle);
            let wait = if first {
                first_request
            } else {
                tokio::time::Instant::now() + settings.keepalive_timeout
            };
            let arrived = tokio::select! {
                biased;
                () = &mut draining => {
                    if !first {
                        return Served::Closed;
                    }
                    // Accepted just as the drain began: its client has most likely sent its
                    // request already. Closing now would fail a request that a restart must not
                    // refuse, so it gets a moment to arrive, and then its answer.
                    tokio::time::timeout(FIRST_REQUEST_GRACE, reader.read_some()).await
                }
                read = tokio::time::timeout_at(wait, reader.read_some()) => read,
            };
            if !matches!(arrived, Ok(Ok(1..))) {
                return Served::Closed;
            }
        }
        conn.activity.set(proxy::Stage::Head);
        // The first head is due by the deadline set at the accept; a later one has its own.
        let due = if first {
            first_request
        } else {
            tokio::time::Instant::now() + settings.header_read_timeout
        };
        let head = tokio::time::timeout_at(
            due,
            reader.read_head(settings.max_header_size, first && cleartext),
        )
        .await;
        first = false;
        let next = match head {
            // Boxed, so that a request's state exists only while it is in flight: a task is as
            // large as its largest state, and an idle connection's should be small.
            Ok(Ok(head)) => Box::pin(exchange(head, reader, writer, settings, conn)).await,
            Ok(Err(HeadError::Http2Preface)) => {
                let Reader { half, buf } = reader;
                return Served::Http2(Rewind::new(buf.freeze(), half.unsplit(writer)));
            }
            Ok(Err(HeadError::Refused(error))) => {
                tracing::debug!(client = %conn.client, %error, "request head refused");
                let mut response = error.into_response(ResponseBody::whole);
                response
                    .headers_mut()
                    .insert(RequestId::HEADER, RequestId::next().header_value());
                let facts = RequestFacts::refused();
                if respond(&mut writer, response, &facts, None).await.is_ok() {
                    linger(reader, writer).await;
                }
                None
            }
            Ok(Err(HeadError::Closed)) | Err(_) => None,
        };
        match next {
            Some(kept) => halves = kept,
            None => return Served::Closed,
        }
    }
}

/// One request and its response. Gives the connection back if it can carry another request.
async fn exchange(
    head: Head,
    reader: Reader,
    mut writer: WriteHalf<ClientIo>,
    settings: &Settings,
    conn: &Arc<proxy::Connection>,
) -> Option<(Reader, WriteHalf<ClientIo>)> {
    let Head {
        mut parts,
        framing,
        facts,
        expect_continue,
        upgrade,
    } = head;
    let refused = matches!(framing, Framing::Length(n) if n > settings.max_request_body);
    if expect_continue && framing.has_body() && !refused {
        // Sent at once rather than on the body's first read: the proxy streams the body
        // upstream right away in any case.
        writer
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .ok()?;
    }
    let upgrade = upgrade.then(|| {
        let (sender, receiver) = oneshot::channel();
        parts
            .extensions
            .insert(OnUpgrade(Arc::new(std::sync::Mutex::new(Some(receiver)))));
        sender
    });
    // The body takes the read half when there is one, and gives it back when read to its end.
    let (mut reader, body, returned) = match framing {
        Framing::Empty => (Some(reader), IncomingBody::empty(), None),
        framing => {
            let (give_back, returned) = oneshot::channel();
            let body = IncomingBody::new(reader, framing, give_back);
            (None, body, Some(returned))
        }
    };
    let request = Request::from_parts(parts, Inbound::Http1(body));
    conn.activity.set(proxy::Stage::Upstream);
    // Boxed on its own: built in place it would be copied whole into this request's state, and
    // that state whole into its box.
    let handling = Box::pin(proxy::handle(conn, request));
    let response = match reader.as_mut() {
        // A client that hangs up while waiting cancels its request, upstream included.
        Some(current) => tokio::select! {
            response = handling => response,
            () = current.closed(settings.max_header_size) => return None,
        },
        None => handling.await,
    };

    conn.activity.set(proxy::Stage::Response);
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(upgrade), Some(current)) = (upgrade, reader) else {
            tracing::debug!(client = %conn.client, "upstream switched protocols unasked");
            return None;
        };
        respond(&mut writer, response, &facts, None).await.ok()?;
        let Reader { half, buf } = current;
        let _ = upgrade.send(Rewind::new(buf.freeze(), half.unsplit(writer)));
        return None;
    }

    let keep = respond(&mut writer, response, &facts, reader.as_mut())
        .await
        .ok()?;
    if !keep {
        // The client has been told that the connection ends: it ends now, whatever is left of
        // the request body.
        let _ = writer.shutdown().await;
    }
    if let Some(returned) = returned {
        let wait = if keep { BODY_AFTER_RESPONSE } else { LINGER };
        reader = match tokio::time::timeout(wait, returned).await {
            Ok(Ok(current)) => Some(current),
            _ => None,
        };
    }
    let reader = reader?;
    if !keep {
        linger(reader, writer).await;
        return None;
    }
    Some((reader, writer))
}

/// The read half of a connection and what has been read from it but not yet used.
pub struct Reader {
    half: ReadHalf<ClientIo>,
    buf: BytesMut,
}

enum HeadError {
    /// The client went away, or sent something that is not even a broken request.
    Closed,
    Http2Preface,
    Refused(ProxyError),
}

impl From<io::Error> for HeadError {
    fn from(_: io::Error) -> Self {
        Self::Closed
    }
}

impl Reader {
    /// Reads what has arrived. The bytes land on the stack first, so that a connection waiting
    /// for its next request holds no buffer at all. Ok(0) is the end of the stream.
    async fn read_some(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| {
            let mut stack = [MaybeUninit::<u8>::uninit(); STACK_READ];
            let mut read = ReadBuf::uninit(&mut stack);
            ready!(Pin::new(&mut self.half).poll_read(cx, &mut read))?;
            self.buf.extend_from_slice(read.filled());
            Poll::Ready(Ok(read.filled().len()))
        })
        .await
    }

    async fn read_head(&mut self, max_size: usize, h2_allowed: bool) -> Result<Head, HeadError> {
        loop {
            if h2_allowed {
                let n = self.buf.len().min(H2_PREFACE.len());
                if self.buf[..n] == H2_PREFACE[..n] {
                    if n == H2_PREFACE.len() {
                        return Err(HeadError::Http2Preface);
                    }
                } else if let Some(head) = parse_head(&mut self.buf)? {
                    return Ok(head);
                }
            } else if let Some(head) = parse_head(&mut self.buf)? {
                return Ok(head);
            }
            if self.buf.len() >= max_size {
                return Err(HeadError::Refused(ProxyError::HeadersTooLarge {
                    limit: max_size as u64,
                }));
            }
            if self.read_some().await? == 0 {
                return Err(HeadError::Closed);
            }
        }
    }

    /// Resolves when the client closes the connection (or it fails). What the client sends
    /// meanwhile, a pipelined request, is kept, up to `max` bytes.
    async fn closed(&mut self, max: usize) {
        while self.buf.len() < max {
            match self.read_some().await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
        std::future::pending().await
    }
}

/// Answers a connection over `server.max_connections` without reading its request: a fixed
/// 503, then a moment of reading and discarding into a small buffer (see `linger`).
pub async fn refuse_overloaded(mut stream: tokio::net::TcpStream) {
    static ANSWER: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        let body = ProxyError::Overloaded.body();
        let mut out = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    });
    if stream.write_all(&ANSWER).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let discard = async {
        let mut sink = [0u8; 512];
        while let Ok(1..) = tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {}
    };
    let _ = tokio::time::timeout(LINGER, discard).await;
}

/// Closes the sending side, then reads and discards for a moment: closing a socket with unread
/// data resets the connection, and the client could lose the answer just sent. (Boxed, as
/// `respond` is.)
fn linger(
    mut reader: Reader,
    mut writer: WriteHalf<ClientIo>,
) -> Pin<Box<impl Future<Output = ()>>> {
    Box::pin(async move {
        let _ = writer.shutdown().await;
        let discard = async {
            while let Ok(1..) = reader.read_some().await {
                reader.buf.clear();
            }
        };
        let _ = tokio::time::timeout(LINGER, discard).await;
    })
}

struct Head {
    parts: http::request::Parts,
    framing: Framing,
    facts: RequestFacts,
    expect_continue: bool,
    upgrade: bool,
}

/// What writing the response needs to know of its request.
struct RequestFacts {
    version: Version,
    head_method: bool,
    keep_alive: bool,
}

impl RequestFacts {
    fn refused() -> Self {
        Self {
            version: Version::HTTP_11,
            head_method: false,
            keep_alive: false,
        }
    }
}

/// Parses a complete request head off the front of `buf`; None while it is incomplete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, HeadError> {
    let malformed = |what| HeadError::Refused(ProxyError::Malformed(what));
    let refused = |error: httparse::Error| {
        malformed(match error {
            httparse::Error::TooManyHeaders => "more than 100 header fields",
            httparse::Error::Version => "not an HTTP/1.x request",
            _ => "the request head does not parse as HTTP/1.1",
        })
    };
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    // An incomplete head is parsed too, so that what can never become a request, such as a TLS
    // handshake sent to a cleartext port, is refused without waiting for the rest.
    let length = match request.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(refused(error)),
    };
    let method = request.method.unwrap_or_default();
    // Upper-case letters, '_' and '-', as nginx takes: `get` is not GET to every server.
    if !method
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b == b'_' || b == b'-')
    {
        return Err(malformed("invalid method"));
    }
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| malformed("invalid method"))?;
    let version = match request.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let path = span(buf, request.path.unwrap_or_default().as_bytes()).map_err(malformed)?;
    let spans = Spans::new(buf, request.headers).map_err(malformed)?;
    let head = buf.split_to(length).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path.0 as usize..path.1 as usize))
        .map_err(|_| malformed("invalid request target"))?;
    let (map, noted) = spans.header_map(&head).map_err(malformed)?;
    headers::check_host(&map, version == Version::HTTP_11).map_err(malformed)?;
    let Noted {
        framed,
        connection,
        expect,
        upgrade: upgrade_field,
    } = noted;

    let framing = if framed {
        framing::from_fields(&map, version).map_err(malformed)?
    } else {
        Framing::Empty
    };
    let keep_alive = match version {
        Version::HTTP_10 => {
            connection && headers::has_token(&map, header::CONNECTION, "keep-alive")
        }
        _ => !(connection && headers::has_token(&map, header::CONNECTION, "close")),
    };
    let expect_continue = expect
        && version == Version::HTTP_11
        && map
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let upgrade = upgrade_field
        && connection
        && version == Version::HTTP_11
        && method == Method::GET
        && framing == Framing::Empty
        && headers::is_websocket_upgrade(&map);
    let facts = RequestFacts {
        version,
        head_method: method == Method::HEAD,
        keep_alive,
    };
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = map;
    Ok(Some(Head {
        parts,
        framing,
        facts,
        expect_continue,
        upgrade,
    }))
}

#[derive(Debug, thiserror::Error)]
pub enum BodyReadError {
    #[error("the client closed the connection mid-body")]
    Truncated,
    #[error("malformed chunked encoding: {0}")]
    BadChunk(&'static str),
    #[error("reading the request body: {0}")]
    Io(#[from] io::Error),
}

impl From<Broken> for BodyReadError {
    fn from(broken: Broken) -> Self {
        match broken {
            Broken::Truncated => Self::Truncated,
            Broken::Framing(what) => Self::BadChunk(what),
            Broken::Io(error) => Self::Io(error),
        }
    }
}

/// A request body read straight off the connection.
pub struct IncomingBody {
    /// None once the body has ended (or failed, or never was).
    reading: Option<Reader>,
    decoder: Decoder,
    give_back: Option<oneshot::Sender<Reader>>,
}

impl IncomingBody {
    fn empty() -> Self {
        Self {
            reading: None,
            decoder: Decoder::new(Framing::Empty),
            give_back: None,
        }
    }

    fn new(reader: Reader, framing: Framing, give_back: oneshot::Sender<Reader>) -> Self {
        let mut body = Self {
            reading: Some(reader),
            decoder: Decoder::new(framing),
            give_back: Some(give_back),
        };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    /// The body has been read to its end: the connection can carry the next request.
    fn finish(&mut self) {
        if let (Some(reader), Some(give_back)) = (self.reading.take(), self.give_back.take()) {
            let _ = give_back.send(reader);
        }
    }

    fn fail(&mut self, error: BodyReadError) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        self.reading = None;
        self.give_back = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for IncomingBody {
    type Data = Bytes;
    type Error = BodyReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyReadError>>> {
        let this = self.get_mut();
        let Some(Reader { half, buf }) = this.reading.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(framing::poll_piece(&mut this.decoder, buf, half, cx)) {
            Ok(Some(data)) => {
                if this.decoder.is_done() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Ok(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Err(broken) => this.fail(broken.into()),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reading.is_none() || self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            None => SizeHint::with_exact(0),
            Some(_) => self.decoder.size_hint(),
        }
    }
}

/// Writes a response. Boxed, response included, so that this state exists only while a response
/// is being written: a task is as large as its largest state, and a connection waiting for its
/// next request should be small.
fn respond<'a>(
    writer: &'a mut WriteHalf<ClientIo>,
    response: Response<ResponseBody>,
    request: &'a RequestFacts,
    reader: Option<&'a mut Reader>,
) -> Pin<Box<impl Future<Output = io::Result<bool>> + 'a>> {
    Box::pin(write_response(writer, response, request, reader))
}

/// How the response body is delimited on the wire.
enum Delimit {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// Writes a response, its body streamed frame by frame as it comes: frames already there are
/// gathered into one write, and a frame that has to be waited for is preceded by a write of
/// what is gathered, so an SSE event is never held back. Ok(false): the connection cannot carry
/// another request after this one.
// TODO(#12): split below 80 lines; the allow goes then.
#[allow(clippy::too_many_lines)]
async fn write_response(
    writer: &mut WriteHalf<ClientIo>,
    response: Response<ResponseBody>,
    request: &RequestFacts,
    mut reader: Option<&mut Reader>,
) -> io::Result<bool> {
    let (parts, body) = response.into_parts();
    let status = parts.status;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(match request.version {
        Version::HTTP_10 => b"HTTP/1.0 ",
        _ => b"HTTP/1.1 ",
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // One pass over the fields, noting on the way the ones that decide this hop's framing.
    let (mut declared, mut close, mut dated) = (None, false, false);
    for (name, value) in &parts.headers {
        if name == header::CONNECTION {
            close |= headers::lists(value, "close");
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            match value.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if declared.is_none() => declared = Some(n),
                // Unusable or repeated: the length is written below from what is known.
                _ => continue,
            }
        }
        dated |= name == header::DATE;
        framing::write_field(&mut out, name, value);
    }
    let mut keep = request.keep_alive && !close;
    let delimit = if framing::bodiless(request.head_method, status) {
        Delimit::None
    } else if let Some(n) = declared {
        Delimit::Length(n)
    } else if let Some(n) = body.size_hint().exact() {
        Delimit::Length(n)
    } else if request.version == Version::HTTP_11 {
        Delimit::Chunked
    } else {
        keep = false;
        Delimit::Close
    };
    match delimit {
        Delimit::Length(n) if declared.is_none() => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Delimit::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if status == StatusCode::SWITCHING_PROTOCOLS {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if request.version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        date::write(&mut out);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");

    let mut body = std::pin::pin!(body);
    let mut sent = 0u64;
    let mut cut = false;
    if !matches!(delimit, Delimit::None) {
        loop {
            // Whatever is ready now joins the pending write; whatever is not yet, is awaited
            // only after that write.
            let ready_now =
                std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
            let frame = match ready_now {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    if !out.is_empty() {
                        writer.write_all(&out).await?;
                        writer.flush().await?;
                        out.clear();
                    }
                    next_frame(body.as_mut(), reader.as_deref_mut()).await?
                }
            };
            let data = match frame {
                None => break,
                Some(Err(_)) => {
                    // Cut mid-body: the client sees the body end early, as framed.
                    keep = false;
                    cut = true;
                    break;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    // Trailers and empty frames have nothing to write.
                    _ => continue,
                },
            };
            let data = match delimit {
                Delimit::Length(n) => {
                    let room = n.saturating_sub(sent);
                    if (data.len() as u64) > room {
                        keep = false;
                        data.slice(..room as usize)
                    } else {
                        data
                    }
                }
                _ => data,
            };
            sent += data.len() as u64;
            if let Delimit::Chunked = delimit {
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            }
            if data.len() >= BODY_READ {
                // Large: written from where it lies rather than copied.
                writer.write_all(&out).await?;
                out.clear();
                writer.write_all(&data).await?;
            } else {
                out.extend_from_slice(&data);
            }
            if let Delimit::Chunked = delimit {
                out.extend_from_slice(b"\r\n");
            }
        }
        match delimit {
            Delimit::Chunked if !cut => out.extend_from_slice(b"0\r\n\r\n"),
            Delimit::Length(n) if sent < n => keep = false,
            _ => {}
        }
    }
    if !out.is_empty() {
        writer.write_all(&out).await?;
    }
    writer.flush().await?;
    Ok(keep)
}

/// The next body frame; an error if the client hangs up meanwhile (only noticed while the
/// request body is done, since until then the read side belongs to it).
async fn next_frame(
    mut body: Pin<&mut ResponseBody>,
    reader: Option<&mut Reader>,
) -> io::Result<Option<Result<Frame<Bytes>, crate::body::BodyError>>> {
    use http_body_util::BodyExt;
    match reader {
        Some(reader) => tokio::select! {
            frame = body.frame() => Ok(frame),
            () = reader.closed(STACK_READ) => Err(io::ErrorKind::ConnectionAborted.into()),
        },
        None => Ok(body.frame().await),
    }
}

/// The client's side of an upgraded connection, for the tunnel to splice. (Shared, because a
/// request's extensions must be cloneable.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<std::sync::Mutex<Option<oneshot::Receiver<Rewind<ClientIo>>>>>);

impl OnUpgrade {
    pub async fn connection(self) -> Result<Rewind<ClientIo>, String> {
        let receiver = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .ok_or("the upgraded connection was already taken")?;
        receiver
            .await
            .map_err(|_| "the client connection closed before the upgrade".to_owned())
    }
}

/// A byte stream with bytes already read from it put back in front.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let taken = self.prefix.split_to(n);
            buf.put_slice(&taken);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The Date field, formatted once a second per thread rather than once a response.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }

    pub fn write(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with_borrow_mut(|(at, text)| {
            if *at != second || text.is_empty() {
                *at = second;
                *text = httpdate::fmt_http_date(now);
            }
            out.extend_from_slice(text.as_bytes());
        });
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn parse(wire: &[u8]) -> Result<Option<(Head, usize)>, ()> {
        let mut buf = BytesMut::from(wire);
        match parse_head(&mut buf) {
            Ok(Some(head)) => Ok(Some((head, wire.len() - buf.len()))),
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        }
    }

    proptest! {
        /// A valid request head is incomplete at every cut, and whole at its end: what is taken
        /// is what httparse says the head is, field for field, and the bytes after it are left
        /// for the body.
        #[test]
        fn request_heads_cut_anywhere_then_whole(
            method in prop_oneof![Just("GET"), Just("POST"), Just("DELETE")],
            path in "/v1/[a-z0-9/._-]{0,30}",
            fields in prop::collection::vec(("x-[a-z]{1,10}", "[ -~]{0,20}"), 0..6),
            cut in any::<prop::sample::Index>(),
            body in prop::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut wire = format!("{method} {path} HTTP/1.1\r\nHost: proxy\r\n");
            for (name, value) in &fields {
                wire.push_str(&format!("{name}: {}\r\n", value.trim()));
            }
            wire.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
            let head_len = wire.len();
            let mut wire = wire.into_bytes();
            wire.extend_from_slice(&body);
            let cut = cut.index(head_len);
            prop_assert!(matches!(parse(&wire[..cut]), Ok(None)), "cut at {cut}");

            let (head, taken) = parse(&wire).unwrap().expect("a whole head");
            let mut reference = [httparse::EMPTY_HEADER; 16];
            let mut request = httparse::Request::new(&mut reference);
            let status = request.parse(&wire).unwrap();
            prop_assert_eq!(status, httparse::Status::Complete(taken));
            prop_assert_eq!(taken, head_len);
            prop_assert_eq!(head.parts.method.as_str(), request.method.unwrap());
            prop_assert_eq!(head.parts.uri.to_string(), request.path.unwrap());
            for field in request.headers.iter() {
                let got: Vec<_> = head.parts.headers.get_all(field.name).iter().map(|v| v.as_bytes()).collect();
                prop_assert!(got.contains(&field.value), "{}", field.name);
            }
            prop_assert_eq!(head.framing, Framing::Length(body.len() as u64));
        }

        /// Whatever a mutation does to a head's framing fields or request line, a head is
        /// either refused or taken exactly as httparse reads it, with framing that
        /// framing::from_fields would give it.
        #[test]
        fn mutated_heads_are_refused_or_read_as_httparse_does(
            line in prop_oneof![Just("GET / HTTP/1.1"), Just("get / HTTP/1.1"), Just("GET  / HTTP/1.1"),
                Just("GET / HTTP/1.0"), Just("GET / HTTP/2.0"), Just("G\u{7f}T / HTTP/1.1")],
            framing in prop::collection::vec(prop_oneof![
                Just("Content-Length: 3"), Just("Content-Length: 3, 3"), Just("Content-Length: -3"),
                Just("Transfer-Encoding: chunked"), Just("Transfer-Encoding: gzip"),
                Just("Transfer-Encoding : chunked"), Just("Content-Length:3"),
                Just("Host: other"), Just(" folded: x")], 0..4),
        ) {
            let mut wire = format!("{line}\r\nHost: proxy\r\n");
            for field in &framing {
                wire.push_str(field);
                wire.push_str("\r\n");
            }
            wire.push_str("\r\n");
            let mut reference = [httparse::EMPTY_HEADER; 16];
            let mut request = httparse::Request::new(&mut reference);
            let parsed = request.parse(wire.as_bytes());
            match parse(wire.as_bytes()) {
                Ok(Some((head, taken))) => {
                    prop_assert_eq!(parsed, Ok(httparse::Status::Complete(taken)));
                    let expected = framing::from_fields(&head.parts.headers, head.parts.version);
                    prop_assert_eq!(Ok(head.framing), expected);
                    prop_assert_eq!(head.parts.headers.get_all(header::HOST).iter().count(), 1);
                    prop_assert!(head.parts.method.as_str().bytes().all(|b| b.is_ascii_uppercase()));
                }
                Ok(None) => prop_assert!(false, "a whole head taken as incomplete: {wire:?}"),
                Err(()) => {}
            }
        }
    }
}
