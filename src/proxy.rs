//! One request's way through the proxy, in phases named as pingora's `ProxyHttp` names them.
//! `handle` runs them in this order; a feature plugs into the one phase that owns its concern:
//!
//! 1. request_filter (`admit`): whether the request is let in at all. The method, the target,
//!    the path (`[proxy] allowed_path_prefixes`) and the declared body size; in tokens mode the
//!    presented token, checked against the generation's token store (`crate::tokens`) by `auth`,
//!    which also puts the upstream key where the token was; then the token's place under its
//!    limits (`crate::limits`). Whatever refuses a request belongs here.
//! 2. upstream_peer (`peer`): which upstreams may answer: the route (`crate::routes`), by path
//!    and, where a route names models, by the model the request names.
//! 3. upstream_request_filter (`rewrite`): the request as it goes upstream: hop-by-hop fields,
//!    `Host`, `Expect`, the client's identity (`X-Forwarded-For`), and a streamed chat request
//!    asked for its usage (`crate::usage::stream_options`).
//! 4. forward (`failover`): the request sent to the route's upstreams and keys in turn until
//!    one answers; the upstream key of each is placed here.
//! 5. response_filter (`respond`): the answer as it goes back: its header fields, the usage
//!    meter (`crate::usage`) on its body, the model list cut to a token's models, and the
//!    WebSocket tunnel (`tunnel`) of an upgrade.
//! 6. logging (`access_log`): the access record, handed to the response body (or the tunnel)
//!    and written when the response ends; as it drops it settles the token's limits with the
//!    usage seen and counts the request in the metrics (`crate::metrics`).
//!
//! An error in phases 1 to 5 ends the request with the proxy's own answer (`ProxyError`);
//! logging runs for every request. `Ctx` carries what an early phase tells a later one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::request::Parts;
use http::{HeaderValue, Request, Response, Version, header};

use crate::body::{ClientBody, Inbound};
use crate::drain;
use crate::error::ProxyError;
use crate::generation::{Generation, Live};
use crate::http::OnUpgrade;

pub mod access_log;
mod admit;
pub mod auth;
mod failover;
mod peer;
mod respond;
mod response_body;
mod rewrite;
mod tunnel;

use access_log::{AccessRecord, RequestId};
use auth::Grant;

pub use crate::http::{Activity, Stage};
pub use response_body::ResponseBody;

/// What a connection tells each of its requests.
pub struct Connection {
    pub live: Arc<Live>,
    pub client: SocketAddr,
    pub drain: drain::Watch,
    /// What the connection is waiting for, for the log line of a drain that has to cut it.
    pub activity: Activity,
    /// The connection counts against `server.max_connections` for as long as this lives.
    pub _open: OpenConnection,
}

/// Counts itself among the open connections for as long as it lives: its connection's, and any
/// WebSocket tunnel's that outlives the request that opened it.
pub struct OpenConnection {
    counter: Arc<AtomicUsize>,
    /// How many were open with this one, when it opened.
    pub open: usize,
}

impl OpenConnection {
    pub fn new(counter: &Arc<AtomicUsize>) -> Self {
        let open = counter.fetch_add(1, Ordering::Relaxed) + 1;
        Self {
            counter: counter.clone(),
            open,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

pub async fn handle(conn: &Arc<Connection>, request: Request<Inbound>) -> Response<ResponseBody> {
    // The generation is fixed for this request's whole life, whatever reloads happen meanwhile.
    let generation = conn.live.snapshot();
    let id = RequestId::next();
    let mut record = AccessRecord::new(
        id,
        request.method(),
        request.uri(),
        conn.client,
        generation.number,
        generation.config.log.access_log,
    );
    let client_version = request.version();
    let (mut parts, body) = request.into_parts();
    let body = ClientBody::new(body);
    let forwarded = phases(&generation, conn, &mut parts, &body, &mut record).await;
    let (mut response, body_unread) = match forwarded {
        Ok(response) => (response, false),
        Err(error) => answer_error(id, error, &body),
    };
    if (conn.drain.is_draining() || body_unread) && client_version < Version::HTTP_2 {
        // This HTTP/1 connection ends after the response (where the next request would start
        // is unknown when the body was not read to its end): say so to the client.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
        .headers_mut()
        .insert(RequestId::HEADER, id.header_value());
    access_log::logging(record, &parts, &mut response);
    response
}

/// What one request's phases hand on to the next ones, as pingora's `CTX`.
pub struct Ctx {
    /// The token the request was let in with (tokens mode).
    grant: Grant,
    /// The client's side of an upgrade, for the tunnel once the upstream has switched too.
    client_upgrade: Option<OnUpgrade>,
    /// The answer is the model list, to be cut to the token's models.
    model_list: bool,
}

/// The phases from request_filter to response_filter, in order; the first error ends them.
async fn phases(
    generation: &Generation,
    conn: &Arc<Connection>,
    parts: &mut Parts,
    body: &ClientBody,
    record: &mut AccessRecord,
) -> Result<Response<ResponseBody>, ProxyError> {
    let grant = admit::request_filter(generation, parts, body, &mut record.permit).await?;
    let choice = peer::upstream_peer(generation, parts, body).await?;
    let mut ctx = Ctx {
        grant,
        client_upgrade: None,
        model_list: false,
    };
    let bytes_in = record.bytes_in.clone();
    let outgoing =
        rewrite::upstream_request_filter(generation, conn, parts, body, &mut ctx, bytes_in).await?;
    let answered = failover::forward(choice, outgoing, body).await?;
    respond::response_filter(generation, conn, parts, answered, ctx).await
}

/// The proxy's own answer to a request that a phase ended, and whether the request's body was
/// left unread.
fn answer_error(
    id: RequestId,
    error: ProxyError,
    body: &ClientBody,
) -> (Response<ResponseBody>, bool) {
    // Debug, not Display: the details (an upstream address) are for the log only.
    tracing::debug!(request_id = %id, ?error, "answered by the proxy");
    let body_unread = matches!(
        error,
        ProxyError::BodyTooLarge { .. } | ProxyError::ClientBody(_)
    );
    // Like nginx's lingering close: the client may still be sending.
    body.discard_rest(DISCARD_TIME);
    (error.into_response(ResponseBody::whole), body_unread)
}

/// How long the proxy keeps reading a request body it answered early, so that the client gets
/// the answer rather than a reset.
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use crate::config::proxy::has_dot_segment;

    #[test]
    fn dot_segments_are_caught_in_any_spelling() {
        assert!(has_dot_segment("/v1/../admin"));
        assert!(has_dot_segment("/v1/%2E%2e/admin"));
        assert!(has_dot_segment("/v1/./x"));
        assert!(has_dot_segment("/v1/..%2fadmin"));
        assert!(has_dot_segment("/v1/%2e%2e%2fadmin"));
        assert!(has_dot_segment("/v1/%2E%2E%2Fadmin"));
        assert!(has_dot_segment("/v1/.%2e%2fadmin"));
        assert!(has_dot_segment("/v1/..%5cadmin"));
        assert!(has_dot_segment("/v1/x\\..\\admin"));
        assert!(has_dot_segment("/v1/.."));
        assert!(!has_dot_segment("/v1/files/a%2Fb.jsonl"));
        assert!(!has_dot_segment("/v1/100%"));
        assert!(!has_dot_segment("/v1/%zz/..x"));
        assert!(!has_dot_segment("/v1/chat/completions"));
        assert!(!has_dot_segment("/v1/files/file-abc.jsonl"));
    }
}
