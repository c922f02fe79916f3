//! Listening sockets inherited from systemd: its fd store after a restart, or socket activation.
//!
//! The one place that needs `unsafe`: turning the descriptor numbers systemd passes in
//! LISTEN_FDS into owned sockets, and clearing those variables so that nothing takes them twice.
#![allow(unsafe_code)]

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};

pub struct InheritedListener {
    pub name: String,
    pub addr: SocketAddr,
    pub listener: std::net::TcpListener,
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
