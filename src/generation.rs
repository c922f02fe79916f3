//! A generation: one loaded config with everything built from it, immutable once made.
//!
//! `Live` holds the current generation in an ArcSwap. A request or connection takes a snapshot
//! when it starts and keeps it to its end; a reload builds the next generation off to the side
//! and swaps it in whole, so serving never waits on a reload and never sees half of one.

mod tls;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{Config, ConfigError, ConfigFile};
use crate::upstream::Upstream;
use crate::workers;

pub struct Generation {
    pub number: u64,
    pub loaded_at: SystemTime,
    pub config: Config,
    /// The default upstream (`[upstream]`).
    pub upstream: Arc<Upstream>,
    /// Every upstream by name, the default among them, and the routes to them.
    pub routes: crate::routes::Routes,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub http2: http2::Builder<TokioExecutor>,
    /// Tokens mode's key and tokens; None in passthrough mode.
    pub auth: Option<crate::tokens::Tokens>,
    /// Per-token limits, over counters that every generation shares.
    pub limits: crate::limits::Limiter,
    /// The config file and every file it names, with a fingerprint of their contents as loaded:
    /// the file watcher reloads when the fingerprint on disk differs.
    pub files: Vec<PathBuf>,
    pub fingerprint: u64,
    /// Worker threads; fixed at start, so a reload keeps the first generation's number.
    pub workers: usize,
}

impl Generation {
    /// Reads, parses, validates and builds; blocking file I/O, so not on the serving path.
    pub fn load(
        path: &Path,
        number: u64,
        previous: Option<&Generation>,
    ) -> Result<Self, ConfigError> {
        let file = ConfigFile::read(path)?;
        let config = file.parse()?;
        let workers = match previous {
            Some(previous) => {
                if config.server.workers != previous.config.server.workers {
                    tracing::warn!("server.workers changes only with a restart");
                }
                previous.workers
            }
            None => workers::count(config.server.workers),
        };
        let mut contents: Vec<crate::config::FileRead> =
            vec![(path.to_owned(), file.text().as_bytes().to_vec())];
        let tls = match &config.tls {
            Some(tls) => {
                let (acceptor, read) = tls::acceptor(tls, &file)?;
                contents.extend(read);
                Some(acceptor)
            }
            None => None,
        };
        let (upstream_files, read) = crate::upstream::Files::read(&config.upstream, &file)?;
        contents.extend(read);
        let upstream = Upstream::build(
            &config.upstream,
            &file,
            upstream_files,
            workers,
            previous.map(|p| &p.upstream),
        )?;
        let (routes, read) = crate::routes::Routes::build(
            &config,
            &file,
            upstream.clone(),
            workers,
            previous.map(|p| &p.routes),
        )?;
        contents.extend(read);
        let (auth, read) = crate::tokens::load(&config.auth, &file)?;
        contents.extend(read);
        let limits = crate::limits::Limiter::build(
            &config.limits,
            auth.is_some(),
            &file,
            previous.map(|p| &p.limits),
        )?;
        let http2 = http2_builder(&config);
        let fingerprint = fingerprint(
            contents
                .iter()
                .map(|(p, b)| (p.as_path(), Some(b.as_slice()))),
        );
        Ok(Self {
            number,
            loaded_at: SystemTime::now(),
            files: contents.into_iter().map(|(p, _)| p).collect(),
            fingerprint,
            workers,
            config,
            upstream,
            routes,
            tls,
            http2,
            auth,
            limits,
        })
    }

    /// Every address this generation listens on, and whether it speaks TLS.
    pub fn listen_addrs(&self) -> impl Iterator<Item = (SocketAddr, bool)> + '_ {
        let plain = self.config.listen.iter().map(|a| (*a.get_ref(), false));
        let tls = self
            .config
            .tls
            .iter()
            .flat_map(|t| t.listen.iter().map(|a| (*a.get_ref(), true)));
        plain.chain(tls)
    }

    pub fn is_tls(&self, addr: SocketAddr) -> bool {
        self.config
            .tls
            .as_ref()
            .is_some_and(|t| t.listen.iter().any(|a| *a.get_ref() == addr))
    }

    pub fn http1_settings(&self) -> crate::http::Settings {
        let server = &self.config.server;
        crate::http::Settings {
            header_read_timeout: server.header_read_timeout.0,
            keepalive_timeout: server.keepalive_timeout.0,
            max_header_size: usize::try_from(server.max_header_size.0).unwrap_or(usize::MAX),
            max_request_body: server.max_request_body.0,
        }
    }

    /// Makes this generation's path prefixes the routes requests are counted under.
    fn count_routes(&self) {
        let prefixes = self.config.proxy.allowed_path_prefixes.iter();
        crate::metrics::set_routes(prefixes.map(|p| p.as_str()));
    }

    /// What it serves, as `openai-proxy check` tells it.
    pub fn summary(&self) -> String {
        let addrs: Vec<(SocketAddr, bool)> = self.listen_addrs().collect();
        self.summary_on(&addrs)
    }

    /// What it serves on the given (bound) addresses, for logs and `systemctl status`.
    pub fn summary_on(&self, addrs: &[(SocketAddr, bool)]) -> String {
        let addrs: Vec<String> = addrs
            .iter()
            .map(|(a, tls)| {
                if *tls {
                    format!("https://{a}")
                } else {
                    format!("http://{a}")
                }
            })
            .collect();
        let upstream = &self.config.upstream;
        let host = upstream
            .host
            .as_ref()
            .map(|h| format!(" (Host {})", h.as_str()))
            .unwrap_or_default();
        // The egress proxy without its user: only when one is set, so that the line is as it
        // was for a config without.
        let via = upstream
            .proxy
            .as_ref()
            .map(|p| format!(" via {}", p.get_ref()))
            .unwrap_or_default();
        format!(
            "listening on {}; upstream {}{host}{via}",
            addrs.join(", "),
            upstream.url
        )
    }
}

fn http2_builder(config: &Config) -> http2::Builder<TokioExecutor> {
    let server = &config.server;
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(server.max_header_size.0).unwrap_or(u32::MAX))
        .max_concurrent_streams(server.max_streams_per_connection)
        .adaptive_window(true);
    builder
}

/// A hash of each file's path and contents (None: the file could not be read).
pub fn fingerprint<'a>(files: impl Iterator<Item = (&'a Path, Option<&'a [u8]>)>) -> u64 {
    let mut hasher = DefaultHasher::new();
    for (path, contents) in files {
        path.hash(&mut hasher);
        contents.hash(&mut hasher);
    }
    hasher.finish()
}

pub struct Live {
    current: ArcSwap<Generation>,
    last_reload_error: Mutex<Option<String>>,
    /// The addresses really listened on (port 0 resolved), for the watchdog's self-check.
    listening: Mutex<Vec<SocketAddr>>,
    /// The last `STATUS=` line but what rests, for updates when keys or upstreams rest.
    last_status: Mutex<String>,
}

impl Live {
    pub fn new(first: Generation) -> Self {
        first.count_routes();
        Self {
            current: ArcSwap::from_pointee(first),
            last_reload_error: Mutex::new(None),
            listening: Mutex::new(Vec::new()),
            last_status: Mutex::new(String::new()),
        }
    }

    pub fn set_listening(&self, addrs: Vec<SocketAddr>) {
        *self.listening.lock().expect("not poisoned") = addrs;
    }

    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listening.lock().expect("not poisoned").clone()
    }

    pub fn snapshot(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    pub fn swap(&self, next: Generation) -> Arc<Generation> {
        next.count_routes();
        let next = Arc::new(next);
        self.current.store(next.clone());
        *self.last_reload_error.lock().expect("not poisoned") = None;
        next
    }

    pub fn reload_failed(&self, error: String) {
        *self.last_reload_error.lock().expect("not poisoned") = Some(error);
    }

    /// The `STATUS=` line: what serves where, since when, and why the last reload failed if it did.
    pub fn status(&self, bound: &[(SocketAddr, bool)]) -> String {
        let generation = self.snapshot();
        let mut status = format!(
            "generation {} loaded {}; {}",
            generation.number,
            httpdate::fmt_http_date(generation.loaded_at),
            generation.summary_on(bound)
        );
        if let Some(error) = &*self.last_reload_error.lock().expect("not poisoned") {
            status.push_str(&format!("; last reload FAILED: {error}"));
        }
        *self.last_status.lock().expect("not poisoned") = status.clone();
        with_resting(status, &generation)
    }

    /// The last `STATUS=` line, with what rests now.
    pub fn status_now(&self) -> String {
        let status = self.last_status.lock().expect("not poisoned").clone();
        with_resting(status, &self.snapshot())
    }
}

/// `status`, and the keys and upstreams resting if any do.
fn with_resting(mut status: String, generation: &Generation) -> String {
    let resting = generation.routes.resting();
    if !resting.is_empty() {
        status.push_str(&format!("; resting: {resting}"));
    }
    status
}
