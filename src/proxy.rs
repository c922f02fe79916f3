//! One request's way through the proxy: admit it, forward it, relay the answer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};

use crate::access_log::{AccessRecord, RequestId};
use crate::auth;
use crate::body::{ClientBody, Inbound, ResponseBody};
use crate::config::proxy::has_dot_segment;
use crate::drain;
use crate::error::ProxyError;
use crate::failover;
use crate::generation::{Generation, Live};
use crate::headers;
use crate::limits;
use crate::tunnel;
use crate::usage;

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

/// The stage an HTTP/1.1 connection is at. Set as it moves on (a relaxed store), read only when
/// a drain cuts the connection, to say what kept it.
#[derive(Debug, Default)]
pub struct Activity(std::sync::atomic::AtomicU8);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Waiting for a request to begin.
    Idle,
    /// Reading a request head.
    Head,
    /// Waiting for the upstream's response head (the request body may still be flowing).
    Upstream,
    /// Relaying the response to the client.
    Response,
    /// Speaking HTTP/2: streams in flight.
    Http2,
}

impl Activity {
    pub fn set(&self, stage: Stage) {
        self.0
            .store(stage as u8, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn describe(&self) -> &'static str {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => "the next request to begin",
            1 => "the rest of a request head",
            2 => "the upstream's response",
            3 => "the rest of its response",
            _ => "its HTTP/2 streams",
        }
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
    let bytes_in = record.bytes_in.clone();
    let client_version = request.version();
    let (mut parts, body) = request.into_parts();
    let body = ClientBody::new(body);
    let mut body_unread = false;
    let forwarded = forward(
        &generation,
        conn,
        &mut parts,
        body.clone(),
        bytes_in,
        &mut record.permit,
    )
    .await;
    record.token = auth::token_name(&parts.extensions);
    record.upstream = parts
        .extensions
        .get::<crate::routes::UpstreamName>()
        .map(|n| n.0.clone());
    let mut response = match forwarded {
        Ok(response) => response,
        Err(error) => {
            // Debug, not Display: the details (an upstream address) are for the log only.
            tracing::debug!(request_id = %id, ?error, "answered by the proxy");
            body_unread = matches!(
                error,
                ProxyError::BodyTooLarge { .. } | ProxyError::ClientBody(_)
            );
            // Like nginx's lingering close: the client may still be sending.
            body.discard_rest(DISCARD_TIME);
            error.into_response(ResponseBody::whole)
        }
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
    record.stream = crate::metrics::Open::stream_if_sse(response.headers());
    record.status = response.status().as_u16();
    record.time_to_headers = record.started.elapsed();
    response.body_mut().set_record(record);
    response
}

/// How long the proxy keeps reading a request body it answered early, so that the client gets
/// the answer rather than a reset.
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(30);

fn admit(generation: &Generation, request: &http::request::Parts) -> Result<(), ProxyError> {
    if request.method == Method::CONNECT {
        return Err(ProxyError::ConnectRefused);
    }
    // HTTP/2 always carries :scheme and :authority; in HTTP/1 they mean a forward-proxy request.
    if request.version < Version::HTTP_2 && request.uri.authority().is_some() {
        return Err(ProxyError::AbsoluteFormRefused);
    }
    let path = request.uri.path();
    let allowed = &generation.config.proxy.allowed_path_prefixes;
    if !allowed.iter().any(|p| path.starts_with(p.as_str())) || has_dot_segment(path) {
        return Err(ProxyError::PathNotAllowed(path.to_owned()));
    }
    let limit = generation.config.server.max_request_body.0;
    let declared = request
        .headers
        .get(header::CONTENT_LENGTH)
        .map(|v| v.to_str().ok().and_then(|v| v.parse::<u64>().ok()));
    match declared {
        Some(None) => Err(ProxyError::Malformed("invalid Content-Length")),
        Some(Some(length)) if length > limit => Err(ProxyError::BodyTooLarge { limit }),
        _ => Ok(()),
    }
}

async fn forward(
    generation: &Generation,
    conn: &Arc<Connection>,
    parts: &mut http::request::Parts,
    body: ClientBody,
    bytes_in: Arc<std::sync::atomic::AtomicU64>,
    permit: &mut Option<limits::Permit>,
) -> Result<Response<ResponseBody>, ProxyError> {
    admit(generation, parts)?;
    let grant = auth::admit(generation, parts, &body).await?;
    if let Some(token) = &grant {
        *permit = Some(generation.limits.admit(&token.name, &token.quota).await?);
    }
    ask_for_stream_usage(generation, parts, &body).await?;
    let model_list = auth::wants_model_list(&grant, parts);
    let routes = &generation.routes;
    let model = match routes.reads_model() {
        true => auth::request_model(generation, parts, &body).await?,
        false => None,
    };
    let choice = routes.pick(parts.uri.path(), model.as_deref());
    // The HTTP/1.1 server hands over the connection only for an upgrade without a body; any
    // other request with Upgrade fields goes as a plain request, without them.
    let client_upgrade = parts.extensions.remove::<crate::http1::OnUpgrade>();
    let upgrade = client_upgrade.is_some();

    let headers = upstream_headers(generation, conn, parts, upgrade);
    let outgoing = failover::Outgoing {
        method: &parts.method,
        uri: &parts.uri,
        headers,
        upgrade,
        own_key: grant.is_some(),
        body_limit: generation.config.server.max_request_body.0,
        bytes_in,
    };
    let answered = failover::send(choice, outgoing, &body).await?;
    let (response, upgraded) = (answered.response, answered.upgraded);
    let idle = answered.named.upstream.config().idle_timeout.0;

    let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let tunnel = match (client_upgrade, upgraded) {
        (Some(client), Some(upgraded)) => Some(open_tunnel(client, upgraded, conn, idle, parts)),
        _ => None,
    };
    let (mut response_parts, body) = response.into_parts();
    answered.named.mark(
        answered.tried,
        &mut parts.extensions,
        &mut response_parts.headers,
    );
    let request_extensions = &parts.extensions;
    let (method, path) = (&parts.method, parts.uri.path());
    let mut parts = response_parts;
    headers::strip_hop_by_hop(&mut parts.headers, switched && upgrade);
    if grant.is_some() {
        auth::hide_key_in_answer(request_extensions, &mut parts.headers);
    }
    mark_event_stream(&mut parts.headers);
    let meter = match reads_usage(generation) {
        true => usage::Meter::for_answer(method, path, parts.status, &parts.headers),
        false => None,
    };
    let mut body = ResponseBody::upstream(body, idle);
    body.send_record_to(tunnel);
    body.meter(meter);
    if model_list {
        return auth::filter_model_list(&grant, parts, body).await;
    }
    Ok(Response::from_parts(parts, body))
}

/// Whether anything reads an answer's token figures: the access log, or in tokens mode the
/// usage records, limits and token metrics. Without a reader the answer is not scanned.
fn reads_usage(generation: &Generation) -> bool {
    generation.config.log.access_log || generation.auth.is_some()
}

/// The client's header fields as they go upstream: hop-by-hop fields, `Expect` and `Host` out,
/// and the client's identity added or taken out as the config says.
fn upstream_headers(
    generation: &Generation,
    conn: &Connection,
    parts: &mut http::request::Parts,
    upgrade: bool,
) -> http::HeaderMap {
    let mut headers = std::mem::take(&mut parts.headers);
    headers::strip_hop_by_hop(&mut headers, upgrade);
    // The client's `Expect: 100-continue` is answered on its connection; not the upstream's to answer.
    headers.remove(header::EXPECT);
    if generation.config.proxy.forward_client_identity {
        append_forwarded_for(&mut headers, conn.client);
    } else {
        headers::strip_client_identity(&mut headers);
    }
    // Upstream::send sets it: Host over HTTP/1.1, :authority over HTTP/2.
    headers.remove(header::HOST);
    headers
}

/// An event stream's answer tells an nginx in front of us not to buffer it.
fn mark_event_stream(headers: &mut http::HeaderMap) {
    let streaming = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if streaming {
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
}

/// Starts a WebSocket tunnel; the request's access record goes to it through the returned
/// sender, and is written when the tunnel closes, with a Realtime session's usage.
fn open_tunnel(
    client: crate::http1::OnUpgrade,
    upgraded: crate::upstream::http1::Upgraded,
    conn: &Arc<Connection>,
    idle: std::time::Duration,
    request: &http::request::Parts,
) -> tokio::sync::oneshot::Sender<AccessRecord> {
    let (sender, record) = tokio::sync::oneshot::channel();
    let meter = usage::Session::for_path(request.uri.path());
    // The tunnel holds the connection, which keeps counting against max_connections.
    let tunnel = tunnel::splice(client, upgraded, conn.clone(), idle, (record, meter));
    tokio::spawn(tunnel);
    sender
}

/// `[limits] stream_usage`: a streamed chat request is read ahead (as far as a token's model
/// check reads) and, if it lacks `stream_options.include_usage`, sent with it. A body larger
/// than that goes as it came.
async fn ask_for_stream_usage(
    generation: &Generation,
    parts: &mut http::request::Parts,
    body: &ClientBody,
) -> Result<(), ProxyError> {
    if !(generation.config.limits.stream_usage
        && usage::stream_options::applies(&parts.method, parts.uri.path()))
    {
        return Ok(());
    }
    let limit = generation.config.server.max_request_body.0;
    let idle = generation.upstream.config().idle_timeout.0;
    let (read, whole) = body
        .read_ahead(limit.min(auth::INSPECT_LIMIT), idle)
        .await
        .map_err(|e| e.to_proxy_error())?;
    if let Some(asking) = whole
        .then(|| usage::stream_options::with_include_usage(&read))
        .flatten()
    {
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(asking.len()));
        body.replace_read(asking);
    }
    Ok(())
}

fn append_forwarded_for(headers: &mut http::HeaderMap, client: SocketAddr) {
    let name = header::HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {}", client.ip()),
        None => client.ip().to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
