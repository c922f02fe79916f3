//! Counters kept per configured name: requests, retries and failovers by upstream; OpenAI tokens
//! by token, model and kind; limit refusals by token and limit.
//!
//! Every label stays bounded. Upstream and token names come from the config (the request path
//! only ever holds a configured one). Models are named by the upstream's answers: the first
//! `MAX_MODELS` distinct names get a series of their own, later ones count under `other`, a
//! name that is too long or holds a control character too, and usage without a model under
//! `unknown`.
//!
//! The request path takes no lock: names and models are looked up in one `ArcSwap` snapshot of
//! read-only maps, and counts are relaxed atomic adds. A name or model seen for the first time
//! is added under a lock that only such insertions (and never a lookup) take: at most once per
//! configured name and `MAX_MODELS` times per process.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
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

/// FNV-1a: names and models are short, and every request hashes one or two of them, where
/// SipHash's cost shows. Flooding is no concern: the keys are configured names and at most
/// `MAX_MODELS` models.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Map<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

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

/// The names and models seen so far: one snapshot, so that a request loads it once.
#[derive(Clone, Default)]
struct Maps {
    upstreams: Map<Arc<str>, Arc<Upstream>>,
    tokens: Map<Arc<str>, Arc<Token>>,
    /// The first `MAX_MODELS` models seen, each with its slot.
    models: Map<Box<str>, usize>,
}

impl Maps {
    /// Every slot's label, `other` and `unknown` last.
    fn model_names(&self) -> Vec<String> {
        let mut names = vec![String::new(); self.models.len()];
        for (model, &slot) in &self.models {
            names[slot] = model.to_string();
        }
        names.push("other".into());
        names.push("unknown".into());
        names
    }
}

/// Every name with its value, in the names' order.
fn sorted<T>(map: &Map<Arc<str>, Arc<T>>) -> Vec<(Arc<str>, Arc<T>)> {
    let mut all: Vec<_> = map.iter().map(|(n, v)| (n.clone(), v.clone())).collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Which of `Maps`' maps of names.
type Pick<T> = fn(&mut Maps) -> &mut Map<Arc<str>, Arc<T>>;

pub struct Named {
    maps: ArcSwap<Maps>,
    /// Taken to add a name or a model, never to look one up.
    insert: Mutex<()>,
}

impl Named {
    pub fn new() -> Self {
        Self {
            maps: ArcSwap::from_pointee(Maps::default()),
            insert: Mutex::new(()),
        }
    }

    /// Calls `f` with the value for `name` in `map`, one of the current maps, or else with
    /// one added (once) to the map `pick` chooses.
    fn with<T: Default>(
        &self,
        map: &Map<Arc<str>, Arc<T>>,
        pick: Pick<T>,
        name: &str,
        f: impl FnOnce(&T),
    ) {
        match map.get(name) {
            Some(value) => f(value),
            None => {
                let added =
                    self.add(|next| Some(pick(next).entry(name.into()).or_default().clone()));
                f(&added.expect("an entry is always added"));
            }
        }
    }

    /// Applies `change` to a copy of the current maps and makes it current, unless it answers
    /// None; answers what it did.
    fn add<R>(&self, change: impl FnOnce(&mut Maps) -> Option<R>) -> Option<R> {
        let _insert = self.insert.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = Maps::clone(&self.maps.load());
        let answer = change(&mut next)?;
        self.maps.store(Arc::new(next));
        Some(answer)
    }

    /// The slot of a model named by an answer; see the module's comment.
    fn model_slot(&self, maps: &Maps, model: Option<&str>) -> usize {
        let Some(model) = model else {
            return UNKNOWN_MODEL;
        };
        if let Some(&slot) = maps.models.get(model) {
            return slot;
        }
        if model.len() > MAX_MODEL_LEN || model.chars().any(char::is_control) {
            return OTHER_MODEL;
        }
        let added = self.add(|next| match next.models.get(model) {
            Some(&slot) => Some(slot),
            None if next.models.len() >= MAX_MODELS => None,
            None => {
                let slot = next.models.len();
                next.models.insert(model.into(), slot);
                Some(slot)
            }
        });
        added.unwrap_or(OTHER_MODEL)
    }

    /// A finished request's figures: under the upstream that answered (the last tried), and
    /// its tokens under its token and model.
    pub fn request(&self, request: &super::Request<'_>, class: usize) {
        let maps = self.maps.load();
        if let Some(tried) = request.upstream {
            let answered = tried.rsplit(',').next().unwrap_or(tried);
            let shard = crate::workers::current() % SHARDS;
            self.with(
                &maps.upstreams,
                |m| &mut m.upstreams,
                answered,
                |upstream| {
                    upstream.requests[shard].0[class].fetch_add(1, Ordering::Relaxed);
                },
            );
        }
        if let (Some(token), Some(usage)) = (request.token, request.usage) {
            let slot = self.model_slot(&maps, request.model);
            self.with(
                &maps.tokens,
                |m| &mut m.tokens,
                token,
                |token| {
                    for (counter, value) in token.counts[slot].iter().zip(usage) {
                        counter.fetch_add(value, Ordering::Relaxed);
                    }
                },
            );
        }
    }

    pub fn retried(&self, upstream: &str, reason: usize, next: super::NextTry) {
        let maps = self.maps.load();
        self.with(
            &maps.upstreams,
            |m| &mut m.upstreams,
            upstream,
            |upstream| {
                upstream.retries[reason].fetch_add(1, Ordering::Relaxed);
                if next == super::NextTry::Upstream {
                    upstream.failovers.fetch_add(1, Ordering::Relaxed);
                }
            },
        );
    }

    pub fn refused(&self, token: &str, limit: usize) {
        let maps = self.maps.load();
        self.with(
            &maps.tokens,
            |m| &mut m.tokens,
            token,
            |token| {
                token.refusals[limit].fetch_add(1, Ordering::Relaxed);
            },
        );
    }

    pub fn write(&self, w: &mut Writer) {
        self.write_upstreams(w);
        self.write_tokens(w);
    }

    fn write_upstreams(&self, w: &mut Writer) {
        let upstreams = sorted(&self.maps.load().upstreams);
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
        let maps = self.maps.load();
        let tokens = sorted(&maps.tokens);
        let models = maps.model_names();
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
    fn fnv_is_fnv_1a() {
        let mut hasher = Fnv::default();
        hasher.write(b"a");
        assert_eq!(hasher.finish(), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn models_past_the_bound_count_as_other() {
        let named = Named::new();
        let slot = |model: Option<&str>| named.model_slot(&named.maps.load(), model);
        for i in 0..MAX_MODELS {
            assert_eq!(slot(Some(&format!("model-{i}"))), i);
        }
        assert_eq!(slot(Some("one-too-many")), OTHER_MODEL);
        assert_eq!(slot(Some("model-3")), 3);
        assert_eq!(slot(None), UNKNOWN_MODEL);
        let names = named.maps.load().model_names();
        assert_eq!(names.len(), MAX_MODELS + 2);
        assert_eq!(names[3], "model-3");
        assert_eq!(names[OTHER_MODEL], "other");
        assert_eq!(names[UNKNOWN_MODEL], "unknown");
    }

    #[test]
    fn a_model_name_with_a_control_character_or_too_long_is_other() {
        let named = Named::new();
        let slot = |model: Option<&str>| named.model_slot(&named.maps.load(), model);
        assert_eq!(slot(Some("a\nb")), OTHER_MODEL);
        assert_eq!(slot(Some(&"x".repeat(200))), OTHER_MODEL);
        assert_eq!(slot(Some("gpt-4o")), 0);
    }
}
