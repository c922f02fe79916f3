//! Draining: a signal every connection honours, and a count whose reaching zero says they are done.
//!
//! One `Drain` per listener, so that a reload can retire one listener's connections while the
//! others serve on; shutdown drains them all. Each connection and each WebSocket tunnel holds a
//! `Watch`: when the last one is dropped, the drain is complete (the mini-redis pattern).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Finish what is in flight, take nothing new.
    Draining,
    /// The drain timeout passed: stop now.
    Cut,
}

pub struct Drain {
    phase: watch::Sender<Phase>,
    tracker: mpsc::Sender<()>,
    all_done: mpsc::Receiver<()>,
}

/// Held by each connection or tunnel for as long as it lives.
#[derive(Clone)]
pub struct Watch {
    phase: watch::Receiver<Phase>,
    _tracker: mpsc::Sender<()>,
}

/// Held by an accept loop: it hears the drain but is not counted in it, and hands each
/// connection it accepts a `Watch` that is.
pub struct Signal {
    phase: watch::Receiver<Phase>,
    tracker: mpsc::WeakSender<()>,
}

/// What a finished drain found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub in_flight: usize,
    pub cut: usize,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        let (phase, _) = watch::channel(Phase::Serving);
        let (tracker, all_done) = mpsc::channel(1);
        Self {
            phase,
            tracker,
            all_done,
        }
    }

    pub fn signal(&self) -> Signal {
        Signal {
            phase: self.phase.subscribe(),
            tracker: self.tracker.downgrade(),
        }
    }

    /// Tells every watcher to finish, waits up to `timeout` for them, then cuts the rest.
    pub async fn drain(self, timeout: Duration) -> Outcome {
        let Self {
            phase,
            tracker,
            mut all_done,
        } = self;
        let in_flight = tracker.strong_count() - 1;
        drop(tracker);
        phase.send_replace(Phase::Draining);
        if tokio::time::timeout(timeout, all_done.recv()).await.is_ok() {
            return Outcome { in_flight, cut: 0 };
        }
        let cut = all_done.sender_strong_count();
        phase.send_replace(Phase::Cut);
        // Cut tasks stop at their next poll; this only waits for them to be scheduled.
        let _ = tokio::time::timeout(Duration::from_secs(1), all_done.recv()).await;
        Outcome { in_flight, cut }
    }
}

impl Signal {
    /// A counted watch for a new connection; None once the drain has begun.
    pub fn watch(&self) -> Option<Watch> {
        Some(Watch {
            phase: self.phase.clone(),
            _tracker: self.tracker.upgrade()?,
        })
    }

    pub fn draining(&self) -> PhaseWait {
        PhaseWait::new(&self.phase, Phase::Draining)
    }
}

impl Watch {
    pub fn is_draining(&self) -> bool {
        *self.phase.borrow() >= Phase::Draining
    }

    pub fn draining(&self) -> PhaseWait {
        PhaseWait::new(&self.phase, Phase::Draining)
    }

    pub fn cut(&self) -> PhaseWait {
        PhaseWait::new(&self.phase, Phase::Cut)
    }
}

/// Resolves once the drain has reached a phase. It is polled alongside a connection's work, at
/// every wake-up of that work, so it is made to cost nothing then: the waiting registers with
/// the drain's notifier once, and is looked at again (which takes the notifier's lock) only
/// after the phase has changed.
pub struct PhaseWait {
    changes: watch::Receiver<Phase>,
    armed: bool,
    wait: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl PhaseWait {
    fn new(phase: &watch::Receiver<Phase>, wanted: Phase) -> Self {
        let mut phase = phase.clone();
        Self {
            changes: phase.clone(),
            armed: false,
            // Unconstrained: under tokio's cooperative budget the wait could decline to look when
            // polled, after `changes` was marked seen, and the change would then go unnoticed.
            wait: Box::pin(tokio::task::unconstrained(async move {
                // The sender lives until the drain completes; if it is gone, the drain is over.
                let _ = phase.wait_for(|phase| *phase >= wanted).await;
            })),
        }
    }
}

impl Future for PhaseWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.armed && !this.changes.has_changed().unwrap_or(true) {
            return Poll::Pending;
        }
        this.armed = true;
        this.changes.mark_unchanged();
        this.wait.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_watchers_then_cuts() {
        let drain = Drain::new();
        let polite = drain.signal().watch().unwrap();
        let stubborn = drain.signal().watch().unwrap();
        let polite_task = tokio::spawn(async move { polite.draining().await });
        let stubborn_task = tokio::spawn(async move { stubborn.cut().await });
        let outcome = drain.drain(Duration::from_millis(100)).await;
        assert_eq!(
            outcome,
            Outcome {
                in_flight: 2,
                cut: 1
            }
        );
        polite_task.await.unwrap();
        stubborn_task.await.unwrap();
    }

    #[tokio::test]
    async fn drain_with_nothing_in_flight_is_immediate() {
        let outcome = Drain::new().drain(Duration::from_secs(60)).await;
        assert_eq!(
            outcome,
            Outcome {
                in_flight: 0,
                cut: 0
            }
        );
    }
}
