//! WebSocket tunnels (or any upgraded protocol): the client's connection and the upstream's,
//! spliced both ways until either side closes, the tunnel has been silent both ways for the
//! upstream's idle timeout, or the drain cuts it.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Connection;
use super::access_log::AccessRecord;
use crate::http::OnUpgrade;
use crate::upstream::http1::Upgraded;
use crate::usage;

/// Runs a tunnel to its end. `conn`, held for as long, keeps the tunnel counted against
/// `server.max_connections`. The request's access record comes through `record` and is written
/// when the tunnel closes, with the usage `meter` read from what the upstream sent.
pub async fn splice(
    client: OnUpgrade,
    mut upstream: Upgraded,
    conn: Arc<Connection>,
    idle: Duration,
    (record, meter): (oneshot::Receiver<AccessRecord>, Option<usage::Session>),
) {
    let client = match client.connection().await {
        Ok(client) => client,
        Err(error) => {
            tracing::debug!(%error, "upgrade did not complete");
            return;
        }
    };
    let _open = crate::metrics::Open::websocket();
    let started = Instant::now();
    // Every byte either way is read from or written to the client: watching that side alone
    // sees all the tunnel's traffic.
    let mut client = Watched::new(client, started);
    client.meter = meter;
    let last = client.last.clone();
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match result {
            Ok((up, down)) => tracing::debug!(bytes_up = up, bytes_down = down, seconds = started.elapsed().as_secs_f64(), "tunnel closed"),
            Err(error) => tracing::debug!(%error, "tunnel closed with an error"),
        },
        () = silent_for(&last, started, idle) => tracing::debug!(?idle, "idle tunnel closed"),
        () = conn.drain.cut() => tracing::info!(after = ?started.elapsed(), "tunnel cut at the end of the drain timeout"),
    }
    if let (Ok(mut record), Some(meter)) = (record.await, client.meter.as_mut()) {
        record.note_usage(meter.finish());
    }
}

/// Resolves once nothing has moved for `idle`. `last` holds the milliseconds from `origin` to
/// the last movement; the timer is re-armed lazily when it fires early.
async fn silent_for(last: &AtomicU64, origin: Instant, idle: Duration) {
    loop {
        let moved = origin + Duration::from_millis(last.load(Ordering::Relaxed));
        let deadline = moved + idle;
        if deadline <= Instant::now() {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

/// A byte stream that notes when it last moved bytes.
struct Watched<T> {
    inner: T,
    origin: Instant,
    last: Arc<AtomicU64>,
    /// Reads the usage figures in what is written (what the upstream sent).
    meter: Option<usage::Session>,
}

impl<T> Watched<T> {
    fn new(inner: T, origin: Instant) -> Self {
        Self {
            inner,
            origin,
            last: Arc::default(),
            meter: None,
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written @ 1..)) = polled {
            this.touch();
            if let Some(meter) = this.meter.as_mut() {
                meter.pass(&buf[..written]);
            }
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
