//! Reloading: what triggers it (SIGHUP, a changed file) and the reload itself.
//!
//! Triggers only set a flag (a `Notify` permit), so any number of them arriving during a reload
//! coalesce into exactly one more. The reload builds the whole next generation off the serving
//! path and swaps it in only when every step has succeeded.

use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use signal_hook::consts::{SIGALRM, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::listeners::ListenerSet;
use super::logging::Logging;
use super::systemd;
use super::watch::FileWatcher;
use crate::generation::{Generation, Live};
use crate::outcome;

pub enum Event {
    Reload,
    /// Hand the service over to the binary on disk, whether or not it was replaced.
    Handover,
    Shutdown,
}

pub struct Triggers {
    reload: Arc<Notify>,
    handover: Arc<Notify>,
    shutdown: Arc<Notify>,
    files: FileWatcher,
}

impl Triggers {
    pub fn start(live: &Live) -> std::io::Result<Self> {
        let (reload, handover, shutdown) = Default::default();
        // Every signal a stray `kill` or a log rotation script might send is caught here: none
        // may end the process with its connections unannounced.
        let signals = signal_hook_tokio::Signals::new([
            SIGHUP, SIGTERM, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM,
        ])?;
        let notices = Notices {
            reload: Arc::clone(&reload),
            handover: Arc::clone(&handover),
            shutdown: Arc::clone(&shutdown),
        };
        tokio::spawn(handle_signals(signals, notices));
        let files = FileWatcher::start(reload.clone(), &live.snapshot())?;
        Ok(Self {
            reload,
            handover,
            shutdown,
            files,
        })
    }

    pub async fn next(&self) -> Event {
        tokio::select! {
            biased;
            () = self.shutdown.notified() => Event::Shutdown,
            () = self.handover.notified() => Event::Handover,
            () = self.reload.notified() => Event::Reload,
        }
    }

    /// Watches the files the serving generation was built from.
    pub fn follow(&self, generation: &Generation) {
        self.files.follow(generation);
    }
}

/// The exit status of a stop that had to cut requests, streams or WebSockets in flight.
pub const EXIT_CUT: u8 = 3;

/// Where the signals' meanings go.
struct Notices {
    reload: Arc<Notify>,
    handover: Arc<Notify>,
    shutdown: Arc<Notify>,
}

/// HUP reloads; USR2 hands over to a new process; TERM, INT and QUIT drain and stop, and a
/// second one cuts what is left at once; USR1 and ALRM are logged and otherwise ignored (there
/// is no log file to reopen).
async fn handle_signals(mut signals: signal_hook_tokio::Signals, notices: Notices) {
    let mut stopping = false;
    while let Some(signal) = signals.next().await {
        match signal {
            SIGHUP => notices.reload.notify_one(),
            SIGUSR2 => notices.handover.notify_one(),
            SIGUSR1 | SIGALRM => {
                tracing::info!(signal, "signal ignored: it has no meaning here");
            }
            _ if stopping => {
                tracing::warn!(
                    signal,
                    "second stop signal: exiting without waiting for the drain"
                );
                super::logging::flush();
                std::process::exit(EXIT_CUT.into());
            }
            _ => {
                stopping = true;
                notices.shutdown.notify_one();
            }
        }
    }
}

/// Loads the config again and, if every step succeeds, serves it. A failure changes nothing.
pub async fn reload(
    config_path: &Path,
    live: &Live,
    listeners: &mut ListenerSet,
    logging: &Logging,
) -> Result<Arc<Generation>, String> {
    let started = Instant::now();
    let current = live.snapshot();
    let number = current.number + 1;
    systemd::reloading(&format!(
        "reloading {} (generation {number})",
        config_path.display()
    ));
    let path = config_path.to_owned();
    let loaded =
        tokio::task::spawn_blocking(move || Generation::load(&path, number, Some(&current)))
            .await
            .map_err(|e| format!("the reload task failed: {e}"))
            .and_then(|loaded| loaded.map_err(|e| e.to_string()));
    let prepared = loaded.and_then(|next| match listeners.bind_new(&next) {
        Ok(bound) => Ok((next, bound)),
        Err(e) => Err(e.to_string()),
    });
    let outcome = match prepared {
        Ok((next, bound)) => {
            logging.apply(&next.config.log);
            let drain_timeout = next.config.server.drain_timeout.0;
            // Before the swap, so that no request of the new generation looks before it.
            next.routes.preconnect(listeners.workers());
            let next = live.swap(next);
            listeners.apply(bound, &next, drain_timeout).await;
            let status = listeners.status();
            tracing::info!(
                generation = number,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "config reloaded: {status}"
            );
            outcome::record(Ok(&format!("reloaded: {status}")));
            Ok(next)
        }
        Err(error) => {
            tracing::error!(%error, generation = number - 1, "reload failed; the running config keeps serving");
            live.reload_failed(error.clone());
            outcome::record(Err(&error));
            Err(error)
        }
    };
    crate::metrics::reloaded(outcome.as_ref().map(drop).map_err(String::as_str));
    systemd::ready(&listeners.status());
    outcome
}
