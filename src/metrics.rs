//! Prometheus metrics: counted on the request path with relaxed atomic increments only, written
//! out in Prometheus' text format or OpenMetrics when the admin listener is scraped.
//!
//! Every label set is bounded and known ahead: a route is one of the configured
//! `allowed_path_prefixes` (or `other`), a method one of a fixed list (or `other`), a status one
//! of five classes; upstreams, tokens and models are bounded as `named` says. The request path takes no lock: the route table is read through an
//! `ArcSwap`, and every figure is an atomic. Facts that the control plane owns (the generation,
//! the listeners, idle upstream connections) are read when scraped, not counted.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::Method;

mod named;

pub use named::{LIMITS, REASONS};

const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Histogram bucket bounds in microseconds: from a cached answer to a long reasoning stream.
const BOUNDS_US: [u64; 16] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
    600_000_000,
];

/// Per-bucket (not cumulative) counts, the last one past every bound; summed when written.
struct Histogram {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
        }
    }

    fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let index = BOUNDS_US.partition_point(|&bound| bound < us);
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// Shards per route: each worker counts in its own (`workers::current()` modulo this), so that
/// workers on different cores never write the same cache line.
const SHARDS: usize = 16;

/// Everything counted for one route.
struct Route {
    /// The prefix as configured, or `other` for paths under none.
    name: Box<str>,
    shards: [Shard; SHARDS],
}

/// One worker's counts for a route, on cache lines of its own.
#[repr(align(128))]
struct Shard {
    requests: [[AtomicU64; CLASSES.len()]; METHODS.len()],
    duration: Histogram,
    ttfb: Histogram,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl Route {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            shards: std::array::from_fn(|_| Shard {
                requests: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
                duration: Histogram::new(),
                ttfb: Histogram::new(),
                bytes_in: AtomicU64::new(0),
                bytes_out: AtomicU64::new(0),
            }),
        }
    }

    /// The sum of a counter over the shards.
    fn total(&self, of: impl Fn(&Shard) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|shard| of(shard).load(Ordering::Relaxed))
            .sum()
    }
}

/// One finished request, as its access record saw it.
pub struct Request<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub status: u16,
    pub time_to_headers: Duration,
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The upstreams tried, comma-separated: the last one answered.
    pub upstream: Option<&'a str>,
    /// The client's token name, in tokens mode.
    pub token: Option<&'a str>,
    /// The model the upstream named in its answer.
    pub model: Option<&'a str>,
    /// The upstream's token figures, in the order of `named::KINDS`.
    pub usage: Option<[u64; 4]>,
}

struct Registry {
    /// The serving generation's prefixes, longest first, for matching a path.
    current: ArcSwap<Vec<Arc<Route>>>,
    /// Every route ever configured, in the order first seen, so that a counter never goes
    /// away or restarts across reloads. Touched only by reloads and scrapes.
    all: Mutex<Vec<Arc<Route>>>,
    other: Arc<Route>,
    streams_open: AtomicI64,
    websockets_open: AtomicI64,
    upstream_open: AtomicI64,
    upstream_connects: AtomicU64,
    upstream_connect_failures: AtomicU64,
    upstream_tls_handshakes: AtomicU64,
    /// 0: no connection tried yet; 1: the last one opened; 2: the last one failed.
    upstream_last_dial: std::sync::atomic::AtomicU8,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    last_reload: Mutex<Option<ReloadResult>>,
    named: named::Named,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| Registry {
    current: ArcSwap::from_pointee(Vec::new()),
    all: Mutex::new(Vec::new()),
    other: Arc::new(Route::new("other")),
    streams_open: AtomicI64::new(0),
    websockets_open: AtomicI64::new(0),
    upstream_open: AtomicI64::new(0),
    upstream_connects: AtomicU64::new(0),
    upstream_connect_failures: AtomicU64::new(0),
    upstream_tls_handshakes: AtomicU64::new(0),
    upstream_last_dial: std::sync::atomic::AtomicU8::new(0),
    reloads_ok: AtomicU64::new(0),
    reloads_failed: AtomicU64::new(0),
    last_reload: Mutex::new(None),
    named: named::Named::new(),
});

/// Makes `prefixes` the routes that requests are counted under from now on.
pub fn set_routes<'a>(prefixes: impl Iterator<Item = &'a str>) {
    let registry = &*REGISTRY;
    let mut all = registry.all.lock().unwrap_or_else(|p| p.into_inner());
    let mut current: Vec<Arc<Route>> = prefixes
        .map(|prefix| match all.iter().find(|r| &*r.name == prefix) {
            Some(route) => route.clone(),
            None => {
                let route = Arc::new(Route::new(prefix));
                all.push(route.clone());
                route
            }
        })
        .collect();
    current.sort_by_key(|r| std::cmp::Reverse(r.name.len()));
    registry.current.store(Arc::new(current));
}

/// Counts a finished request: a handful of relaxed atomic adds.
pub fn request(request: &Request<'_>) {
    let registry = &*REGISTRY;
    let current = registry.current.load();
    let route = current
        .iter()
        .find(|r| request.path.starts_with(&*r.name))
        .unwrap_or(&registry.other);
    // In the order of METHODS.
    let method = match *request.method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::PATCH => 3,
        Method::DELETE => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        _ => METHODS.len() - 1,
    };
    let class = usize::from(request.status / 100).clamp(1, CLASSES.len()) - 1;
    let shard = &route.shards[crate::workers::current() % SHARDS];
    shard.requests[method][class].fetch_add(1, Ordering::Relaxed);
    shard.duration.observe(request.duration);
    shard.ttfb.observe(request.time_to_headers);
    shard
        .bytes_in
        .fetch_add(request.bytes_in, Ordering::Relaxed);
    shard
        .bytes_out
        .fetch_add(request.bytes_out, Ordering::Relaxed);
    registry.named.request(request, class);
}

/// Where the try after a failed one goes: the same upstream with another key, or another
/// upstream (a failover).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextTry {
    Key,
    Upstream,
}

/// Counts a try on `upstream` that was not the client's answer and was followed by another:
/// `reason` is one of `REASONS`.
pub fn upstream_retried(upstream: &str, reason: &'static str, next: NextTry) {
    if let Some(reason) = REASONS.iter().position(|r| *r == reason) {
        REGISTRY.named.retried(upstream, reason, next);
    }
}

/// Counts a request of `token` refused by `limit`, one of `LIMITS`.
pub fn limit_refused(token: &str, limit: &'static str) {
    if let Some(limit) = LIMITS.iter().position(|l| *l == limit) {
        REGISTRY.named.refused(token, limit);
    }
}

/// Counts itself in a gauge for as long as it lives.
pub struct Open(&'static AtomicI64);

impl Open {
    fn new(gauge: &'static AtomicI64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }

    /// An event stream (SSE) being relayed, if the response is one.
    pub fn stream_if_sse(headers: &http::HeaderMap) -> Option<Self> {
        let sse = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        sse.then(|| Self::new(&REGISTRY.streams_open))
    }

    /// A WebSocket (or other upgraded) tunnel.
    pub fn websocket() -> Self {
        Self::new(&REGISTRY.websockets_open)
    }

    /// An upstream connection, from its handshake to its close.
    pub fn upstream_connection() -> Self {
        Self::new(&REGISTRY.upstream_open)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts an attempt to open an upstream connection: `Ok(tls)` when it opened (and whether over
/// TLS), `Err(())` when it failed (TCP, TLS or the connect timeout).
pub fn upstream_dialed(result: Result<bool, ()>) {
    let registry = &*REGISTRY;
    let (counter, state) = match result {
        Ok(tls) => {
            if tls {
                registry
                    .upstream_tls_handshakes
                    .fetch_add(1, Ordering::Relaxed);
            }
            (&registry.upstream_connects, 1)
        }
        Err(()) => (&registry.upstream_connect_failures, 2),
    };
    counter.fetch_add(1, Ordering::Relaxed);
    registry.upstream_last_dial.store(state, Ordering::Relaxed);
}

/// The upstream as the last connection attempt found it.
pub fn upstream_state() -> &'static str {
    match REGISTRY.upstream_last_dial.load(Ordering::Relaxed) {
        0 => "unknown",
        1 => "up",
        _ => "down",
    }
}

#[derive(Debug, Clone)]
pub struct ReloadResult {
    pub at: SystemTime,
    /// None when the reload succeeded.
    pub error: Option<String>,
}

/// Counts a reload by its result and keeps the last one for `/status`.
pub fn reloaded(result: Result<(), &str>) {
    let registry = &*REGISTRY;
    let counter = match result {
        Ok(()) => &registry.reloads_ok,
        Err(_) => &registry.reloads_failed,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    *registry
        .last_reload
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(ReloadResult {
        at: SystemTime::now(),
        error: result.err().map(str::to_owned),
    });
}

pub fn last_reload() -> Option<ReloadResult> {
    REGISTRY
        .last_reload
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// What the control plane knows at the moment of a scrape.
pub struct Facts {
    pub generation: u64,
    pub loaded_at: SystemTime,
    pub upstream_idle: usize,
    /// The limits backend (Redis) failed its last admission check.
    pub limits_backend_down: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus' text exposition format 0.0.4.
    Text,
    OpenMetrics,
}

impl Format {
    /// OpenMetrics when the scraper's `Accept` asks for it, else the text format.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Writes one metric family at a time, in either format.
struct Writer {
    out: String,
    format: Format,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    Info,
}

impl Writer {
    /// The `# HELP` and `# TYPE` lines. `name` is the family's name without `_total` or `_info`.
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let (name, kind) = match (self.format, kind) {
            (Format::OpenMetrics, Kind::Counter) => (name.to_owned(), "counter"),
            (Format::OpenMetrics, Kind::Info) => (name.to_owned(), "info"),
            (Format::Text, Kind::Counter) => (format!("{name}_total"), "counter"),
            (Format::Text, Kind::Info) => (format!("{name}_info"), "gauge"),
            (_, Kind::Gauge) => (name.to_owned(), "gauge"),
            (_, Kind::Histogram) => (name.to_owned(), "histogram"),
        };
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, text)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape(text));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// A counter's sample, left out while it is zero.
    fn nonzero(&mut self, name: &str, labels: &[(&str, &str)], counter: &AtomicU64) {
        let value = counter.load(Ordering::Relaxed);
        if value > 0 {
            self.sample(name, labels, value);
        }
    }

    /// A family with a single unlabelled sample.
    fn single(&mut self, name: &str, kind: Kind, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help);
        let sample = match kind {
            Kind::Counter => format!("{name}_total"),
            _ => name.to_owned(),
        };
        self.sample(&sample, &[], value);
    }

    fn histogram(&mut self, name: &str, route: &Route, of: Field<Histogram>) {
        let mut cumulative = 0;
        for i in 0..=BOUNDS_US.len() {
            cumulative += route.total(|shard| &of(shard).buckets[i]);
            let le = BOUNDS_US
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |&us| seconds(us));
            let labels = [("route", &*route.name), ("le", le.as_str())];
            self.sample(&format!("{name}_bucket"), &labels, cumulative);
        }
        let sum = seconds(route.total(|shard| &of(shard).sum_us));
        let labels = [("route", &*route.name)];
        self.sample(&format!("{name}_sum"), &labels, sum);
        self.sample(&format!("{name}_count"), &labels, cumulative);
    }
}

/// Microseconds as seconds, exactly, in the shortest decimal form (`0.005`, `1`, `2.5`).
fn seconds(us: u64) -> String {
    let (whole, fraction) = (us / 1_000_000, us % 1_000_000);
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = format!("{fraction:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole exposition, in `format`.
pub fn render(format: Format, facts: &Facts) -> String {
    let registry = &*REGISTRY;
    let routes: Vec<Arc<Route>> = {
        let all = registry.all.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .chain(std::iter::once(&registry.other))
            .cloned()
            .collect()
    };
    let mut w = Writer {
        out: String::with_capacity(16 << 10),
        format,
    };
    w.family(
        "openai_proxy_build",
        Kind::Info,
        "The running build: its version.",
    );
    w.sample(
        "openai_proxy_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    write_requests(&mut w, &routes);
    write_connections(&mut w, registry, facts);
    write_reloads(&mut w, registry, facts);
    registry.named.write(&mut w);
    w.single(
        "openai_proxy_limits_backend_unavailable",
        Kind::Gauge,
        "1 while the limits backend (Redis) failed its last admission check, else 0.",
        u8::from(facts.limits_backend_down),
    );
    if format == Format::OpenMetrics {
        w.out.push_str("# EOF\n");
    }
    w.out
}

/// One figure of a route's.
type Field<T> = fn(&Shard) -> &T;

fn write_requests(w: &mut Writer, routes: &[Arc<Route>]) {
    w.family(
        "openai_proxy_requests",
        Kind::Counter,
        "Requests answered, by route (the allowed path prefix, or other), method and status class.",
    );
    for route in routes {
        for (m, method) in METHODS.iter().enumerate() {
            for (c, class) in CLASSES.iter().enumerate() {
                let count = route.total(|shard| &shard.requests[m][c]);
                if count > 0 {
                    let labels = [
                        ("route", &*route.name),
                        ("method", method),
                        ("status_class", class),
                    ];
                    w.sample("openai_proxy_requests_total", &labels, count);
                }
            }
        }
    }
    let families: [(&str, &str, PerRoute); 4] = [
        (
            "openai_proxy_request_duration_seconds",
            "Time from a request's arrival to the end of its response, streams included.",
            PerRoute::Histogram(|r| &r.duration),
        ),
        (
            "openai_proxy_time_to_first_byte_seconds",
            "Time from a request's arrival to its response headers.",
            PerRoute::Histogram(|r| &r.ttfb),
        ),
        (
            "openai_proxy_received_bytes",
            "Request body bytes received from clients.",
            PerRoute::Counter(|r| &r.bytes_in),
        ),
        (
            "openai_proxy_sent_bytes",
            "Response body bytes sent to clients.",
            PerRoute::Counter(|r| &r.bytes_out),
        ),
    ];
    for (name, help, series) in families {
        let kind = match series {
            PerRoute::Histogram(_) => Kind::Histogram,
            PerRoute::Counter(_) => Kind::Counter,
        };
        w.family(name, kind, help);
        for route in routes {
            match series {
                PerRoute::Histogram(of) => w.histogram(name, route, of),
                PerRoute::Counter(of) => {
                    let labels = [("route", &*route.name)];
                    w.sample(&format!("{name}_total"), &labels, route.total(of));
                }
            }
        }
    }
}

/// A family with one series per route: a histogram, or a counter (`NAME_total`).
#[derive(Clone, Copy)]
enum PerRoute {
    Histogram(Field<Histogram>),
    Counter(Field<AtomicU64>),
}

fn write_connections(w: &mut Writer, registry: &Registry, facts: &Facts) {
    let load = |gauge: &AtomicI64| gauge.load(Ordering::Relaxed).max(0);
    let gauges = [
        (
            "openai_proxy_streams_open",
            "Event streams (SSE) being relayed.",
            load(&registry.streams_open),
        ),
        (
            "openai_proxy_websockets_open",
            "WebSocket tunnels open.",
            load(&registry.websockets_open),
        ),
        (
            "openai_proxy_upstream_connections_open",
            "Connections to the upstream open, idle or busy.",
            load(&registry.upstream_open),
        ),
        (
            "openai_proxy_upstream_connections_idle",
            "Upstream connections open and carrying no request.",
            i64::try_from(facts.upstream_idle).unwrap_or(i64::MAX),
        ),
    ];
    for (name, help, value) in gauges {
        w.single(name, Kind::Gauge, help, value);
    }
    let counters = [
        (
            "openai_proxy_upstream_connects",
            "Upstream connections opened.",
            &registry.upstream_connects,
        ),
        (
            "openai_proxy_upstream_connect_failures",
            "Upstream connections that failed to open (TCP, TLS or the connect timeout).",
            &registry.upstream_connect_failures,
        ),
        (
            "openai_proxy_upstream_tls_handshakes",
            "TLS handshakes completed with the upstream.",
            &registry.upstream_tls_handshakes,
        ),
    ];
    for (name, help, counter) in counters {
        w.single(name, Kind::Counter, help, counter.load(Ordering::Relaxed));
    }
}

fn write_reloads(w: &mut Writer, registry: &Registry, facts: &Facts) {
    w.family(
        "openai_proxy_reloads",
        Kind::Counter,
        "Config reloads, by result.",
    );
    for (result, counter) in [
        ("success", &registry.reloads_ok),
        ("failure", &registry.reloads_failed),
    ] {
        let value = counter.load(Ordering::Relaxed);
        w.sample("openai_proxy_reloads_total", &[("result", result)], value);
    }
    w.single(
        "openai_proxy_config_generation",
        Kind::Gauge,
        "The serving config's generation: 1 at start, one more for each good reload.",
        facts.generation,
    );
    let loaded = facts
        .loaded_at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    w.single(
        "openai_proxy_config_last_reload_success_timestamp_seconds",
        Kind::Gauge,
        "When the serving config was loaded (at start, or by the last good reload), in Unix seconds.",
        loaded,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_are_exact_and_short() {
        assert_eq!(seconds(5_000), "0.005");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(2_500_000), "2.5");
        assert_eq!(seconds(0), "0");
    }

    #[test]
    fn a_histogram_puts_each_observation_in_the_first_bucket_that_holds_it() {
        let histogram = Histogram::new();
        histogram.observe(Duration::from_millis(5));
        histogram.observe(Duration::from_millis(6));
        histogram.observe(Duration::from_secs(3_600));
        assert_eq!(histogram.buckets[0].load(Ordering::Relaxed), 1);
        assert_eq!(histogram.buckets[1].load(Ordering::Relaxed), 1);
        assert_eq!(
            histogram.buckets[BOUNDS_US.len()].load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn each_method_counts_under_its_own_name() {
        for (i, name) in METHODS.iter().enumerate() {
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            let path = format!("/metrics-test-{i}/");
            set_routes(std::iter::once(path.as_str()));
            request(&Request {
                method: &method,
                path: &path,
                status: 200,
                time_to_headers: Duration::ZERO,
                duration: Duration::ZERO,
                bytes_in: 0,
                bytes_out: 0,
                upstream: None,
                token: None,
                model: None,
                usage: None,
            });
            let route = REGISTRY.current.load()[0].clone();
            assert_eq!(route.total(|shard| &shard.requests[i][1]), 1, "{name}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
