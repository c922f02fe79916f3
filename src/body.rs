//! Request bodies as they stream through: counted, size-limited and watched for silence, never
//! buffered.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use crate::error::ProxyError;
use crate::http::{IncomingBody, ReadError};

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("no body data for {0:?}")]
    Idle(Duration),
    #[error("{0}")]
    Stream(#[from] hyper::Error),
    #[error("{0}")]
    Read(#[from] ReadError),
}

impl BodyError {
    pub fn to_proxy_error(&self) -> ProxyError {
        match self {
            Self::TooLarge { limit } => ProxyError::BodyTooLarge { limit: *limit },
            other => ProxyError::ClientBody(other.to_string()),
        }
    }
}

/// Fails a body that stays silent for longer than its idle timeout. The deadline is moved lazily:
/// a frame only records the time, and the timer is re-armed when it fires early.
pub struct IdleTimer {
    pub limit: Duration,
    last_activity: Instant,
    /// Made the first time the body has to wait: most bodies never do, and then cost no timer.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            last_activity: Instant::now(),
            sleep: None,
        }
    }

    pub fn touch(&mut self) {
        self.last_activity = Instant::now();
    }

    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.last_activity + self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.last_activity + self.limit;
            if deadline <= Instant::now() {
                return true;
            }
            sleep.as_mut().reset(deadline);
        }
    }
}

/// A body read off an HTTP/1.1 connection or an HTTP/2 stream, as it comes.
pub enum Either<H1, H2> {
    Http1(H1),
    Http2(H2),
}

impl<H1, H2> Body for Either<H1, H2>
where
    H1: Body<Data = Bytes> + Unpin,
    H2: Body<Data = Bytes> + Unpin,
    BodyError: From<H1::Error> + From<H2::Error>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Http1(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
            Self::Http2(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Http1(body) => body.is_end_stream(),
            Self::Http2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Http1(body) => body.size_hint(),
            Self::Http2(body) => body.size_hint(),
        }
    }
}

/// A client's request body as it arrives: off an HTTP/1.1 connection, or an HTTP/2 stream.
pub enum Inbound {
    /// As it arrives, off the client's connection.
    Direct(Either<IncomingBody, Incoming>),
    /// What the proxy read ahead to look at (`ClientBody::read_ahead`), then the rest.
    ReadAhead(Box<ReadAhead>),
}

pub struct ReadAhead {
    /// Sent first, as they came.
    frames: VecDeque<Frame<Bytes>>,
    /// None: the body ended within what was read.
    rest: Option<Inbound>,
}

impl Body for Inbound {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Direct(body) => Pin::new(body).poll_frame(cx),
            Self::ReadAhead(ahead) => match ahead.frames.pop_front() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => match ahead.rest.as_mut() {
                    Some(rest) => Pin::new(rest).poll_frame(cx),
                    None => Poll::Ready(None),
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Direct(body) => body.is_end_stream(),
            Self::ReadAhead(ahead) => {
                ahead.frames.is_empty() && ahead.rest.as_ref().is_none_or(Body::is_end_stream)
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Direct(body) => body.size_hint(),
            Self::ReadAhead(ahead) => {
                let read: u64 = ahead
                    .frames
                    .iter()
                    .filter_map(|f| f.data_ref().map(|d| d.len() as u64))
                    .sum();
                let rest = ahead
                    .rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + read);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + read);
                }
                hint
            }
        }
    }
}

/// The client's request body, shared between the request sent upstream and the handler: when
/// the proxy answers an error itself, the handler reads and discards what the client is still
/// sending. Closing a connection with unread data makes the kernel reset it, and the client
/// would see a broken pipe instead of our answer.
#[derive(Clone)]
pub struct ClientBody(Arc<Mutex<Option<Inbound>>>);

impl ClientBody {
    pub fn new(body: Inbound) -> Self {
        let body = (!body.is_end_stream()).then_some(body);
        Self(Arc::new(Mutex::new(body)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Inbound>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads the body ahead, up to a little over `limit` bytes, so that it can be looked at
    /// before it goes upstream; what was read is put back to be sent first, unchanged. Returns
    /// the bytes read and whether they are the whole body (false: more than `limit` came).
    pub async fn read_ahead(&self, limit: u64, idle: Duration) -> Result<(Bytes, bool), BodyError> {
        let Some(mut body) = self.lock().take() else {
            return Ok((Bytes::new(), true));
        };
        let mut frames = VecDeque::new();
        let mut bytes = bytes::BytesMut::new();
        let outcome = loop {
            if bytes.len() as u64 > limit {
                break Ok(false);
            }
            match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => break Err(BodyError::Idle(idle)),
                Ok(None) => break Ok(true),
                Ok(Some(Err(error))) => break Err(error),
                Ok(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        bytes.extend_from_slice(data);
                    }
                    frames.push_back(frame);
                }
            }
        };
        let ended = matches!(outcome, Ok(true));
        if !(ended && frames.is_empty()) {
            let rest = (!ended).then_some(body);
            *self.lock() = Some(Inbound::ReadAhead(Box::new(ReadAhead { frames, rest })));
        }
        outcome.map(|whole| (bytes.freeze(), whole))
    }

    /// Replaces a body that `read_ahead` read whole with `bytes`.
    pub fn replace_read(&self, bytes: Bytes) {
        let frames = VecDeque::from([Frame::data(bytes)]);
        *self.lock() = Some(Inbound::ReadAhead(Box::new(ReadAhead {
            frames,
            rest: None,
        })));
    }

    /// A copy of a body that `read_ahead` read whole, to send to another upstream while this
    /// one stays as it is. Any other body copies as empty: callers copy only a body read whole.
    pub fn copy_read(&self) -> ClientBody {
        let copy = match &*self.lock() {
            Some(Inbound::ReadAhead(ahead)) if ahead.rest.is_none() => {
                let frames = ahead.frames.iter().filter_map(copy_frame).collect();
                Some(Inbound::ReadAhead(Box::new(ReadAhead {
                    frames,
                    rest: None,
                })))
            }
            _ => None,
        };
        Self(Arc::new(Mutex::new(copy)))
    }

    /// Reads what is left of the body in the background, for up to `within`, then drops it
    /// (and with it, if unfinished, the connection).
    pub fn discard_rest(&self, within: Duration) {
        let Some(mut body) = self.lock().take() else {
            return;
        };
        tokio::spawn(async move {
            let drain = async { while let Some(Ok(_)) = body.frame().await {} };
            let _ = tokio::time::timeout(within, drain).await;
        });
    }
}

fn copy_frame(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    match (frame.data_ref(), frame.trailers_ref()) {
        (Some(data), _) => Some(Frame::data(data.clone())),
        (None, Some(trailers)) => Some(Frame::trailers(trailers.clone())),
        (None, None) => None,
    }
}

/// A client's request body on its way upstream.
pub struct RequestBody {
    inner: Option<ClientBody>,
    seen: u64,
    limit: u64,
    counter: Arc<AtomicU64>,
    idle: Option<IdleTimer>,
    /// Over HTTP/2 a failed request body only resets the stream, and the response may never
    /// come; this tells the waiting request why it failed.
    failed: Option<oneshot::Sender<ProxyError>>,
}

impl RequestBody {
    /// The body, and a receiver that yields its error if it fails (and closes if it does not).
    pub fn new(
        inner: ClientBody,
        limit: u64,
        idle: Duration,
        counter: Arc<AtomicU64>,
    ) -> (Self, oneshot::Receiver<ProxyError>) {
        let (failed, on_failure) = oneshot::channel();
        let empty = inner.lock().is_none();
        let body = Self {
            inner: (!empty).then_some(inner),
            seen: 0,
            limit,
            counter,
            idle: (!empty).then(|| IdleTimer::new(idle)),
            failed: (!empty).then_some(failed),
        };
        (body, on_failure)
    }

    pub fn empty() -> Self {
        Self {
            inner: None,
            seen: 0,
            limit: 0,
            counter: Arc::default(),
            idle: None,
            failed: None,
        }
    }

    /// Stops sending; what the client still sends stays in the shared body to be discarded.
    fn fail(&mut self, error: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.inner = None;
        if let Some(failed) = self.failed.take() {
            let _ = failed.send(error.to_proxy_error());
        }
        Poll::Ready(Some(Err(error)))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(shared) = this.inner.as_ref() else {
            return Poll::Ready(None);
        };
        let polled = {
            let mut slot = shared.lock();
            match slot.as_mut() {
                Some(body) => {
                    let polled = Pin::new(body).poll_frame(cx);
                    if let Poll::Ready(None) = polled {
                        *slot = None;
                    }
                    polled
                }
                // The handler took it back: the request has already failed.
                None => Poll::Ready(None),
            }
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    this.counter.store(this.seen, Ordering::Relaxed);
                    if this.seen > this.limit {
                        return this.fail(BodyError::TooLarge { limit: this.limit });
                    }
                }
                if let Some(idle) = this.idle.as_mut() {
                    idle.touch();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.fail(e),
            Poll::Ready(None) => {
                this.inner = None;
                this.failed = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(idle) = this.idle.as_mut() else {
                    return Poll::Pending;
                };
                if !idle.poll_expired(cx) {
                    return Poll::Pending;
                }
                let limit = idle.limit;
                this.fail(BodyError::Idle(limit))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner
            .as_ref()
            .is_none_or(|shared| shared.lock().as_ref().is_none_or(Body::is_end_stream))
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self
            .inner
            .as_ref()
            .and_then(|shared| shared.lock().as_ref().map(Body::size_hint));
        hint.unwrap_or_else(|| SizeHint::with_exact(0))
    }
}
