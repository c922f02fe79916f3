//! A body written onto a connection, on either side: a response to a client, a request to the
//! upstream. The `Encoder` frames it as its `Framing` says; `pump` streams it frame by frame as
//! it comes, through an `Outlet` that knows the connection.

use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use hyper::body::{Body, Frame};

use super::framing::{BODY_READ, Framing};

/// Frames a body's data for the wire, gathering it behind the head in one pending write.
pub struct Encoder {
    framing: Framing,
    /// Bytes gathered for the next write: the head first, then framed body data.
    pub out: Vec<u8>,
    /// Body bytes framed so far.
    sent: u64,
    /// More came than the body's length says: the surplus was not written.
    overlong: bool,
}

impl Encoder {
    /// An encoder for a body of `framing`, behind `head`, which is written first.
    pub fn new(framing: Framing, head: Vec<u8>) -> Self {
        Self {
            framing,
            out: head,
            sent: 0,
            overlong: false,
        }
    }

    /// Counts `data`, cut to what its length leaves room for, and opens its chunk.
    fn open(&mut self, data: Bytes) -> Bytes {
        let data = match self.framing {
            Framing::Length(n) => {
                let room = n.saturating_sub(self.sent);
                if (data.len() as u64) > room {
                    self.overlong = true;
                    data.slice(..room as usize)
                } else {
                    data
                }
            }
            _ => data,
        };
        self.sent += data.len() as u64;
        if self.framing == Framing::Chunked {
            self.out
                .extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        data
    }

    /// Closes the chunk that `open` began.
    fn close(&mut self) {
        if self.framing == Framing::Chunked {
            self.out.extend_from_slice(b"\r\n");
        }
    }

    /// Frames `data` into the pending write, copied.
    pub fn copy(&mut self, data: Bytes) {
        let data = self.open(data);
        self.out.extend_from_slice(&data);
        self.close();
    }

    /// Ends the body: a chunked one with its last chunk.
    pub fn end(&mut self) {
        if self.framing == Framing::Chunked {
            self.out.extend_from_slice(b"0\r\n\r\n");
        }
    }

    /// Whether what was framed is the body its length says, no more and no less.
    pub fn whole(&self) -> bool {
        match self.framing {
            Framing::Length(n) => !self.overlong && self.sent == n,
            _ => true,
        }
    }
}

/// The connection a body is pumped onto: how bytes go out, and how the pump waits for the
/// body's next frame. `Stop` ends the pump early (the connection failed, or the outlet saw a
/// reason to stop).
pub trait Outlet<B: Body> {
    type Stop;

    /// Writes `bytes` out.
    fn write(&mut self, bytes: &[u8]) -> impl Future<Output = Result<(), Self::Stop>> + Send;

    /// Flushes what was written.
    fn flush(&mut self) -> impl Future<Output = Result<(), Self::Stop>> + Send;

    /// The body's next frame, waited for.
    #[allow(clippy::type_complexity)]
    fn next_frame(
        &mut self,
        body: Pin<&mut B>,
    ) -> impl Future<Output = Result<Option<Result<Frame<Bytes>, B::Error>>, Self::Stop>> + Send;

    /// A data frame on its way out.
    fn take(&mut self, _data: &Bytes) -> Result<(), Self::Stop> {
        Ok(())
    }

    /// The body has ended, before its end is written.
    fn end(&mut self) -> Result<(), Self::Stop> {
        Ok(())
    }
}

/// Writes what `encoder` holds, then `body` as it comes: frames already there are gathered into
/// one write, and a frame that has to be waited for is preceded by a write of what is gathered,
/// so an SSE event is never held back. Ok(None): the body went out whole, flushed. Ok(Some):
/// the body failed; what was gathered since the last write is still in the encoder.
pub async fn pump<B, O>(
    mut body: Pin<&mut B>,
    encoder: &mut Encoder,
    outlet: &mut O,
) -> Result<Option<B::Error>, O::Stop>
where
    B: Body<Data = Bytes>,
    O: Outlet<B>,
{
    loop {
        // Whatever is ready now joins the pending write; whatever is not yet is awaited only
        // after that write.
        let ready_now = std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await;
        let frame = match ready_now {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                if !encoder.out.is_empty() {
                    outlet.write(&encoder.out).await?;
                    outlet.flush().await?;
                    encoder.out.clear();
                }
                outlet.next_frame(body.as_mut()).await?
            }
        };
        let data = match frame {
            None => break,
            Some(Err(error)) => return Ok(Some(error)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                // Trailers and empty frames have nothing to write.
                _ => continue,
            },
        };
        outlet.take(&data)?;
        let data = encoder.open(data);
        if data.len() >= BODY_READ {
            // Large: written from where it lies rather than copied.
            outlet.write(&encoder.out).await?;
            encoder.out.clear();
            outlet.write(&data).await?;
        } else {
            encoder.out.extend_from_slice(&data);
        }
        encoder.close();
    }
    outlet.end()?;
    encoder.end();
    if !encoder.out.is_empty() {
        outlet.write(&encoder.out).await?;
        encoder.out.clear();
    }
    outlet.flush().await?;
    Ok(None)
}
