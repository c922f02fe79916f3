//! Percentiles of a sample, by the nearest-rank method, reported in milliseconds.

use serde_json::{Value, json};

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// count, p50, p90, p99, p99.9 and max of durations given in nanoseconds, as milliseconds.
pub fn summary(mut ns: Vec<u64>) -> Value {
    ns.sort_unstable();
    let ms: Vec<f64> = ns.iter().map(|&n| n as f64 / 1e6).collect();
    let round = |x: f64| {
        if x.is_finite() {
            json!((x * 1000.0).round() / 1000.0)
        } else {
            Value::Null
        }
    };
    json!({
        "count": ms.len(),
        "p50_ms": round(percentile(&ms, 50.0)),
        "p90_ms": round(percentile(&ms, 90.0)),
        "p99_ms": round(percentile(&ms, 99.0)),
        "p999_ms": round(percentile(&ms, 99.9)),
        "max_ms": round(ms.last().copied().unwrap_or(f64::NAN)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[7.0], 99.9), 7.0);
    }
}
