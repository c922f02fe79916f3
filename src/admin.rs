//! The admin listener: `/metrics`, `/healthz`, `/readyz` and `/status`, on sockets of their own
//! (`[admin] listen`), never on a proxy listener.
//!
//! Its sockets are bound, adopted, stored and retired with the proxy's (see `listeners`); at a
//! stop they keep answering until the proxy's own connections have drained, so that `/readyz`
//! says 503 to a load balancer for as long as the drain lasts. It is served on the control
//! thread, apart from the workers, so a scrape costs the request path nothing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};

use crate::drain;
use crate::error::ProxyError;
use crate::generation::Live;
use crate::{metrics, server};

/// Connections open at once on each admin listener: a scraper and a few probes need few.
const MAX_CONNECTIONS: usize = 64;
/// For a request head to arrive, and for an idle kept-alive connection to be closed.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Set once the proxy begins to drain; `/readyz` answers 503 from then on.
static DRAINING: AtomicBool = AtomicBool::new(false);
/// The proxy's listeners as bound (port 0 resolved, with whether each speaks TLS) and the admin
/// ones: written by the control plane when they change, read by `/status`.
static LISTENING: Mutex<Listening> = Mutex::new(Listening {
    proxy: Vec::new(),
    admin: Vec::new(),
});

struct Listening {
    proxy: Vec<(SocketAddr, bool)>,
    admin: Vec<SocketAddr>,
}

pub fn set_draining() {
    DRAINING.store(true, Ordering::SeqCst);
}

/// Records the listeners as they are now bound, for `/status`.
pub fn publish(proxy: Vec<(SocketAddr, bool)>, admin: Vec<SocketAddr>) {
    *LISTENING.lock().unwrap_or_else(|p| p.into_inner()) = Listening { proxy, admin };
}

pub async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    live: Arc<Live>,
    drain: drain::Signal,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut draining = drain.draining();
    while let Some((stream, client, watch)) =
        server::accept(&listener, addr, &drain, &mut draining).await
    {
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(%client, "admin connection refused: too many open");
            continue;
        }
        let (live, open) = (live.clone(), open.clone());
        tokio::spawn(async move {
            serve_connection(stream, live, watch).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn serve_connection(stream: TcpStream, live: Arc<Live>, watch: drain::Watch) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let response = answer(&live, &request);
        async move { Ok::<_, Infallible>(response) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = watch.draining() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                _ = connection.as_mut() => {}
                () = watch.cut() => {}
            }
        }
    }
}

fn answer<B>(live: &Live, request: &Request<B>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        return not_found(path);
    }
    match path {
        "/healthz" => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        "/readyz" => readyz(live),
        "/status" => json(StatusCode::OK, &status(live)),
        "/metrics" => {
            let accept = request
                .headers()
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let format = metrics::Format::from_accept(accept);
            let generation = live.snapshot();
            let facts = metrics::Facts {
                generation: generation.number,
                loaded_at: generation.loaded_at,
                upstream_idle: generation.upstream.connections_idle(),
                limits_backend_down: crate::limits::health::is_down(),
            };
            let mut response =
                Response::new(Full::new(Bytes::from(metrics::render(format, &facts))));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            response
        }
        _ => not_found(path),
    }
}

fn not_found(path: &str) -> Response<Full<Bytes>> {
    ProxyError::PathNotAllowed(path.to_owned()).into_response(Full::new)
}

fn readyz(live: &Live) -> Response<Full<Bytes>> {
    let serving = !LISTENING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .proxy
        .is_empty();
    let (status, state) = if DRAINING.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !serving {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    } else {
        (StatusCode::OK, "ready")
    };
    let generation = live.snapshot().number;
    json(
        status,
        &serde_json::json!({"status": state, "generation": generation}),
    )
}

/// The facts of `STATUS=` and more, as JSON.
fn status(live: &Live) -> serde_json::Value {
    let (proxy, admin) = {
        let listening = LISTENING.lock().unwrap_or_else(|p| p.into_inner());
        (listening.proxy.clone(), listening.admin.clone())
    };
    let generation = live.snapshot();
    let upstream = &generation.config.upstream;
    let last_reload = metrics::last_reload().map(|r| {
        serde_json::json!({
            "result": if r.error.is_none() { "success" } else { "failure" },
            "at": unix_seconds(r.at),
            "error": r.error,
        })
    });
    serde_json::json!({
        "status": live.status(&proxy),
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "draining": DRAINING.load(Ordering::SeqCst),
        "generation": generation.number,
        "loaded_at": unix_seconds(generation.loaded_at),
        "listeners": proxy.iter().map(|(addr, tls)| serde_json::json!({
            "address": addr.to_string(),
            "tls": tls,
        })).collect::<Vec<_>>(),
        "admin_listeners": admin.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "upstreams": [{
            "url": upstream.url.to_string(),
            "host": upstream.host.as_ref().map(|h| h.as_str()),
            "state": metrics::upstream_state(),
            "connections_idle": generation.upstream.connections_idle(),
        }],
        "last_reload": last_reload,
    })
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
