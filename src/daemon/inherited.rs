//! Listening sockets inherited from systemd (its fd store after a restart, or socket
//! activation) or from a predecessor handing over to this process.
//!
//! The one place that needs `unsafe`: turning the descriptor numbers passed in LISTEN_FDS and
//! OPENAI_PROXY_HANDOVER_FD into owned descriptors, and clearing those variables so that nothing
//! takes them twice.
#![allow(unsafe_code)]

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Names the descriptor of the predecessor's end of a handover.
pub const HANDOVER_FD: &str = "OPENAI_PROXY_HANDOVER_FD";

pub struct InheritedListener {
    /// Who passed it: `systemd` or `predecessor`.
    pub from: &'static str,
    pub name: String,
    pub addr: SocketAddr,
    pub listener: std::net::TcpListener,
}

/// The connection to the process this one takes over from, if it was started by a handover.
/// Call once, before any thread starts: it clears the variable naming it.
pub fn take_predecessor() -> Option<UnixStream> {
    let fd: RawFd = std::env::var(HANDOVER_FD).ok()?.parse().ok()?;
    // SAFETY: main calls this before the runtime (or any other thread) exists.
    unsafe { std::env::remove_var(HANDOVER_FD) };
    // SAFETY: only looked at, while no other thread exists that could close it.
    let open = rustix::io::fcntl_getfd(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }).is_ok();
    // The predecessor put its end of a socket pair at this number, open across the exec.
    if !open {
        eprintln!("openai-proxy: {HANDOVER_FD}={fd} names no open descriptor");
        return None;
    }
    // SAFETY: the descriptor is open (checked above) and was passed to this process for it
    // alone; the variable naming it is cleared, so nothing else takes it.
    Some(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Takes the sockets passed in LISTEN_FDS. Call once, before any thread starts: it clears the
/// LISTEN_* variables, which is only sound while the process is single-threaded.
pub fn take() -> Vec<InheritedListener> {
    let passed = match sd_notify::listen_fds_with_names() {
        Ok(passed) => passed.collect::<Vec<_>>(),
        Err(error) => {
            eprintln!("openai-proxy: ignoring the sockets passed by systemd: {error}");
            Vec::new()
        }
    };
    // SAFETY: main calls this first thing, before the runtime (or any other thread) exists,
    // so no other thread can be reading the environment.
    unsafe {
        for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(name);
        }
    }
    let mut listeners = Vec::new();
    for (fd, name) in passed {
        // SAFETY: sd_notify checked LISTEN_PID, so these descriptors were passed to this very
        // process; they are open, and nothing else in the process owns them, since the
        // variables naming them are cleared above and this runs once.
        let socket = socket2::Socket::from(unsafe { OwnedFd::from_raw_fd(fd) });
        match adopt(socket) {
            Ok((addr, listener)) => listeners.push(InheritedListener {
                from: "systemd",
                name,
                addr,
                listener,
            }),
            Err(error) => {
                eprintln!("openai-proxy: ignoring passed socket {name:?} (fd {fd}): {error}")
            }
        }
    }
    listeners
}

/// Makes a descriptor a predecessor passed one of the inherited listeners, if it is a
/// listening TCP socket.
pub fn from_predecessor(name: String, fd: OwnedFd) -> std::io::Result<InheritedListener> {
    let (addr, listener) = adopt(socket2::Socket::from(fd))?;
    Ok(InheritedListener {
        from: "predecessor",
        name,
        addr,
        listener,
    })
}

fn adopt(socket: socket2::Socket) -> std::io::Result<(SocketAddr, std::net::TcpListener)> {
    if socket.r#type()? != socket2::Type::STREAM {
        return Err(std::io::Error::other("not a stream socket"));
    }
    let addr = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("not an IP socket"))?;
    socket.set_cloexec(true)?;
    socket.set_nonblocking(true)?;
    Ok((addr, socket.into()))
}
