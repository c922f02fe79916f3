//! The open-file limit and the descriptor table, set up once while the process is still
//! single-threaded.
//!
//! The kernel grows a process's descriptor table by doubling when a new descriptor does not fit,
//! and in a multi-threaded process each growth waits for an RCU grace period with the table
//! locked: every thread that accepts or connects meanwhile stalls. Measured here (perf sched):
//! `accept4` blocked 10–14 ms in `expand_files` as 1,000 streams opened, which was the whole
//! tail of their time to first event. nginx's workers are single-threaded processes and never
//! wait. Grown before any thread exists, the table costs nothing, and the kernel never shrinks it.

use std::os::fd::RawFd;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors per connection the table is sized for: the client's, and at most one upstream.
const PER_CONNECTION: u64 = 2;
/// For listeners, upstream HTTP/2 connections, files and the journal.
const HEADROOM: u64 = 256;

/// Raises the soft limit on open files to the hard one (as Go does at start), then grows the
/// descriptor table to what `max_connections` needs, within that limit. Call before any thread
/// starts. Best effort: a failure leaves the kernel to grow the table later.
pub fn prepare(max_connections: usize) {
    let soft = raise_soft_limit();
    let wanted = (max_connections as u64)
        .saturating_mul(PER_CONNECTION)
        .saturating_add(HEADROOM)
        .min(soft);
    let Ok(highest) = RawFd::try_from(wanted.saturating_sub(1)) else {
        return;
    };
    // A descriptor at the highest number makes the kernel size the table for it, once.
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = rustix::io::fcntl_dupfd_cloexec(&null, highest);
    }
}

/// The soft limit after raising it to the hard limit, if it could be.
fn raise_soft_limit() -> u64 {
    let limit = getrlimit(Resource::Nofile);
    let Some(current) = limit.current else {
        return u64::MAX;
    };
    // An unlimited hard limit still meets the kernel's nr_open; a million is its default.
    let maximum = limit.maximum.unwrap_or(1 << 20);
    if maximum <= current {
        return current;
    }
    let raised = Rlimit {
        current: Some(maximum),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => maximum,
        Err(_) => current,
    }
}
