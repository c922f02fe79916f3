//! response_filter: the upstream's answer as it goes back to the client.

use std::sync::Arc;

use http::request::Parts;
use http::{HeaderValue, Response, StatusCode, header};

use super::access_log::AccessRecord;
use super::failover::Answered;
use super::{Connection, Ctx, auth, tunnel};
use crate::error::ProxyError;
use crate::generation::Generation;
use crate::headers::{self, Exchange};
use crate::proxy::ResponseBody;
use crate::usage;

/// Opens the WebSocket tunnel of an upgrade, names the upstream, rewrites the header fields
/// (hop-by-hop out, the key hidden, event streams unbuffered), sets the usage meter on the body,
/// and cuts the model list to the token's models.
pub async fn response_filter(
    generation: &Generation,
    conn: &Arc<Connection>,
    parts: &mut Parts,
    answered: Answered<'_>,
    ctx: Ctx,
) -> Result<Response<ResponseBody>, ProxyError> {
    let idle = answered.named.upstream.config().idle_timeout.0;
    let switched = answered.response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upgrade = ctx.client_upgrade.is_some();
    let tunnel = match (ctx.client_upgrade, answered.upgraded) {
        (Some(client), Some(upgraded)) => Some(open_tunnel(client, upgraded, conn, idle, parts)),
        _ => None,
    };
    let (mut head, body) = answered.response.into_parts();
    answered
        .named
        .mark(answered.tried, &mut parts.extensions, &mut head.headers);
    headers::strip_hop_by_hop(&mut head.headers, Exchange::upgrade_if(switched && upgrade));
    if ctx.grant.is_some() {
        auth::hide_key_in_answer(&parts.extensions, &mut head.headers);
    }
    mark_event_stream(&mut head.headers);
    let meter = match reads_usage(generation) {
        true => {
            usage::Meter::for_answer(&parts.method, parts.uri.path(), head.status, &head.headers)
        }
        false => None,
    };
    let mut body = ResponseBody::upstream(body, idle);
    body.send_record_to(tunnel);
    body.meter(meter);
    if ctx.model_list {
        return auth::filter_model_list(&ctx.grant, head, body).await;
    }
    Ok(Response::from_parts(head, body))
}

/// Whether anything reads an answer's token figures: the access log, or in tokens mode the
/// usage records, limits and token metrics. Without a reader the answer is not scanned.
fn reads_usage(generation: &Generation) -> bool {
    generation.config.log.access_log || generation.auth.is_some()
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
    client: crate::http::OnUpgrade,
    upgraded: crate::upstream::http1::Upgraded,
    conn: &Arc<Connection>,
    idle: std::time::Duration,
    request: &Parts,
) -> tokio::sync::oneshot::Sender<AccessRecord> {
    let (sender, record) = tokio::sync::oneshot::channel();
    let meter = usage::Session::for_path(request.uri.path());
    // The tunnel holds the connection, which keeps counting against max_connections.
    let tunnel = tunnel::splice(client, upgraded, conn.clone(), idle, (record, meter));
    tokio::spawn(tunnel);
    sender
}
