//! One worker's connections to the upstream: HTTP/2 connections (lanes) that carry many requests
//! each, HTTP/1.1 connections idle between requests, the connections being opened, and the task
//! that closes those idle for too long.
//!
//! Where a request goes is `plan`'s decision, a pure function of the pool's state in numbers
//! (`Facts`); `checkout` gathers them, carries the plan out, and `ready` waits for or dials the
//! connection it names.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use hyper::client::conn::http2;
use tokio::time::Instant;

use super::dial::{Connected, Dialer, Protocols};
use super::load::{InFlight, Load};
use super::{Config, http1};
use crate::body::RequestBody;
use crate::error::ProxyError;

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

/// One worker's connections. Only that worker uses it, so its lock is never contended.
pub(super) struct Pool {
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

pub(super) type Connecting = Shared<BoxFuture<'static, Result<(), ProxyError>>>;

struct Lane {
    sender: http2::SendRequest<RequestBody>,
    load: Arc<Load>,
}

struct Idle {
    conn: http1::Connection,
    since: Instant,
}

/// A connection ready for a request.
pub(super) enum Ready {
    /// A stream of an HTTP/2 connection, with the request's share of that connection.
    Stream(http2::SendRequest<RequestBody>, InFlight),
    /// An HTTP/1.1 connection, counted busy while it carries the request.
    Http1(http1::Connection),
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

/// What a checkout decides by: the pool's state, in numbers.
#[derive(Debug, Clone, Copy, Default)]
struct Facts {
    /// The request must go over HTTP/1.1 (it has been written out for it already).
    http1_only: bool,
    /// An idle HTTP/1.1 connection, checked usable, waits for the request.
    idle_ready: bool,
    /// Idle HTTP/1.1 connections besides that one.
    idle: usize,
    /// HTTP/1.1 connections carrying a request.
    busy: usize,
    spares_dialing: usize,
    max_idle: usize,
    /// Whether the upstream is expected to speak HTTP/2.
    http2: bool,
    /// Whether a connection is being opened: an HTTP/2 one, or one ahead of requests.
    connecting: bool,
    /// The open HTTP/2 connection that carries the fewest requests: its index, and how many.
    least_busy: Option<(usize, usize)>,
}

/// Where a request goes, and what is opened in the background for those that follow.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    take: Take,
    /// Open a spare HTTP/1.1 connection.
    spare: bool,
    /// Open another HTTP/2 connection.
    open_next: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Take {
    Idle,
    Lane(usize),
    Wait,
    Preconnecting,
    Dial,
}

/// Where the next request goes. A ready HTTP/1.1 connection first: it costs a request the
/// least CPU and time. When none is ready and the upstream speaks HTTP/2, the request goes on
/// an HTTP/2 connection, which carries many at once and so has no handshake to wait for, while
/// HTTP/1.1 connections are opened in the background (four at a time) for the requests to come:
/// a burst of new streams rides HTTP/2 while the HTTP/1.1 pool grows to the steady load.
/// Otherwise, or when the request must stay HTTP/1.1, it opens an HTTP/1.1 connection of its own.
fn plan(facts: &Facts) -> Plan {
    // Under load, a request that leaves no connection idle has a spare opened for the next one,
    // so that it finds a connection ready instead of waiting for a handshake: a rising load
    // (new streams arriving faster than handshakes complete) stays one connection ahead.
    let under_load = facts.busy + 1 >= SPARE_FROM_BUSY;
    let http1 = |take| Plan {
        take,
        spare: facts.idle == 0 && under_load && facts.spares_dialing == 0,
        open_next: false,
    };
    let alone = |take| Plan {
        take,
        spare: false,
        open_next: false,
    };
    if facts.idle_ready {
        return http1(Take::Idle);
    }
    if !facts.http2 {
        // A connection opened ahead of requests (at start, after a reload) is nearly there.
        if facts.connecting {
            return alone(Take::Preconnecting);
        }
        return http1(Take::Dial);
    }
    if facts.http1_only {
        return http1(Take::Dial);
    }
    match facts.least_busy {
        Some((lane, in_flight)) if in_flight < STREAMS_PER_CONNECTION => Plan {
            take: Take::Lane(lane),
            // No more spares at once than requests riding this connection for want of one.
            spare: facts.spares_dialing < MAX_SPARES_DIALING.min(in_flight + 1)
                && facts.idle < facts.max_idle,
            // Every connection is filling up: open the next one now, so that no request has to
            // wait for its handshake.
            open_next: in_flight + 1 >= OPEN_NEXT_AT && !facts.connecting,
        },
        _ => alone(Take::Wait),
    }
}

impl Pool {
    pub fn new(config: &Config, dialer: Arc<Dialer>) -> Self {
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

    /// A connection for a request, speaking `protocols`: one the pool has, or the one
    /// being opened once it is open, or a new one of the request's own, as `plan` says.
    pub async fn ready(self: &Arc<Self>, protocols: Protocols) -> Result<Ready, ProxyError> {
        loop {
            let busy = match self.checkout(protocols, Instant::now()) {
                Checkout::Stream(sender, in_flight) => return Ok(Ready::Stream(sender, in_flight)),
                Checkout::Idle(conn) => return Ok(Ready::Http1(conn)),
                Checkout::Wait(connecting) => {
                    connecting.await?;
                    continue;
                }
                // Its failure is not this request's: it dials its own next.
                Checkout::Preconnecting(connecting) => {
                    let _ = connecting.await;
                    continue;
                }
                Checkout::Dial(busy) => busy,
            };
            // Boxed: what is rare should not make every request's state larger, since that
            // state is moved as a whole.
            let mut conn = if protocols == Protocols::Http1Only {
                Box::pin(self.dialer.dial_http1()).await?
            } else {
                match Box::pin(self.dialer.dial()).await? {
                    Connected::Http1(conn) => conn,
                    Connected::Http2(sender) => {
                        self.add_lane(sender);
                        continue;
                    }
                }
            };
            conn.busy = Some(busy);
            return Ok(Ready::Http1(conn));
        }
    }

    /// Where the next request goes, as of `now`, per `plan`; starts what the plan opens.
    fn checkout(self: &Arc<Self>, protocols: Protocols, now: Instant) -> Checkout {
        let mut state = self.lock();
        let idle = self.take_idle(&mut state, now);
        state.lanes.retain(|lane| !lane.sender.is_closed());
        let least_busy = state
            .lanes
            .iter()
            .map(|lane| lane.load.in_flight())
            .enumerate()
            .min_by_key(|&(_, in_flight)| in_flight);
        let plan = plan(&Facts {
            http1_only: protocols == Protocols::Http1Only,
            idle_ready: idle.is_some(),
            idle: state.idle.len(),
            busy: Arc::strong_count(&state.busy) - 1,
            spares_dialing: state.spares_dialing,
            max_idle: self.max_idle,
            http2: state.http2,
            connecting: state.connecting.is_some(),
            least_busy,
        });
        if plan.spare {
            state.spares_dialing += 1;
            tokio::spawn(self.dial_spare());
        }
        if plan.open_next {
            let connecting = self.connect_lane();
            state.connecting = Some(connecting.clone());
            tokio::spawn(connecting);
        }
        match plan.take {
            Take::Idle => {
                let mut conn = idle.expect("an idle connection is taken only when there is one");
                conn.busy = Some(state.busy.clone());
                Checkout::Idle(conn)
            }
            Take::Lane(index) => {
                let lane = &state.lanes[index];
                Checkout::Stream(lane.sender.clone(), lane.load.take())
            }
            Take::Wait => {
                let connecting = state.connecting.get_or_insert_with(|| self.connect_lane());
                Checkout::Wait(connecting.clone())
            }
            Take::Preconnecting => match &state.connecting {
                Some(connecting) => Checkout::Preconnecting(connecting.clone()),
                None => unreachable!("a preconnecting pool is connecting"),
            },
            Take::Dial => Checkout::Dial(state.busy.clone()),
        }
    }

    /// The newest idle connection that is usable and not idle past the timeout as of `now`; the
    /// unusable ones it passes are dropped, and the timed-out ones, all older, are closed.
    fn take_idle(&self, state: &mut PoolState, now: Instant) -> Option<http1::Connection> {
        while let Some(mut idle) = state.idle.pop() {
            if idle.since + self.idle_timeout <= now {
                // Put back in time order: everything under it has been idle longer still.
                state.idle.clear();
                return None;
            }
            if idle.conn.is_usable() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// A connection opened ahead of the first request, unless the pool has one or is opening
    /// one. Marked as connecting before any request can look, so that the first requests wait
    /// for it rather than open their own beside it.
    pub fn preconnect(self: &Arc<Self>) -> Option<Connecting> {
        let mut state = self.lock();
        if !state.lanes.is_empty() || !state.idle.is_empty() || state.connecting.is_some() {
            return None;
        }
        Some(state.connecting.insert(self.connect_lane()).clone())
    }

    /// Connections open and carrying no request.
    pub fn connections_idle(&self) -> usize {
        let state = self.lock();
        let lanes = state.lanes.iter();
        state.idle.len() + lanes.filter(|l| l.load.idle_since().is_some()).count()
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

    /// Back from a request that has ended, to carry the next; closed when the pool holds as
    /// many idle as it keeps.
    pub fn put_idle(self: &Arc<Self>, mut conn: http1::Connection) {
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::{HeaderValue, Request, Response};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::config::upstream::UpstreamUrl;

    /// A pool whose upstream speaks HTTP/1.1, as an http:// one does.
    fn http1() -> Facts {
        Facts {
            max_idle: 256,
            ..Facts::default()
        }
    }

    /// A pool with one HTTP/2 connection that carries `in_flight` requests.
    fn http2(in_flight: usize) -> Facts {
        Facts {
            http2: true,
            least_busy: Some((0, in_flight)),
            ..http1()
        }
    }

    #[test]
    fn an_idle_connection_goes_first() {
        for facts in [http1(), http2(0), http2(STREAMS_PER_CONNECTION)] {
            for http1_only in [false, true] {
                let facts = Facts {
                    idle_ready: true,
                    http1_only,
                    ..facts
                };
                assert_eq!(plan(&facts).take, Take::Idle, "{facts:?}");
            }
        }
    }

    #[test]
    fn with_none_idle_a_request_dials_its_own() {
        assert_eq!(plan(&http1()).take, Take::Dial);
        let written_out = Facts {
            http1_only: true,
            ..http2(0)
        };
        assert_eq!(plan(&written_out).take, Take::Dial);
        // Unless a connection opened ahead of requests is on its way.
        let preconnecting = Facts {
            connecting: true,
            ..http1()
        };
        let waits = Plan {
            take: Take::Preconnecting,
            spare: false,
            open_next: false,
        };
        assert_eq!(plan(&preconnecting), waits);
    }

    #[test]
    fn an_http2_connection_carries_up_to_streams_per_connection() {
        assert_eq!(plan(&http2(0)).take, Take::Lane(0));
        let busiest = Facts {
            least_busy: Some((3, STREAMS_PER_CONNECTION - 1)),
            ..http2(0)
        };
        assert_eq!(plan(&busiest).take, Take::Lane(3));
        assert_eq!(plan(&http2(STREAMS_PER_CONNECTION)).take, Take::Wait);
        let none_yet = Facts {
            least_busy: None,
            ..http2(0)
        };
        assert_eq!(plan(&none_yet).take, Take::Wait);
    }

    #[test]
    fn the_next_http2_connection_opens_at_open_next_at() {
        assert!(!plan(&http2(OPEN_NEXT_AT - 2)).open_next);
        assert!(plan(&http2(OPEN_NEXT_AT - 1)).open_next);
        assert!(plan(&http2(STREAMS_PER_CONNECTION - 1)).open_next);
        let opening = Facts {
            connecting: true,
            ..http2(OPEN_NEXT_AT)
        };
        assert!(!plan(&opening).open_next);
        // A request that waits for the next connection opens it itself, not in the background.
        assert!(!plan(&http2(STREAMS_PER_CONNECTION)).open_next);
    }

    #[test]
    fn spares_open_beside_http2_as_requests_ride_it() {
        let spare = |in_flight, spares_dialing, idle| {
            let facts = Facts {
                spares_dialing,
                idle,
                ..http2(in_flight)
            };
            plan(&facts).spare
        };
        // No more at once than the requests riding HTTP/2 for want of one.
        assert!(spare(0, 0, 0));
        assert!(!spare(0, 1, 0));
        assert!(spare(2, 2, 0));
        assert!(!spare(2, 3, 0));
        assert!(spare(50, MAX_SPARES_DIALING - 1, 0));
        assert!(!spare(50, MAX_SPARES_DIALING, 0));
        // Nor past what the pool keeps idle.
        assert!(spare(50, 0, 255));
        assert!(!spare(50, 0, 256));
        let full = Facts {
            spares_dialing: 0,
            ..http2(STREAMS_PER_CONNECTION)
        };
        assert!(!plan(&full).spare);
    }

    #[test]
    fn http1_spares_open_under_load_only() {
        let spare = |busy, idle, spares_dialing, idle_ready| {
            let facts = Facts {
                busy,
                idle,
                spares_dialing,
                idle_ready,
                ..http1()
            };
            plan(&facts).spare
        };
        // A lone client's requests, one after another.
        assert!(!spare(0, 0, 0, false));
        assert!(!spare(0, 0, 0, true));
        assert!(spare(SPARE_FROM_BUSY - 1, 0, 0, false));
        assert!(spare(SPARE_FROM_BUSY - 1, 0, 0, true));
        // One is left idle for the next request, or a spare is on its way already.
        assert!(!spare(SPARE_FROM_BUSY, 1, 0, true));
        assert!(!spare(SPARE_FROM_BUSY, 0, 1, false));
    }

    /// An HTTP/1.1 upstream on 127.0.0.1 that answers each request with its connection's
    /// number, counted from 0 in the order they were accepted.
    async fn http1_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let number = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(answer(tcp, number));
            }
        });
        (addr, accepted)
    }

    /// Answers each bodiless request on `tcp` with `number`, until the client closes it.
    async fn answer(mut tcp: TcpStream, number: usize) {
        let body = number.to_string();
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut head = Vec::new();
        let mut byte = [0; 1];
        while tcp.read(&mut byte).await.is_ok_and(|n| n == 1) {
            head.push(byte[0]);
            if head.ends_with(b"\r\n\r\n") {
                head.clear();
                if tcp.write_all(response.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }

    /// A pool that dials `addr` over http://, with the default timeouts and limits.
    fn pool(addr: SocketAddr) -> Arc<Pool> {
        let config = Config {
            url: UpstreamUrl::parse(&format!("http://{addr}")).unwrap(),
            ..Config::default()
        };
        let dialer = Arc::new(Dialer::new(&config, None, None));
        Arc::new(Pool::new(&config, dialer))
    }

    /// Sends a GET over the HTTP/1.1 connection the pool has ready, and returns its response,
    /// whose body holds the connection until it is read to its end.
    async fn get(pool: &Arc<Pool>) -> Response<http1::ResponseBody> {
        let Ready::Http1(conn) = pool.ready(Protocols::Any).await.unwrap() else {
            panic!("an http:// upstream is spoken to over HTTP/1.1");
        };
        let request = Request::get("/").body(RequestBody::empty()).unwrap();
        let host = HeaderValue::from_static("upstream");
        let mut out = http1::Outgoing::new(request, &host, crate::headers::Exchange::Plain);
        match http1::exchange(conn, &mut out, &Arc::downgrade(pool)).await {
            Ok((response, _)) => response,
            Err(_) => panic!("the upstream answers"),
        }
    }

    async fn text<B: hyper::body::Body<Error: std::fmt::Debug>>(response: Response<B>) -> String {
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_request_reuses_the_connection_the_last_one_left_idle() {
        let (addr, accepted) = http1_upstream().await;
        let pool = pool(addr);
        for _ in 0..3 {
            assert_eq!(text(get(&pool).await).await, "0");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.connections_idle(), 1);
    }

    #[tokio::test]
    async fn a_request_that_finds_none_idle_dials_a_new_connection() {
        let (addr, _) = http1_upstream().await;
        let pool = pool(addr);
        let first = get(&pool).await;
        // The first one's body, unread, holds its connection.
        assert_ne!(text(get(&pool).await).await, "0");
        assert_eq!(text(first).await, "0");
    }

    #[tokio::test]
    async fn an_idle_connection_past_its_timeout_is_not_handed_out() {
        let (addr, _) = http1_upstream().await;
        let pool = pool(addr);
        let put = Instant::now();
        pool.put_idle(pool.dialer.dial_http1().await.unwrap());
        let almost = put + pool.idle_timeout - Duration::from_millis(1);
        assert!(matches!(
            pool.checkout(Protocols::Any, almost),
            Checkout::Idle(_)
        ));
        pool.put_idle(pool.dialer.dial_http1().await.unwrap());
        let past = Instant::now() + pool.idle_timeout;
        assert!(matches!(
            pool.checkout(Protocols::Any, past),
            Checkout::Dial(_)
        ));
        assert_eq!(
            pool.connections_idle(),
            0,
            "a timed-out connection is closed"
        );
    }

    /// An HTTP/2 connection to an upstream on 127.0.0.1 that answers every request with "ok".
    async fn http2_lane(pool: &Pool) -> http2::SendRequest<RequestBody> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|_: Request<Incoming>| async {
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("ok"))))
            });
            let server = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            let _ = server.serve_connection(TokioIo::new(tcp), service).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        pool.dialer.handshake(TokioIo::new(tcp)).await.unwrap()
    }

    #[tokio::test]
    async fn requests_share_an_http2_connection_up_to_streams_per_connection() {
        // Where the connections opened in the background go: nowhere, so that whenever they
        // run, they leave the pool as it was.
        let refused = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = pool(refused.local_addr().unwrap());
        drop(refused);
        let lane = http2_lane(&pool).await;
        pool.add_lane(lane);
        // Those connections are opened only once this test awaits: each checkout's effect on the
        // pool is seen as it is.
        let mut streams = Vec::new();
        for n in 0..STREAMS_PER_CONNECTION {
            let Checkout::Stream(sender, in_flight) = pool.checkout(Protocols::Any, Instant::now())
            else {
                panic!("request {n} rides the HTTP/2 connection");
            };
            streams.push((sender, in_flight));
            let state = pool.lock();
            assert_eq!(
                state.spares_dialing,
                MAX_SPARES_DIALING.min(n + 1),
                "request {n}"
            );
            assert_eq!(
                state.connecting.is_some(),
                n + 1 >= OPEN_NEXT_AT,
                "request {n}"
            );
        }
        assert!(matches!(
            pool.checkout(Protocols::Any, Instant::now()),
            Checkout::Wait(_)
        ));
        // A second connection takes the requests the first has no room for.
        pool.add_lane(http2_lane(&pool).await);
        let Checkout::Stream(_, _in_flight) = pool.checkout(Protocols::Any, Instant::now()) else {
            panic!("the next request rides the second HTTP/2 connection");
        };
        assert_eq!(pool.lock().lanes[1].load.in_flight(), 1);
        // The streams handed out are the connection's own.
        let (mut sender, _in_flight) = streams.pop().unwrap();
        let request = Request::get("http://upstream/")
            .body(RequestBody::empty())
            .unwrap();
        assert_eq!(
            text(sender.send_request(request).await.unwrap()).await,
            "ok"
        );
    }
}
