//! The HTTP/1.1 side of client connections. It is ours rather than hyper's for what a proxy in
//! front of SDKs needs: a kept-alive connection waiting for its next request holds no buffer, a
//! request that cannot be parsed is answered in OpenAI's error shape rather than with a bare
//! 400, and a request costs less. HTTP/2, over TLS or in cleartext, stays with hyper.
//!
//! One task per connection reads a request head, hands the request to its `Handler` and writes
//! the response. A request body takes the read half of the connection with it and gives it back
//! once read to its end; a body left unread ends the connection, since the next request's start
//! is then unknown.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::encode::{Encoder, Outlet, pump};
use super::framing::{Framing, Peer};
use super::head::{self, Reply, RequestHead};
use super::io::{BoxIo, Rewind};
use super::wire::{Carrier, WireBody};
use crate::drain;
use crate::error::ProxyError;

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

/// What answers the requests of a connection, and what the server loop needs to know of it.
pub trait Handler {
    /// The body of its responses.
    type Body: Body<Data = Bytes, Error: Send> + Send;

    /// The response to `request`.
    fn call(
        &self,
        request: Request<IncomingBody>,
    ) -> impl Future<Output = Response<Self::Body>> + Send;

    /// The response to a request whose head was refused.
    fn refuse(&self, error: ProxyError) -> Response<Self::Body>;

    /// The client's address, for the log.
    fn client(&self) -> SocketAddr;

    /// The drain the connection honours.
    fn drain(&self) -> &drain::Watch;

    /// Where the connection notes what it is waiting for.
    fn activity(&self) -> &Activity;
}

/// How a connection left this module.
pub enum Served {
    Closed,
    /// The client sent HTTP/2's cleartext preface: the connection is hyper's now, with the bytes
    /// already read put back in front.
    Http2(Rewind<BoxIo>),
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

/// The stage a connection is at. Set as it moves on (a relaxed store), read only when a drain
/// cuts the connection, to say what kept it.
#[derive(Debug, Default)]
pub struct Activity(std::sync::atomic::AtomicU8);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Waiting for a request to begin.
    Idle,
    /// Reading a request head.
    Head,
    /// Waiting for the upstream's response head (the request body may still be flowing).
    Upstream,
    /// Relaying the response to the client.
    Response,
    /// Speaking HTTP/2: streams in flight.
    Http2,
}

impl Activity {
    pub fn set(&self, stage: Stage) {
        self.0
            .store(stage as u8, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn describe(&self) -> &'static str {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => "the next request to begin",
            1 => "the rest of a request head",
            2 => "the upstream's response",
            3 => "the rest of its response",
            _ => "its HTTP/2 streams",
        }
    }
}

pub async fn serve<H: Handler>(
    io: BoxIo,
    settings: &Settings,
    handler: &H,
    cleartext: bool,
    first_request: Instant,
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
    let mut draining = handler.drain().draining();
    let mut first = true;
    loop {
        let (mut reader, writer) = halves;
        if reader.buf.is_empty() {
            handler.activity().set(Stage::Idle);
            let wait = if first {
                first_request
            } else {
                Instant::now() + settings.keepalive_timeout
            };
            if !reader.request_begun(&mut draining, first, wait).await {
                return Served::Closed;
            }
        }
        handler.activity().set(Stage::Head);
        // The first head is due by the deadline set at the accept; a later one has its own.
        let due = if first {
            first_request
        } else {
            Instant::now() + settings.header_read_timeout
        };
        let head = tokio::time::timeout_at(
            due,
            reader.read_head(settings.max_header_size, first && cleartext),
        )
        .await;
        first = false;
        let next = match head {
            // Boxed: a request's state exists only while it is in flight.
            Ok(Ok(head)) => Box::pin(exchange(head, reader, writer, settings, handler)).await,
            Ok(Err(HeadError::Http2Preface)) => {
                let Reader { half, buf } = reader;
                return Served::Http2(Rewind::new(buf.freeze(), half.unsplit(writer)));
            }
            Ok(Err(HeadError::Refused(error))) => {
                refuse(handler, error, reader, writer).await;
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

/// Answers a request head that was refused, then ends the connection.
async fn refuse<H: Handler>(
    handler: &H,
    error: ProxyError,
    reader: Reader,
    mut writer: WriteHalf<BoxIo>,
) {
    tracing::debug!(client = %handler.client(), %error, "request head refused");
    let response = handler.refuse(error);
    if respond(&mut writer, response, &Reply::refused(), None)
        .await
        .is_ok()
    {
        linger(reader, writer).await;
    }
}

/// One request and its response. Gives the connection back if it can carry another request.
async fn exchange<H: Handler>(
    head: RequestHead,
    reader: Reader,
    mut writer: WriteHalf<BoxIo>,
    settings: &Settings,
    handler: &H,
) -> Option<(Reader, WriteHalf<BoxIo>)> {
    let RequestHead {
        mut parts,
        framing,
        reply,
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
    let upgrade = upgrade.then(|| OnUpgrade::offer(&mut parts.extensions));
    // The body takes the read half when there is one, and gives it back when read to its end.
    let (mut reader, body, returned) = match framing {
        Framing::Empty => (Some(reader), IncomingBody::empty(), None),
        framing => {
            let (give_back, returned) = oneshot::channel();
            let body = IncomingBody::new(Returning { reader, give_back }, framing);
            (None, body, Some(returned))
        }
    };
    let request = Request::from_parts(parts, body);
    handler.activity().set(Stage::Upstream);
    // Boxed on its own: built in place it would be copied whole into this request's state, and
    // that state whole into its box.
    let handling = Box::pin(handler.call(request));
    let response = match reader.as_mut() {
        // A client that hangs up while waiting cancels its request, upstream included.
        Some(current) => tokio::select! {
            response = handling => response,
            () = current.closed(settings.max_header_size) => return None,
        },
        None => handling.await,
    };

    handler.activity().set(Stage::Response);
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        hand_over(response, upgrade, reader, writer, &reply, handler).await;
        return None;
    }
    let keep = respond(&mut writer, response, &reply, reader.as_mut())
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

/// Writes a `101 Switching Protocols` and hands the connection to the upgrade that asked for it.
async fn hand_over<H: Handler>(
    response: Response<H::Body>,
    upgrade: Option<oneshot::Sender<Rewind<BoxIo>>>,
    reader: Option<Reader>,
    mut writer: WriteHalf<BoxIo>,
    reply: &Reply,
    handler: &H,
) {
    let (Some(upgrade), Some(current)) = (upgrade, reader) else {
        tracing::debug!(client = %handler.client(), "upstream switched protocols unasked");
        return;
    };
    if respond(&mut writer, response, reply, None).await.is_err() {
        return;
    }
    let Reader { half, buf } = current;
    let _ = upgrade.send(Rewind::new(buf.freeze(), half.unsplit(writer)));
}

/// The read half of a connection and what has been read from it but not yet used.
pub struct Reader {
    half: ReadHalf<BoxIo>,
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

    /// Waits, holding no buffer, for the next request to begin by `wait`; false if the
    /// connection ends instead.
    async fn request_begun(
        &mut self,
        draining: &mut drain::PhaseWait,
        first: bool,
        wait: Instant,
    ) -> bool {
        // Whatever capacity is left goes: an idle connection holds no buffer.
        self.buf = BytesMut::new();
        let arrived = tokio::select! {
            biased;
            () = draining => {
                if !first {
                    return false;
                }
                // Accepted just as the drain began: its client has most likely sent its
                // request already. Closing now would fail a request that a restart must not
                // refuse, so it gets a moment to arrive, and then its answer.
                tokio::time::timeout(FIRST_REQUEST_GRACE, self.read_some()).await
            }
            read = tokio::time::timeout_at(wait, self.read_some()) => read,
        };
        matches!(arrived, Ok(Ok(1..)))
    }

    async fn read_head(
        &mut self,
        max_size: usize,
        h2_allowed: bool,
    ) -> Result<RequestHead, HeadError> {
        loop {
            if h2_allowed {
                let n = self.buf.len().min(H2_PREFACE.len());
                if self.buf[..n] == H2_PREFACE[..n] {
                    if n == H2_PREFACE.len() {
                        return Err(HeadError::Http2Preface);
                    }
                } else if let Some(head) = self.parse_head()? {
                    return Ok(head);
                }
            } else if let Some(head) = self.parse_head()? {
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

    fn parse_head(&mut self) -> Result<Option<RequestHead>, HeadError> {
        head::parse_request(&mut self.buf).map_err(HeadError::Refused)
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

/// A request body read straight off the client's connection.
pub type IncomingBody = WireBody<Returning>;

/// What a request body holds: the read half, given back once the body has been read to its end.
pub struct Returning {
    reader: Reader,
    give_back: oneshot::Sender<Reader>,
}

impl Carrier for Returning {
    type Io = ReadHalf<BoxIo>;
    const PEER: Peer = Peer::Client;

    fn wire(&mut self) -> (&mut ReadHalf<BoxIo>, &mut BytesMut) {
        (&mut self.reader.half, &mut self.reader.buf)
    }

    fn finish(self) {
        let _ = self.give_back.send(self.reader);
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
fn linger(mut reader: Reader, mut writer: WriteHalf<BoxIo>) -> Pin<Box<impl Future<Output = ()>>> {
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

/// Writes a response. Boxed, response included, so that this state exists only while a response
/// is being written.
fn respond<'a, B>(
    writer: &'a mut WriteHalf<BoxIo>,
    response: Response<B>,
    reply: &'a Reply,
    reader: Option<&'a mut Reader>,
) -> Pin<Box<impl Future<Output = io::Result<bool>> + 'a>>
where
    B: Body<Data = Bytes, Error: Send> + Send + 'a,
{
    Box::pin(write_response(writer, response, reply, reader))
}

/// Writes a response, its body streamed as it comes (see `pump`). Ok(false): the connection
/// cannot carry another request after this one.
async fn write_response<B>(
    writer: &mut WriteHalf<BoxIo>,
    response: Response<B>,
    reply: &Reply,
    reader: Option<&mut Reader>,
) -> io::Result<bool>
where
    B: Body<Data = Bytes, Error: Send> + Send,
{
    let (parts, body) = response.into_parts();
    let mut out = Vec::with_capacity(512);
    let exact = body.size_hint().exact();
    let (framing, mut keep) = head::write_response(&mut out, &parts, reply, exact);
    let mut encoder = Encoder::new(framing, out);
    let mut outlet = ToClient { writer, reader };
    if framing == Framing::Empty {
        Outlet::<B>::write(&mut outlet, &encoder.out).await?;
    } else {
        let body = std::pin::pin!(body);
        match pump(body, &mut encoder, &mut outlet).await? {
            None => keep &= encoder.whole(),
            Some(_) => {
                // Cut mid-body: the client sees the body end early, as framed.
                keep = false;
                if !encoder.out.is_empty() {
                    Outlet::<B>::write(&mut outlet, &encoder.out).await?;
                }
            }
        }
    }
    Outlet::<B>::flush(&mut outlet).await?;
    Ok(keep)
}

/// The client's connection, as a response body is pumped onto it.
struct ToClient<'a> {
    writer: &'a mut WriteHalf<BoxIo>,
    /// The read side, while the request body does not hold it: watched for the client hanging up.
    reader: Option<&'a mut Reader>,
}

impl<B> Outlet<B> for ToClient<'_>
where
    B: Body<Data = Bytes, Error: Send> + Send,
{
    type Stop = io::Error;

    async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes).await
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.writer.flush().await
    }

    /// The next body frame; an error if the client hangs up meanwhile (only noticed while the
    /// request body is done, since until then the read side belongs to it).
    async fn next_frame(
        &mut self,
        mut body: Pin<&mut B>,
    ) -> io::Result<Option<Result<Frame<Bytes>, B::Error>>> {
        use http_body_util::BodyExt;
        match self.reader.as_deref_mut() {
            Some(reader) => tokio::select! {
                frame = body.frame() => Ok(frame),
                () = reader.closed(STACK_READ) => Err(io::ErrorKind::ConnectionAborted.into()),
            },
            None => Ok(body.frame().await),
        }
    }
}

/// The client's side of an upgraded connection, for the tunnel to splice. (Shared, because a
/// request's extensions must be cloneable.)
#[derive(Clone)]
pub struct OnUpgrade(Arc<std::sync::Mutex<Option<oneshot::Receiver<Rewind<BoxIo>>>>>);

impl OnUpgrade {
    /// Puts an `OnUpgrade` in a request's extensions; the connection goes through the returned
    /// sender once the upgrade is answered.
    fn offer(extensions: &mut http::Extensions) -> oneshot::Sender<Rewind<BoxIo>> {
        let (sender, receiver) = oneshot::channel();
        extensions.insert(Self(Arc::new(std::sync::Mutex::new(Some(receiver)))));
        sender
    }

    pub async fn connection(self) -> Result<Rewind<BoxIo>, String> {
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
