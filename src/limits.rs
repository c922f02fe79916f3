//! Per-token limits: requests and tokens per minute, tokens per UTC day, requests in flight.
//!
//! Limits apply in tokens mode, per token name. A request is admitted (or refused with 429)
//! right after its token is verified and before anything goes upstream; its tokens are charged
//! when its response ends, from the upstream's own figures (`Usage`), by `Permit::settle`.
//!
//! Windows are fixed and aligned to the wall clock: a minute is a UTC minute, a day a UTC day,
//! so that instances sharing a backend count in the same windows. `max_concurrent` counts this
//! process's requests, streams and WebSockets in flight (with any backend): a shared count would
//! leak slots when an instance dies.
//!
//! The counters live in a `local::Store` that outlives generations (a reload keeps it) and is
//! written to the state directory, so that a restart keeps the day's quota.

pub mod local;
pub mod redis;
pub mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};

pub use crate::config::limits::{Backend, Config, Limit, OnBackendError};
use crate::config::{ConfigError, ConfigFile};
use crate::error::{ProxyError, RateLimited};
use crate::usage::Usage;

/// The limits of one token; each one unset means no limit of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Quota {
    pub requests_per_minute: Option<Limit>,
    pub tokens_per_minute: Option<Limit>,
    pub tokens_per_day: Option<Limit>,
    pub max_concurrent: Option<Limit>,
}

impl Quota {
    /// This token's limits, each falling back to `[limits]`'s default.
    pub fn or(self, defaults: &Quota) -> Quota {
        Quota {
            requests_per_minute: self.requests_per_minute.or(defaults.requests_per_minute),
            tokens_per_minute: self.tokens_per_minute.or(defaults.tokens_per_minute),
            tokens_per_day: self.tokens_per_day.or(defaults.tokens_per_day),
            max_concurrent: self.max_concurrent.or(defaults.max_concurrent),
        }
    }

    fn is_empty(&self) -> bool {
        *self == Quota::default()
    }
}

impl Config {
    pub fn defaults(&self) -> Quota {
        Quota {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            max_concurrent: self.max_concurrent,
        }
    }
}

/// The state file of the local backend, in the state directory.
pub const STATE_FILE: &str = "limits.json";

/// Where the local backend's state file is: `$STATE_DIRECTORY` (its first entry), else
/// `state_directory` (relative to the config's directory), else the config's directory.
pub fn state_path(config: &Config, file: &ConfigFile) -> PathBuf {
    let from_systemd = std::env::var_os("STATE_DIRECTORY")
        .and_then(|dirs| std::env::split_paths(&dirs).next())
        .filter(|dir| !dir.as_os_str().is_empty());
    let dir = match (from_systemd, &config.state_directory) {
        (Some(dir), _) => dir,
        (None, Some(dir)) => file.resolve(dir),
        (None, None) => file.resolve(Path::new(".")),
    };
    dir.join(STATE_FILE)
}

/// The limits of one generation, over counters that outlive it.
pub struct Limiter {
    defaults: Quota,
    /// Counts requests in flight always, and the windows with the local backend.
    store: Arc<local::Store>,
    /// The Redis backend's connection, kept across reloads while the URL stays.
    redis: Option<Arc<redis::Client>>,
    redis_timeout: Duration,
    on_backend_error: OnBackendError,
}

impl Limiter {
    /// Builds the limits of a new generation; a reload keeps the counters of `previous`. Limits
    /// need tokens mode, since they are kept per token: set in passthrough mode, they are an
    /// error rather than silently nothing.
    pub fn build(
        config: &Config,
        tokens_mode: bool,
        file: &ConfigFile,
        previous: Option<&Limiter>,
    ) -> Result<Self, ConfigError> {
        if !tokens_mode && (!config.defaults().is_empty() || config.backend != Backend::Local) {
            return Err(ConfigError::File {
                path: file.path.clone(),
                message: "[limits] are kept per token: they need [auth] mode = \"tokens\"".into(),
            });
        }
        let store = match previous {
            Some(previous) => previous.store.clone(),
            None => Arc::new(local::Store::open(state_path(config, file))),
        };
        let redis = match &config.backend {
            Backend::Local => None,
            Backend::Redis(url) => Some(
                previous
                    .and_then(|p| p.redis.clone())
                    .filter(|client| client.url() == url)
                    .unwrap_or_else(|| Arc::new(redis::Client::new(url.clone()))),
            ),
        };
        Ok(Self {
            defaults: config.defaults(),
            store,
            redis,
            redis_timeout: config.redis_timeout.0,
            on_backend_error: config.on_backend_error,
        })
    }

    /// Admits a request of the token `name` with its own limits `quota` (over `[limits]`), or
    /// refuses it with 429; what it admits is counted at once.
    pub async fn admit(&self, name: &Arc<str>, quota: &Quota) -> Result<Permit, ProxyError> {
        let quota = quota.or(&self.defaults);
        let now = Now::current();
        let slot = self.store.admit(name, &quota, &now, self.redis.is_none())?;
        let permit = Permit {
            store: self.store.clone(),
            redis: self.redis.clone(),
            name: name.clone(),
            model: None,
            usage: None,
            slot,
        };
        let Some(redis) = &self.redis else {
            return Ok(permit);
        };
        // With "allow", a token far from its limits need not wait for Redis (see
        // `redis`'s doc); with "deny", every request waits for Redis's word.
        let optimistic = self.on_backend_error == OnBackendError::Allow;
        if optimistic && redis.admit_at_once(name, &quota, &now) {
            return Ok(permit);
        }
        let ahead = if optimistic {
            redis::lease_size(&quota)
        } else {
            1
        };
        let checked = redis.admit(name, &quota, &now, ahead);
        let checked = tokio::time::timeout(self.redis_timeout, checked)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.redis_timeout)));
        match checked {
            Ok((admitted, used)) => {
                health::up();
                match exceeded(&quota, &used) {
                    Some(which) if !admitted => Err(refusal(name, which, &quota, &used, &now)),
                    _ => Ok(permit),
                }
            }
            Err(error) => {
                health::down(&error, self.on_backend_error);
                match self.on_backend_error {
                    OnBackendError::Allow => Ok(permit),
                    OnBackendError::Deny => Err(ProxyError::LimitsUnavailable),
                }
            }
        }
    }

    /// The counters, for the control thread to save (every generation shares them).
    pub fn saver(&self) -> Saver {
        Saver(self.store.clone())
    }
}

/// Writes the counters to the state file: every `SAVE_EVERY` while they change, and at stop.
#[derive(Clone)]
pub struct Saver(Arc<local::Store>);

/// How much of a day's counts a crash can lose.
const SAVE_EVERY: Duration = Duration::from_secs(5);

impl Saver {
    /// Saves every `SAVE_EVERY`, for as long as the runtime it is spawned on runs.
    pub async fn run(self) {
        let mut tick = tokio::time::interval(SAVE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.0.save();
        }
    }

    /// Saves now, if anything changed since the last save.
    pub fn save(&self) {
        self.0.save();
    }
}

/// A request let in: holds its place among the token's requests in flight until dropped, and
/// records the request and its usage (tokens charged to its windows) when dropped.
pub struct Permit {
    store: Arc<local::Store>,
    redis: Option<Arc<redis::Client>>,
    name: Arc<str>,
    model: Option<String>,
    usage: Option<Usage>,
    slot: local::Slot,
}

impl Permit {
    /// The model the request used, for its usage record (unnamed: "-").
    pub fn name_model(&mut self, model: &str) {
        self.model = Some(model.to_owned());
    }

    /// Ends the request with the tokens the upstream reported (`None`: not known, so it counts
    /// as a request with unknown tokens).
    pub fn settle(mut self, usage: Option<Usage>) {
        self.usage = usage;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let tally = Tally::of(self.usage);
        let model = self.model.as_deref().unwrap_or("-");
        let now = Now::current();
        match &self.redis {
            Some(redis) => redis.charge(&self.name, model, &tally, &now),
            None => self.store.charge(&self.slot, model, &tally, &now),
        }
    }
}

/// One request's usage, or the sum of many: what a usage record counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tally {
    pub requests: u64,
    pub prompt: u64,
    pub completion: u64,
    pub cached: u64,
    pub reasoning: u64,
}

impl Tally {
    /// One request, with its tokens if known.
    pub fn of(usage: Option<Usage>) -> Self {
        let usage = usage.unwrap_or_default();
        Self {
            requests: 1,
            prompt: usage.prompt,
            completion: usage.completion,
            cached: usage.cached,
            reasoning: usage.reasoning,
        }
    }

    /// What the token limits count: prompt + completion.
    pub fn tokens(&self) -> u64 {
        self.prompt + self.completion
    }

    pub fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.prompt += other.prompt;
        self.completion += other.completion;
        self.cached += other.cached;
        self.reasoning += other.reasoning;
    }
}

/// A usage record: one token's use of one model on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Row {
    pub day: u64,
    pub token: String,
    pub model: String,
    #[serde(flatten)]
    pub tally: Tally,
}

/// Whether the backend can be reached: an outage is logged once when it starts and once when it
/// ends, and shows in `STATUS=` meanwhile.
pub mod health {
    use std::sync::LazyLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::sync::watch;

    use super::OnBackendError;

    static DOWN: AtomicBool = AtomicBool::new(false);
    static STATUS: LazyLock<watch::Sender<Option<String>>> =
        LazyLock::new(|| watch::Sender::new(None));

    /// What `STATUS=` should add while the backend is down; None while it is up.
    pub fn status() -> watch::Receiver<Option<String>> {
        STATUS.subscribe()
    }

    pub fn down(error: &str, policy: OnBackendError) {
        if DOWN.swap(true, Ordering::Relaxed) {
            return;
        }
        let what = match policy {
            OnBackendError::Allow => "allowed, uncounted",
            OnBackendError::Deny => "refused (503)",
        };
        tracing::warn!(%error, "limits backend (Redis) unreachable: requests are {what} until it is back");
        let since = httpdate::fmt_http_date(std::time::SystemTime::now());
        STATUS.send_replace(Some(format!(
            "limits backend (Redis) UNREACHABLE since {since}: requests {what}"
        )));
    }

    /// Whether the last admission check found the backend unreachable.
    pub fn is_down() -> bool {
        DOWN.load(Ordering::Relaxed)
    }

    pub fn up() {
        if DOWN.swap(false, Ordering::Relaxed) {
            tracing::info!("limits backend (Redis) reachable again");
            STATUS.send_replace(None);
        }
    }
}

/// The wall clock, in the windows the counters are kept in.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Minutes since the Unix epoch.
    pub minute: u64,
    /// Days since the Unix epoch (UTC).
    pub day: u64,
    /// Until the minute ends, and until the day ends.
    pub minute_left: Duration,
    pub day_left: Duration,
}

impl Now {
    pub fn current() -> Self {
        Self::at(SystemTime::now())
    }

    pub fn at(time: SystemTime) -> Self {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let millis = since.as_millis() as u64;
        Self {
            minute: millis / 60_000,
            day: millis / 86_400_000,
            minute_left: Duration::from_millis(60_000 - millis % 60_000),
            day_left: Duration::from_millis(86_400_000 - millis % 86_400_000),
        }
    }
}

/// What a token has used in the current windows, as the admission check reads them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    pub requests_minute: u64,
    pub tokens_minute: u64,
    pub tokens_day: u64,
}

/// The limit a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exceeded {
    RequestsPerMinute,
    TokensPerMinute,
    TokensPerDay,
    MaxConcurrent,
}

/// The one admission rule, whichever backend counts: the first limit `used` has reached, if any.
/// A token limit is checked as "is there budget left", since a request's tokens are known only
/// after it.
pub fn exceeded(quota: &Quota, used: &Used) -> Option<Exceeded> {
    let reached = |limit: Option<Limit>, used: u64| limit.is_some_and(|l| used >= l.0);
    if reached(quota.requests_per_minute, used.requests_minute) {
        Some(Exceeded::RequestsPerMinute)
    } else if reached(quota.tokens_per_minute, used.tokens_minute) {
        Some(Exceeded::TokensPerMinute)
    } else if reached(quota.tokens_per_day, used.tokens_day) {
        Some(Exceeded::TokensPerDay)
    } else {
        None
    }
}

impl Exceeded {
    /// The limit's name, as `[limits]` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests_per_minute",
            Self::TokensPerMinute => "tokens_per_minute",
            Self::TokensPerDay => "tokens_per_day",
            Self::MaxConcurrent => "max_concurrent",
        }
    }
}

/// The 429 for a request of the token `name` that ran into `which` (counted in the metrics),
/// with OpenAI's rate-limit headers for the requests and tokens windows as they stand and
/// `Retry-After` for when it may pass.
pub fn refusal(name: &str, which: Exceeded, quota: &Quota, used: &Used, now: &Now) -> ProxyError {
    crate::metrics::limit_refused(name, which.name());
    let (limit, what, retry) = match which {
        Exceeded::RequestsPerMinute => (
            quota.requests_per_minute,
            "requests per minute",
            now.minute_left,
        ),
        Exceeded::TokensPerMinute => (
            quota.tokens_per_minute,
            "tokens per minute",
            now.minute_left,
        ),
        Exceeded::TokensPerDay => (quota.tokens_per_day, "tokens per day (UTC)", now.day_left),
        Exceeded::MaxConcurrent => (
            quota.max_concurrent,
            "requests in flight (max_concurrent)",
            Duration::from_secs(1),
        ),
    };
    let limit = limit.map_or(0, |l| l.0);
    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        headers.insert(
            name,
            HeaderValue::from_str(&value).expect("digits and units"),
        );
    };
    let retry_secs = retry.as_millis().div_ceil(1000).max(1);
    put("retry-after", retry_secs.to_string());
    if let Some(rpm) = quota.requests_per_minute {
        put("x-ratelimit-limit-requests", rpm.0.to_string());
        let left = rpm.0.saturating_sub(used.requests_minute);
        put("x-ratelimit-remaining-requests", left.to_string());
        put("x-ratelimit-reset-requests", reset_text(now.minute_left));
    }
    // The tokens headers speak of the window that is shorter to wait for: the day once the
    // day's quota is spent, else the minute.
    let day_spent = which == Exceeded::TokensPerDay;
    let tokens = match (quota.tokens_per_minute, quota.tokens_per_day) {
        (Some(tpm), _) if !day_spent => Some((tpm.0, used.tokens_minute, now.minute_left)),
        (_, Some(tpd)) => Some((tpd.0, used.tokens_day, now.day_left)),
        (Some(tpm), None) => Some((tpm.0, used.tokens_minute, now.minute_left)),
        (None, None) => None,
    };
    if let Some((limit, used, reset)) = tokens {
        put("x-ratelimit-limit-tokens", limit.to_string());
        put(
            "x-ratelimit-remaining-tokens",
            limit.saturating_sub(used).to_string(),
        );
        put("x-ratelimit-reset-tokens", reset_text(reset));
    }
    let kind = match which {
        Exceeded::TokensPerMinute | Exceeded::TokensPerDay => "tokens",
        Exceeded::RequestsPerMinute | Exceeded::MaxConcurrent => "requests",
    };
    ProxyError::RateLimited(Box::new(RateLimited {
        message: format!(
            "Rate limit reached for this token on {what}: limit {limit}. \
             Please try again in {}.",
            reset_text(retry)
        ),
        kind,
        headers,
    }))
}

/// A duration as OpenAI writes its reset headers: "20ms", "1s", "6m0s", "1h2m3s".
pub fn reset_text(d: Duration) -> String {
    let millis = d.as_millis();
    if millis < 1000 {
        return format!("{millis}ms");
    }
    let secs = millis.div_ceil(1000);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m{s}s"),
        (h, m) => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(rpm: u64, tpm: u64, tpd: u64) -> Quota {
        let some = |n: u64| (n > 0).then_some(Limit(n));
        Quota {
            requests_per_minute: some(rpm),
            tokens_per_minute: some(tpm),
            tokens_per_day: some(tpd),
            max_concurrent: None,
        }
    }

    #[test]
    fn reset_texts_read_like_openai() {
        assert_eq!(reset_text(Duration::from_millis(20)), "20ms");
        assert_eq!(reset_text(Duration::from_millis(1000)), "1s");
        assert_eq!(reset_text(Duration::from_millis(1001)), "2s");
        assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
        assert_eq!(reset_text(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn the_first_limit_reached_refuses() {
        let q = quota(2, 100, 1000);
        let used = |r, t, d| Used {
            requests_minute: r,
            tokens_minute: t,
            tokens_day: d,
        };
        assert_eq!(exceeded(&q, &used(1, 99, 999)), None);
        assert_eq!(
            exceeded(&q, &used(2, 0, 0)),
            Some(Exceeded::RequestsPerMinute)
        );
        assert_eq!(
            exceeded(&q, &used(0, 100, 0)),
            Some(Exceeded::TokensPerMinute)
        );
        assert_eq!(
            exceeded(&q, &used(0, 0, 1000)),
            Some(Exceeded::TokensPerDay)
        );
        assert_eq!(exceeded(&Quota::default(), &used(9, 9, 9)), None);
    }

    #[test]
    fn token_limits_fall_back_to_the_defaults() {
        let own = quota(5, 0, 0);
        let defaults = quota(1, 2, 3);
        assert_eq!(own.or(&defaults), quota(5, 2, 3));
    }

    #[test]
    fn every_limit_has_its_series_in_the_metrics() {
        let all = [
            Exceeded::RequestsPerMinute,
            Exceeded::TokensPerMinute,
            Exceeded::TokensPerDay,
            Exceeded::MaxConcurrent,
        ];
        let names: Vec<&str> = all.iter().map(|e| e.name()).collect();
        assert_eq!(names, crate::metrics::LIMITS);
    }

    #[test]
    fn refusals_carry_openai_headers() {
        let now = Now::at(UNIX_EPOCH + Duration::from_secs(86_400 * 3 + 45));
        assert_eq!(now.minute_left, Duration::from_secs(15));
        let q = quota(2, 100, 0);
        let used = Used {
            requests_minute: 2,
            tokens_minute: 40,
            tokens_day: 40,
        };
        let ProxyError::RateLimited(limited) =
            refusal("t", Exceeded::RequestsPerMinute, &q, &used, &now)
        else {
            panic!("a 429");
        };
        let h = &limited.headers;
        assert_eq!(h["retry-after"], "15");
        assert_eq!(h["x-ratelimit-limit-requests"], "2");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-reset-requests"], "15s");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "60");
        assert!(limited.message.contains("requests per minute"));
        assert_eq!(limited.kind, "requests");
    }
}
