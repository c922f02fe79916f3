//! What this instance knows of each token's windows in Redis, so that a request far from its
//! limits is admitted without waiting for Redis.
//!
//! Requests per minute are exact: Redis counts admissions ahead for an instance (a lease of
//! credits, granted by the admission script only while the minute has room for them), and the
//! instance spends them without asking. A credit is counted before it is spent, so instances
//! together never admit more than the limit; a credit left unspent lapses with its minute.
//! Token limits are "is there budget left" checks: they are passed at once while Redis's counts
//! (at most `FRESH` old, plus this instance's own charges since) leave more than a tenth of the
//! limit; nearer the limit the request waits for Redis's own check.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::super::{Limit, Now, Quota, Used};

/// How long Redis's counts are trusted for the token limits.
pub const FRESH: Duration = Duration::from_secs(1);

/// The most admissions one lease counts ahead.
const MOST_AHEAD: u64 = 256;

/// How many admissions to ask Redis for at once for a token with this quota: a 32nd of its
/// requests limit (at most `MOST_AHEAD`; 1, no credit to spare, under 64 a minute), or none
/// without a requests limit, where there is nothing to count ahead.
pub fn size(quota: &Quota) -> u64 {
    quota
        .requests_per_minute
        .map_or(0, |l| (l.0 / 32).clamp(1, MOST_AHEAD))
}

/// One token's state, as Redis last reported it.
struct Lease {
    minute: u64,
    day: u64,
    /// Admissions Redis counted in `minute` for this instance that it has not spent.
    credits: u64,
    /// Redis's counts at its last answer, plus this instance's charges since.
    used: Used,
    /// When Redis answered.
    at: Instant,
    /// When more credits or newer counts were last asked for.
    asked: Option<Instant>,
}

/// A request admitted at once.
pub struct Taken {
    /// Ask Redis for this many credits (0: only its counts), without waiting.
    pub refill: Option<u64>,
    /// No credit paid for it (no requests limit): Redis is still to count it.
    pub uncounted: bool,
}

#[derive(Default)]
pub struct Leases(Mutex<HashMap<Arc<str>, Lease>>);

/// Whether `used` leaves more than a tenth of `limit` (none: no limit).
fn far_below(limit: Option<Limit>, used: u64) -> bool {
    limit.is_none_or(|l| used.saturating_add((l.0 / 10).max(1)) < l.0)
}

impl Leases {
    /// Admits a request of `name` at once if the state known of it allows (None: it waits for
    /// Redis). The known state is of this minute and day; with token limits, fresh and far
    /// below them; with a requests limit, a credit is spent.
    pub fn take(&self, name: &str, quota: &Quota, now: &Now) -> Option<Taken> {
        let mut leases = self.0.lock().expect("not poisoned");
        let lease = leases.get_mut(name)?;
        if lease.minute != now.minute || lease.day != now.day {
            return None;
        }
        let age = lease.at.elapsed();
        let tokens_limited = quota.tokens_per_minute.is_some() || quota.tokens_per_day.is_some();
        let within = far_below(quota.tokens_per_minute, lease.used.tokens_minute)
            && far_below(quota.tokens_per_day, lease.used.tokens_day);
        if (tokens_limited && age > FRESH) || !within {
            return None;
        }
        let size = size(quota);
        let uncounted = match quota.requests_per_minute {
            Some(_) if lease.credits == 0 => return None,
            Some(_) => {
                lease.credits -= 1;
                false
            }
            None => true,
        };
        // Asked again only once an answer came since the last ask, or that ask is old (lost
        // with its connection).
        let asking = lease
            .asked
            .is_some_and(|asked| asked > lease.at && asked.elapsed() < FRESH);
        let low = size > 1 && lease.credits <= size / 2;
        let ageing = tokens_limited && age > FRESH / 2;
        let refill = (low || ageing) && !asking;
        if refill {
            lease.asked = Some(Instant::now());
        }
        Some(Taken {
            refill: refill.then_some(size),
            uncounted,
        })
    }

    /// Redis's answer to an admission or a refill asked in the window of `now`: its counts,
    /// and credits to spare (counted admissions nobody has spent).
    pub fn answered(&self, name: &Arc<str>, now: &Now, used: Used, spare: u64) {
        let mut leases = self.0.lock().expect("not poisoned");
        let lease = leases.entry(name.clone()).or_insert_with(|| Lease {
            minute: now.minute,
            day: now.day,
            credits: 0,
            used,
            at: Instant::now(),
            asked: None,
        });
        if (lease.day, lease.minute) > (now.day, now.minute) {
            // An answer about a window already left behind.
            return;
        }
        if lease.minute != now.minute {
            lease.credits = 0;
        }
        lease.minute = now.minute;
        lease.day = now.day;
        lease.credits += spare;
        lease.used = used;
        lease.at = Instant::now();
    }

    /// This instance charged `tokens` to `name`'s windows of `now`.
    pub fn charged(&self, name: &str, tokens: u64, now: &Now) {
        let mut leases = self.0.lock().expect("not poisoned");
        if let Some(lease) = leases.get_mut(name)
            && (lease.minute, lease.day) == (now.minute, now.day)
        {
            lease.used.tokens_minute += tokens;
            lease.used.tokens_day += tokens;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn quota(rpm: Option<u64>, tpm: Option<u64>) -> Quota {
        Quota {
            requests_per_minute: rpm.map(Limit),
            tokens_per_minute: tpm.map(Limit),
            ..Quota::default()
        }
    }

    fn at(secs: u64) -> Now {
        Now::at(UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn credits_are_spent_then_the_request_waits() {
        let leases = Leases::default();
        let name: Arc<str> = "a".into();
        let q = quota(Some(64 * 32), None);
        assert!(leases.take(&name, &q, &at(0)).is_none(), "unknown: waits");
        leases.answered(&name, &at(0), Used::default(), 3);
        for _ in 0..3 {
            let taken = leases.take(&name, &q, &at(1)).expect("a credit");
            assert!(!taken.uncounted);
        }
        assert!(leases.take(&name, &q, &at(2)).is_none(), "spent: waits");
        leases.answered(&name, &at(2), Used::default(), 1);
        assert!(
            leases.take(&name, &q, &at(60)).is_none(),
            "lapsed with the minute"
        );
    }

    #[test]
    fn a_refill_is_asked_once_when_credits_run_low() {
        let leases = Leases::default();
        let name: Arc<str> = "b".into();
        let q = quota(Some(64 * 32), None);
        assert_eq!(size(&q), 64);
        leases.answered(&name, &at(0), Used::default(), 40);
        let refills: Vec<Option<u64>> = (0..20)
            .map(|_| leases.take(&name, &q, &at(0)).unwrap().refill)
            .collect();
        assert_eq!(refills.iter().flatten().count(), 1, "{refills:?}");
        assert_eq!(refills[7], Some(64), "at 32 credits left");
    }

    #[test]
    fn near_a_token_limit_the_request_waits() {
        let leases = Leases::default();
        let name: Arc<str> = "c".into();
        let q = quota(None, Some(100));
        let used = |tokens| Used {
            tokens_minute: tokens,
            ..Used::default()
        };
        leases.answered(&name, &at(0), used(80), 0);
        let taken = leases.take(&name, &q, &at(0)).expect("far below");
        assert!(taken.uncounted, "no requests limit: counted afterwards");
        leases.charged(&name, 10, &at(0));
        assert!(leases.take(&name, &q, &at(0)).is_none(), "90 of 100: waits");
    }

    #[test]
    fn sizes() {
        assert_eq!(size(&quota(None, Some(5))), 0);
        assert_eq!(size(&quota(Some(3), None)), 1);
        assert_eq!(size(&quota(Some(100), None)), 3);
        assert_eq!(size(&quota(Some(1_000_000_000), None)), MOST_AHEAD);
    }
}
