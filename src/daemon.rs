//! The daemon's life, start to exit: check a config, or run the proxy from it.

mod descriptors;
mod handover;
mod inherited;
mod listeners;
mod logging;
mod reload;
mod systemd;
mod watch;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use crate::generation::{Generation, Live};
use crate::workers::Workers;
use crate::{config, drain, limits, routes};
use handover::Predecessor;
use inherited::InheritedListener;
use listeners::ListenerSet;
use logging::Logging;
use reload::{Event, Triggers};

/// Like `nginx -t`: everything a start would load and build, without binding or serving.
pub fn check(config: &Path) -> ExitCode {
    match Generation::load(config, 1, None) {
        Ok(generation) => {
            println!(
                "openai-proxy: {} is valid: {}",
                config.display(),
                generation.summary()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("openai-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}

pub fn run(config_path: PathBuf) -> ExitCode {
    // Before any thread exists: these clear LISTEN_FDS and friends from the environment.
    let mut inherited = inherited::take();
    let mut predecessor = match Predecessor::take() {
        None => None,
        Some(Ok((predecessor, sockets))) => {
            // Not the main process yet: systemd would refuse to hear this one.
            systemd::keep_quiet();
            inherited.extend(sockets);
            Some(predecessor)
        }
        Some(Err(error)) => {
            eprintln!("openai-proxy: cannot start: {error}");
            return ExitCode::FAILURE;
        }
    };
    let served = serve(config_path, inherited, &mut predecessor);
    logging::flush();
    match served {
        Ok(outcome) if outcome.cut > 0 => ExitCode::from(reload::EXIT_CUT),
        Ok(_) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("openai-proxy: cannot start: {error}");
            if let Some(predecessor) = predecessor.take() {
                predecessor.fail(&error.to_string());
            }
            systemd::status(&format!("failed to start: {error}"));
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Bind(#[from] listeners::BindError),
    #[error("cannot start threads, or watch signals or files: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("{0}")]
    Handover(String),
}

/// The daemon's life: load and build, start the workers, then serve from the control thread.
fn serve(
    config_path: PathBuf,
    inherited: Vec<InheritedListener>,
    predecessor: &mut Option<Predecessor>,
) -> Result<drain::Outcome, StartError> {
    // The binary as it is now: a handover is due once another stands at its path.
    let exe = handover::Exe::current();
    // Load the config and build everything from it: TLS, the upstream client, limits.
    let first = Generation::load(&config_path, 1, None)?;
    // While this is the only thread: growing the descriptor table later stalls every thread.
    descriptors::prepare(first.config.server.max_connections.0);
    let logging = Logging::init(&first.config.log);
    // Workers serve connections; this thread runs the control plane.
    let workers = Workers::start(first.workers)?;
    let control = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    control.block_on(async {
        let live = Arc::new(Live::new(first));
        let limits = live.snapshot().limits.saver();
        tokio::spawn(limits.clone().run());
        tokio::spawn(systemd::follow(limits::health::status()));

        // Listen: sockets systemd kept for us across a restart, freshly bound ones for the rest.
        let mut listeners = ListenerSet::start(live.clone(), &workers, inherited)?;
        let triggers = Triggers::start(&live)?;
        announce_ready(&live, &mut listeners, &workers, predecessor)?;
        let daemon = Daemon {
            config_path,
            exe,
            live,
            listeners,
            logging,
            limits,
        };
        daemon.serve(&triggers).await
    })
}

/// Connects upstream, takes over from a predecessor if there is one, and tells systemd the
/// proxy is ready.
fn announce_ready(
    live: &Arc<Live>,
    listeners: &mut ListenerSet,
    workers: &Workers,
    predecessor: &mut Option<Predecessor>,
) -> Result<(), StartError> {
    // Connect upstream now, so that the first requests find a connection open.
    live.snapshot().routes.preconnect(workers.handles());

    // Ready; when taking over from a predecessor, once it has named this the main process.
    if let Some(predecessor) = predecessor.take() {
        predecessor.ready().map_err(StartError::Handover)?;
        systemd::speak();
        listeners.store_all();
    }
    let watched = live.clone();
    systemd::spawn_watchdog(move || watched.listening().first().copied());
    let (resting, line) = (live.clone(), live.clone());
    systemd::spawn_resting_status(
        &routes::RESTING_CHANGED,
        move || resting.snapshot().routes.resting(),
        move || line.status_now(),
    );
    let status = listeners.status();
    systemd::ready(&status);
    tracing::info!(workers = workers.len(), "ready: {status}");
    Ok(())
}

/// The running daemon's control plane.
struct Daemon {
    config_path: PathBuf,
    /// The binary as it was at start.
    exe: handover::Exe,
    live: Arc<Live>,
    listeners: ListenerSet,
    logging: Logging,
    limits: limits::Saver,
}

impl Daemon {
    /// Serves, reloading on SIGHUP or a changed file, and handing over to a new binary when one
    /// has replaced this one (or when asked), as often as asked; then drains.
    async fn serve(mut self, triggers: &Triggers) -> Result<drain::Outcome, StartError> {
        loop {
            match triggers.next().await {
                Event::Shutdown => break,
                Event::Reload if !self.exe.replaced() => {
                    let reloaded = reload::reload(
                        &self.config_path,
                        &self.live,
                        &mut self.listeners,
                        &self.logging,
                    )
                    .await;
                    if reloaded.is_ok() {
                        triggers.follow(&self.live.snapshot());
                    }
                }
                Event::Reload | Event::Handover => {
                    // The successor reads the limits' counters as they stand now.
                    self.limits.save();
                    if handover::hand_over(&self.exe, &self.listeners, &self.live).await {
                        self.listeners.leave_admin().await;
                        break;
                    }
                }
            }
        }
        Ok(self.drain().await)
    }

    /// Stops accepting, lets what is in flight finish, then saves the limits' counters.
    async fn drain(self) -> drain::Outcome {
        let drain_timeout = self.live.snapshot().config.server.drain_timeout.0;
        systemd::stopping(&format!("draining for up to {drain_timeout:?}"));
        tracing::info!(?drain_timeout, "stopping: draining connections");
        let outcome = self.listeners.drain(drain_timeout).await;
        self.limits.save();
        tracing::info!(
            in_flight = outcome.in_flight,
            cut = outcome.cut,
            "drained; exiting"
        );
        outcome
    }
}
