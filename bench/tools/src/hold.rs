//! Idle keep-alive connections and what they cost a server in memory.
//!
//! First `--parallel` requests at once on as many connections, closed after: the server now
//! holds as many upstream connections as the rest will need, so that those are not counted.
//! Then reads the RSS (and PSS) of the server's processes, opens `--conns` connections, sends one
//! request on each (`--parallel` at a time) and reads the answer, so each is a kept-alive
//! connection that has served a request, lets them sit idle for `--settle-ms` and reads the
//! memory again. The difference over the count is the memory one idle connection costs.

use std::time::Duration;

use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::args::Args;
use crate::client::{Connection, Target};

pub fn run(argv: &[String]) -> Result<(), String> {
    let args = Args::parse(
        argv,
        &["url", "conns", "pids", "parallel", "settle-ms", "timeout-secs"],
    )?;
    let target = Target::new(args.required("url")?, None, None)?;
    let conns: usize = args.number("conns", 1000)?;
    let parallel: usize = args.number("parallel", 64)?;
    let settle = Duration::from_millis(args.number("settle-ms", 1000)?);
    let timeout = Duration::from_secs(args.number("timeout-secs", 60)?);
    let pids: Vec<u32> = args
        .required("pids")?
        .split(',')
        .map(|p| p.trim().parse().map_err(|_| format!("bad pid {p:?}")))
        .collect::<Result<_, _>>()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let report = runtime.block_on(async move {
        let warm: Vec<_> = (0..parallel)
            .map(|_| {
                let target = target.clone();
                tokio::spawn(async move { one_request(&target).await })
            })
            .collect();
        for task in warm {
            let conn = task.await.map_err(|e| e.to_string())??;
            drop(conn.sender);
            let _ = conn.task.await;
        }
        tokio::time::sleep(settle).await;
        let before = memory(&pids)?;
        let started = Instant::now();
        let gate = std::sync::Arc::new(Semaphore::new(parallel));
        let mut tasks = Vec::with_capacity(conns);
        for _ in 0..conns {
            let target = target.clone();
            let gate = gate.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.expect("never closed");
                one_request(&target).await
            }));
        }
        let mut held: Vec<Connection> = Vec::with_capacity(conns);
        let mut failed = 0usize;
        let mut first_error = None;
        let opened = tokio::time::timeout(timeout, async {
            for task in tasks {
                match task.await {
                    Ok(Ok(conn)) => held.push(conn),
                    Ok(Err(e)) => {
                        failed += 1;
                        first_error.get_or_insert(e);
                    }
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
        })
        .await;
        if opened.is_err() {
            return Err(format!("could not open {conns} connections within {timeout:?}"));
        }
        let open_seconds = started.elapsed().as_secs_f64();
        tokio::time::sleep(settle).await;
        let still_open = held.iter().filter(|c| !c.task.is_finished()).count();
        let after = memory(&pids)?;
        let per_conn = |a: u64, b: u64| {
            if still_open == 0 {
                f64::NAN
            } else {
                (a as f64 - b as f64) / still_open as f64
            }
        };
        let report = json!({
            "conns": conns,
            "held": held.len(),
            "still_open": still_open,
            "failed": failed,
            "first_error": first_error,
            "open_seconds": open_seconds,
            "rss_before_kib": before.rss_kib,
            "rss_after_kib": after.rss_kib,
            "pss_before_kib": before.pss_kib,
            "pss_after_kib": after.pss_kib,
            "rss_per_conn_kib": per_conn(after.rss_kib, before.rss_kib),
            "pss_per_conn_kib": per_conn(after.pss_kib, before.pss_kib),
        });
        for conn in held {
            conn.task.abort();
        }
        Ok(report)
    })?;
    println!("{report}");
    Ok(())
}

async fn one_request(target: &Target) -> Result<Connection, String> {
    let mut conn = target.connect().await?;
    let response = conn
        .sender
        .send_request(target.request(&crate::request_body(false)))
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    if status != StatusCode::OK {
        return Err(format!("status {status}"));
    }
    Ok(conn)
}

pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// The sum over the server's processes. RSS counts a shared page once per process that maps it;
/// PSS divides it among them, the fairer sum for a server made of several processes.
pub fn memory(pids: &[u32]) -> Result<Memory, String> {
    let mut total = Memory {
        rss_kib: 0,
        pss_kib: 0,
    };
    for pid in pids {
        let path = format!("/proc/{pid}/smaps_rollup");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        total.rss_kib += kib(&text, "Rss:").ok_or_else(|| format!("{path}: no Rss"))?;
        total.pss_kib += kib(&text, "Pss:").ok_or_else(|| format!("{path}: no Pss"))?;
    }
    Ok(total)
}

fn kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_rollup_fields() {
        let text = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:  6500 kB\nPss:  5000 kB\nPss_Anon: 4000 kB\n";
        assert_eq!(kib(text, "Rss:"), Some(6500));
        assert_eq!(kib(text, "Pss:"), Some(5000));
    }
}
