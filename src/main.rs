//! openai-proxy: the daemon's life, start to exit. Each step lives in the module named for it.
#![deny(unsafe_code)]

mod admin;
mod body;
mod cli;
mod config;
mod descriptors;
mod drain;
mod error;
mod generation;
mod handover;
mod headers;
mod http;
mod inherited;
mod keys;
mod limits;
mod listeners;
mod logging;
mod metrics;
mod models;
mod outcome;
mod proxy;
mod reload;
mod routes;
mod server;
mod systemd;
mod tokens;
mod upstream;
mod usage;
mod watch;
mod workers;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use cli::Command;
use generation::{Generation, Live};
use handover::Predecessor;
use inherited::InheritedListener;
use listeners::ListenerSet;
use logging::Logging;
use reload::{Event, Triggers};
use workers::Workers;

/// hyper allocates and frees a little for every request; mimalloc does that in thread-local
/// pages, where glibc's malloc was a tenth of the CPU time under load (bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args_os().skip(1)) {
        Ok(command) => command,
        Err(error) => {
            eprintln!("openai-proxy: {error}\n\n{}", cli::HELP);
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{}", cli::HELP);
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("openai-proxy {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { config } => check(&config),
        Command::Reload { pid } => match outcome::request(pid) {
            Ok(message) => {
                println!("openai-proxy: {message}");
                ExitCode::SUCCESS
            }
            Err(message) => {
                eprintln!("openai-proxy: reload failed: {message}");
                ExitCode::FAILURE
            }
        },
        Command::TokenNew { name } => match tokens::new_token(&name) {
            Ok(text) => {
                print!("{text}");
                eprintln!(
                    "openai-proxy: the first line is the token, for the client (it is kept nowhere \
                     else); add the table to the tokens_file"
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("openai-proxy: {error}");
                ExitCode::from(2)
            }
        },
        Command::Usage {
            config,
            since,
            token,
        } => match limits::report::table(&config, since.as_deref(), token.as_deref()) {
            Ok(table) => {
                print!("{table}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("openai-proxy: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => run(config),
    }
}

/// Like `nginx -t`: everything a start would load and build, without binding or serving.
fn check(config: &Path) -> ExitCode {
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

fn run(config_path: PathBuf) -> ExitCode {
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
        systemd::spawn_watchdog(live.clone());
        systemd::spawn_resting_status(live.clone());
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
