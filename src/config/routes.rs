//! `[upstreams.NAME]` and `[[route]]`: more upstreams by name, and which requests go to them.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

/// The `[upstreams.NAME]` tables.
pub type UpstreamsConfig = BTreeMap<Spanned<String>, super::upstream::Config>;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefixes, any of which matches.
    #[serde(default)]
    pub paths: Vec<Spanned<String>>,
    /// Model names (`*` at the end: a prefix), any of which matches.
    #[serde(default)]
    pub models: Vec<Spanned<String>>,
    /// Upstream names, in the order they are to be tried.
    pub upstreams: Spanned<Vec<Spanned<String>>>,
}
