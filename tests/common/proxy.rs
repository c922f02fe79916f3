//! The real proxy binary as a child process: started with a config written for the test,
//! waited on through its notify socket, its logs kept; and its subcommands run once.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::*;

/// The real proxy binary, started with a config written for the test.
pub struct Proxy {
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub notify: NotifySocket,
    pub child: Child,
    pub logs: Arc<Mutex<Vec<String>>>,
    /// The addresses the proxy reported in its READY status, by scheme.
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
}

pub struct ProxyOptions {
    pub env: Vec<(String, String)>,
    pub wait_ready: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            env: Vec::new(),
            wait_ready: true,
        }
    }
}

impl Proxy {
    pub fn start(config: &str) -> Self {
        Self::start_with(config, ProxyOptions::default())
    }

    pub fn start_with(config: &str, options: ProxyOptions) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), config, options)
    }

    /// The proxy with `config` written as config.toml in `dir`, beside the files it names.
    pub fn start_in(dir: TempDir, config: &str, options: ProxyOptions) -> Self {
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        Self::spawn(dir, config_path, options)
    }

    /// The command that runs the proxy binary at `bin` with `config_path`, in an environment of
    /// its own: none of the test runner's logging, journal, sockets or watchdog.
    pub fn command(bin: &Path, config_path: &Path) -> Command {
        let mut command = Command::new(bin);
        command
            .arg("--config")
            .arg(config_path)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("LISTEN_FDS")
            .env_remove("WATCHDOG_USEC");
        command
    }

    pub fn spawn(dir: TempDir, config_path: PathBuf, options: ProxyOptions) -> Self {
        let mut command = Self::command(Path::new(BIN), &config_path);
        for (k, v) in &options.env {
            command.env(k, v);
        }
        Self::spawn_command(dir, config_path, command, options.wait_ready)
    }

    /// Runs `command` (the proxy, or something that execs it) with the test's notify socket.
    pub fn spawn_command(
        dir: TempDir,
        config_path: PathBuf,
        mut command: Command,
        wait_ready: bool,
    ) -> Self {
        let notify = NotifySocket::new(dir.path());
        command
            .env("NOTIFY_SOCKET", &notify.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let mut proxy = Self {
            dir,
            config_path,
            notify,
            child,
            logs,
            http: None,
            https: None,
        };
        if wait_ready {
            proxy.wait_ready(0);
        }
        proxy
    }

    /// Waits for a READY=1 after message `skip` and reads the bound addresses from its STATUS.
    pub fn wait_ready(&mut self, skip: usize) -> usize {
        let index = self
            .notify
            .wait_for(skip, Duration::from_secs(15), "READY=1", |m| {
                m.lines().any(|l| l == "READY=1")
            });
        let message = &self.notify.messages()[index];
        let status = message
            .lines()
            .find_map(|l| l.strip_prefix("STATUS="))
            .expect("READY comes with a STATUS")
            .to_owned();
        self.http = addr_after(&status, "http://");
        self.https = addr_after(&status, "https://");
        index
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http.expect("a plain listener"))
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not exit within {timeout:?}; logs:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).unwrap();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- proxy logs ---\n{}\n--- notify ---\n{:#?}",
                self.logs(),
                self.notify.messages()
            );
        }
    }
}

fn addr_after(status: &str, scheme: &str) -> Option<SocketAddr> {
    status
        .split([' ', ',', ';'])
        .find_map(|word| word.strip_prefix(scheme))
        .and_then(|a| a.parse().ok())
}

/// `openai-proxy check` on `config`, written as config.toml in `dir`: whether it passed, and
/// what it printed.
pub fn check_in(dir: &Path, config: &str) -> (bool, String) {
    let path = dir.join("config.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The fake upstream (both ALPNs) and the proxy in front of it on a plain listener, with `extra`
/// before the `[upstream]` table (a `[server]` table, say).
pub async fn proxy_and_upstream(extra: &str) -> (Pki, FakeUpstream, Proxy) {
    let pki = Pki::new();
    let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
    let proxy = Proxy::start(&basic_config(&upstream, &pki, extra));
    (pki, upstream, proxy)
}

/// The real proxy in tokens mode, its key file and tokens file beside its config.
pub fn start_tokens(
    upstream: &FakeUpstream,
    pki: &Pki,
    tokens: &str,
    env: &[(&str, &str)],
) -> Proxy {
    let options = ProxyOptions {
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    start_tokens_with(upstream, pki, "", tokens, options)
}

/// The real proxy in tokens mode with `extra` after its [auth] table (a `[limits]` table, say),
/// these `[[token]]` tables in its tokens file, and `options`.
pub fn start_tokens_with(
    upstream: &FakeUpstream,
    pki: &Pki,
    extra: &str,
    tokens: &str,
    options: ProxyOptions,
) -> Proxy {
    let extra = format!("{TOKENS_AUTH}\n{extra}\n");
    Proxy::start_in(
        tokens_dir(tokens),
        &basic_config(upstream, pki, &extra),
        options,
    )
}

/// Ends a process the test did not start itself (the successor) when the test ends.
pub struct Successor(pub u32);

impl Drop for Successor {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg(self.0.to_string())
            .status();
    }
}
