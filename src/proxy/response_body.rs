//! What goes back to the client: the upstream's body as it arrives, or one the proxy made,
//! counted, metered for usage and watched for silence.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;

use crate::body::{BodyError, IdleTimer};
use crate::http::http2::OpenStream;
use crate::proxy::access_log::AccessRecord;
use crate::upstream::UpstreamBody;
use crate::usage;

/// What goes back to the client: the upstream's body as it arrives, or one the proxy made.
/// It carries the request's access record, written when the body ends or is dropped.
pub struct ResponseBody {
    kind: ResponseKind,
    record: Option<AccessRecord>,
    /// Over HTTP/2, the stream it is sent on, counted open for as long as the body lives.
    stream: Option<OpenStream>,
    /// Reads the upstream's usage figures as the body passes, for the record.
    meter: Option<Box<usage::Meter>>,
    /// Where the record goes instead: a WebSocket tunnel, which writes it when it closes.
    record_to: Option<oneshot::Sender<AccessRecord>>,
}

enum ResponseKind {
    Whole(Option<Bytes>),
    Upstream {
        inner: UpstreamBody,
        idle: IdleTimer,
    },
}

impl ResponseBody {
    pub fn whole(bytes: Bytes) -> Self {
        Self {
            kind: ResponseKind::Whole((!bytes.is_empty()).then_some(bytes)),
            record: None,
            stream: None,
            meter: None,
            record_to: None,
        }
    }

    pub fn upstream(inner: UpstreamBody, idle: Duration) -> Self {
        Self {
            kind: ResponseKind::Upstream {
                inner,
                idle: IdleTimer::new(idle),
            },
            record: None,
            stream: None,
            meter: None,
            record_to: None,
        }
    }

    pub fn hold_stream(&mut self, stream: OpenStream) {
        self.stream = Some(stream);
    }

    pub fn set_record(&mut self, record: AccessRecord) {
        match self.record_to.take() {
            // A tunnel that never opened drops the receiver: the record is written now.
            Some(tunnel) => drop(tunnel.send(record)),
            None => self.record = Some(record),
        }
    }

    pub fn meter(&mut self, meter: Option<Box<usage::Meter>>) {
        self.meter = meter;
    }

    pub fn send_record_to(&mut self, tunnel: Option<oneshot::Sender<AccessRecord>>) {
        self.record_to = tunnel;
    }

    /// Puts what the meter read into the record, before the record is written.
    fn read_meter(&mut self) {
        if let (Some(mut meter), Some(record)) = (self.meter.take(), self.record.as_mut()) {
            record.note_usage(meter.finish());
        }
    }

    fn count(&mut self, bytes: usize) {
        if let Some(record) = self.record.as_mut() {
            record.bytes_out += bytes as u64;
        }
    }

    fn finish(&mut self) {
        self.kind = ResponseKind::Whole(None);
        self.read_meter();
        // Dropping the record writes the access log line.
        self.record = None;
    }
}

impl Drop for ResponseBody {
    /// A body dropped before its end (the client went, or its last frame was known to be the
    /// last) still has its usage written.
    fn drop(&mut self) {
        self.read_meter();
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            ResponseKind::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ResponseKind::Upstream { inner, idle, .. } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    idle.touch();
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending if idle.poll_expired(cx) => {
                    Poll::Ready(Some(Err(BodyError::Idle(idle.limit))))
                }
                Poll::Pending => Poll::Pending,
            },
        };
        let polled = ready!(polled);
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.count(data.len());
                    if let Some(meter) = this.meter.as_mut() {
                        meter.pass(data);
                    }
                }
            }
            Some(Err(e)) => {
                if let Some(record) = this.record.as_mut() {
                    record.note_cut(e);
                }
                this.finish();
            }
            None => this.finish(),
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Whole(bytes) => bytes.is_none(),
            ResponseKind::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Whole(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ResponseKind::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
