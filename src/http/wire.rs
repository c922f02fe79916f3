//! A body read straight off its connection, on either side: a request body off a client
//! connection, a response body off an upstream one.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::AsyncRead;

use super::framing::{self, Decoder, Framing, Peer, ReadError};

/// What a body holds while it is read: the connection, with what has been read from it and not
/// yet used; and where the connection goes once the body has been read to its end.
pub trait Carrier {
    type Io: AsyncRead + Unpin;
    /// Whose body this is, for its errors.
    const PEER: Peer;
    /// The connection and its buffer.
    fn wire(&mut self) -> (&mut Self::Io, &mut BytesMut);
    /// The body has been read to its end: the connection can carry the next message.
    fn finish(self);
}

/// A body read off its connection as it arrives. A body dropped or failed before its end drops
/// its connection, since where the next message would start is then unknown.
pub struct WireBody<C> {
    /// None once the body has ended (or failed, or never was).
    carrier: Option<C>,
    decoder: Decoder,
}

impl<C: Carrier> WireBody<C> {
    /// No body: nothing to read.
    pub fn empty() -> Self {
        Self {
            carrier: None,
            decoder: Decoder::new(Framing::Empty),
        }
    }

    pub fn new(carrier: C, framing: Framing) -> Self {
        let mut body = Self {
            carrier: Some(carrier),
            decoder: Decoder::new(framing),
        };
        if body.decoder.is_done() {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let Some(carrier) = self.carrier.take() {
            carrier.finish();
        }
    }
}

impl<C: Carrier + Unpin> Body for WireBody<C> {
    type Data = Bytes;
    type Error = ReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        let this = self.get_mut();
        let Some(carrier) = this.carrier.as_mut() else {
            return Poll::Ready(None);
        };
        let (io, buf) = carrier.wire();
        match ready!(framing::poll_piece(&mut this.decoder, buf, io, cx)) {
            Ok(Some(data)) => {
                // Given back before the last bytes are relayed, to be ready for the next
                // message on the connection.
                if this.decoder.is_done() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Ok(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Err(broken) => {
                this.carrier = None;
                Poll::Ready(Some(Err(ReadError {
                    peer: C::PEER,
                    broken,
                })))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.carrier.is_none() || self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.carrier {
            None => SizeHint::with_exact(0),
            Some(_) => self.decoder.size_hint(),
        }
    }
}
