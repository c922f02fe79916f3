//! Response bodies from the upstream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::http1;
use super::load::InFlight;
use crate::body::{BodyError, Either};

/// A response body from the upstream, holding its connection (HTTP/1.1) or its share of one
/// (HTTP/2) until it ends or is dropped.
pub struct UpstreamBody {
    body: Either<http1::ResponseBody, Incoming>,
    /// The HTTP/2 connection's count of the requests it carries includes this one meanwhile.
    _lease: Option<InFlight>,
}

impl UpstreamBody {
    pub(super) fn http1(body: http1::ResponseBody) -> Self {
        Self {
            body: Either::Http1(body),
            _lease: None,
        }
    }

    pub(super) fn http2(body: Incoming, lease: InFlight) -> Self {
        Self {
            body: Either::Http2(body),
            _lease: Some(lease),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
