//! Counters kept per configured name: requests, retries and failovers by upstream; OpenAI tokens
//! by token, model and kind; limit refusals by token and limit.
//!
//! Every label stays bounded. Upstream and token names come from the config (the request path
//! only ever holds a configured one). Models are named by the upstream's answers: the first
//! `MAX_MODELS` distinct names get a series of their own, later ones count under `other`, a
//! name that is too long or holds a control character too, and usage without a model under
//! `unknown`.
//!
//! The request path takes no lock: names and models are looked up in `ArcSwap` snapshots of
//! read-only maps, and counts are relaxed atomic adds. A name or model seen for the first time
//! is added under a lock that only such insertions (and never a lookup) take: at most once per
//! configured name and `MAX_MODELS` times per process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::{CLASSES, Kind, SHARDS, Writer};

/// The token kinds, in the order of `Tokens::counts`.
pub const KINDS: [&str; 4] = ["prompt", "completion", "cached", "reasoning"];
/// The limits a request can be refused by, named as in `[limits]`.
pub const LIMITS: [&str; 4] = [
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_day",
    "max_concurrent",
];
/// Why a try was not the client's answer and another followed.
pub const REASONS: [&str; 4] = [
    // A rotated key got a 429: it rests, the next key is tried.
    "key_rate_limited",
    // A rotated key got a 401: it is set aside, the next key is tried.
    "key_refused",
    // Connecting failed (TCP, TLS, the egress proxy) or the connection broke before an answer.
    "unreachable",
    // The upstream answered 429, 502, 503 or 504.
    "status",
];

/// Distinct models with a series of their own.
pub const MAX_MODELS: usize = 64;
const OTHER_MODEL: usize = MAX_MODELS;
const UNKNOWN_MODEL: usize = MAX_MODELS + 1;
/// A model name longer than this counts under `other`.
const MAX_MODEL_LEN: usize = 128;

/// Values of type `T` by name, read through a snapshot; see the module's comment.
pub struct ByName<T> {
    map: ArcSwap<HashMap<Arc<str>, Arc<T>>>,
    insert: Mutex<()>,
}

impl<T: Default> ByName<T> {
    fn new() -> Self {
        Self {
            map: ArcSwap::from_pointee(HashMap::new()),
            insert: Mutex::new(()),
        }
    }

    /// Calls `f` with the value for `name`, made (once) if it is the first time.
    fn with(&self, name: &str, f: impl FnOnce(&T)) {
        if let Some(value) = self.map.load().get(name) {
            return f(value);
        }
        let _insert = self.insert.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.map.load_full();
        let value = match current.get(name) {
            Some(value) => value.clone(),
            None => {
                let value = Arc::new(T::default());
                let mut next = HashMap::clone(&current);
                next.insert(Arc::from(name), value.clone());
                self.map.store(Arc::new(next));
                value
            }
        };
        f(&value);
    }

    /// Every name with its value, in the names' order.
    fn sorted(&self) -> Vec<(Arc<str>, Arc<T>)> {
        let mut all: Vec<_> = self
            .map
            .load()
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[derive(Default)]
pub struct Upstream {
    /// Every request counts here: by worker shard, as routes do, then status class.
    requests: [Classes; SHARDS],
    retries: [AtomicU64; REASONS.len()],
    failovers: AtomicU64,
}

/// One worker's requests by status class, on a cache line of its own.
#[derive(Default)]
#[repr(align(128))]
struct Classes([AtomicU64; CLASSES.len()]);

impl Upstream {
    /// Requests by status class, summed over the shards.
    fn requests(&self) -> Vec<u64> {
        (0..CLASSES.len())
            .map(|class| {
                let shards = self.requests.iter();
                shards.map(|s| s.0[class].load(Ordering::Relaxed)).sum()
            })
            .collect()
    }
}

pub struct Token {
    /// By model slot (see `Models`), then kind.
    counts: [[AtomicU64; KINDS.len()]; MAX_MODELS + 2],
    refusals: [AtomicU64; LIMITS.len()],
}

impl Default for Token {
    fn default() -> Self {
        Self {
            counts: std::array::from_fn(|_| Default::default()),
            refusals: Default::default(),
        }
    }
}

/// The first `MAX_MODELS` models seen, each with its slot.
struct Models {
    slots: ArcSwap<HashMap<Box<str>, usize>>,
    insert: Mutex<()>,
}

impl Models {
    fn new() -> Self {
        Self {
            slots: ArcSwap::from_pointee(HashMap::new()),
            insert: Mutex::new(()),
        }
    }

    fn slot(&self, model: Option<&str>) -> usize {
        let Some(model) = model else {
            return UNKNOWN_MODEL;
        };
        if let Some(&slot) = self.slots.load().get(model) {
            return slot;
        }
        if model.len() > MAX_MODEL_LEN || model.chars().any(char::is_control) {
            return OTHER_MODEL;
        }
        let _insert = self.insert.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.slots.load_full();
        if let Some(&slot) = current.get(model) {
            return slot;
        }
        if current.len() >= MAX_MODELS {
            return OTHER_MODEL;
        }
        let slot = current.len();
        let mut next = HashMap::clone(&current);
        next.insert(model.into(), slot);
        self.slots.store(Arc::new(next));
        slot
    }

    /// Every slot's label, `other` and `unknown` last.
    fn names(&self) -> Vec<String> {
        let slots = self.slots.load();
        let mut names = vec![String::new(); slots.len()];
        for (model, &slot) in slots.iter() {
            names[slot] = model.to_string();
        }
        names.push("other".into());
        names.push("unknown".into());
        names
    }
}

pub struct Named {
    upstreams: ByName<Upstream>,
    tokens: ByName<Token>,
    models: Models,
}

impl Named {
    pub fn new() -> Self {
        Self {
            upstreams: ByName::new(),
            tokens: ByName::new(),
            models: Models::new(),
        }
    }

    /// A finished request's figures: under the upstream that answered (the last tried), and
    /// its tokens under its token and model.
    pub fn request(&self, request: &super::Request<'_>, class: usize) {
        if let Some(tried) = request.upstream {
            let answered = tried.rsplit(',').next().unwrap_or(tried);
            let shard = crate::workers::current() % SHARDS;
            self.upstreams.with(answered, |upstream| {
                upstream.requests[shard].0[class].fetch_add(1, Ordering::Relaxed);
            });
        }
        if let (Some(token), Some(usage)) = (request.token, request.usage) {
            let slot = self.models.slot(request.model);
            self.tokens.with(token, |token| {
                for (counter, value) in token.counts[slot].iter().zip(usage) {
                    counter.fetch_add(value, Ordering::Relaxed);
                }
            });
        }
    }

    pub fn retried(&self, upstream: &str, reason: usize, failover: bool) {
        self.upstreams.with(upstream, |upstream| {
            upstream.retries[reason].fetch_add(1, Ordering::Relaxed);
            if failover {
                upstream.failovers.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    pub fn refused(&self, token: &str, limit: usize) {
        self.tokens.with(token, |token| {
            token.refusals[limit].fetch_add(1, Ordering::Relaxed);
        });
    }

    pub fn write(&self, w: &mut Writer) {
        self.write_upstreams(w);
        self.write_tokens(w);
    }

    fn write_upstreams(&self, w: &mut Writer) {
        let upstreams = self.upstreams.sorted();
        write_pairs(
            w,
            (
                "openai_proxy_upstream_requests",
                "Requests by the upstream that answered them (the last one tried) and status class.",
            ),
            &upstreams,
            ("upstream", "status_class", &CLASSES),
            Upstream::requests,
        );
        write_pairs(
            w,
            (
                "openai_proxy_upstream_retries",
                "Tries that were not the client's answer and were followed by another (the next key or upstream), by upstream and reason.",
            ),
            &upstreams,
            ("upstream", "reason", &REASONS),
            |u| loaded(&u.retries),
        );
        w.family(
            "openai_proxy_upstream_failovers",
            Kind::Counter,
            "Requests that moved from this upstream to the route's next one.",
        );
        for (name, upstream) in &upstreams {
            let labels = [("upstream", &**name)];
            let value = upstream.failovers.load(Ordering::Relaxed);
            w.sample("openai_proxy_upstream_failovers_total", &labels, value);
        }
    }

    fn write_tokens(&self, w: &mut Writer) {
        let tokens = self.tokens.sorted();
        let models = self.models.names();
        w.family(
            "openai_proxy_openai_tokens",
            Kind::Counter,
            "OpenAI tokens the upstream reported, by client token, model (as the upstream named it) and kind; cached is part of prompt, reasoning of completion.",
        );
        for (name, token) in &tokens {
            for (model, counts) in models.iter().zip(&token.counts) {
                for (kind, counter) in KINDS.iter().zip(counts) {
                    let labels = [("token", &**name), ("model", model), ("kind", kind)];
                    w.nonzero("openai_proxy_openai_tokens_total", &labels, counter);
                }
            }
        }
        write_pairs(
            w,
            (
                "openai_proxy_limit_refusals",
                "Requests refused (429) by one of their token's limits, by token and limit.",
            ),
            &tokens,
            ("token", "limit", &LIMITS),
            |t| loaded(&t.refusals),
        );
    }
}

/// A counter family (name without `_total`, help) labelled by each entry's name (`labels.0`)
/// and one of `labels.2` (`labels.1`), whose counts `of` gives in the same order.
fn write_pairs<T>(
    w: &mut Writer,
    (family, help): (&str, &str),
    entries: &[(Arc<str>, Arc<T>)],
    labels: (&str, &str, &[&str]),
    of: fn(&T) -> Vec<u64>,
) {
    let (name_label, value_label, values) = labels;
    w.family(family, Kind::Counter, help);
    let sample = format!("{family}_total");
    for (name, entry) in entries {
        for (value, count) in values.iter().zip(of(entry)) {
            if count > 0 {
                let labels = [(name_label, &**name), (value_label, *value)];
                w.sample(&sample, &labels, count);
            }
        }
    }
}

fn loaded(counters: &[AtomicU64]) -> Vec<u64> {
    counters.iter().map(|c| c.load(Ordering::Relaxed)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_past_the_bound_count_as_other() {
        let models = Models::new();
        for i in 0..MAX_MODELS {
            assert_eq!(models.slot(Some(&format!("model-{i}"))), i);
        }
        assert_eq!(models.slot(Some("one-too-many")), OTHER_MODEL);
        assert_eq!(models.slot(Some("model-3")), 3);
        assert_eq!(models.slot(None), UNKNOWN_MODEL);
        let names = models.names();
        assert_eq!(names.len(), MAX_MODELS + 2);
        assert_eq!(names[3], "model-3");
        assert_eq!(names[OTHER_MODEL], "other");
        assert_eq!(names[UNKNOWN_MODEL], "unknown");
    }

    #[test]
    fn a_model_name_with_a_control_character_or_too_long_is_other() {
        let models = Models::new();
        assert_eq!(models.slot(Some("a\nb")), OTHER_MODEL);
        assert_eq!(models.slot(Some(&"x".repeat(200))), OTHER_MODEL);
        assert_eq!(models.slot(Some("gpt-4o")), 0);
    }
}
