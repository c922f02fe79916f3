//! Several upstreams by name, and the routes that choose one for each request.
//!
//! `[upstream]` is the upstream named `default`; each `[upstreams.NAME]` adds one, with every
//! key `[upstream]` has. The `[[route]]` tables are tried in order: the first whose `paths`
//! (prefixes) and `models` (names, a `*` ending a prefix) both match sends the request to the
//! first of its `upstreams`; when none matches, the default takes it. The request's model is
//! looked for (as tokens mode reads it) only when some route names models, and passed in here.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue, header};

use crate::config::routes::RouteConfig;
use crate::config::{ConfigError, ConfigFile, FileRead};
use crate::keys::{Key, Keys};
use crate::models::ModelRule;
use crate::upstream::{self, Upstream};

/// Woken when a key or an upstream starts to rest, so that `STATUS=` says so.
pub static RESTING_CHANGED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// The name `[upstream]` goes by.
pub const DEFAULT: &str = "default";

/// Sent to the client with every upstream response: the name of the upstream that answered.
pub const HEADER: HeaderName = HeaderName::from_static("x-openai-proxy-upstream");

/// A built upstream and what goes with its name.
pub struct Named {
    pub name: Arc<str>,
    pub upstream: Arc<Upstream>,
    /// `HEADER`'s value.
    header: HeaderValue,
    /// Where the proxy's own key goes, instead of `Authorization: Bearer`.
    key_header: Option<HeaderName>,
    /// The proxy's own keys for this upstream (`key_files`); empty: `[auth]`'s key.
    pub keys: Keys,
    pub breaker: Breaker,
}

/// After this many failures in a row an upstream rests (its circuit opens) ...
const TRIP_AFTER: u32 = 5;
/// ... for this long; then requests try it again, and one more failure rests it again.
const PAUSE: Duration = Duration::from_secs(30);

/// An upstream's circuit breaker: failures to answer in a row, and since when it rests.
#[derive(Default)]
pub struct Breaker {
    failures: AtomicU32,
    resting_until: Mutex<Option<Instant>>,
}

impl Breaker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.resting_until.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_resting(&self) -> bool {
        self.lock().is_some_and(|until| until > Instant::now())
    }

    /// Counts a try: answered, or failed to (see `failover`). Returns true when the failure
    /// made the upstream rest.
    pub fn record(&self, answered: bool) -> bool {
        if answered {
            if self.failures.swap(0, Ordering::Relaxed) > 0 {
                *self.lock() = None;
            }
            return false;
        }
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 < TRIP_AFTER {
            return false;
        }
        // One failure after the pause rests it again.
        self.failures.store(TRIP_AFTER - 1, Ordering::Relaxed);
        *self.lock() = Some(Instant::now() + PAUSE);
        true
    }
}

/// The upstreams a request may go to, in order: never empty.
#[derive(Clone, Copy)]
pub struct Choice<'a> {
    upstreams: &'a [Named],
    indexes: &'a [usize],
}

impl<'a> Choice<'a> {
    pub fn count(self) -> usize {
        self.indexes.len()
    }

    pub fn iter(self) -> impl Iterator<Item = &'a Named> {
        self.indexes.iter().map(move |&i| &self.upstreams[i])
    }
}

/// Which upstreams a request was sent to (comma-separated, in order; the last answered), kept
/// in its extensions for its access log line.
#[derive(Clone)]
pub struct UpstreamName(pub Arc<str>);

pub struct Routes {
    /// The default upstream first, then the others in name order.
    upstreams: Vec<Named>,
    routes: Vec<Route>,
    reads_model: bool,
}

struct Route {
    paths: Vec<String>,
    models: Vec<ModelRule>,
    /// Indexes into `Routes::upstreams`, in the order they are to be tried.
    upstreams: Vec<usize>,
}

impl Routes {
    /// Builds the named upstreams (an unchanged one is kept from `previous`, with its
    /// connections) and the routes; returns the files the upstreams' configs named, as read.
    pub fn build(
        config: &crate::config::Config,
        file: &ConfigFile,
        default: Arc<Upstream>,
        workers: usize,
        previous: Option<&Routes>,
    ) -> Result<(Self, Vec<FileRead>), ConfigError> {
        let mut read = Vec::new();
        let mut upstreams = vec![Named::new(
            DEFAULT,
            default,
            &config.upstream,
            file,
            &mut read,
        )?];
        for (name, upstream_config) in &config.upstreams {
            if name.get_ref() == DEFAULT || HeaderValue::from_str(name.get_ref()).is_err() {
                return Err(file.error_at(
                    name.span(),
                    format!(
                        "{:?} cannot name an upstream: [upstream] is the one named \"default\", \
                         and a name is letters, digits, '-' and '_'",
                        name.get_ref()
                    ),
                ));
            }
            let (files, named_read) = upstream::Files::read(upstream_config, file)?;
            read.extend(named_read);
            let kept = previous
                .and_then(|p| p.find(name.get_ref()))
                .map(|n| &n.upstream);
            let built = Upstream::build(upstream_config, file, files, workers, kept)?;
            let named = Named::new(name.get_ref(), built, upstream_config, file, &mut read)?;
            upstreams.push(named);
        }
        let routes = config
            .route
            .iter()
            .map(|route| Route::build(route, &upstreams, file))
            .collect::<Result<Vec<_>, _>>()?;
        let reads_model = routes.iter().any(|r| !r.models.is_empty());
        let routes = Self {
            upstreams,
            routes,
            reads_model,
        };
        Ok((routes, read))
    }

    fn find(&self, name: &str) -> Option<&Named> {
        self.upstreams.iter().find(|n| &*n.name == name)
    }

    /// What rests now, for `STATUS=`: upstreams whose circuit is open, keys that got a 429 or
    /// a 401 (by fingerprint); empty when nothing does.
    pub fn resting(&self) -> String {
        let mut resting = Vec::new();
        for named in &self.upstreams {
            if named.breaker.is_resting() {
                resting.push(format!("upstream {}", named.name));
            }
            for key in named.keys.unusable() {
                resting.push(format!("key {key} of {}", named.name));
            }
        }
        resting.join(", ")
    }

    /// Connects every upstream ahead of the first request (see `Upstream::preconnect`).
    pub fn preconnect(&self, workers: &[tokio::runtime::Handle]) {
        for named in &self.upstreams {
            named.upstream.preconnect(workers);
        }
    }

    /// Whether choosing an upstream needs the request's model.
    pub fn reads_model(&self) -> bool {
        self.reads_model
    }

    /// The upstreams for a request to `path` naming `model` (None: none found, or not looked
    /// for), in the order they are to be tried: the first matching route's, else the default.
    pub fn pick(&self, path: &str, model: Option<&str>) -> Choice<'_> {
        let indexes = self
            .routes
            .iter()
            .find(|route| route.matches(path, model))
            .map_or(&[0][..], |route| &route.upstreams[..]);
        Choice {
            upstreams: &self.upstreams,
            indexes,
        }
    }
}

impl Named {
    fn new(
        name: &str,
        upstream: Arc<Upstream>,
        config: &upstream::Config,
        file: &ConfigFile,
        read: &mut Vec<FileRead>,
    ) -> Result<Self, ConfigError> {
        let (keys, keys_read) = Keys::load(&config.key_files, file)?;
        read.extend(keys_read);
        let key_header = config
            .key_header
            .as_ref()
            .map(|h| {
                HeaderName::from_bytes(h.get_ref().as_bytes())
                    .map_err(|_| file.error_at(h.span(), "not a header name"))
            })
            .transpose()?
            .filter(|h| *h != header::AUTHORIZATION);
        Ok(Self {
            name: Arc::from(name),
            upstream,
            header: HeaderValue::from_str(name).expect("names are checked to be header values"),
            key_header,
            keys,
            breaker: Breaker::default(),
        })
    }

    /// Marks an upstream response with this name, and its request with the names of every
    /// upstream it was sent to (for the access log).
    pub fn mark(&self, tried: Arc<str>, request: &mut http::Extensions, response: &mut HeaderMap) {
        request.insert(UpstreamName(tried));
        response.insert(HEADER, self.header.clone());
    }

    /// Puts the proxy's own key where this upstream takes it: `key` (one of `keys`), or
    /// `[auth]`'s key, which tokens mode put in `Authorization: Bearer`, moved to `key_header`
    /// bare, as Azure's `api-key` takes it.
    pub fn place_key(&self, headers: &mut HeaderMap, key: Option<&Key>) {
        if let Some(key) = key {
            key.place(headers, self.key_header.as_ref());
            return;
        }
        let Some(name) = &self.key_header else {
            return;
        };
        let Some(bearer) = headers.remove(header::AUTHORIZATION) else {
            return;
        };
        let key = bearer.as_bytes().get(7..).unwrap_or_default();
        if let Ok(mut value) = HeaderValue::from_bytes(key) {
            value.set_sensitive(true);
            headers.insert(name.clone(), value);
        }
    }
}

impl Route {
    fn build(
        config: &RouteConfig,
        upstreams: &[Named],
        file: &ConfigFile,
    ) -> Result<Self, ConfigError> {
        if config.upstreams.get_ref().is_empty() {
            return Err(file.error_at(config.upstreams.span(), "a route needs an upstream"));
        }
        let indexes = config
            .upstreams
            .get_ref()
            .iter()
            .map(|name| {
                upstreams
                    .iter()
                    .position(|n| *n.name == **name.get_ref())
                    .ok_or_else(|| {
                        file.error_at(
                            name.span(),
                            format!("no upstream is named {:?}", name.get_ref()),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let models = config
            .models
            .iter()
            .map(|m| ModelRule::parse(m.get_ref()).map_err(|e| file.error_at(m.span(), e)))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(path) = config.paths.iter().find(|p| !p.get_ref().starts_with('/')) {
            return Err(file.error_at(path.span(), "a path prefix starts with '/'"));
        }
        Ok(Self {
            paths: config.paths.iter().map(|p| p.get_ref().clone()).collect(),
            models,
            upstreams: indexes,
        })
    }

    fn matches(&self, path: &str, model: Option<&str>) -> bool {
        let path_matches = self.paths.is_empty() || self.paths.iter().any(|p| path.starts_with(p));
        let model_matches = self.models.is_empty()
            || model.is_some_and(|model| self.models.iter().any(|rule| rule.matches(model)));
        path_matches && model_matches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(paths: &[&str], models: &[&str]) -> Route {
        Route {
            paths: paths.iter().map(|p| p.to_string()).collect(),
            models: models
                .iter()
                .map(|m| ModelRule::parse(m).unwrap())
                .collect(),
            upstreams: vec![1],
        }
    }

    #[test]
    fn a_route_matches_its_paths_and_its_models() {
        let by_model = route(&[], &["gpt-4o*", "o3"]);
        assert!(by_model.matches("/v1/chat/completions", Some("gpt-4o-mini")));
        assert!(by_model.matches("/v1/responses", Some("o3")));
        assert!(!by_model.matches("/v1/responses", Some("o3-mini")));
        assert!(!by_model.matches("/v1/chat/completions", None));
        let by_path = route(&["/v1/audio/"], &[]);
        assert!(by_path.matches("/v1/audio/speech", None));
        assert!(!by_path.matches("/v1/chat/completions", Some("gpt-4o")));
        let both = route(&["/v1/chat/"], &["gpt-4o*"]);
        assert!(both.matches("/v1/chat/completions", Some("gpt-4o")));
        assert!(!both.matches("/v1/embeddings", Some("gpt-4o")));
        assert!(!both.matches("/v1/chat/completions", Some("o3")));
    }
}
