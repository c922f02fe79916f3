//! The counters in this process: one entry per token, each behind its own short lock.
//!
//! The map of tokens is read-locked to find a token's entry (write-locked only the first time a
//! token is seen); the entry's own mutex is held for a few additions, never across an await.
//! Requests in flight are an atomic per token. The whole is written to a JSON state file
//! (renamed over the old one, so it is never half written) when it changed, and read back at
//! start, so that a restart keeps the day's counts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use super::{Exceeded, Now, Quota, Row, Tally, Used, exceeded, refusal};
use crate::error::ProxyError;

/// One token's counts in the current minute and UTC day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Counts {
    minute: u64,
    requests_minute: u64,
    tokens_minute: u64,
    day: u64,
    requests_day: u64,
    tokens_day: u64,
}

impl Counts {
    /// Starts new windows when the clock has left the ones counted in.
    fn roll(&mut self, now: &Now) {
        if self.minute != now.minute {
            self.minute = now.minute;
            self.requests_minute = 0;
            self.tokens_minute = 0;
        }
        if self.day != now.day {
            self.day = now.day;
            self.requests_day = 0;
            self.tokens_day = 0;
        }
    }

    fn used(&self) -> Used {
        Used {
            requests_minute: self.requests_minute,
            tokens_minute: self.tokens_minute,
            tokens_day: self.tokens_day,
        }
    }
}

#[derive(Default)]
struct Entry {
    counts: Mutex<Counts>,
    in_flight: AtomicU64,
    /// What the token used, by UTC day, then model.
    usage: Mutex<HashMap<u64, HashMap<String, Tally>>>,
}

pub struct Store {
    tokens: RwLock<HashMap<Arc<str>, Arc<Entry>>>,
    /// Changed since last written.
    dirty: AtomicBool,
    path: PathBuf,
}

/// A request's place among its token's requests in flight, given back when dropped; it also
/// finds the token's entry again when the request is charged.
pub struct Slot(Arc<Entry>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default, Serialize, Deserialize)]
struct StateFile {
    tokens: HashMap<String, Counts>,
    #[serde(default)]
    usage: Vec<Row>,
}

impl Store {
    /// The store, with the counts saved at `path` if it holds any (a missing file is a first
    /// start; an unreadable one is logged and started over).
    pub fn open(path: PathBuf) -> Self {
        let saved = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<StateFile>(&bytes).unwrap_or_else(|error| {
                tracing::warn!(path = %path.display(), %error, "the limits state file does not parse; counting from zero");
                StateFile::default()
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot read the limits state file; counting from zero");
                StateFile::default()
            }
        };
        let mut tokens: HashMap<Arc<str>, Arc<Entry>> = saved
            .tokens
            .into_iter()
            .map(|(name, counts)| {
                let entry = Entry {
                    counts: Mutex::new(counts),
                    ..Entry::default()
                };
                (Arc::from(name), Arc::new(entry))
            })
            .collect();
        for row in saved.usage {
            let entry = tokens.entry(Arc::from(row.token.as_str())).or_default();
            let mut usage = entry.usage.lock().expect("not poisoned");
            usage
                .entry(row.day)
                .or_default()
                .insert(row.model, row.tally);
        }
        Self {
            tokens: RwLock::new(tokens),
            dirty: AtomicBool::new(false),
            path,
        }
    }

    fn entry(&self, name: &Arc<str>) -> Arc<Entry> {
        if let Some(entry) = self.tokens.read().expect("not poisoned").get(name) {
            return entry.clone();
        }
        let mut tokens = self.tokens.write().expect("not poisoned");
        tokens.entry(name.clone()).or_default().clone()
    }

    /// Counts the request if the token's limits let it in; else the 429 that refuses it. Without
    /// `windows` (another backend keeps them), only its place in flight is checked.
    pub fn admit(
        &self,
        name: &Arc<str>,
        quota: &Quota,
        now: &Now,
        windows: bool,
    ) -> Result<Slot, ProxyError> {
        let entry = self.entry(name);
        let in_flight = entry.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = Slot(entry.clone());
        let mut counts = entry.counts.lock().expect("not poisoned");
        counts.roll(now);
        let over_concurrency = quota.max_concurrent.is_some_and(|max| in_flight > max.0);
        let which = match exceeded(quota, &counts.used()).filter(|_| windows) {
            Some(which) => Some(which),
            None if over_concurrency => Some(Exceeded::MaxConcurrent),
            None => None,
        };
        if let Some(which) = which {
            return Err(refusal(name, which, quota, &counts.used(), now));
        }
        if !windows {
            return Ok(slot);
        }
        counts.requests_minute += 1;
        counts.requests_day += 1;
        drop(counts);
        self.dirty.store(true, Ordering::Relaxed);
        Ok(slot)
    }

    /// Records a finished request: its tokens in its token's minute and day, and its usage
    /// under its day and model.
    pub fn charge(&self, slot: &Slot, model: &str, tally: &Tally, now: &Now) {
        let entry = &slot.0;
        let mut counts = entry.counts.lock().expect("not poisoned");
        counts.roll(now);
        counts.tokens_minute += tally.tokens();
        counts.tokens_day += tally.tokens();
        drop(counts);
        let mut usage = entry.usage.lock().expect("not poisoned");
        let day = usage.entry(now.day).or_default();
        match day.get_mut(model) {
            Some(sum) => sum.add(tally),
            None => {
                day.insert(model.to_owned(), *tally);
            }
        }
        drop(usage);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// The usage records from `since` (a day number) on, of one token or all.
    pub fn rows(&self, since: u64, token: Option<&str>) -> Vec<Row> {
        let tokens = self.tokens.read().expect("not poisoned");
        let mut rows = Vec::new();
        for (name, entry) in tokens.iter() {
            if token.is_some_and(|t| t != &**name) {
                continue;
            }
            let usage = entry.usage.lock().expect("not poisoned");
            let days = usage.iter().filter(|(day, _)| **day >= since);
            for (day, models) in days {
                rows.extend(models.iter().map(|(model, tally)| Row {
                    day: *day,
                    token: name.to_string(),
                    model: model.clone(),
                    tally: *tally,
                }));
            }
        }
        rows
    }

    /// Writes the counts if they changed: to a temporary file, then renamed over the state file.
    pub fn save(&self) {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let state = StateFile {
            tokens: self
                .tokens
                .read()
                .expect("not poisoned")
                .iter()
                .map(|(name, entry)| {
                    let counts = *entry.counts.lock().expect("not poisoned");
                    (name.to_string(), counts)
                })
                .collect(),
            usage: self.rows(0, None),
        };
        let temporary = self.path.with_extension("json.new");
        let written = serde_json::to_vec(&state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&temporary, bytes))
            .and_then(|()| std::fs::rename(&temporary, &self.path));
        if let Err(error) = written {
            // Tried again at the next save.
            self.dirty.store(true, Ordering::Relaxed);
            tracing::warn!(path = %self.path.display(), %error, "cannot write the limits state file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Limit;
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn tokens(prompt: u64) -> crate::usage::Usage {
        crate::usage::Usage {
            prompt,
            ..Default::default()
        }
    }

    fn at(secs: u64) -> Now {
        Now::at(UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// A store with its state file in a directory of its own (kept as long as the store).
    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("limits.json"));
        (dir, store)
    }

    #[test]
    fn windows_count_and_roll_over() {
        let (_dir, store) = store();
        let name: Arc<str> = "alice".into();
        let quota = Quota {
            requests_per_minute: Some(Limit(2)),
            tokens_per_day: Some(Limit(100)),
            ..Quota::default()
        };
        let t = 86_400 * 10;
        let a = store.admit(&name, &quota, &at(t), true).unwrap();
        let b = store.admit(&name, &quota, &at(t + 1), true).unwrap();
        assert!(store.admit(&name, &quota, &at(t + 2), true).is_err());
        drop((a, b));
        // The next minute lets requests in again; the day's tokens stay counted.
        let slot = store
            .admit(&name, &Quota::default(), &at(t + 61), true)
            .unwrap();
        store.charge(&slot, "m", &Tally::of(Some(tokens(100))), &at(t + 61));
        assert!(matches!(
            store.admit(&name, &quota, &at(t + 62), true),
            Err(ProxyError::RateLimited(_))
        ));
        // The next UTC day starts from zero.
        assert!(store.admit(&name, &quota, &at(t + 86_400), true).is_ok());
    }

    #[test]
    fn concurrency_slots_come_back() {
        let (_dir, store) = store();
        let name: Arc<str> = "bob".into();
        let quota = Quota {
            max_concurrent: Some(Limit(1)),
            ..Quota::default()
        };
        let first = store.admit(&name, &quota, &at(0), true).unwrap();
        assert!(store.admit(&name, &quota, &at(0), true).is_err());
        drop(first);
        assert!(store.admit(&name, &quota, &at(0), true).is_ok());
    }

    #[test]
    fn counts_survive_a_save_and_an_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits.json");
        let store = Store::open(path.clone());
        let name: Arc<str> = "carol".into();
        let slot = store
            .admit(&name, &Quota::default(), &at(1000), true)
            .unwrap();
        store.charge(&slot, "gpt-4o", &Tally::of(Some(tokens(42))), &at(1000));
        store.charge(&slot, "gpt-4o", &Tally::of(None), &at(1001));
        store.save();
        let again = Store::open(path);
        let counts = *again.entry(&name).counts.lock().unwrap();
        assert_eq!(counts.tokens_day, 42);
        let rows = again.rows(0, Some("carol"));
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].tally.requests, rows[0].tally.prompt), (2, 42));
        assert!(again.rows(1, None).is_empty(), "a later day has none");
    }
}
