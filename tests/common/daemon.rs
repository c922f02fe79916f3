//! Other programs the tests start (Debian's redis-server, tinyproxy, microsocks, prometheus): a
//! child process with its output kept, waited on until it listens, killed when dropped; the free
//! loopback port it is given; signals sent by PID.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a daemon may take to listen on its port.
const LISTEN_WAIT: Duration = Duration::from_secs(30);

/// A loopback port free a moment ago, for the programs that cannot be given port 0.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Sends `signal` (a name: TERM, HUP, STOP, ...) to process `pid` with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A daemon run by the test, its output kept, killed when dropped.
pub struct Daemon {
    child: Child,
    pub port: u16,
    output: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Runs `command` and waits until it accepts connections on 127.0.0.1:`port`.
    pub async fn spawn(mut command: Command, port: u16) -> Self {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let program = command.get_program().to_string_lossy().into_owned();
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("{program} starts (is its Debian package installed?): {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>);
        for pipe in [stdout, stderr].into_iter().flatten() {
            let sink = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push(line);
                }
            });
        }
        let daemon = Self {
            child,
            port,
            output,
        };
        let deadline = Instant::now() + LISTEN_WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "{program} listens on {port}: {}",
                daemon.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        daemon
    }

    /// What it wrote to stdout and stderr so far, a line each.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    pub fn signal(&self, signal: &str) {
        send_signal(self.child.id(), signal);
    }

    /// Kills it now and waits for it; its port, free again.
    pub fn kill(mut self) -> u16 {
        self.stop();
        self.port
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
