//! Accepting connections and serving HTTP on them, each honouring its listener's drain.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::body::{Either, Inbound};

use crate::drain;
use crate::error::ProxyError;
use crate::generation::{Generation, Live};
use crate::http::http2::{self, Streams};
use crate::http::server::{self as http1, Handler};
use crate::http::{Activity, BoxIo, IncomingBody, Rewind};
use crate::proxy::access_log::RequestId;
use crate::proxy::{self, ResponseBody};

pub async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    live: Arc<Live>,
    drain: drain::Signal,
    connections: Arc<AtomicUsize>,
) {
    let mut draining = drain.draining();
    while let Some((stream, client, watch)) = accept(&listener, addr, &drain, &mut draining).await {
        let _ = stream.set_nodelay(true);
        let count = proxy::OpenConnection::new(&connections);
        tokio::spawn(serve_connection(
            stream,
            client,
            addr,
            live.clone(),
            watch,
            count,
        ));
    }
}

/// The next connection, with its drain watch; None once the listener's drain has begun.
pub async fn accept(
    listener: &TcpListener,
    addr: SocketAddr,
    drain: &drain::Signal,
    draining: &mut drain::PhaseWait,
) -> Option<(TcpStream, SocketAddr, drain::Watch)> {
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut *draining => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, client)) => return Some((stream, client, drain.watch()?)),
            Err(error) => {
                // Out of file descriptors, most likely: the connection waits in the backlog
                // until one is free, so pause rather than spin.
                tracing::warn!(%addr, %error, "accept failed");
                tokio::select! {
                    () = &mut *draining => return None,
                    () = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    client: SocketAddr,
    local: SocketAddr,
    live: Arc<Live>,
    drain: drain::Watch,
    count: proxy::OpenConnection,
) {
    let generation = live.snapshot();
    if count.open > generation.config.server.max_connections.0 {
        // Answered before anything is read, so that connections over the limit cost no buffer;
        // over TLS there is nothing to answer in before a handshake, so closed.
        if !generation.is_tls(local) {
            http1::refuse_overloaded(stream).await;
        }
        return;
    }
    let conn = Arc::new(proxy::Connection {
        live: live.clone(),
        client,
        drain,
        activity: proxy::Activity::default(),
        _open: count,
    });
    // The handshake, the first read and the first request head share one deadline.
    let first_request =
        tokio::time::Instant::now() + generation.config.server.header_read_timeout.0;
    let tls = generation.tls.as_ref().filter(|_| generation.is_tls(local));
    // One await of serve_http, not one per branch: a task is as large as its largest state, and
    // each await point of a future holds a slot of its own. The common case, an HTTP/1.1
    // connection waiting for its next request, should be small; so is the TLS handshake boxed.
    let (io, h2, cleartext): (BoxIo, bool, bool) = match tls {
        Some(acceptor) => {
            match tokio::time::timeout_at(first_request, Box::pin(acceptor.accept(stream))).await {
                Ok(Ok(stream)) => {
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    (Box::new(stream), h2, false)
                }
                Ok(Err(error)) => {
                    tracing::debug!(%client, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%client, "TLS handshake timed out");
                    return;
                }
            }
        }
        None => (Box::new(stream), false, true),
    };
    serve_http(io, h2, cleartext, first_request, &generation, conn).await;
}

/// HTTP/2 when TLS negotiated it or a cleartext client opens with its preface; HTTP/1.1 otherwise.
async fn serve_http(
    io: BoxIo,
    h2: bool,
    cleartext: bool,
    first_request: tokio::time::Instant,
    generation: &Generation,
    conn: Arc<proxy::Connection>,
) {
    let io = if h2 {
        Rewind::new(bytes::Bytes::new(), io)
    } else {
        let settings = generation.http1_settings();
        let served = tokio::select! {
            served = http1::serve(io, &settings, &conn, cleartext, first_request) => served,
            () = conn.drain.cut() => {
                tracing::debug!(client = %conn.client, waiting_for = conn.activity.describe(), "connection cut by the drain timeout");
                return;
            }
        };
        match served {
            http1::Served::Http2(io) => io,
            http1::Served::Closed => return,
        }
    };
    Box::pin(serve_http2(io, first_request, generation, conn)).await;
}

async fn serve_http2(
    io: Rewind<BoxIo>,
    first_request: tokio::time::Instant,
    generation: &Generation,
    conn: Arc<proxy::Connection>,
) {
    let drain = conn.drain.clone();
    let client = conn.client;
    conn.activity.set(proxy::Stage::Http2);
    let streams = Streams::new();
    let counted = streams.clone();
    let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let conn = conn.clone();
        let stream = counted.open();
        async move {
            let request = request.map(|body| Inbound::Direct(Either::Http2(body)));
            let mut response = proxy::handle(&conn, request).await;
            response.body_mut().hold_stream(stream);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = generation.http2.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let keepalive = generation.config.server.keepalive_timeout.0;
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = streams.idle(first_request, keepalive) => {
            // GOAWAY; a client that neither acknowledges it nor opens a stream meanwhile is
            // closed on.
            connection.as_mut().graceful_shutdown();
            let grace = tokio::time::Instant::now() + http2::GOAWAY_GRACE;
            tokio::select! {
                result = connection.as_mut() => result,
                () = streams.idle(grace, http2::GOAWAY_GRACE) => return,
            }
        }
        () = drain.draining() => {
            // GOAWAY: streams in flight finish, no new ones start.
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                () = drain.cut() => {
                    tracing::debug!(%client, "HTTP/2 connection cut by the drain timeout with streams in flight");
                    return;
                }
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%client, %error, "connection ended with an error");
    }
}

/// The proxy answers the requests of its client connections.
impl Handler for Arc<proxy::Connection> {
    type Body = ResponseBody;

    fn call(
        &self,
        request: http::Request<IncomingBody>,
    ) -> impl Future<Output = http::Response<ResponseBody>> + Send {
        proxy::handle(
            self,
            request.map(|body| Inbound::Direct(Either::Http1(body))),
        )
    }

    fn refuse(&self, error: ProxyError) -> http::Response<ResponseBody> {
        let mut response = error.into_response(ResponseBody::whole);
        response
            .headers_mut()
            .insert(RequestId::HEADER, RequestId::next().header_value());
        response
    }

    fn client(&self) -> SocketAddr {
        self.client
    }

    fn drain(&self) -> &drain::Watch {
        &self.drain
    }

    fn activity(&self) -> &Activity {
        &self.activity
    }
}
