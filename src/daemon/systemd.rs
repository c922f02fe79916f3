//! Talking to systemd: readiness, reload and stop notices, status, the watchdog and the fd store.
//!
//! Outside systemd (no NOTIFY_SOCKET) every call here does nothing. A failed notification is
//! logged and otherwise ignored: the proxy serves whether or not systemd hears of it.
//!
//! Only the service's main process may speak (`NotifyAccess=main`): a successor started by a
//! handover keeps quiet until its predecessor has named it the main process, and the
//! predecessor keeps quiet from then on.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// Whether this process is the one systemd listens to.
static MAIN: AtomicBool = AtomicBool::new(true);

/// From now on, until `speak`, nothing is sent.
pub fn keep_quiet() {
    MAIN.store(false, Ordering::SeqCst);
}

pub fn speak() {
    MAIN.store(true, Ordering::SeqCst);
}

fn send(states: &[NotifyState]) {
    if !MAIN.load(Ordering::SeqCst) {
        return;
    }
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "could not notify systemd");
    }
}

/// The last `STATUS=` the proxy composed, and what a condition outside it (the limits backend
/// down) adds to it for as long as it lasts.
static STATUS: Mutex<(String, Option<String>)> = Mutex::new((String::new(), None));

/// `status`, remembered, with the added condition if there is one.
fn composed(status: &str) -> String {
    let mut last = STATUS.lock().expect("not poisoned");
    last.0 = status.to_owned();
    compose(&last)
}

fn compose((status, extra): &(String, Option<String>)) -> String {
    match extra {
        Some(extra) => format!("{status}; {extra}"),
        None => status.clone(),
    }
}

/// Adds the condition `extra` holds to every `STATUS=`, and sends the last one again each time
/// it changes.
pub async fn follow(mut extra: tokio::sync::watch::Receiver<Option<String>>) {
    while extra.changed().await.is_ok() {
        let text = extra.borrow_and_update().clone();
        let line = {
            let mut last = STATUS.lock().expect("not poisoned");
            last.1 = text;
            compose(&last)
        };
        send(&[NotifyState::Status(&line)]);
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(&composed(status))]);
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` systemd 253+ requires, in one message.
pub fn reloading(status: &str) {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status(&composed(status)),
        ]),
        Err(error) => tracing::warn!(%error, "cannot read CLOCK_MONOTONIC"),
    }
}

pub fn stopping(status: &str) {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status(&composed(status)),
    ]);
}

/// Names `pid` the service's main process; the last thing this process tells systemd.
pub fn hand_over(pid: u32, status: &str) {
    send(&[
        NotifyState::MainPid(pid),
        NotifyState::Ready,
        NotifyState::Status(status),
    ]);
    keep_quiet();
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(&composed(status))]);
}

/// The fd store name of a listener: FDNAME allows no ':', so `127.0.0.1:8080` is
/// `listen-127.0.0.1-8080` and `[::1]:8080` is `listen-[--1]-8080`.
pub fn listener_name(addr: SocketAddr) -> String {
    format!("listen-{addr}").replace(':', "-")
}

/// The fd store name of an admin listener, `admin-127.0.0.1-9901`: apart from the proxy's.
pub fn admin_listener_name(addr: SocketAddr) -> String {
    format!("admin-{addr}").replace(':', "-")
}

/// Hands a copy of a listening socket to systemd, which keeps it open across our restarts.
pub fn store_listener(name: &str, listener: &impl AsFd) {
    if !MAIN.load(Ordering::SeqCst) {
        return;
    }
    let states = [NotifyState::FdStore, NotifyState::FdName(name)];
    if let Err(error) = sd_notify::notify_with_fds(&states, &[listener.as_fd()]) {
        tracing::warn!(%name, %error, "could not store the listening socket with systemd");
    }
}

pub fn forget_listener(name: &str) {
    send(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
}

/// Keeps `STATUS=` saying what rests (keys, upstreams): `resting` names it (empty: nothing),
/// `line` is the whole `STATUS=` line with it. Sent when `changed` is woken, and each second
/// while anything rests, until nothing does (then no timer runs).
pub fn spawn_resting_status(
    changed: &'static tokio::sync::Notify,
    resting: impl Fn() -> String + Send + 'static,
    line: impl Fn() -> String + Send + 'static,
) {
    tokio::spawn(async move {
        let mut shown = String::new();
        loop {
            let notified = changed.notified();
            if shown.is_empty() {
                notified.await;
            } else {
                let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
            }
            let now = resting();
            if now != shown {
                status(&line());
                shown = now;
            }
        }
    });
}

/// With `WatchdogSec=` set, pings at half the interval, but only after proving that the runtime
/// still schedules tasks and a listener still accepts a connection: the first address
/// `listening` gives (None: nothing to prove yet).
pub fn spawn_watchdog(listening: impl Fn() -> Option<SocketAddr> + Send + 'static) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !MAIN.load(Ordering::SeqCst) {
                return;
            }
            let Some(addr) = listening() else {
                continue;
            };
            match accepts(addr, interval / 4).await {
                Ok(()) => send(&[NotifyState::Watchdog]),
                Err(error) => {
                    tracing::warn!(%addr, %error, "watchdog: own listener does not accept; not pinging")
                }
            }
        }
    });
}

async fn accepts(mut addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let connect = tokio::task::spawn_blocking(move || TcpStream::connect_timeout(&addr, timeout));
    connect.await.map_err(std::io::Error::other)?.map(drop)
}
