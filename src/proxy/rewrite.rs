//! upstream_request_filter: the request as it goes upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http::request::Parts;
use http::{HeaderValue, header};

use super::failover::Outgoing;
use super::{Connection, Ctx, auth};
use crate::body::ClientBody;
use crate::error::ProxyError;
use crate::generation::Generation;
use crate::headers::{self, Exchange};
use crate::usage;

/// Asks a streamed chat request for its usage, asks for the model list unencoded where it is
/// to be cut, takes the client's side of an upgrade into `ctx`, and rewrites the header fields.
/// The upstream key is in place already: the request filter put it where the token was.
pub async fn upstream_request_filter<'p>(
    generation: &Generation,
    conn: &Connection,
    parts: &'p mut Parts,
    body: &ClientBody,
    ctx: &mut Ctx,
    bytes_in: Arc<AtomicU64>,
) -> Result<Outgoing<'p>, ProxyError> {
    ask_for_stream_usage(generation, parts, body).await?;
    ctx.model_list = auth::wants_model_list(&ctx.grant, parts);
    // The HTTP/1.1 server hands over the connection only for an upgrade without a body; any
    // other request with Upgrade fields goes as a plain request, without them.
    ctx.client_upgrade = parts.extensions.remove::<crate::http::OnUpgrade>();
    let exchange = Exchange::upgrade_if(ctx.client_upgrade.is_some());
    let headers = upstream_headers(generation, conn, parts, exchange);
    Ok(Outgoing {
        method: &parts.method,
        uri: &parts.uri,
        headers,
        exchange,
        own_key: ctx.grant.is_some(),
        body_limit: generation.config.server.max_request_body.0,
        bytes_in,
    })
}

/// The client's header fields as they go upstream: hop-by-hop fields, `Expect` and `Host` out,
/// and the client's identity added or taken out as the config says.
fn upstream_headers(
    generation: &Generation,
    conn: &Connection,
    parts: &mut Parts,
    exchange: Exchange,
) -> http::HeaderMap {
    let mut headers = std::mem::take(&mut parts.headers);
    headers::strip_hop_by_hop(&mut headers, exchange);
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

/// `[limits] stream_usage`: a streamed chat request is read ahead (as far as a token's model
/// check reads) and, if it lacks `stream_options.include_usage`, sent with it. A body larger
/// than that goes as it came.
async fn ask_for_stream_usage(
    generation: &Generation,
    parts: &mut Parts,
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
