//! The listening sockets: bound once, adopted across restarts, diffed on reload.
//!
//! An address that stays in the config keeps its socket for the life of the process, and through
//! systemd's fd store beyond it: a restart hands the same socket to the next process, so a
//! connection that arrives in between waits in the backlog instead of being refused.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use super::inherited::InheritedListener;
use super::systemd;
use crate::drain::{self, Drain};
use crate::generation::{Generation, Live};
use crate::workers::Workers;
use crate::{admin, server};

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    source: io::Error,
}

pub struct ListenerSet {
    live: Arc<Live>,
    /// Every listener is served by an accept loop on each worker.
    workers: Vec<tokio::runtime::Handle>,
    /// Connections open across all listeners, checked against `server.max_connections`.
    connections: Arc<AtomicUsize>,
    /// By configured address (which may have port 0) and kind; each with the address it is
    /// bound to.
    running: HashMap<(SocketAddr, Kind), Running>,
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Proxy,
    /// `/metrics` and the health endpoints (`[admin] listen`).
    Admin,
}

impl Kind {
    /// Its name in systemd's fd store and in a handover.
    fn socket_name(self, addr: SocketAddr) -> String {
        match self {
            Self::Proxy => systemd::listener_name(addr),
            Self::Admin => systemd::admin_listener_name(addr),
        }
    }
}

/// Every address `generation` listens on, and for what.
fn wanted(generation: &Generation) -> impl Iterator<Item = (SocketAddr, Kind)> + '_ {
    let proxy = generation.listen_addrs().map(|(a, _)| (a, Kind::Proxy));
    let admin = generation.config.admin.listen.iter();
    proxy.chain(admin.map(|a| (*a.get_ref(), Kind::Admin)))
}

/// A listener: the address the config names (port 0 possibly) and what it serves.
type Key = (SocketAddr, Kind);

/// What a reload does to the listeners, per address and kind.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    /// Running and still wanted: the socket stays, and its connections with it.
    keep: Vec<Key>,
    /// Wanted and not running: bound before the new generation serves, in the config's order.
    open: Vec<Key>,
    /// Running and no longer wanted: retired once the new generation serves, in address order.
    close: Vec<Key>,
}

/// Compares the listeners running with those wanted. Pure: binds and closes nothing.
fn plan(running: impl IntoIterator<Item = Key>, wanted: impl IntoIterator<Item = Key>) -> Plan {
    let running: Vec<Key> = running.into_iter().collect();
    let mut plan = Plan::default();
    for key in wanted {
        if plan.keep.contains(&key) || plan.open.contains(&key) {
            continue;
        }
        if running.contains(&key) {
            plan.keep.push(key);
        } else {
            plan.open.push(key);
        }
    }
    plan.close = running
        .into_iter()
        .filter(|key| !plan.keep.contains(key))
        .collect();
    plan.close.sort_unstable();
    plan
}

struct Running {
    local: SocketAddr,
    /// Kept to be handed on: to systemd's fd store, or to a successor.
    socket: std::net::TcpListener,
    drain: Drain,
    accept_loops: Vec<tokio::task::JoinHandle<()>>,
}

/// Sockets ready to serve, not yet serving, and the listeners to retire once they do. Dropping
/// it closes the fresh ones and retires nothing.
pub struct Bound {
    sockets: Vec<BoundSocket>,
    close: Vec<Key>,
}

struct BoundSocket {
    addr: SocketAddr,
    kind: Kind,
    listener: std::net::TcpListener,
    /// Bound by this process, so not yet in systemd's fd store.
    fresh: bool,
}

impl ListenerSet {
    /// Takes over the sockets systemd handed us that the config still wants, binds the rest.
    pub fn start(
        live: Arc<Live>,
        workers: &Workers,
        inherited: Vec<InheritedListener>,
    ) -> Result<Self, BindError> {
        let generation = live.snapshot();
        let mut adopted: HashMap<SocketAddr, InheritedListener> =
            inherited.into_iter().map(|l| (l.addr, l)).collect();
        let mut sockets = Vec::new();
        for (addr, kind) in wanted(&generation) {
            // A listener on port 0 has no fixed address to match, only its name in the store.
            let inherited = if addr.port() == 0 {
                let name = kind.socket_name(addr);
                let found = adopted
                    .iter()
                    .find(|(_, l)| l.name == name)
                    .map(|(a, _)| *a);
                found.and_then(|a| adopted.remove(&a))
            } else {
                adopted.remove(&addr)
            };
            match inherited {
                Some(inherited) => {
                    tracing::info!(%addr, name = %inherited.name, from = inherited.from, "adopted a listening socket");
                    sockets.push(BoundSocket {
                        addr,
                        kind,
                        listener: inherited.listener,
                        fresh: false,
                    });
                }
                None => sockets.push(BoundSocket {
                    addr,
                    kind,
                    listener: bind(addr)?,
                    fresh: true,
                }),
            }
        }
        for (addr, stale) in adopted {
            tracing::info!(%addr, "closing a stored socket the config no longer lists");
            systemd::forget_listener(&stale.name);
        }
        let mut set = Self {
            live,
            workers: workers.handles().to_vec(),
            connections: Arc::default(),
            running: HashMap::new(),
        };
        set.serve(sockets, &generation);
        Ok(set)
    }

    /// Plans the change to `next`'s listeners and binds the addresses it adds. Nothing changes
    /// until `apply`.
    pub fn bind_new(&self, next: &Generation) -> Result<Bound, BindError> {
        let Plan { open, close, .. } = plan(self.running.keys().copied(), wanted(next));
        let sockets = open
            .into_iter()
            .map(|(addr, kind)| {
                let listener = bind(addr)?;
                Ok(BoundSocket {
                    addr,
                    kind,
                    listener,
                    fresh: true,
                })
            })
            .collect::<Result<_, BindError>>()?;
        Ok(Bound { sockets, close })
    }

    /// Serves the new sockets and retires the listeners the plan closes. Returns once the
    /// retired ones accept nothing more, so that READY=1 means the new listeners are in place.
    pub async fn apply(&mut self, bound: Bound, generation: &Generation, drain_timeout: Duration) {
        self.serve(bound.sockets, generation);
        self.retire(bound.close, generation, drain_timeout).await;
    }

    fn serve(&mut self, sockets: Vec<BoundSocket>, generation: &Generation) {
        for BoundSocket {
            addr,
            kind,
            listener,
            fresh,
        } in sockets
        {
            if fresh {
                systemd::store_listener(&kind.socket_name(addr), &listener);
            }
            let local = listener.local_addr().unwrap_or(addr);
            let drain = Drain::new();
            if kind == Kind::Admin {
                tracing::info!(%addr, %local, "admin listening");
                let accept_loop = self.serve_admin(&listener, addr, &drain);
                let accept_loops = accept_loop.into_iter().collect();
                let running = Running {
                    local,
                    socket: listener,
                    drain,
                    accept_loops,
                };
                self.running.insert((addr, kind), running);
                continue;
            }
            tracing::info!(%addr, %local, tls = generation.is_tls(addr), "listening");
            let mut accept_loops = Vec::with_capacity(self.workers.len());
            for worker in &self.workers {
                // Each worker polls its own descriptor of the one socket; the kernel hands each
                // connection to one of them.
                let listener = match listener.try_clone() {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::error!(%addr, %error, "cannot share the socket with a worker");
                        continue;
                    }
                };
                let (live, signal, connections) =
                    (self.live.clone(), drain.signal(), self.connections.clone());
                accept_loops.push(worker.spawn(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            server::accept_loop(listener, addr, live, signal, connections).await
                        }
                        Err(error) => tracing::error!(%addr, %error, "cannot accept on a worker"),
                    }
                }));
            }
            self.running.insert(
                (addr, kind),
                Running {
                    local,
                    socket: listener,
                    drain,
                    accept_loops,
                },
            );
        }
        self.publish(generation);
    }

    /// An admin listener is served by one accept loop, on the control thread.
    fn serve_admin(
        &self,
        listener: &std::net::TcpListener,
        addr: SocketAddr,
        drain: &Drain,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let listener = listener
            .try_clone()
            .and_then(TcpListener::from_std)
            .inspect_err(
                |error| tracing::error!(%addr, %error, "cannot accept on the admin listener"),
            )
            .ok()?;
        let (live, signal) = (self.live.clone(), drain.signal());
        Some(tokio::spawn(admin::accept_loop(
            listener, addr, live, signal,
        )))
    }

    /// Tells the watchdog and the admin listener which sockets are in place.
    fn publish(&self, generation: &Generation) {
        let local = |kind: Kind| {
            let running = self.running.iter().filter(move |((_, k), _)| *k == kind);
            running.map(|(_, r)| r.local).collect()
        };
        self.live.set_listening(local(Kind::Proxy));
        admin::publish(self.bound(generation), local(Kind::Admin));
    }

    async fn retire(&mut self, close: Vec<Key>, generation: &Generation, drain_timeout: Duration) {
        for (addr, kind) in close {
            let Some(Running {
                drain,
                accept_loops,
                ..
            }) = self.running.remove(&(addr, kind))
            else {
                continue;
            };
            systemd::forget_listener(&kind.socket_name(addr));
            tokio::spawn(async move {
                let outcome = drain.drain(drain_timeout).await;
                tracing::info!(%addr, in_flight = outcome.in_flight, cut = outcome.cut, "retired listener drained");
            });
            // Each accept loop closes its descriptor as it ends; with the last, the socket.
            for accept_loop in accept_loops {
                let _ = accept_loop.await;
            }
            tracing::info!(%addr, "stopped listening; draining its connections");
        }
        self.publish(generation);
    }

    /// Every listening socket, by its fd store name.
    pub fn sockets(&self) -> impl Iterator<Item = (String, &std::net::TcpListener)> {
        self.running
            .iter()
            .map(|((addr, kind), r)| (kind.socket_name(*addr), &r.socket))
    }

    /// Hands every listening socket to systemd's fd store (which ignores one it holds already).
    pub fn store_all(&self) {
        for ((addr, kind), running) in &self.running {
            systemd::store_listener(&kind.socket_name(*addr), &running.socket);
        }
    }

    /// The worker threads the listeners are served on.
    pub fn workers(&self) -> &[tokio::runtime::Handle] {
        &self.workers
    }

    /// The `STATUS=` line, with the addresses really bound (port 0 resolved).
    pub fn status(&self) -> String {
        let generation = self.live.snapshot();
        self.live.status(&self.bound(&generation))
    }

    /// The proxy's listeners as bound (port 0 resolved), in the config's order, with whether
    /// each speaks TLS.
    fn bound(&self, generation: &Generation) -> Vec<(SocketAddr, bool)> {
        let mut bound: Vec<(SocketAddr, bool)> = generation
            .listen_addrs()
            .filter_map(|(addr, tls)| {
                let running = self.running.get(&(addr, Kind::Proxy));
                running.map(|r| (r.local, tls))
            })
            .collect();
        bound.dedup();
        bound
    }

    /// After a handover: the successor answers on the admin sockets from now on, so this process
    /// stops accepting on them (they stay in systemd's store, the successor's now).
    pub async fn leave_admin(&mut self) {
        let admin: Vec<(SocketAddr, Kind)> = self
            .running
            .keys()
            .filter(|(_, kind)| *kind == Kind::Admin)
            .copied()
            .collect();
        for key in admin {
            let running = self.running.remove(&key).expect("listed above");
            running.drain.drain(ADMIN_DRAIN).await;
        }
    }

    /// Stops accepting everywhere, lets what is in flight finish within `timeout`, cuts the rest.
    /// The admin listeners answer on (`/readyz`: 503) until the proxy's connections are done.
    pub async fn drain(self, timeout: Duration) -> drain::Outcome {
        admin::set_draining();
        let (proxy, admin): (Vec<_>, Vec<_>) = self
            .running
            .into_iter()
            .partition(|((_, kind), _)| *kind == Kind::Proxy);
        let outcomes =
            futures_util::future::join_all(proxy.into_iter().map(|(_, r)| r.drain.drain(timeout)))
                .await;
        for (_, running) in admin {
            running.drain.drain(ADMIN_DRAIN).await;
        }
        outcomes.into_iter().fold(
            drain::Outcome {
                in_flight: 0,
                cut: 0,
            },
            |sum, o| drain::Outcome {
                in_flight: sum.in_flight + o.in_flight,
                cut: sum.cut + o.cut,
            },
        )
    }
}

/// How long admin connections (a scrape, a probe) may take to finish at the end of a stop.
const ADMIN_DRAIN: Duration = Duration::from_secs(1);

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, BindError> {
    let attempt = || -> io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        // A restart must be able to rebind while old connections sit in TIME_WAIT.
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(true)?;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        Ok(socket.into())
    };
    attempt().map_err(|source| BindError { addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: &str, kind: Kind) -> Key {
        (addr.parse().unwrap(), kind)
    }

    #[test]
    fn a_listener_still_listed_is_kept_and_one_added_is_opened() {
        let a = key("127.0.0.1:8080", Kind::Proxy);
        let b = key("127.0.0.1:8081", Kind::Proxy);
        assert_eq!(
            plan([a], [a, b]),
            Plan {
                keep: vec![a],
                open: vec![b],
                close: vec![],
            }
        );
    }

    #[test]
    fn a_listener_no_longer_listed_is_closed() {
        let a = key("127.0.0.1:8080", Kind::Proxy);
        let b = key("[::1]:8080", Kind::Proxy);
        let admin = key("127.0.0.1:9901", Kind::Admin);
        assert_eq!(
            plan([b, admin, a], [a]),
            Plan {
                keep: vec![a],
                open: vec![],
                close: vec![admin, b],
            }
        );
    }

    #[test]
    fn an_address_that_changes_kind_is_closed_and_opened_again() {
        let proxy = key("127.0.0.1:9000", Kind::Proxy);
        let admin = key("127.0.0.1:9000", Kind::Admin);
        assert_eq!(
            plan([proxy], [admin]),
            Plan {
                keep: vec![],
                open: vec![admin],
                close: vec![proxy],
            }
        );
    }

    #[test]
    fn port_zero_listeners_are_kept_by_their_configured_address() {
        let proxy = key("127.0.0.1:0", Kind::Proxy);
        let admin = key("127.0.0.1:0", Kind::Admin);
        let plan = plan([proxy, admin], [admin, proxy]);
        assert_eq!(plan.keep, vec![admin, proxy]);
        assert!(plan.open.is_empty() && plan.close.is_empty());
    }

    #[test]
    fn new_listeners_open_in_the_configs_order_once_each() {
        let a = key("127.0.0.1:3", Kind::Proxy);
        let b = key("127.0.0.1:1", Kind::Proxy);
        let c = key("127.0.0.1:2", Kind::Admin);
        assert_eq!(plan([], [a, b, c, b]).open, vec![a, b, c]);
    }
}
