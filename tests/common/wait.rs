//! Bounded waits: a whole test under a deadline, and polls of a condition until it holds.

use std::time::{Duration, Instant};

/// Bounds a whole test: a hang fails instead of blocking CI.
pub async fn bounded<F: std::future::Future>(seconds: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(seconds), f)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {seconds}s"))
}

/// Polls `check` until it returns Some, failing after `timeout`.
pub async fn eventually<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until at least `room` is left in the current UTC minute, so that a test's requests
/// all fall in one minute's window of a per-minute limit.
pub fn wait_for_room_in_minute(room: Duration) {
    let left = |now: std::time::SystemTime| {
        let millis = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        Duration::from_millis(60_000 - millis % 60_000)
    };
    while left(std::time::SystemTime::now()) < room {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls an async check until it returns Some, failing after `timeout`.
pub async fn eventually_async<T, F: std::future::Future<Output = Option<T>>>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
