//! Logs: to the journal with structured fields under systemd, else readable lines on stderr.
//! The level comes from the config (and follows it on reload) unless RUST_LOG overrides it.

use crate::config::log::Config;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    from_env: bool,
}

/// Writes what is still queued for stderr when dropped: at exit, however the process exits.
static STDERR_FLUSH: std::sync::Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> =
    std::sync::Mutex::new(None);

/// Writes out every log line still queued. For an exit that skips destructors.
pub fn flush() {
    let guard = STDERR_FLUSH
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    drop(guard);
}

impl Logging {
    pub fn init(config: &Config) -> Self {
        let env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
        let from_env = env.is_some();
        let initial = match env.map(|v| EnvFilter::builder().parse(v)) {
            Some(Ok(filter)) => filter,
            Some(Err(error)) => {
                eprintln!("openai-proxy: ignoring RUST_LOG: {error}");
                config.level.filter()
            }
            None => config.level.filter(),
        };
        let (filter, handle) = reload::Layer::new(initial);
        let journald = if under_journald() {
            match tracing_journald::layer() {
                Ok(layer) => Some(
                    layer
                        .with_syslog_identifier("openai-proxy".into())
                        .with_field_prefix(None),
                ),
                Err(error) => {
                    eprintln!("openai-proxy: journald unreachable, logging to stderr: {error}");
                    None
                }
            }
        } else {
            None
        };
        // Lines reach stderr from a thread of their own, in batches: one write(2) per burst
        // rather than one per access log line on the thread serving the request. Never lossy:
        // a writer that many lines behind makes logging wait, as writing directly did. (The
        // queue is allocated whole at start: tracing-appender's default of 128k lines would
        // be 4 MiB of resident memory.)
        let (stderr, stderr_flush) = if journald.is_none() {
            let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .buffered_lines_limit(4096)
                .lossy(false)
                .thread_name("log-writer")
                .finish(std::io::BufWriter::new(std::io::stderr()));
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_target(false);
            (Some(layer), Some(guard))
        } else {
            (None, None)
        };
        tracing_subscriber::registry()
            .with(filter)
            .with(journald)
            .with(stderr)
            .init();
        *STDERR_FLUSH
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = stderr_flush;
        Self {
            filter: handle,
            from_env,
        }
    }

    pub fn apply(&self, config: &Config) {
        if self.from_env {
            return;
        }
        if let Err(error) = self.filter.reload(config.level.filter()) {
            tracing::warn!(%error, "could not change the log level");
        }
    }
}

/// systemd sets JOURNAL_STREAM to the device and inode of the stderr it connected to the journal;
/// if our stderr is still that stream, the journal is where logs belong.
fn under_journald() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(expected) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(stderr).metadata() else {
        return false;
    };
    expected.to_str() == Some(&format!("{}:{}", meta.dev(), meta.ino()))
}
