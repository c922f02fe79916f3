//! The upstream: where requests go, and the verified TLS connections, pooled per worker, that
//! take them there.

mod egress;
pub mod http1;
mod resolve;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{BodyError, RequestBody};
pub use crate::config::upstream::Config;
use crate::config::upstream::bracket_ipv6;
use crate::config::{ConfigError, ConfigFile, FileRead};
use crate::error::ProxyError;
use crate::workers;

pub use egress::Secret;
use egress::{Egress, Link};

/// The egress proxy `config` names, if any; an `https://` one is verified with `tls`'s roots.
fn egress(
    config: &Config,
    files: &Files,
    tls: &rustls::ClientConfig,
    file: &ConfigFile,
) -> Result<Option<Egress>, ConfigError> {
    let Some(proxy) = &config.proxy else {
        return Ok(None);
    };
    let password = files.proxy_password.as_ref();
    Egress::new(proxy.get_ref(), password, tls, config.dns_refresh.0)
        .map(Some)
        .map_err(|message| file.error_at(proxy.span(), message))
}

/// The files an upstream's config names, as read for a build.
#[derive(Debug, Default, PartialEq)]
pub struct Files {
    pub ca_pem: Option<Vec<u8>>,
    pub proxy_password: Option<Secret>,
}

impl Files {
    /// Reads them, and returns each with its contents too, for the file watcher.
    pub fn read(config: &Config, file: &ConfigFile) -> Result<(Self, Vec<FileRead>), ConfigError> {
        let mut read = Vec::new();
        let ca_pem = match &config.ca_file {
            Some(key) => {
                let (path, bytes) = file.read_named(key)?;
                read.push((path, bytes.clone()));
                Some(bytes)
            }
            None => None,
        };
        let proxy_password = match &config.proxy_password_file {
            Some(key) => {
                if config
                    .proxy
                    .as_ref()
                    .is_none_or(|p| p.get_ref().user.is_none())
                {
                    return Err(file.error_at(
                        key.span(),
                        "proxy_password_file needs a proxy url with a user: \"http://user@host:port\"",
                    ));
                }
                let (password, password_read) =
                    file.read_secret_as(key, "the proxy password file", password_line)?;
                read.push(password_read);
                Some(password)
            }
            None => None,
        };
        let files = Self {
            ca_pem,
            proxy_password,
        };
        Ok((files, read))
    }
}

/// The password is the file's one line; what is wrong is said without quoting any of it.
fn password_line(bytes: &[u8]) -> Result<Secret, &'static str> {
    let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        return Err("it is empty");
    }
    if line.contains(&b'\n') {
        return Err("it holds more than one line");
    }
    Ok(Secret::new(line.to_vec()))
}

/// A built upstream. Rebuilding one costs a trust-store load and empties the pool, so a reload
/// that leaves the upstream's config and CA file as they were keeps the old one.
pub struct Upstream {
    config: Config,
    files: Files,
    /// Per worker thread, so that a request and its upstream connection share a thread.
    pools: Vec<Arc<Pool>>,
    dialer: Arc<Dialer>,
    scheme: Scheme,
    /// Sent as :authority over HTTP/2 and as the Host header over HTTP/1.1 (never both: some
    /// servers refuse a request that has both).
    authority: Authority,
    host_header: HeaderValue,
}

impl Upstream {
    pub fn build(
        config: &Config,
        file: &ConfigFile,
        files: Files,
        workers: usize,
        previous: Option<&Arc<Upstream>>,
    ) -> Result<Arc<Upstream>, ConfigError> {
        if let Some(previous) = previous
            && previous.config == *config
            && previous.files == files
            && previous.pools.len() == workers.max(1)
        {
            return Ok(previous.clone());
        }
        let tls = client_tls(config, file, files.ca_pem.as_deref())?;
        let egress = egress(config, &files, &tls, file)?;
        let url = &config.url;
        let host = config
            .host
            .as_ref()
            .map_or(url.host.as_str(), |h| h.as_str());
        let server_name = ServerName::try_from(host.to_owned()).map_err(|_| ConfigError::File {
            path: file.path.clone(),
            message: format!("{host:?} is not a valid TLS server name"),
        })?;
        // Exactly `host`, never with the url's port: the connection goes where the url says
        // (see Dialer), and the Host header (HTTP/1.1) or :authority (HTTP/2) says `host`.
        let authority_text = bracket_ipv6(host);
        let authority: Authority = authority_text.parse().map_err(|_| ConfigError::File {
            path: file.path.clone(),
            message: format!("{authority_text:?} is not a valid upstream authority"),
        })?;
        let host_header = HeaderValue::from_str(authority.as_str())
            .expect("an authority is a valid header value");
        let tls = (url.scheme == Scheme::HTTPS).then(|| {
            let offering = |protocols: &[&[u8]]| {
                let mut tls = tls.clone();
                tls.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
                tokio_rustls::TlsConnector::from(Arc::new(tls))
            };
            let pooled: &[&[u8]] = if config.http2 {
                &[b"h2", b"http/1.1"]
            } else {
                &[b"http/1.1"]
            };
            Tls {
                pooled: offering(pooled),
                http1: offering(&[b"http/1.1"]),
                server_name,
            }
        });
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .adaptive_window(true)
            .max_header_list_size(64 << 10);
        let dialer = Arc::new(Dialer {
            resolver: resolve::Resolver::new(&url.host, url.port, config.dns_refresh.0),
            // http:// means HTTP/1.1: no prior-knowledge HTTP/2.
            offers_h2: config.http2 && tls.is_some(),
            tls,
            egress,
            connect_timeout: config.connect_timeout.0,
            http2,
        });
        let pools = (0..workers.max(1))
            .map(|_| Arc::new(Pool::new(config, dialer.clone())))
            .collect();
        Ok(Arc::new(Upstream {
            config: config.clone(),
            files,
            pools,
            dialer,
            scheme: url.scheme.clone(),
            authority,
            host_header,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Opens a connection on each worker ahead of the first request, so that the first request
    /// after a start or a reload doesn't wait for a TLS handshake. A worker that has one already
    /// opens none; a failure is only logged, and requests dial again.
    pub fn preconnect(&self, workers: &[tokio::runtime::Handle]) {
        for (index, worker) in workers.iter().enumerate() {
            let pool = &self.pools[index % self.pools.len()];
            // Marked as connecting here, before any request can look, so that the first requests
            // wait for this connection rather than open their own beside it.
            let connecting = {
                let mut state = pool.lock();
                if !state.lanes.is_empty() || !state.idle.is_empty() || state.connecting.is_some() {
                    continue;
                }
                state.connecting.insert(pool.connect_lane()).clone()
            };
            worker.spawn(async move {
                if let Err(error) = connecting.await {
                    tracing::debug!(%error, "could not connect to the upstream ahead of requests");
                }
            });
        }
    }

    /// Connections open and carrying no request, across the workers' pools: for a scrape, which
    /// takes each pool's lock for a moment.
    pub fn connections_idle(&self) -> usize {
        self.pools
            .iter()
            .map(|pool| {
                let state = pool.lock();
                let lanes = state.lanes.iter();
                state.idle.len() + lanes.filter(|l| l.load.idle_since().is_some()).count()
            })
            .sum()
    }

    /// The upstream URI for a client's path and query, under the url's base path.
    pub fn uri(&self, client: &Uri) -> Uri {
        let base = &self.config.url.base_path;
        let path_and_query = match client.path_and_query() {
            // Shares the client's bytes: no copy, no second parse.
            Some(pq) if base.is_empty() => pq.clone(),
            pq => {
                let pq = pq.map_or("/", PathAndQuery::as_str);
                PathAndQuery::try_from(format!("{base}{pq}"))
                    .expect("a valid path under a valid base path is valid")
            }
        };
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .expect("scheme, authority and path are each valid")
    }

    /// Sends a request. The response body holds the connection it came on (or its HTTP/2
    /// stream) until it ends; a switch of protocols comes with the upstream's side of the
    /// switched connection.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
        upgrade: bool,
    ) -> Result<(Response<UpstreamBody>, Option<http1::Upgraded>), ProxyError> {
        let timeout = self.config.response_timeout.0;
        let sending = async {
            if upgrade {
                // Boxed, as dialing is below: what is rare should not make every request's
                // state larger, since that state is moved as a whole.
                Box::pin(self.send_upgrade(request)).await
            } else {
                self.send_pooled(request).await.map(|r| (r, None))
            }
        };
        tokio::time::timeout(timeout, sending)
            .await
            .unwrap_or(Err(ProxyError::UpstreamTimeout(timeout)))
    }

    /// Over a connection of its own: WebSocket upgrades cannot ride an HTTP/2 connection, and
    /// an upgraded connection never comes back.
    async fn send_upgrade(
        &self,
        request: Request<RequestBody>,
    ) -> Result<(Response<UpstreamBody>, Option<http1::Upgraded>), ProxyError> {
        let conn = self.dialer.dial_http1().await?;
        let mut outgoing = http1::Outgoing::new(request, &self.host_header, true);
        match http1::exchange(conn, &mut outgoing, &Weak::new()).await {
            Ok((response, upgraded)) => Ok((response.map(UpstreamBody::Http1), upgraded)),
            Err(http1::Failure::Stale(error) | http1::Failure::Failed(error)) => Err(error),
        }
    }

    async fn send_pooled(
        &self,
        request: Request<RequestBody>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        let pool = &self.pools[workers::current() % self.pools.len()];
        // The request as HTTP/2 takes it, until it goes out over HTTP/1.1 and becomes `outgoing`.
        let mut request = Some(request);
        let mut outgoing = None;
        let mut retries = 0;
        loop {
            // Once written out for HTTP/1.1 (and found a stale connection), it stays HTTP/1.1.
            let http1_only = outgoing.is_some();
            let conn = match pool.checkout(http1_only) {
                Checkout::Stream(mut sender, in_flight) => {
                    let Some(unsent) = request.take() else {
                        unreachable!(
                            "HTTP/2 is offered only to a request not yet sent over HTTP/1.1"
                        );
                    };
                    match sender.try_send_request(unsent).await {
                        Ok(response) => {
                            return Ok(response.map(|body| UpstreamBody::Http2 {
                                body,
                                _lease: in_flight,
                            }));
                        }
                        Err(mut e) => match e.take_message() {
                            // Never sent: the connection had just closed.
                            Some(unsent) if retries < MAX_RETRIES => {
                                retries += 1;
                                request = Some(unsent);
                                continue;
                            }
                            _ => return Err(failure(e.error())),
                        },
                    }
                }
                Checkout::Idle(conn) => conn,
                Checkout::Wait(connecting) => {
                    connecting.await?;
                    continue;
                }
                // Its failure is not this request's: it dials its own next.
                Checkout::Preconnecting(connecting) => {
                    let _ = connecting.await;
                    continue;
                }
                Checkout::Dial(busy) => {
                    let mut conn = if http1_only {
                        Box::pin(pool.dialer.dial_http1()).await?
                    } else {
                        match Box::pin(pool.dialer.dial()).await? {
                            Connected::Http1(conn) => conn,
                            Connected::Http2(sender) => {
                                pool.add_lane(sender);
                                continue;
                            }
                        }
                    };
                    conn.busy = Some(busy);
                    conn
                }
            };
            let out = match (&mut outgoing, request.take()) {
                (Some(out), _) => out,
                (None, Some(request)) => {
                    outgoing.insert(http1::Outgoing::new(request, &self.host_header, false))
                }
                (None, None) => unreachable!("a request is either unsent or outgoing"),
            };
            match http1::exchange(conn, out, &Arc::downgrade(pool)).await {
                Ok((response, _)) => return Ok(response.map(UpstreamBody::Http1)),
                // A kept-alive connection the upstream closed meanwhile: not this request's
                // fault, so it goes again.
                Err(http1::Failure::Stale(_)) if retries < MAX_RETRIES => retries += 1,
                Err(http1::Failure::Stale(error) | http1::Failure::Failed(error)) => {
                    return Err(error);
                }
            }
        }
    }
}

/// How many requests one HTTP/2 connection carries before another is opened. Upstreams cap the
/// streams of a connection (nginx at 128, Cloudflare at 256); a request past the cap would wait
/// for a stream to end, and an SSE stream can last minutes.
const STREAMS_PER_CONNECTION: usize = 100;

/// When the least busy HTTP/2 connection carries this many requests, the next one is opened.
const OPEN_NEXT_AT: usize = STREAMS_PER_CONNECTION * 3 / 4;

/// At most this many spare HTTP/1.1 connections are opened at once: enough for the pool to
/// catch up with a rising load in a few handshakes' time, few enough not to flood an upstream
/// that is slow to accept.
const MAX_SPARES_DIALING: usize = 4;

/// How many requests in flight over HTTP/1.1 make a load: when one of them takes the last idle
/// connection, a spare is opened for the next. A lone client's requests, one after another, do
/// not open a second connection.
const SPARE_FROM_BUSY: usize = 2;

/// How often a request that never left (its connection closed just before) is tried again.
const MAX_RETRIES: u32 = 3;

/// One worker's connections. Only that worker uses it, so its lock is never contended.
struct Pool {
    state: Mutex<PoolState>,
    dialer: Arc<Dialer>,
    idle_timeout: Duration,
    max_idle: usize,
}

struct PoolState {
    /// Whether the upstream's last new connection spoke HTTP/2 (what the next is expected to).
    http2: bool,
    /// HTTP/2 connections, each carrying many requests.
    lanes: Vec<Lane>,
    /// The HTTP/2 connection being opened, which every request that needs one waits for.
    connecting: Option<Connecting>,
    /// HTTP/1.1 connections between requests, oldest first; the newest is reused first, so that
    /// the oldest go idle long enough to be closed when fewer are needed.
    idle: Vec<Idle>,
    /// Whether a task is closing idle connections.
    reaping: bool,
    /// Spare HTTP/1.1 connections being opened.
    spares_dialing: usize,
    /// Cloned into each HTTP/1.1 connection while it carries a request, so that its count says
    /// how many are busy (an upgraded or closed connection drops its clone with it).
    busy: Arc<()>,
}

type Connecting = Shared<BoxFuture<'static, Result<(), ProxyError>>>;

struct Lane {
    sender: http2::SendRequest<RequestBody>,
    load: Arc<Load>,
}

struct Idle {
    conn: http1::Connection,
    since: Instant,
}

enum Checkout {
    Stream(http2::SendRequest<RequestBody>, InFlight),
    Idle(http1::Connection),
    /// For the HTTP/2 connection being opened, which the request then goes on.
    Wait(Connecting),
    /// For the HTTP/1.1 connection opened ahead of requests: then for whatever is idle.
    Preconnecting(Connecting),
    /// A new connection of the request's own, busy from the start.
    Dial(Arc<()>),
}

impl Pool {
    fn new(config: &Config, dialer: Arc<Dialer>) -> Self {
        Self {
            state: Mutex::new(PoolState {
                http2: dialer.offers_h2,
                lanes: Vec::new(),
                connecting: None,
                idle: Vec::new(),
                reaping: false,
                spares_dialing: 0,
                busy: Arc::new(()),
            }),
            dialer,
            idle_timeout: config.pool_idle_timeout.0,
            max_idle: config.pool_max_idle,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the next request goes. A ready HTTP/1.1 connection first: it costs a request the
    /// least CPU and time. When none is ready and the upstream speaks HTTP/2, the request goes
    /// on an HTTP/2 connection, which carries many at once and so has no handshake to wait for,
    /// while HTTP/1.1 connections are opened in the background (four at a time) for the
    /// requests to come: a burst of new streams rides HTTP/2 while the HTTP/1.1 pool grows to
    /// the steady load. Otherwise, or when the request must stay HTTP/1.1 (`http1_only`), it
    /// opens an HTTP/1.1 connection of its own.
    fn checkout(self: &Arc<Self>, http1_only: bool) -> Checkout {
        let mut state = self.lock();
        let now = Instant::now();
        while let Some(mut idle) = state.idle.pop() {
            if idle.since + self.idle_timeout <= now {
                // Put back in time order: everything under it has been idle longer still.
                state.idle.clear();
                break;
            }
            if idle.conn.is_usable() {
                let mut conn = idle.conn;
                conn.busy = Some(state.busy.clone());
                self.keep_a_spare(&mut state);
                return Checkout::Idle(conn);
            }
        }
        if !state.http2 {
            // A connection opened ahead of requests (at start, after a reload) is nearly there.
            if let Some(connecting) = &state.connecting {
                return Checkout::Preconnecting(connecting.clone());
            }
            return self.dial(&mut state);
        }
        if http1_only {
            return self.dial(&mut state);
        }
        state.lanes.retain(|lane| !lane.sender.is_closed());
        let least_busy = state
            .lanes
            .iter()
            .map(|lane| (lane, lane.load.in_flight.load(Ordering::Relaxed)))
            .min_by_key(|&(_, in_flight)| in_flight);
        if let Some((lane, in_flight)) = least_busy
            && in_flight < STREAMS_PER_CONNECTION
        {
            let checkout = Checkout::Stream(lane.sender.clone(), lane.load.take());
            // No more spares at once than requests riding this connection for want of one.
            let spares = MAX_SPARES_DIALING.min(in_flight + 1);
            if state.spares_dialing < spares && state.idle.len() < self.max_idle {
                state.spares_dialing += 1;
                tokio::spawn(self.dial_spare());
            }
            if in_flight + 1 >= OPEN_NEXT_AT && state.connecting.is_none() {
                // Every connection is filling up: open the next one now, in the background,
                // so that no request has to wait for its handshake.
                let connecting = self.connect_lane();
                state.connecting = Some(connecting.clone());
                tokio::spawn(connecting);
            }
            return checkout;
        }
        let connecting = state
            .connecting
            .get_or_insert_with(|| self.connect_lane())
            .clone();
        Checkout::Wait(connecting)
    }

    /// The request opens a connection of its own, busy from the start.
    fn dial(self: &Arc<Self>, state: &mut PoolState) -> Checkout {
        let busy = state.busy.clone();
        self.keep_a_spare(state);
        Checkout::Dial(busy)
    }

    /// Under load, a request that leaves no connection idle has a spare opened for the next
    /// one, so that it finds a connection ready instead of waiting for a handshake: a rising
    /// load (new streams arriving faster than handshakes complete) stays one connection ahead.
    fn keep_a_spare(self: &Arc<Self>, state: &mut PoolState) {
        let busy = Arc::strong_count(&state.busy) - 1;
        if state.idle.is_empty() && busy >= SPARE_FROM_BUSY && state.spares_dialing == 0 {
            state.spares_dialing += 1;
            tokio::spawn(self.dial_spare());
        }
    }

    /// A new connection that the requests waiting for it share, rather than each opening one.
    /// It is driven by whichever of them polls; if they all give up, the next request resumes it.
    fn connect_lane(self: &Arc<Self>) -> Connecting {
        let pool = Arc::downgrade(self);
        let dialer = self.dialer.clone();
        async move {
            let connected = dialer.dial().await;
            let Some(pool) = pool.upgrade() else {
                return connected.map(drop);
            };
            pool.lock().connecting = None;
            match connected? {
                Connected::Http2(sender) => pool.add_lane(sender),
                // The upstream chose HTTP/1.1: one request can use this connection, the others
                // open their own.
                Connected::Http1(conn) => {
                    pool.lock().http2 = false;
                    pool.put_idle(conn);
                }
            }
            Ok(())
        }
        .boxed()
        .shared()
    }

    fn dial_spare(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        let pool = Arc::downgrade(self);
        let dialer = self.dialer.clone();
        async move {
            let dialed = dialer.dial_http1().await;
            let Some(pool) = pool.upgrade() else {
                return;
            };
            pool.lock().spares_dialing -= 1;
            match dialed {
                Ok(conn) => {
                    tracing::debug!("a spare upstream connection is ready");
                    pool.put_idle(conn);
                }
                Err(error) => tracing::debug!(%error, "could not open a spare upstream connection"),
            }
        }
    }

    fn add_lane(self: &Arc<Self>, sender: http2::SendRequest<RequestBody>) {
        let mut state = self.lock();
        state.http2 = true;
        state.lanes.push(Lane {
            sender,
            load: Arc::new(Load::new()),
        });
        self.reap_later(&mut state);
    }

    fn put_idle(self: &Arc<Self>, mut conn: http1::Connection) {
        conn.busy = None;
        let mut state = self.lock();
        if state.idle.len() >= self.max_idle {
            return;
        }
        state.idle.push(Idle {
            conn,
            since: Instant::now(),
        });
        self.reap_later(&mut state);
    }

    /// Starts the task that closes connections idle for `idle_timeout`, unless it runs already.
    /// It ends when the pool is empty or gone, so an idle proxy has no timer firing.
    fn reap_later(self: &Arc<Self>, state: &mut PoolState) {
        if state.reaping {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        state.reaping = true;
        runtime.spawn(reap(Arc::downgrade(self), self.idle_timeout));
    }
}

async fn reap(weak: Weak<Pool>, timeout: Duration) {
    let mut next = Instant::now() + timeout;
    loop {
        tokio::time::sleep_until(next).await;
        let Some(pool) = weak.upgrade() else {
            return;
        };
        let mut state = pool.lock();
        let now = Instant::now();
        state.idle.retain(|idle| idle.since + timeout > now);
        state.lanes.retain(|lane| {
            !lane.sender.is_closed() && lane.load.idle_since().is_none_or(|t| t + timeout > now)
        });
        if state.idle.is_empty() && state.lanes.is_empty() {
            state.reaping = false;
            return;
        }
        let lanes = state
            .lanes
            .iter()
            .map(|lane| lane.load.idle_since().unwrap_or(now) + timeout);
        let idle = state.idle.first().map(|idle| idle.since + timeout);
        next = lanes.chain(idle).min().unwrap_or(now + timeout);
    }
}

/// The requests on an HTTP/2 connection, and since when it has had none.
struct Load {
    in_flight: AtomicUsize,
    born: Instant,
    /// Nanoseconds after `born`; meaningful while `in_flight` is 0.
    idle_since: AtomicU64,
}

impl Load {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            born: Instant::now(),
            idle_since: AtomicU64::new(0),
        }
    }

    fn take(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn release(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            // Racing a take on another thread can only leave an older time, which at worst
            // closes an idle connection early.
            let nanos = u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.idle_since.store(nanos, Ordering::Relaxed);
        }
    }

    fn idle_since(&self) -> Option<Instant> {
        (self.in_flight.load(Ordering::Relaxed) == 0)
            .then(|| self.born + Duration::from_nanos(self.idle_since.load(Ordering::Relaxed)))
    }
}

/// A response's share of its HTTP/2 connection, held by the response body until it ends or is
/// dropped.
pub struct InFlight(Arc<Load>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// A response body from the upstream, holding its connection (HTTP/1.1) or its share of one
/// (HTTP/2) until it ends or is dropped.
pub enum UpstreamBody {
    Http1(http1::ResponseBody),
    Http2 { body: Incoming, _lease: InFlight },
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Self::Http1(body) => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
            Self::Http2 { body, .. } => Pin::new(body).poll_frame(cx).map_err(BodyError::from),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Http1(body) => body.is_end_stream(),
            Self::Http2 { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Http1(body) => body.size_hint(),
            Self::Http2 { body, .. } => body.size_hint(),
        }
    }
}

/// Opens connections to the upstream: TCP to the url's host and port, TLS with the configured
/// host as server name (like `curl --connect-to`), then HTTP/2 or HTTP/1.1 as ALPN decides.
struct Dialer {
    /// The url's host and port, as addresses to connect to.
    resolver: Arc<resolve::Resolver>,
    /// None for an http:// upstream.
    tls: Option<Tls>,
    /// The proxy every connection goes through, when there is one.
    egress: Option<Egress>,
    offers_h2: bool,
    connect_timeout: Duration,
    http2: http2::Builder<TokioExecutor>,
}

struct Tls {
    /// Offers h2 when the config allows it.
    pooled: tokio_rustls::TlsConnector,
    /// Offers only http/1.1: for upgrades and the pool of HTTP/1.1 connections.
    http1: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

enum Connected {
    Http1(http1::Connection),
    Http2(http2::SendRequest<RequestBody>),
}

enum Transport {
    Plain(Link),
    Tls(Box<tokio_rustls::client::TlsStream<Link>>),
}

impl Dialer {
    async fn dial(&self) -> Result<Connected, ProxyError> {
        match self.transport(false).await? {
            Transport::Tls(tls) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                let (sender, connection) = self
                    .http2
                    .handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| failure(&e))?;
                let open = crate::metrics::Open::upstream_connection();
                tokio::spawn(async move {
                    let _open = open;
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "upstream HTTP/2 connection failed");
                    }
                });
                Ok(Connected::Http2(sender))
            }
            Transport::Tls(tls) => Ok(Connected::Http1(http1::Connection::new(tls))),
            Transport::Plain(link) => Ok(Connected::Http1(http1::Connection::new(Box::new(link)))),
        }
    }

    /// An HTTP/1.1 connection, whatever the upstream would prefer: for upgrades, which cannot
    /// ride HTTP/2, and for the pool of HTTP/1.1 connections.
    async fn dial_http1(&self) -> Result<http1::Connection, ProxyError> {
        let io: http1::Stream = match self.transport(true).await? {
            Transport::Tls(tls) => tls,
            Transport::Plain(link) => Box::new(link),
        };
        Ok(http1::Connection::new(io))
    }

    /// TCP (or a tunnel through the egress proxy), then TLS for https://, both within the
    /// connect timeout.
    async fn transport(&self, http1_only: bool) -> Result<Transport, ProxyError> {
        let limit = self.connect_timeout;
        let connecting = async {
            let link = match &self.egress {
                Some(egress) => egress.connect(&self.resolver).await?,
                None => Link::Tcp(self.tcp().await?),
            };
            let Some(tls) = &self.tls else {
                return Ok(Transport::Plain(link));
            };
            let connector = if http1_only { &tls.http1 } else { &tls.pooled };
            match connector.connect(tls.server_name.clone(), link).await {
                Ok(stream) => {
                    let session = stream.get_ref().1;
                    tracing::debug!(
                        alpn = ?session.alpn_protocol().map(String::from_utf8_lossy),
                        handshake = ?session.handshake_kind(),
                        "upstream connection opened"
                    );
                    Ok(Transport::Tls(Box::new(stream)))
                }
                Err(e) => Err(tls_failure(&e)),
            }
        };
        let transport = tokio::time::timeout(limit, connecting)
            .await
            .unwrap_or_else(|_| {
                Err(match &self.egress {
                    Some(egress) => egress.timed_out(limit),
                    None => ProxyError::UpstreamUnreachable(format!(
                        "connect timed out after {limit:?}"
                    )),
                })
            });
        crate::metrics::upstream_dialed(match &transport {
            Ok(transport) => Ok(matches!(transport, Transport::Tls(_))),
            Err(_) => Err(()),
        });
        transport
    }

    async fn tcp(&self) -> Result<TcpStream, ProxyError> {
        let unreachable = ProxyError::UpstreamUnreachable;
        let addrs = self.resolver.addrs().await.map_err(unreachable)?;
        let tcp = match connect_any(&addrs).await {
            Ok(tcp) => tcp,
            Err(failed) => match self.resolver.after_failure(&addrs).await {
                Some(moved) => connect_any(&moved).await.map_err(unreachable)?,
                None => return Err(unreachable(failed)),
            },
        };
        egress::socket_options(&tcp)
            .map_err(|e| unreachable(format!("tcp socket options: {e}")))?;
        Ok(tcp)
    }
}

/// A TCP connection to the first of `addrs` that takes one; else why the last one did not.
async fn connect_any(addrs: &[SocketAddr]) -> Result<TcpStream, String> {
    let mut last = None;
    for &addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(format!("tcp connect to {addr}: {e}")),
        }
    }
    Err(last.unwrap_or_else(|| "no address to connect to".to_owned()))
}

/// Names where a failed request went wrong, from the error's chain of causes.
fn failure(error: &hyper::Error) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(body) = e.downcast_ref::<crate::body::BodyError>() {
            return body.to_proxy_error();
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return ProxyError::UpstreamTls(tls.to_string());
        }
        source = cause(e);
    }
    ProxyError::UpstreamProtocol(chain(error))
}

/// A failed TLS handshake: a rustls error or a connection lost on the way.
fn tls_failure(error: &io::Error) -> ProxyError {
    match tls_error(error) {
        Some(tls) => ProxyError::UpstreamTls(tls.to_string()),
        None => ProxyError::UpstreamUnreachable(format!("TLS handshake: {}", chain(error))),
    }
}

/// The rustls error an I/O error carries, however deep io::Error's wrapping put it.
fn tls_error(error: &io::Error) -> Option<&rustls::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        source = cause(e);
    }
    None
}

/// The next error in the chain. An io::Error's source() skips the error it wraps (which may
/// itself be an io::Error wrapping a rustls::Error), so step into it instead.
fn cause<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    match error
        .downcast_ref::<io::Error>()
        .and_then(io::Error::get_ref)
    {
        Some(inner) => Some(inner),
        None => error.source(),
    }
}

fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

fn client_tls(
    config: &Config,
    file: &ConfigFile,
    ca_pem: Option<&[u8]>,
) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    // A damaged certificate in the system store is skipped, as every TLS client does.
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let (Some(pem), Some(key)) = (ca_pem, &config.ca_file) {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| {
                file.error_at(
                    key.span(),
                    format!("{}: bad PEM: {e}", key.get_ref().display()),
                )
            })?;
            roots.add(cert).map_err(|e| {
                file.error_at(
                    key.span(),
                    format!("{}: unusable CA certificate: {e}", key.get_ref().display()),
                )
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(file.error_at(
                key.span(),
                format!("{} holds no PEM certificate", key.get_ref().display()),
            ));
        }
    }
    if roots.is_empty() {
        return Err(ConfigError::File {
            path: file.path.clone(),
            message: "no trust roots: the system store is empty and no upstream.ca_file is set"
                .into(),
        });
    }
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first, as browsers order it: 128-bit security, and its ten AES rounds to
    // AES-256's fourteen make every byte to and from the upstream cheaper for both ends.
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}
