//! Failover between the upstreams a route names: a request that one upstream could not answer
//! goes to the next, as long as nothing of the response has reached the client.
//!
//! An upstream could not answer when connecting to it failed (TCP, TLS, the egress proxy), its
//! connection broke before its response head (a reset), or it answered 429, 502, 503 or 504.
//! The last upstream's answer, whatever it is, goes to the client. A request is sent again only
//! if its body was read whole first (up to `REPLAY_LIMIT`; a larger one goes to the first
//! upstream alone), and no new try starts `WINDOW` after the first. A timeout waiting for a
//! response head is not tried again: the upstream may still be working on the request. Once a
//! response head is taken, nothing is retried: a stream that breaks after its first event is
//! the client's to see, never duplicated.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};

use crate::body::{ClientBody, RequestBody};
use crate::error::ProxyError;
use crate::headers::Exchange;
use crate::keys::Key;
use crate::metrics::NextTry;
use crate::routes::{Choice, Named, RESTING_CHANGED};
use crate::upstream::{UpstreamBody, http1::Upgraded};

/// The largest request body kept to be sent to another upstream.
pub const REPLAY_LIMIT: u64 = 8 << 20;

/// After this long since the first try, the next upstream is not tried.
pub const WINDOW: Duration = Duration::from_secs(30);

/// A request as it goes to each upstream: its Host, URI and key are set per upstream.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// The client's URI, which each upstream puts under its own url.
    pub uri: &'a Uri,
    pub headers: HeaderMap,
    pub exchange: Exchange,
    /// Tokens mode: the proxy's key is in `headers`, to go where each upstream takes it.
    pub own_key: bool,
    pub body_limit: u64,
    pub bytes_in: Arc<AtomicU64>,
}

pub struct Answered<'a> {
    pub named: &'a Named,
    /// The names of the upstreams tried, in order, comma-separated.
    pub tried: Arc<str>,
    pub response: Response<UpstreamBody>,
    pub upgraded: Option<Upgraded>,
}

/// What one try came to: the upstream's response (and its side of an upgrade), or why none.
type Tried = Result<(Response<UpstreamBody>, Option<Upgraded>), ProxyError>;

/// At most this many tries for one request, over all its upstreams and keys.
pub const MAX_TRIES: usize = 8;

/// forward: sends the request to the route's upstreams (and their keys) in turn, as the module
/// says, and returns the answer that goes to the client.
pub async fn forward<'a>(
    choice: Choice<'a>,
    mut out: Outgoing<'_>,
    body: &ClientBody,
) -> Result<Answered<'a>, ProxyError> {
    let rotating = |named: &Named| out.own_key && !named.keys.is_empty();
    let may_retry = choice.count() > 1 || choice.iter().any(|n| rotating(n) && n.keys.len() > 1);
    let replayable =
        may_retry && (out.exchange == Exchange::Upgrade || read_whole(choice, &out, body).await?);
    let started = Instant::now();
    let mut tried = String::new();
    let mut tries = 0;
    let mut upstreams = choice.iter().peekable();
    while let Some(named) = upstreams.next() {
        if named.breaker.is_resting() && upstreams.peek().is_some() {
            continue;
        }
        let mut keys_tried = Vec::new();
        let rotates = rotating(named);
        while let Some(key) = key_for(named, rotates, &keys_tried, upstreams.peek().is_some()) {
            if let Some((index, _)) = key {
                keys_tried.push(index);
            }
            tries += 1;
            let another_key = rotates && named.keys.has_another(&keys_tried);
            let last = !replayable
                || (upstreams.peek().is_none() && !another_key)
                || tries >= MAX_TRIES
                || started.elapsed() > WINDOW;
            if !tried.is_empty() {
                tried.push(',');
            }
            tried.push_str(&named.name);
            let (headers, body) = match last {
                true => (std::mem::take(&mut out.headers), body.clone()),
                false => (out.headers.clone(), body.copy_read()),
            };
            let key = key.map(|(_, key)| key);
            let result = send_one(named, &out, headers, body, key).await;
            record_health(named, &result);
            // Judged even when nothing follows, so that a key that got a 429 rests all the same;
            // a request with nowhere else to go is not (an upstream's 429 is then just relayed).
            let judged = match may_retry {
                true => judge(named, key, &result),
                false => Next::Answer,
            };
            let next = match judged {
                _ if last => Next::Answer,
                Next::Key(reason) if another_key => Next::Key(reason),
                Next::Key(reason) | Next::Upstream(reason) if upstreams.peek().is_some() => {
                    Next::Upstream(reason)
                }
                _ => Next::Answer,
            };
            if let Next::Key(reason) | Next::Upstream(reason) = next {
                let next = match next {
                    Next::Upstream(_) => NextTry::Upstream,
                    _ => NextTry::Key,
                };
                crate::metrics::upstream_retried(&named.name, reason, next);
            }
            match next {
                Next::Answer => {
                    return result.map(|(response, upgraded)| Answered {
                        named,
                        tried: Arc::from(tried),
                        response,
                        upgraded,
                    });
                }
                Next::Key(_) => continue,
                Next::Upstream(_) => break,
            }
        }
    }
    Err(ProxyError::UpstreamUnreachable(
        "every upstream of the route failed".into(),
    ))
}

/// Counts a try for or against its upstream's breaker: an upstream that answered, if only
/// with a 429, is up.
fn record_health(named: &Named, result: &Tried) {
    let answered = failed_before_answering(result).is_none()
        || matches!(result, Ok((r, _)) if r.status() == StatusCode::TOO_MANY_REQUESTS);
    if named.breaker.record(answered) {
        tracing::warn!(upstream = %named.name, "the upstream failed repeatedly: it rests");
        RESTING_CHANGED.notify_one();
    }
}

/// The key for the next try on `named` (None: `[auth]`'s, without rotation); None outright
/// when every key rests and another upstream can take the request. With nowhere else to go,
/// a resting key is used all the same.
fn key_for<'k>(
    named: &'k Named,
    rotating: bool,
    tried: &[usize],
    another_upstream: bool,
) -> Option<Option<(usize, &'k Key)>> {
    if !rotating {
        return Some(None);
    }
    match named.keys.take(tried) {
        Some(key) => Some(Some(key)),
        None if another_upstream => None,
        None => Some(named.keys.first()),
    }
}

/// What a try calls for; a retry carries its reason, one of `metrics::REASONS`.
enum Next {
    /// Its result goes to the client.
    Answer,
    /// The next key of the same upstream (else the next upstream).
    Key(&'static str),
    Upstream(&'static str),
}

/// Whether a try's result is the client's answer; a key that got a 429 rests, one that got a
/// 401 is set aside.
fn judge(named: &Named, key: Option<&Key>, result: &Tried) -> Next {
    if let (Some(key), Ok((response, _))) = (key, result) {
        match response.status() {
            StatusCode::TOO_MANY_REQUESTS => {
                let rest = key.rest(response.headers());
                tracing::warn!(upstream = %named.name, key = %key.fingerprint, ?rest, "the upstream key rests after a 429");
                RESTING_CHANGED.notify_one();
                return Next::Key("key_rate_limited");
            }
            StatusCode::UNAUTHORIZED => {
                key.set_aside();
                tracing::warn!(upstream = %named.name, key = %key.fingerprint, "the upstream refused the key (401): set aside until the next reload");
                RESTING_CHANGED.notify_one();
                return Next::Key("key_refused");
            }
            _ => {}
        }
    }
    match failed_before_answering(result) {
        Some(reason) => {
            tracing::warn!(upstream = %named.name, reason, "the upstream could not answer");
            Next::Upstream(match result {
                Ok(_) => "status",
                Err(_) => "unreachable",
            })
        }
        None => Next::Answer,
    }
}

/// Reads the body ahead to send it again; false when it is larger than `REPLAY_LIMIT`.
async fn read_whole(
    choice: Choice<'_>,
    out: &Outgoing<'_>,
    body: &ClientBody,
) -> Result<bool, ProxyError> {
    let idle = choice.iter().next().map_or(Duration::from_secs(60), |n| {
        n.upstream.config().idle_timeout.0
    });
    let limit = out.body_limit.min(REPLAY_LIMIT);
    let (_, whole) = body
        .read_ahead(limit, idle)
        .await
        .map_err(|e| e.to_proxy_error())?;
    Ok(whole)
}

/// Why a try is not the client's answer, if it is not.
fn failed_before_answering(result: &Tried) -> Option<String> {
    match result {
        Ok((response, _)) => matches!(
            response.status(),
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        )
        .then(|| format!("answered {}", response.status())),
        Err(
            error @ (ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamTls(_)
            | ProxyError::UpstreamProtocol(_)
            | ProxyError::EgressProxy(_)),
        ) => Some(format!("{error:?}")),
        Err(_) => None,
    }
}

async fn send_one(
    named: &Named,
    out: &Outgoing<'_>,
    headers: HeaderMap,
    body: ClientBody,
    key: Option<&Key>,
) -> Tried {
    let upstream = &named.upstream;
    let idle = upstream.config().idle_timeout.0;
    let (body, body_failed) = if out.exchange == Exchange::Upgrade {
        (RequestBody::empty(), None)
    } else {
        let (body, failed) = RequestBody::new(body, out.body_limit, idle, out.bytes_in.clone());
        (body, Some(failed))
    };
    let mut request = Request::new(body);
    *request.method_mut() = out.method.clone();
    *request.uri_mut() = upstream.uri(out.uri);
    *request.headers_mut() = headers;
    if out.own_key {
        named.place_key(request.headers_mut(), key);
    }
    let Some(mut body_failed) = body_failed else {
        return upstream.send(request, out.exchange).await;
    };
    tokio::select! {
        // A request that failed because its body did says so, not how the upstream saw it.
        response = upstream.send(request, out.exchange) => match response {
            Ok(response) => Ok(response),
            Err(error) => Err(body_failed.try_recv().unwrap_or(error)),
        },
        // A closed channel means the body was sent whole: keep waiting for the response.
        Ok(error) = &mut body_failed => Err(error),
    }
}
