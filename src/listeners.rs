//! The listening sockets: bound once, adopted across restarts, diffed on reload.
//!
//! An address that stays in the config keeps its socket for the life of the process, and through
//! systemd's fd store beyond it: a restart hands the same socket to the next process, so a
//! connection that arrives in between waits in the backlog instead of being refused.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use toml::Spanned;

use crate::config::{ConfigError, ConfigFile};
use crate::drain::{self, Drain};
use crate::generation::{Generation, Live};
use crate::inherited::InheritedListener;
use crate::workers::Workers;
use crate::{server, systemd};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// TLS listeners (ALPN h2 and http/1.1).
    pub listen: Vec<Spanned<SocketAddr>>,
    /// PEM: the certificate, then any intermediates.
    pub cert_file: Spanned<PathBuf>,
    /// PEM: PKCS#8, PKCS#1 or SEC1.
    pub key_file: Spanned<PathBuf>,
}

pub use crate::config::FileRead;

/// The TLS acceptor for the listeners, and the files it was made from.
pub fn tls_acceptor(
    config: &TlsConfig,
    file: &ConfigFile,
) -> Result<(tokio_rustls::TlsAcceptor, Vec<FileRead>), ConfigError> {
    let (cert_path, cert_pem) = file.read_named(&config.cert_file)?;
    let (key_path, key_pem) = file.read_named(&config.key_file)?;
    let at_cert = |message: String| file.error_at(config.cert_file.span(), message);
    let at_key = |message: String| file.error_at(config.key_file.span(), message);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| at_cert(format!("{}: bad PEM: {e}", cert_path.display())))?;
    if chain.is_empty() {
        return Err(at_cert(format!(
            "{} holds no PEM certificate",
            cert_path.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        at_key(format!(
            "{}: no usable private key: {e}",
            key_path.display()
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| at_key(format!("the key does not fit the certificate: {e}")))?;
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    Ok((acceptor, vec![(cert_path, cert_pem), (key_path, key_pem)]))
}

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
    /// By configured address (which may have port 0); each with the address it is bound to.
    running: HashMap<SocketAddr, Running>,
}

struct Running {
    local: SocketAddr,
    /// Kept to be handed on: to systemd's fd store, or to a successor.
    socket: std::net::TcpListener,
    drain: Drain,
    accept_loops: Vec<tokio::task::JoinHandle<()>>,
}

/// Sockets ready to serve, not yet serving. Dropping it closes the fresh ones.
pub struct Bound(Vec<BoundSocket>);

struct BoundSocket {
    addr: SocketAddr,
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
        for (addr, _) in generation.listen_addrs() {
            // A listener on port 0 has no fixed address to match, only its name in the store.
            let inherited = if addr.port() == 0 {
                let name = systemd::listener_name(addr);
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
                        listener: inherited.listener,
                        fresh: false,
                    });
                }
                None => sockets.push(BoundSocket {
                    addr,
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
        set.serve(Bound(sockets), &generation);
        Ok(set)
    }

    /// Binds the addresses `next` adds. Nothing changes until `apply`.
    pub fn bind_new(&self, next: &Generation) -> Result<Bound, BindError> {
        let mut bound = Vec::new();
        for (addr, _) in next.listen_addrs() {
            if !self.running.contains_key(&addr) {
                bound.push(BoundSocket {
                    addr,
                    listener: bind(addr)?,
                    fresh: true,
                });
            }
        }
        Ok(Bound(bound))
    }

    /// Serves the new sockets and retires the listeners `generation` no longer has. Returns once
    /// the retired ones accept nothing more, so that READY=1 means the new listeners are in place.
    pub async fn apply(&mut self, bound: Bound, generation: &Generation, drain_timeout: Duration) {
        self.serve(bound, generation);
        self.retire(generation, drain_timeout).await;
    }

    fn serve(&mut self, bound: Bound, generation: &Generation) {
        for BoundSocket {
            addr,
            listener,
            fresh,
        } in bound.0
        {
            if fresh {
                systemd::store_listener(addr, &listener);
            }
            let local = listener.local_addr().unwrap_or(addr);
            tracing::info!(%addr, %local, tls = generation.is_tls(addr), "listening");
            let drain = Drain::new();
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
                addr,
                Running {
                    local,
                    socket: listener,
                    drain,
                    accept_loops,
                },
            );
        }
        self.live
            .set_listening(self.running.values().map(|r| r.local).collect());
    }

    async fn retire(&mut self, generation: &Generation, drain_timeout: Duration) {
        let wanted: Vec<SocketAddr> = generation.listen_addrs().map(|(a, _)| a).collect();
        let retired: Vec<SocketAddr> = self
            .running
            .keys()
            .filter(|a| !wanted.contains(a))
            .copied()
            .collect();
        for addr in retired {
            let Running {
                drain,
                accept_loops,
                ..
            } = self.running.remove(&addr).expect("listed above");
            systemd::forget_listener(&systemd::listener_name(addr));
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
        self.live
            .set_listening(self.running.values().map(|r| r.local).collect());
    }

    /// Every listening socket, by its fd store name.
    pub fn sockets(&self) -> impl Iterator<Item = (String, &std::net::TcpListener)> {
        self.running
            .iter()
            .map(|(addr, r)| (systemd::listener_name(*addr), &r.socket))
    }

    /// Hands every listening socket to systemd's fd store (which ignores one it holds already).
    pub fn store_all(&self) {
        for (addr, running) in &self.running {
            systemd::store_listener(*addr, &running.socket);
        }
    }

    /// The worker threads the listeners are served on.
    pub fn workers(&self) -> &[tokio::runtime::Handle] {
        &self.workers
    }

    /// The `STATUS=` line, with the addresses really bound (port 0 resolved).
    pub fn status(&self) -> String {
        let generation = self.live.snapshot();
        let mut bound: Vec<(SocketAddr, bool)> = generation
            .listen_addrs()
            .filter_map(|(addr, tls)| self.running.get(&addr).map(|r| (r.local, tls)))
            .collect();
        bound.dedup();
        self.live.status(&bound)
    }

    /// Stops accepting everywhere, lets what is in flight finish within `timeout`, cuts the rest.
    pub async fn drain(self, timeout: Duration) -> drain::Outcome {
        let outcomes = futures_util::future::join_all(
            self.running.into_values().map(|r| r.drain.drain(timeout)),
        )
        .await;
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
