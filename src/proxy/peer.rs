//! upstream_peer: which upstreams may answer a request, by its route.

use http::request::Parts;

use super::auth;
use crate::body::ClientBody;
use crate::error::ProxyError;
use crate::generation::Generation;
use crate::routes::Choice;

/// The route's upstreams, in the order to try them: chosen by path and, where a route names
/// models, by the model the request names (its body read ahead for it).
pub async fn upstream_peer<'g>(
    generation: &'g Generation,
    parts: &Parts,
    body: &ClientBody,
) -> Result<Choice<'g>, ProxyError> {
    let routes = &generation.routes;
    let model = match routes.reads_model() {
        true => auth::request_model(generation, parts, body).await?,
        false => None,
    };
    Ok(routes.pick(parts.uri.path(), model.as_deref()))
}
