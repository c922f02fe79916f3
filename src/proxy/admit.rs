//! request_filter: whether a request is let in at all, before anything of it goes upstream.

use http::request::Parts;
use http::{Method, Version, header};

use super::auth::{self, Grant};
use crate::body::ClientBody;
use crate::config::proxy::has_dot_segment;
use crate::error::ProxyError;
use crate::generation::Generation;
use crate::limits;

/// Refuses what this proxy does not serve (method, target, path, declared body size), then, in
/// tokens mode, a request without a valid token, then one over its token's limits. A request
/// let in on a token holds its `permit` from here on, whatever the later phases do.
pub async fn request_filter(
    generation: &Generation,
    parts: &mut Parts,
    body: &ClientBody,
    permit: &mut Option<limits::Permit>,
) -> Result<Grant, ProxyError> {
    served(generation, parts)?;
    let grant = auth::admit(generation, parts, body).await?;
    if let Some(token) = &grant {
        *permit = Some(generation.limits.admit(&token.name, &token.quota).await?);
    }
    Ok(grant)
}

/// Whether this proxy serves the request, from its head alone.
fn served(generation: &Generation, request: &Parts) -> Result<(), ProxyError> {
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
