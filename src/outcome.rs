//! The outcome of the last reload, so that `systemctl reload` can wait for it and fail when it
//! failed: the daemon writes it to a file in its runtime directory (`RuntimeDirectory=`), and
//! `openai-proxy reload PID` (the unit's ExecReload) sends SIGHUP and waits for that file to
//! change. Outside systemd there is no runtime directory: nothing is written, nothing waited for.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long `openai-proxy reload` waits: a handover may take up to its own timeout, 30 s.
const WAIT: Duration = Duration::from_secs(60);
const FILE: &str = "last-reload";

fn path() -> Option<PathBuf> {
    std::env::var_os("RUNTIME_DIRECTORY").map(|dir| PathBuf::from(dir).join(FILE))
}

/// Records how a reload (or a handover) ended. Each record names this process and counts, so
/// no two are alike; written aside and renamed, so a reader never sees half of one.
pub fn record(result: Result<&str, &str>) {
    static ATTEMPT: AtomicU64 = AtomicU64::new(0);
    let Some(path) = path() else {
        return;
    };
    let attempt = ATTEMPT.fetch_add(1, Ordering::Relaxed) + 1;
    let (verdict, message) = match result {
        Ok(message) => ("ok", message),
        Err(message) => ("failed", message),
    };
    let text = format!("{} {attempt} {verdict} {message}\n", std::process::id());
    let aside = path.with_extension("new");
    let written = std::fs::write(&aside, text).and_then(|()| std::fs::rename(&aside, &path));
    if let Err(error) = written {
        tracing::warn!(path = %path.display(), %error, "cannot record the reload's outcome");
    }
}

/// Asks the proxy running as `pid` to reload and, where there is a runtime directory, waits for
/// the outcome. Ok holds what to print.
pub fn request(pid: u32) -> Result<String, String> {
    let target = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| format!("{pid} is not a PID"))?;
    let path = path();
    let before = path
        .as_ref()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default());
    rustix::process::kill_process(target, rustix::process::Signal::HUP)
        .map_err(|e| format!("cannot signal PID {pid}: {e}"))?;
    let (Some(path), Some(before)) = (path, before) else {
        return Ok(format!("asked PID {pid} to reload"));
    };
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let now = std::fs::read_to_string(&path).unwrap_or_default();
        if now != before {
            let mut words = now.trim_end().splitn(4, ' ').skip(2);
            let (verdict, message) = (words.next(), words.next().unwrap_or(""));
            return match verdict {
                Some("ok") => Ok(message.to_owned()),
                _ => Err(message.to_owned()),
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "PID {pid} did not say how the reload went within {WAIT:?}"
    ))
}
