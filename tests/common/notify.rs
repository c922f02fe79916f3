//! The notify socket: a unix datagram socket standing in for systemd's NOTIFY_SOCKET.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A unix datagram socket standing in for systemd's NOTIFY_SOCKET; keeps every message.
pub struct NotifySocket {
    pub path: PathBuf,
    messages: Arc<(Mutex<Vec<String>>, Condvar)>,
}

impl NotifySocket {
    pub fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let messages = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = messages.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = socket.recv(&mut buf) {
                let (lock, cvar) = &*sink;
                lock.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                cvar.notify_all();
            }
        });
        Self { path, messages }
    }

    pub fn messages(&self) -> Vec<String> {
        self.messages
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits for a message after the first `skip` naming a new main process (a handover's
    /// successor); returns its index and the PID.
    pub fn wait_main_pid(&self, skip: usize, timeout: Duration) -> (usize, u32) {
        let named = self.wait_for(skip, timeout, "MAINPID=", |m| m.contains("MAINPID="));
        (named, main_pid(&self.messages()[named]))
    }

    /// Waits until some message after the first `skip` satisfies `f`; returns its index.
    pub fn wait_for(
        &self,
        skip: usize,
        timeout: Duration,
        what: &str,
        f: impl Fn(&str) -> bool,
    ) -> usize {
        let (lock, cvar) = &*self.messages;
        let deadline = Instant::now() + timeout;
        let mut messages = lock.lock().unwrap();
        loop {
            if let Some(i) = messages.iter().skip(skip).position(|m| f(m)) {
                return skip + i;
            }
            let now = Instant::now();
            if now >= deadline {
                let got = messages.clone();
                drop(messages);
                panic!("timed out waiting for a notify message: {what}; got {got:#?}");
            }
            messages = cvar.wait_timeout(messages, deadline - now).unwrap().0;
        }
    }
}

/// The PID a notify message names the main process.
pub fn main_pid(message: &str) -> u32 {
    message
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {message:?}"))
}
