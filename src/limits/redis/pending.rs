//! What is to be added to Redis without anyone waiting: finished requests' tokens and usage
//! records, and admissions counted after the fact. They are summed per token, window and model
//! as they come and written together a moment later, so that a busy token costs Redis a few
//! commands per flush rather than ten per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::super::{Now, Tally};
use super::{DAY_TTL, FIELD_SEPARATOR, MINUTE_TTL, USAGE_TTL, encode, key, kinds, usage_key};

/// One token's additions in one minute (and its day).
#[derive(Default)]
struct Sums {
    /// Admissions to count in the minute's requests.
    requests: u64,
    /// Usage by model.
    models: HashMap<String, Tally>,
}

/// A token, a minute and its day.
type Window = (Arc<str>, u64, u64);

#[derive(Default)]
pub struct Pending(Mutex<HashMap<Window, Sums>>);

impl Pending {
    /// Adds a finished request's usage; true if nothing was pending before (a flush is due).
    pub fn charge(&self, name: &Arc<str>, model: &str, tally: &Tally, now: &Now) -> bool {
        self.with(name, now, |sums| match sums.models.get_mut(model) {
            Some(sum) => sum.add(tally),
            None => {
                sums.models.insert(model.to_owned(), *tally);
            }
        })
    }

    /// Adds an admission for Redis to count; true if nothing was pending before.
    pub fn count(&self, name: &Arc<str>, now: &Now) -> bool {
        self.with(name, now, |sums| sums.requests += 1)
    }

    fn with(&self, name: &Arc<str>, now: &Now, add: impl FnOnce(&mut Sums)) -> bool {
        let mut pending = self.0.lock().expect("not poisoned");
        let first = pending.is_empty();
        add(pending
            .entry((name.clone(), now.minute, now.day))
            .or_default());
        first
    }

    /// Takes what is pending, as commands: their bytes and how many.
    pub fn take(&self) -> (Vec<u8>, usize) {
        let taken = std::mem::take(&mut *self.0.lock().expect("not poisoned"));
        let mut bytes = Vec::new();
        let mut commands = 0;
        let mut add = |args: &[&[u8]]| {
            let args: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
            encode(&mut bytes, &args);
            commands += 1;
        };
        let mut days = Vec::new();
        for ((name, minute, day), sums) in &taken {
            let tokens: u64 = sums.models.values().map(Tally::tokens).sum();
            let windows = [
                ("rpm", *minute, MINUTE_TTL, sums.requests),
                ("tpm", *minute, MINUTE_TTL, tokens),
                ("tpd", *day, DAY_TTL, tokens),
            ];
            for (window, number, ttl, added) in windows.into_iter().filter(|w| w.3 > 0) {
                let key = key(name, window, number);
                add(&[b"INCRBY", &key, added.to_string().as_bytes()]);
                add(&[b"EXPIRE", &key, ttl.as_bytes()]);
            }
            let usage = usage_key(*day);
            for (model, tally) in &sums.models {
                let model = model.replace(FIELD_SEPARATOR, " ");
                for (kind, value) in kinds(tally) {
                    let field = format!("{name}{FIELD_SEPARATOR}{model}{FIELD_SEPARATOR}{kind}");
                    let value = value.to_string();
                    add(&[b"HINCRBY", &usage, field.as_bytes(), value.as_bytes()]);
                }
            }
            if !sums.models.is_empty() && !days.contains(day) {
                days.push(*day);
            }
        }
        for day in days {
            add(&[b"EXPIRE", &usage_key(day), USAGE_TTL.as_bytes()]);
        }
        (bytes, commands)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn charges_of_one_token_and_model_are_summed() {
        let pending = Pending::default();
        let name: Arc<str> = "a".into();
        let now = Now::at(UNIX_EPOCH + Duration::from_secs(86_400));
        let tally = Tally {
            requests: 1,
            prompt: 5,
            completion: 6,
            ..Tally::default()
        };
        assert!(pending.charge(&name, "m", &tally, &now), "the first is due");
        assert!(!pending.charge(&name, "m", &tally, &now));
        assert!(!pending.count(&name, &now));
        let (bytes, commands) = pending.take();
        // rpm, tpm and tpd (INCRBY and EXPIRE each), 5 kinds, the usage hash's EXPIRE.
        assert_eq!(commands, 6 + 5 + 1);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("$2\r\n22\r\n"), "11 tokens twice: {text}");
        assert!(text.contains("a\tm\trequests\r\n$1\r\n2\r\n"), "{text}");
        assert_eq!(pending.take().1, 0, "taken");
    }
}
