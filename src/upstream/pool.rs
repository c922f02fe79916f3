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

use super::dial::{Connected, Dialer};
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

    /// A connection for a request (HTTP/1.1 when `http1_only`): one the pool has, or the one
    /// being opened once it is open, or a new one of the request's own, as `plan` says.
    pub async fn ready(self: &Arc<Self>, http1_only: bool) -> Result<Ready, ProxyError> {
        loop {
            let busy = match self.checkout(http1_only, Instant::now()) {
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
            let mut conn = if http1_only {
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
    fn checkout(self: &Arc<Self>, http1_only: bool, now: Instant) -> Checkout {
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
            http1_only,
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
