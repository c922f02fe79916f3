//! The upstream host's addresses, looked up once and reused, so that opening a connection does
//! not wait for DNS.
//!
//! The system resolver (getaddrinfo, which honours /etc/hosts and nsswitch.conf) does not say how
//! long an answer may be kept. So an answer is reused for `upstream.dns_refresh`; after that, the
//! next connection still uses it while one lookup runs in the background. When that lookup fails,
//! the last answer stays in use, with a warning, for up to `KEPT_FOR` refresh periods: a name
//! server down for a moment should not take the upstream with it. Past that, connections wait for
//! a lookup of their own and fail with its error. A connection that none of the addresses takes
//! has the host looked up again at once, in case it moved. An IP address as host is never looked
//! up, and a reload that changes the `[upstream]` section starts afresh.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// How many refresh periods an answer may serve while lookups fail.
const KEPT_FOR: u32 = 10;

pub struct Resolver {
    host: String,
    port: u16,
    refresh: Duration,
    known: Mutex<Known>,
    /// Held by a connection looking the host up, so that the others needing an answer meanwhile
    /// wait for it rather than each asking too.
    looking_up: tokio::sync::Mutex<()>,
}

enum Known {
    /// The host is an IP address.
    Fixed(Arc<[SocketAddr]>),
    Resolved {
        addrs: Arc<[SocketAddr]>,
        at: Instant,
        refreshing: bool,
    },
    Unknown,
}

impl Resolver {
    pub fn new(host: &str, port: u16, refresh: Duration) -> Arc<Self> {
        let known = match host.parse::<IpAddr>() {
            Ok(ip) => Known::Fixed(Arc::from([SocketAddr::new(ip, port)])),
            Err(_) => Known::Unknown,
        };
        Arc::new(Self {
            host: host.to_owned(),
            port,
            refresh,
            known: Mutex::new(known),
            looking_up: tokio::sync::Mutex::new(()),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn lock(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The addresses to connect to, in the resolver's order; the error says why there are none.
    pub async fn addrs(self: &Arc<Self>) -> Result<Arc<[SocketAddr]>, String> {
        if let Some(addrs) = self.known_addrs() {
            return Ok(addrs);
        }
        let _one_at_a_time = self.looking_up.lock().await;
        if let Some(addrs) = self.known_addrs() {
            return Ok(addrs);
        }
        self.look_up().await
    }

    /// The last answer while it may serve, starting a background lookup once it is due.
    fn known_addrs(self: &Arc<Self>) -> Option<Arc<[SocketAddr]>> {
        let mut known = self.lock();
        match &mut *known {
            Known::Fixed(addrs) => Some(addrs.clone()),
            Known::Resolved {
                addrs,
                at,
                refreshing,
            } => {
                let age = at.elapsed();
                if age >= self.refresh * KEPT_FOR {
                    return None;
                }
                if age >= self.refresh && !*refreshing {
                    *refreshing = true;
                    tokio::spawn(self.clone().refresh());
                }
                Some(addrs.clone())
            }
            Known::Unknown => None,
        }
    }

    /// After none of `tried` took a connection: the host may have moved since it was looked up,
    /// so it is looked up again at once (unless another connection just did). The addresses to
    /// try next, when they differ.
    pub async fn after_failure(&self, tried: &Arc<[SocketAddr]>) -> Option<Arc<[SocketAddr]>> {
        if matches!(*self.lock(), Known::Fixed(_)) {
            return None;
        }
        let _one_at_a_time = self.looking_up.lock().await;
        let latest = match &*self.lock() {
            Known::Resolved { addrs, .. } if !Arc::ptr_eq(addrs, tried) => Some(addrs.clone()),
            _ => None,
        };
        let fresh = match latest {
            Some(addrs) => addrs,
            None => self.look_up().await.ok()?,
        };
        (fresh[..] != tried[..]).then_some(fresh)
    }

    async fn look_up(&self) -> Result<Arc<[SocketAddr]>, String> {
        let found: Arc<[SocketAddr]> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("resolving {}: {e}", self.host))?
            .collect();
        if found.is_empty() {
            return Err(format!("{} resolves to no address", self.host));
        }
        tracing::debug!(host = %self.host, addrs = ?found, "looked up the upstream host");
        *self.lock() = Known::Resolved {
            addrs: found.clone(),
            at: Instant::now(),
            refreshing: false,
        };
        Ok(found)
    }

    async fn refresh(self: Arc<Self>) {
        if let Err(error) = self.look_up().await {
            tracing::warn!(%error, "the upstream host's addresses could not be looked up again; the last ones stay in use");
            if let Known::Resolved { refreshing, .. } = &mut *self.lock() {
                *refreshing = false;
            }
        }
    }
}
