//! What hyper's HTTP/2 server does not bound by itself: how long a client connection may hold a
//! socket with no stream open. Before its first request it has `header_read_timeout` from the
//! accept (a header block that never ends opens no stream, so it is bounded the same way);
//! afterwards, `keepalive_timeout` from the moment its last stream ended.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// How long a connection told to go away has to finish doing so while no stream is open: time
/// for the GOAWAY to be written and the client to acknowledge it.
pub const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// The streams open on one connection, counted by the requests themselves.
#[derive(Clone)]
pub struct Streams(Arc<watch::Sender<usize>>);

impl Streams {
    pub fn new() -> Self {
        Self(Arc::new(watch::Sender::new(0)))
    }

    /// Counts a stream as open until the returned guard is dropped.
    pub fn open(&self) -> OpenStream {
        self.0.send_modify(|n| *n += 1);
        OpenStream(self.clone())
    }

    /// Resolves once no stream has been open until `first` (if none ever was by then), or for
    /// `idle` since the last one ended.
    pub async fn idle(&self, first: Instant, idle: Duration) {
        let mut open = self.0.subscribe();
        let mut deadline = first;
        loop {
            if *open.borrow_and_update() == 0 {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => return,
                    _ = open.changed() => {}
                }
            } else {
                // Ignoring the error is sound: the sender lives in `self`.
                let _ = open.changed().await;
                // Whenever the count moves while streams are open; the last move to zero wins.
                deadline = Instant::now() + idle;
            }
        }
    }
}

/// One open stream; closes it in the count when dropped. Its response body holds it, so that
/// the stream counts as open until hyper is done with the body (sent whole, or dropped when the
/// stream is reset).
pub struct OpenStream(Streams);

impl Drop for OpenStream {
    fn drop(&mut self) {
        (self.0).0.send_modify(|n| *n -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_first_deadline_then_from_the_last_stream() {
        let streams = Streams::new();
        let start = Instant::now();
        let first = start + Duration::from_secs(2);
        streams.idle(first, Duration::from_secs(5)).await;
        assert_eq!(Instant::now(), first);

        let watcher = tokio::spawn({
            let streams = streams.clone();
            async move { streams.idle(Instant::now(), Duration::from_secs(5)).await }
        });
        let a = streams.open();
        let b = streams.open();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!watcher.is_finished(), "streams are open");
        drop(a);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!watcher.is_finished(), "a stream is still open");
        drop(b);
        let ended = Instant::now();
        watcher.await.unwrap();
        assert_eq!(Instant::now(), ended + Duration::from_secs(5));
    }
}
