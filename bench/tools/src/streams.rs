//! Many concurrent SSE streams through a target, each on its own HTTP/1.1 connection, started
//! evenly over `--ramp-ms`. Per stream: time to first event (from sending the request to the
//! first complete `data:` event); per event: the gap since the previous one (the upstream sends
//! them `--interval-ms` apart) and the delivery lag (arrival minus the upstream's send stamp).

use std::collections::BTreeMap;
use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::time::Instant;

use crate::args::Args;
use crate::client::Target;
use crate::{monotonic_ns, stats};

#[derive(Default)]
struct Timings {
    ttfe_ns: Vec<u64>,
    /// The first event's way, in two: from sending the request to its arrival at the upstream
    /// (the target's request path), and from there to the upstream writing the event.
    to_upstream_ns: u64,
    at_upstream_ns: u64,
    /// Per event after the first: when it arrived, the gap since the one before, its lag.
    events_after_first: Vec<(Instant, u64, u64)>,
    first_lag_ns: u64,
    /// When the request was sent, from the start of the run.
    sent_after_ns: u64,
    first_at: Option<Instant>,
    done_at: Option<Instant>,
    events: u64,
}

pub fn run(argv: &[String]) -> Result<(), String> {
    let args = Args::parse(
        argv,
        &[
            "url",
            "ca",
            "server-name",
            "streams",
            "ramp-ms",
            "events",
            "interval-ms",
            "timeout-secs",
            "samples",
        ],
    )?;
    let target = Target::new(
        args.required("url")?,
        args.optional("ca"),
        args.optional("server-name"),
    )?;
    let streams: u32 = args.number("streams", 100)?;
    let ramp = Duration::from_millis(args.number("ramp-ms", 1000)?);
    let events: u32 = args.number("events", 20)?;
    let interval_ms: u64 = args.number("interval-ms", 50)?;
    let timeout = Duration::from_secs(args.number("timeout-secs", 30)?);
    // One line per stream (when it was sent, its first event's way in parts), for finding
    // out when in the run the slow ones were.
    let samples = args.optional("samples").map(std::path::PathBuf::from);
    let want_samples = samples.is_some();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let (report, lines) = runtime.block_on(async move {
        let started = Instant::now();
        // However the target behaves, the run ends by this deadline.
        let deadline = started + ramp + timeout;
        let mut tasks = Vec::with_capacity(streams as usize);
        for i in 0..streams {
            let at = started + ramp.mul_f64(f64::from(i) / f64::from(streams.max(1)));
            let target = target.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                match tokio::time::timeout_at(deadline, one_stream(&target, events, started)).await
                {
                    Ok(result) => result,
                    Err(_) => Err("not finished by the deadline".to_owned()),
                }
            }));
        }
        let mut done = Vec::with_capacity(streams as usize);
        let mut ok = 0u32;
        let mut errors: BTreeMap<String, u32> = BTreeMap::new();
        for task in tasks {
            match task.await {
                Ok(Ok(t)) => {
                    ok += 1;
                    done.push(t);
                }
                Ok(Err(e)) => *errors.entry(e).or_default() += 1,
                Err(e) => *errors.entry(e.to_string()).or_default() += 1,
            }
        }
        // The window in which every stream was open at once: from the last first event to the
        // first [DONE]. Gaps there are the ones taken "with N concurrent streams"; the ramp
        // before it is busy with connecting and handshakes, which TTFE measures.
        let window_start = done.iter().filter_map(|t| t.first_at).max();
        let window_end = done.iter().filter_map(|t| t.done_at).min();
        let (mut ttfe, mut gap, mut lag, mut gap_all_open, mut lag_all_open) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut to_upstream, mut at_upstream) = (Vec::new(), Vec::new());
        let mut events_total = 0;
        let mut lines = want_samples.then(|| {
            String::from("sent_ms\tttfe_ms\tto_upstream_ms\tat_upstream_ms\tfirst_lag_ms\n")
        });
        for t in done {
            if let Some(lines) = &mut lines {
                let ms = |ns: u64| ns as f64 / 1e6;
                *lines += &format!(
                    "{:.3}\t{:.3}\t{:.3}\t{:.3}\t{:.3}\n",
                    ms(t.sent_after_ns),
                    ms(t.ttfe_ns.first().copied().unwrap_or(0)),
                    ms(t.to_upstream_ns),
                    ms(t.at_upstream_ns),
                    ms(t.first_lag_ns)
                );
            }
            events_total += t.events;
            ttfe.extend(t.ttfe_ns);
            to_upstream.push(t.to_upstream_ns);
            at_upstream.push(t.at_upstream_ns);
            lag.push(t.first_lag_ns);
            for (at, g, l) in t.events_after_first {
                gap.push(g);
                lag.push(l);
                if let (Some(start), Some(end)) = (window_start, window_end)
                    && at >= start
                    && at <= end
                {
                    gap_all_open.push(g);
                    lag_all_open.push(l);
                }
            }
        }
        let window_ms = match (window_start, window_end) {
            (Some(start), Some(end)) if end > start => (end - start).as_secs_f64() * 1e3,
            _ => 0.0,
        };
        let report = json!({
            "streams": streams,
            "ok": ok,
            "failed": streams - ok,
            "errors": errors,
            "events_per_stream": events,
            "interval_ms": interval_ms,
            "events": events_total,
            "seconds": started.elapsed().as_secs_f64(),
            "ttfe": stats::summary(ttfe),
            "ttfe_to_upstream": stats::summary(to_upstream),
            "ttfe_at_upstream": stats::summary(at_upstream),
            "gap": stats::summary(gap),
            "lag": stats::summary(lag),
            "all_open_window_ms": window_ms,
            "gap_all_open": stats::summary(gap_all_open),
            "lag_all_open": stats::summary(lag_all_open),
        });
        (report, lines)
    });
    if let (Some(path), Some(lines)) = (samples, lines) {
        std::fs::write(&path, lines).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    println!("{report}");
    Ok(())
}

async fn one_stream(target: &Target, events: u32, started: Instant) -> Result<Timings, String> {
    let mut conn = target.connect().await?;
    let request = target.request(&crate::request_body(true));
    let sent = Instant::now();
    let sent_at_ns = monotonic_ns();
    let response = conn
        .sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!("status {}", response.status()));
    }
    let mut body = response.into_body();
    let mut buffer: Vec<u8> = Vec::with_capacity(1024);
    let mut timings = Timings {
        sent_after_ns: (sent - started).as_nanos() as u64,
        ..Timings::default()
    };
    let mut last: Option<Instant> = None;
    let mut done = false;
    while !done {
        let frame = match body.frame().await {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => return Err(format!("body: {e}")),
            None => break,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let now = Instant::now();
        let now_ns = monotonic_ns();
        buffer.extend_from_slice(&data);
        while let Some(end) = find(&buffer, b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let Some(payload) = event.strip_prefix(b"data: ") else {
                continue;
            };
            if payload.starts_with(b"[DONE]") {
                done = true;
                break;
            }
            let seq = field(payload, b"\"bench_seq\":").ok_or("an event without bench_seq")?;
            if seq != timings.events {
                return Err(format!(
                    "event {seq} arrived where {} was due",
                    timings.events
                ));
            }
            let sent_ns = field(payload, b"\"bench_sent_ns\":").ok_or("no bench_sent_ns")?;
            let lag = now_ns.saturating_sub(sent_ns);
            match last {
                None => {
                    timings.ttfe_ns.push((now - sent).as_nanos() as u64);
                    let arrived_ns =
                        field(payload, b"\"bench_arrived_ns\":").ok_or("no bench_arrived_ns")?;
                    timings.to_upstream_ns = arrived_ns.saturating_sub(sent_at_ns);
                    timings.at_upstream_ns = sent_ns.saturating_sub(arrived_ns);
                    timings.first_lag_ns = lag;
                    timings.first_at = Some(now);
                }
                Some(previous) => {
                    let gap = (now - previous).as_nanos() as u64;
                    timings.events_after_first.push((now, gap, lag));
                }
            }
            last = Some(now);
            timings.events += 1;
        }
    }
    timings.done_at = Some(Instant::now());
    if !done {
        return Err("the stream ended before data: [DONE]".into());
    }
    if timings.events != u64::from(events) {
        return Err(format!("{} events where {events} were due", timings.events));
    }
    drop(conn.sender);
    conn.task.abort();
    Ok(timings)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The unsigned number after `key` in a JSON text.
fn field(json: &[u8], key: &[u8]) -> Option<u64> {
    let start = find(json, key)? + key.len();
    let digits = json[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&json[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_separators() {
        let event = br#"{"x":1,"bench_seq":12,"bench_sent_ns":987654321}"#;
        assert_eq!(field(event, b"\"bench_seq\":"), Some(12));
        assert_eq!(field(event, b"\"bench_sent_ns\":"), Some(987654321));
        assert_eq!(field(event, b"\"missing\":"), None);
        assert_eq!(find(b"data: a\n\ndata: b", b"\n\n"), Some(7));
    }
}
