//! `[proxy]`: which paths are forwarded, and what the upstream learns of the client.

use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Only paths under these prefixes are forwarded; anything else is answered 404 here.
    pub allowed_path_prefixes: Vec<PathPrefix>,
    /// Pass X-Forwarded-For, Forwarded, Via and the like upstream, and add the client's address
    /// to X-Forwarded-For. Off: the upstream learns nothing about the client.
    pub forward_client_identity: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            allowed_path_prefixes: vec![PathPrefix("/v1/".into())],
            forward_client_identity: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPrefix(String);

impl PathPrefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for PathPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if !text.starts_with('/') {
            return Err(serde::de::Error::custom(format!(
                "{text:?}: a path prefix starts with '/'"
            )));
        }
        if has_dot_segment(&text) {
            return Err(serde::de::Error::custom(format!(
                "{text:?}: a path prefix cannot hold '.' or '..' segments"
            )));
        }
        Ok(Self(text))
    }
}

/// Whether `path`, percent-decoded, has a `.` or `..` segment: one could climb out of an
/// allowed prefix at an upstream that decodes before it resolves segments. Segments are split at
/// `/` and `\` both, and at their encodings `%2f` and `%5c`, since some servers take either as
/// a separator once decoded.
pub fn has_dot_segment(path: &str) -> bool {
    // Nearly every path has neither a dot nor an escape: no segment to look at then.
    if !path.contains(['.', '%', '\\']) {
        return false;
    }
    super::percent_decoded(path.as_bytes())
        .split(|&b| b == b'/' || b == b'\\')
        .any(|segment| segment == b"." || segment == b"..")
}
