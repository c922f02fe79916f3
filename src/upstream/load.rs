//! The requests an HTTP/2 connection carries: counted while they are in flight, so that the pool
//! picks the least busy connection and closes one idle for too long.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The requests on an HTTP/2 connection, and since when it has had none.
pub(super) struct Load {
    in_flight: AtomicUsize,
    born: Instant,
    /// Nanoseconds after `born`; meaningful while `in_flight` is 0.
    idle_since: AtomicU64,
}

impl Load {
    pub fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            born: Instant::now(),
            idle_since: AtomicU64::new(0),
        }
    }

    /// How many requests the connection carries now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// One more request on the connection, until the returned share is dropped.
    pub fn take(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn release(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            // Racing a take on another thread can only leave an older time, which at worst
            // closes an idle connection early.
            let nanos = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.idle_since.store(nanos, Ordering::Relaxed);
        }
    }

    /// Since when the connection has carried no request; None while it carries one.
    pub fn idle_since(&self) -> Option<Instant> {
        (self.in_flight() == 0)
            .then(|| self.born + Duration::from_nanos(self.idle_since.load(Ordering::Relaxed)))
    }
}

/// A response's share of its HTTP/2 connection, held by the response body until it ends or is
/// dropped.
pub struct InFlight(Arc<Load>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.release();
    }
}
