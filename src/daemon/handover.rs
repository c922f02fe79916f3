//! Handing the service over to a new process: an upgrade that makes no client wait.
//!
//! The running process (the predecessor) starts the binary on disk with its own arguments,
//! passes it every listening socket, and waits for it to say that it serves. It then names it
//! systemd's main process, tells it so, and drains like a stop while the successor serves. Until
//! named, the successor serves but says nothing to systemd; if it fails to start, the
//! predecessor kills it and carries on as if nothing had happened.
//!
//! The exchange, over a socket pair whose other end the successor inherits:
//! - predecessor: the listeners' fd store names, one a line, then `end`; the sockets ride along
//!   with the first bytes (SCM_RIGHTS), in the same order;
//! - successor: `ready`, or `failed: <why>`;
//! - predecessor: `main`.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::inherited::{self, HANDOVER_FD, InheritedListener};
use super::listeners::ListenerSet;
use super::systemd;
use crate::generation::Live;
use crate::outcome;

/// How long a successor may take to load its config, take the sockets and serve.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the successor waits to be named the main process once it has said it is ready.
const MAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many listening sockets are handed over (systemd's fd store holds fewer).
const MAX_SOCKETS: usize = 64;

/// The binary this process runs, as it was at start.
pub struct Exe {
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

impl Exe {
    pub fn current() -> Self {
        // A binary replaced already reads as "PATH (deleted)": its path is still PATH.
        let link = std::fs::read_link("/proc/self/exe").unwrap_or_default();
        let path = link
            .to_str()
            .and_then(|l| l.strip_suffix(" (deleted)"))
            .map_or(link.clone(), PathBuf::from);
        let identity = std::fs::metadata("/proc/self/exe")
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Self { path, identity }
    }

    /// Whether another binary now stands at this one's path (a package upgrade put it there).
    pub fn replaced(&self) -> bool {
        let on_disk = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        on_disk.is_some() && on_disk != self.identity
    }
}

/// Hands the service over to the binary on disk. True once the successor is the main process
/// (this one then only finishes what is in flight); false if it failed, and nothing changed.
pub async fn hand_over(exe: &Exe, listeners: &ListenerSet, live: &Live) -> bool {
    tracing::info!(binary = %exe.path.display(), "handing over to a new process");
    systemd::reloading(&format!("handing over to {}", exe.path.display()));
    let successor = match start(exe, listeners).await {
        Ok(successor) => successor,
        Err(error) => {
            tracing::error!(%error, "handover failed; this process keeps serving");
            let error = format!("handover failed: {error}");
            outcome::record(Err(&error));
            live.reload_failed(error);
            systemd::ready(&listeners.status());
            return false;
        }
    };
    let pid = successor.pid;
    let handed = format!("handed over to PID {pid}");
    systemd::hand_over(pid, &handed);
    outcome::record(Ok(&handed));
    if let Err(error) = successor.confirm().await {
        tracing::error!(pid, %error, "the new process went away just after it was named the main process");
    }
    tracing::info!(pid, "handed over; finishing what is in flight");
    true
}

/// A successor that has said it serves, waiting to be named the main process.
struct Successor {
    link: BufReader<tokio::net::UnixStream>,
    pid: u32,
}

/// Starts the binary on disk as a successor, hands it the listening sockets and waits until it
/// serves. On any failure the successor is killed, and the error says why.
async fn start(exe: &Exe, listeners: &ListenerSet) -> Result<Successor, String> {
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| format!("cannot make a socket pair: {e}"))?;
    // Open across the exec, at the number the variable names; ours stays close-on-exec.
    rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())
        .map_err(|e| format!("cannot pass a socket: {e}"))?;
    let mut child = tokio::process::Command::new(&exe.path)
        .args(std::env::args_os().skip(1))
        .env(HANDOVER_FD, theirs.as_raw_fd().to_string())
        // systemd's watchdog goes with the main process: the successor's, once named.
        .env_remove("WATCHDOG_PID")
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.path.display()))?;
    drop(theirs);
    let pid = child.id().unwrap_or(0);
    match introduce(ours, listeners, &mut child).await {
        // Dropping the handle leaves the process running; the runtime reaps it if it ends.
        Ok(link) => Ok(Successor { link, pid }),
        Err(error) => {
            let _ = child.kill().await;
            Err(error)
        }
    }
}

async fn introduce(
    link: UnixStream,
    listeners: &ListenerSet,
    child: &mut tokio::process::Child,
) -> Result<BufReader<tokio::net::UnixStream>, String> {
    let sockets: Vec<(String, BorrowedFd<'_>)> = listeners
        .sockets()
        .map(|(name, socket)| (name, socket.as_fd()))
        .take(MAX_SOCKETS)
        .collect();
    let link = send_sockets(&link, &sockets)
        .and_then(|()| link.set_nonblocking(true))
        .and_then(|()| tokio::net::UnixStream::from_std(link));
    let mut link = match link {
        Ok(link) => BufReader::new(link),
        Err(error) => return Err(ended_early(child, &error.to_string()).await),
    };
    let mut line = String::new();
    let said = tokio::time::timeout(READY_TIMEOUT, link.read_line(&mut line)).await;
    match said {
        Ok(Ok(_)) if line.trim_end() == "ready" => Ok(link),
        Ok(Ok(_)) if line.starts_with("failed: ") => Err(format!(
            "the new process could not start: {}",
            line["failed: ".len()..].trim_end()
        )),
        Err(_) => Err(format!(
            "the new process was not ready within {READY_TIMEOUT:?}"
        )),
        Ok(Ok(_)) => Err(ended_early(child, "it said nothing").await),
        Ok(Err(error)) => Err(ended_early(child, &error.to_string()).await),
    }
}

/// Why a successor that broke off the exchange did so: its exit status, if it has ended.
async fn ended_early(child: &mut tokio::process::Child, what: &str) -> String {
    match tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
        Ok(Ok(status)) => format!("the new process ended before it was ready ({status})"),
        _ => format!("the new process broke off the handover: {what}"),
    }
}

impl Successor {
    /// Tells the successor that systemd now knows it as the main process.
    pub async fn confirm(mut self) -> Result<(), String> {
        self.link
            .get_mut()
            .write_all(b"main\n")
            .await
            .map_err(|e| format!("the new process went away: {e}"))
    }
}

fn send_sockets(link: &UnixStream, sockets: &[(String, BorrowedFd<'_>)]) -> std::io::Result<()> {
    let mut text = String::new();
    for (name, _) in sockets {
        text.push_str(name);
        text.push('\n');
    }
    text.push_str("end\n");
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, fd)| *fd).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other("too many sockets for one message"));
    }
    let bytes = text.as_bytes();
    let sent = rustix::net::sendmsg(
        link,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::empty(),
    )?;
    // The descriptors went with the first bytes; the rest of the text follows as plain bytes.
    (&*link).write_all(&bytes[sent..])
}

/// The successor's side: the predecessor it takes over from.
pub struct Predecessor(UnixStream);

impl Predecessor {
    /// Takes the link to the predecessor, if this process was started by a handover, and the
    /// sockets it passes. Call before any thread starts.
    pub fn take() -> Option<Result<(Self, Vec<InheritedListener>), String>> {
        let link = inherited::take_predecessor()?;
        Some(
            receive_sockets(&link)
                .map(|sockets| (Self(link), sockets))
                .map_err(|e| format!("cannot take the sockets handed over: {e}")),
        )
    }

    /// Says that this process serves and waits to be named the main process.
    pub fn ready(mut self) -> Result<(), String> {
        self.0
            .write_all(b"ready\n")
            .and_then(|()| self.0.set_read_timeout(Some(MAIN_TIMEOUT)))
            .map_err(|e| format!("the old process went away: {e}"))?;
        let mut answer = [0u8; 5];
        match self.0.read_exact(&mut answer) {
            Ok(()) if &answer == b"main\n" => Ok(()),
            Ok(()) => Err("the old process said something unexpected".into()),
            Err(e) => Err(format!("the old process did not hand over: {e}")),
        }
    }

    /// Tells the predecessor why this process cannot take over.
    pub fn fail(mut self, why: &str) {
        let _ = writeln!(self.0, "failed: {}", why.replace('\n', " "));
    }
}

fn receive_sockets(link: &UnixStream) -> std::io::Result<Vec<InheritedListener>> {
    link.set_read_timeout(Some(READY_TIMEOUT))?;
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut buf = vec![0u8; 64 << 10];
    let received = rustix::net::recvmsg(
        link,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(passed) = message {
            fds.extend(passed);
        }
    }
    let mut text = buf[..received.bytes].to_vec();
    while !text.ends_with(b"end\n") {
        let mut more = [0u8; 4096];
        let n = (&*link).read(&mut more)?;
        if n == 0 {
            return Err(std::io::Error::other("the list of sockets ended early"));
        }
        text.extend_from_slice(&more[..n]);
    }
    let text = String::from_utf8_lossy(&text);
    let names = text.lines().take_while(|l| *l != "end");
    names
        .zip(fds)
        .map(|(name, fd)| inherited::from_predecessor(name.to_owned(), fd))
        .collect()
}
