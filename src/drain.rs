//! Draining: a signal every connection honours, and a count whose reaching zero says they are done.
//!
//! One `Drain` per listener, so that a reload can retire one listener's connections while the
//! others serve on; shutdown drains them all. Each connection holds a `Watch` (a WebSocket
//! tunnel holds its connection's): when the last one is dropped, the drain is complete (the
//! mini-redis pattern).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::{Notify, mpsc};

/// A moment in a drain's life. Each comes at most once; a later one implies the earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Finish what is in flight, take nothing new.
    Draining,
    /// The drain timeout passed: stop now.
    Cut,
}

/// One moment, and everyone waiting for it. `reached` is set before the waiters are woken, so a
/// waiter woken for any reason can trust it; since a moment comes only once, a waiter's
/// registration stays valid until the moment itself wakes it.
struct Moment {
    reached: AtomicBool,
    notify: Arc<Notify>,
}

impl Moment {
    fn new() -> Self {
        Self {
            reached: AtomicBool::new(false),
            notify: Arc::new(Notify::new()),
        }
    }

    fn reach(&self) {
        self.reached.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn is_reached(&self) -> bool {
        self.reached.load(Ordering::SeqCst)
    }
}

struct Moments {
    draining: Moment,
    cut: Moment,
}

impl Moments {
    fn get(&self, phase: Phase) -> &Moment {
        match phase {
            Phase::Draining => &self.draining,
            Phase::Cut => &self.cut,
        }
    }
}

pub struct Drain {
    moments: Arc<Moments>,
    tracker: Option<mpsc::Sender<()>>,
    all_done: mpsc::Receiver<()>,
}

/// Held by each connection for as long as it lives.
#[derive(Clone)]
pub struct Watch {
    moments: Arc<Moments>,
    _tracker: mpsc::Sender<()>,
}

/// Held by an accept loop: it hears the drain but is not counted in it, and hands each
/// connection it accepts a `Watch` that is.
pub struct Signal {
    moments: Arc<Moments>,
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
        let (tracker, all_done) = mpsc::channel(1);
        Self {
            moments: Arc::new(Moments {
                draining: Moment::new(),
                cut: Moment::new(),
            }),
            tracker: Some(tracker),
            all_done,
        }
    }

    pub fn signal(&self) -> Signal {
        Signal {
            moments: self.moments.clone(),
            tracker: self
                .tracker
                .as_ref()
                .expect("a drain not yet begun")
                .downgrade(),
        }
    }

    /// Tells every watcher to finish, waits up to `timeout` for them, then cuts the rest.
    pub async fn drain(mut self, timeout: Duration) -> Outcome {
        let in_flight = self.tracker.take().map_or(0, |t| t.strong_count() - 1);
        self.moments.draining.reach();
        if tokio::time::timeout(timeout, self.all_done.recv())
            .await
            .is_ok()
        {
            return Outcome { in_flight, cut: 0 };
        }
        let cut = self.all_done.sender_strong_count();
        tracing::info!(cut, "drain timeout reached: cutting what is left");
        self.moments.cut.reach();
        // Cut tasks stop at their next poll; this only waits for them to be scheduled.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.all_done.recv()).await;
        Outcome { in_flight, cut }
    }
}

impl Drop for Drain {
    /// A drain dropped unfinished leaves no one waiting: whatever still runs is cut.
    fn drop(&mut self) {
        self.moments.draining.reach();
        self.moments.cut.reach();
    }
}

impl Signal {
    /// A counted watch for a new connection; None once the drain has begun.
    pub fn watch(&self) -> Option<Watch> {
        Some(Watch {
            moments: self.moments.clone(),
            _tracker: self.tracker.upgrade()?,
        })
    }

    pub fn draining(&self) -> PhaseWait {
        PhaseWait::new(&self.moments, Phase::Draining)
    }
}

impl Watch {
    pub fn is_draining(&self) -> bool {
        self.moments.draining.is_reached()
    }

    pub fn draining(&self) -> PhaseWait {
        PhaseWait::new(&self.moments, Phase::Draining)
    }

    pub fn cut(&self) -> PhaseWait {
        PhaseWait::new(&self.moments, Phase::Cut)
    }
}

/// Resolves once the drain has reached a phase. It is polled alongside a connection's work, at
/// every wake-up of that work, so it costs an atomic load then: the task registers with the
/// moment's notifier once (and again only if it is polled with another waker), and nothing but
/// the moment itself can take that registration away.
pub struct PhaseWait {
    moments: Arc<Moments>,
    phase: Phase,
    wait: Pin<Box<OwnedNotified>>,
    registered: Option<Waker>,
}

impl PhaseWait {
    fn new(moments: &Arc<Moments>, phase: Phase) -> Self {
        Self {
            moments: moments.clone(),
            phase,
            // Made now: a moment reached between now and the first poll is still noticed.
            wait: Box::pin(moments.get(phase).notify.clone().notified_owned()),
            registered: None,
        }
    }
}

impl Future for PhaseWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.moments.get(this.phase).is_reached() {
            return Poll::Ready(());
        }
        if this
            .registered
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        this.registered = Some(cx.waker().clone());
        // Only reaching the moment wakes this, and that sets `reached` first.
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

    /// Counts its wake-ups.
    struct Counter(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn each_moment_wakes_its_waiters_and_a_spurious_poll_keeps_the_registration() {
        let drain = Drain::new();
        let watch = drain.signal().watch().unwrap();
        let counter = Arc::new(Counter(Default::default()));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let (mut draining, mut cut) = (Box::pin(watch.draining()), Box::pin(watch.cut()));
        for _ in 0..3 {
            assert!(draining.as_mut().poll(&mut cx).is_pending());
            assert!(cut.as_mut().poll(&mut cx).is_pending());
        }
        drain.moments.draining.reach();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert!(draining.as_mut().poll(&mut cx).is_ready());
        assert!(cut.as_mut().poll(&mut cx).is_pending());
        drain.moments.cut.reach();
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
        assert!(cut.as_mut().poll(&mut cx).is_ready());
    }

    /// Many connections on several threads, each waiting for both moments at once, all idle:
    /// a drain reaches every one of them at once.
    #[test]
    fn a_drain_reaches_every_idle_waiter_on_every_thread() {
        let workers = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        for _ in 0..5 {
            let drain = Drain::new();
            let signal = drain.signal();
            let (started, all_started) = std::sync::mpsc::channel();
            for _ in 0..2_000 {
                let watch = signal.watch().unwrap();
                let started = started.clone();
                workers.spawn(async move {
                    let (mut draining, mut cut) = (watch.draining(), watch.cut());
                    let _ = futures_util::poll!(&mut draining);
                    let _ = futures_util::poll!(&mut cut);
                    started.send(()).unwrap();
                    tokio::select! {
                        () = draining => {}
                        () = cut => {}
                    }
                    drop(watch);
                });
            }
            for _ in 0..2_000 {
                all_started.recv().unwrap();
            }
            let control = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let outcome = control.block_on(drain.drain(Duration::from_secs(10)));
            assert_eq!(
                outcome,
                Outcome {
                    in_flight: 2_000,
                    cut: 0
                }
            );
        }
    }
}
