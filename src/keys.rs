//! The proxy's own upstream keys when an upstream has several (`key_files`, tokens mode): used
//! in turn; a key answered 429 rests for the Retry-After the upstream gave, and a key answered
//! 401 is set aside until the next reload. A key is named in logs by its fingerprint alone (the
//! first 8 bytes of its SHA-256, in hex), never by itself.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, header};
use toml::Spanned;

use crate::config::{ConfigError, ConfigFile, FileRead};

/// The rest a 429 without a usable Retry-After gives a key.
const DEFAULT_REST: Duration = Duration::from_secs(10);
/// The longest rest a Retry-After can give a key.
const MAX_REST: Duration = Duration::from_secs(600);

/// A key file's one line, checked; what is wrong is said without quoting any of it.
pub fn key_line(bytes: &[u8]) -> Result<&str, &'static str> {
    let text = std::str::from_utf8(bytes).map_err(|_| "it is not text")?;
    let key = text.trim();
    if key.is_empty() {
        return Err("it is empty");
    }
    if key.contains(char::is_whitespace) {
        return Err("it holds more than the key: one line, the key alone");
    }
    Ok(key)
}

/// One key. No Debug: it must not be printable.
pub struct Key {
    /// The key alone, marked sensitive.
    bare: HeaderValue,
    pub fingerprint: String,
    resting_until: Mutex<Option<Instant>>,
    set_aside: AtomicBool,
}

pub struct Keys {
    keys: Vec<Key>,
    next: AtomicUsize,
}

impl Keys {
    /// Reads each key file as `[auth] upstream_key_file` is read.
    pub fn load(
        files: &[Spanned<PathBuf>],
        file: &ConfigFile,
    ) -> Result<(Self, Vec<FileRead>), ConfigError> {
        let mut keys = Vec::with_capacity(files.len());
        let mut read = Vec::with_capacity(files.len());
        for key_file in files {
            let (key, key_read) = file.read_secret_as(key_file, "the key file", |bytes| {
                let mut bare =
                    HeaderValue::from_str(key_line(bytes)?).map_err(|_| "it is not a key")?;
                bare.set_sensitive(true);
                Ok(bare)
            })?;
            keys.push(Key {
                fingerprint: fingerprint(key.as_bytes()),
                bare: key,
                resting_until: Mutex::new(None),
                set_aside: AtomicBool::new(false),
            });
            read.push(key_read);
        }
        let keys = Self {
            keys,
            next: AtomicUsize::new(0),
        };
        Ok((keys, read))
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// The first key, whatever its state: for when every key rests and there is nothing else.
    pub fn first(&self) -> Option<(usize, &Key)> {
        self.keys.first().map(|key| (0, key))
    }

    /// The next key in turn that is neither resting, set aside, nor in `tried`.
    pub fn take(&self, tried: &[usize]) -> Option<(usize, &Key)> {
        let count = self.keys.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        (0..count)
            .map(|i| (start + i) % count)
            .filter(|i| !tried.contains(i))
            .map(|i| (i, &self.keys[i]))
            .find(|(_, key)| key.usable(now))
    }

    /// Whether a key besides those in `tried` could be used now.
    pub fn has_another(&self, tried: &[usize]) -> bool {
        let now = Instant::now();
        self.keys
            .iter()
            .enumerate()
            .any(|(i, key)| !tried.contains(&i) && key.usable(now))
    }

    /// The fingerprints of the keys resting or set aside, for `STATUS=`.
    pub fn unusable(&self) -> Vec<String> {
        let now = Instant::now();
        self.keys
            .iter()
            .filter(|key| !key.usable(now))
            .map(|key| key.fingerprint.clone())
            .collect()
    }
}

impl Key {
    fn usable(&self, now: Instant) -> bool {
        let resting = self
            .resting_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|until| until > now);
        !resting && !self.set_aside.load(Ordering::Relaxed)
    }

    /// Puts the key in `headers`: bare in `key_header`, else as `Authorization: Bearer KEY`.
    pub fn place(&self, headers: &mut HeaderMap, key_header: Option<&http::HeaderName>) {
        match key_header {
            Some(name) => {
                headers.remove(header::AUTHORIZATION);
                headers.insert(name.clone(), self.bare.clone());
            }
            None => {
                let mut bearer = b"Bearer ".to_vec();
                bearer.extend_from_slice(self.bare.as_bytes());
                let mut value =
                    HeaderValue::from_bytes(&bearer).expect("a key makes a valid header value");
                value.set_sensitive(true);
                headers.insert(header::AUTHORIZATION, value);
            }
        }
    }

    /// After a 429: rests for the answer's Retry-After.
    pub fn rest(&self, answer: &HeaderMap) -> Duration {
        let rest = retry_after(answer).unwrap_or(DEFAULT_REST).min(MAX_REST);
        *self.resting_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + rest);
        rest
    }

    /// After a 401: not used again until the next reload.
    pub fn set_aside(&self) {
        self.set_aside.store(true, Ordering::Relaxed);
    }
}

/// Retry-After as seconds or as an HTTP date.
fn retry_after(answer: &HeaderMap) -> Option<Duration> {
    let value = answer.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

fn fingerprint(key: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key);
    hex(&digest.as_ref()[..8])
}

/// Bytes as lower-case hex: fingerprints here, tokens and their hashes in `auth`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let mut answer = HeaderMap::new();
        answer.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&answer), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        let date = httpdate::fmt_http_date(later);
        answer.insert(header::RETRY_AFTER, HeaderValue::from_str(&date).unwrap());
        let rest = retry_after(&answer).unwrap();
        assert!(rest > Duration::from_secs(100) && rest <= Duration::from_secs(120));
        answer.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&answer), None);
    }

    #[test]
    fn a_fingerprint_shows_nothing_of_the_key() {
        let print = fingerprint(b"sk-proj-SECRET");
        assert_eq!(print.len(), 16);
        assert!(!print.contains("SECRET"));
    }
}
