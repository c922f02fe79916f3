//! The daemon's life, start to exit: check a config, or run the proxy from it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use crate::generation::{Generation, Live};
use crate::handover::{self, Predecessor};
use crate::inherited::{self, InheritedListener};
use crate::listeners::{self, ListenerSet};
use crate::logging::{self, Logging};
use crate::reload::{self, Event, Triggers};
use crate::workers::Workers;
use crate::{config, descriptors, drain, limits, routes, systemd};

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

/// The daemon's life.
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

        // Serve, reloading on SIGHUP or a changed file, and handing over to a new binary when
        // one has replaced this one (or when asked), as often as asked.
        loop {
            match triggers.next().await {
                Event::Shutdown => break,
                Event::Reload if !exe.replaced() => {
                    if reload::reload(&config_path, &live, &mut listeners, &logging)
                        .await
                        .is_ok()
                    {
                        triggers.follow(&live.snapshot());
                    }
                }
                Event::Reload | Event::Handover => {
                    // The successor reads the limits' counters as they stand now.
                    limits.save();
                    if handover::hand_over(&exe, &listeners, &live).await {
                        listeners.leave_admin().await;
                        break;
                    }
                }
            }
        }

        // Drain: stop accepting, let what is in flight finish, then exit.
        let drain_timeout = live.snapshot().config.server.drain_timeout.0;
        systemd::stopping(&format!("draining for up to {drain_timeout:?}"));
        tracing::info!(?drain_timeout, "stopping: draining connections");
        let outcome = listeners.drain(drain_timeout).await;
        limits.save();
        tracing::info!(
            in_flight = outcome.in_flight,
            cut = outcome.cut,
            "drained; exiting"
        );
        Ok(outcome)
    })
}
