//! Tokens mode's request check: the proxy holds the OpenAI key, and clients present tokens the
//! proxy issued.
//!
//! In `passthrough` mode (the default) nothing here runs and the client's own key goes upstream.
//! In `tokens` mode every request must carry a token listed in the generation's token store
//! (`tokens`); the token is taken out of the request and the upstream key put in its place, so
//! the upstream never sees a token and no client ever sees the key. Neither is ever logged, put
//! in an error body or a `STATUS=` line: errors here name tokens by name, never by content.

mod inspect;

pub use inspect::INSPECT_LIMIT;

use std::sync::Arc;

use http::header::{self, SEC_WEBSOCKET_PROTOCOL};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::body::ClientBody;
use crate::error::ProxyError;
use crate::generation::Generation;
use crate::proxy::ResponseBody;
use crate::tokens::{SUBPROTOCOL_PREFIX, Token, Tokens};

/// The name of the token a request came with, for its access log line.
#[derive(Debug, Clone)]
pub struct TokenName(pub Arc<str>);

/// The token a request was let in with, kept for the rest of its way through the proxy.
pub type Grant = Option<Arc<Token>>;

const ORGANIZATION: HeaderName = HeaderName::from_static("openai-organization");
const PROJECT: HeaderName = HeaderName::from_static("openai-project");

/// The request phase of tokens mode: lets the request in on a valid token or refuses it (401),
/// refuses a model the token may not use (403), and puts the upstream key where the token was.
/// Passthrough mode lets everything by untouched.
pub async fn admit(
    generation: &Generation,
    parts: &mut http::request::Parts,
    body: &ClientBody,
) -> Result<Grant, ProxyError> {
    let Some(tokens) = &generation.auth else {
        return Ok(None);
    };
    let token = verify(tokens, &parts.headers)?;
    parts.extensions.insert(TokenName(token.name.clone()));
    if token.restricts_models() {
        let body = inspected_body(parts, body);
        let models = inspect::check_models(generation, &token, parts, body).await?;
        parts
            .extensions
            .insert(NamedModel(models.into_iter().next()));
    }
    if let Some(theirs) = subprotocol_entry(&parts.headers) {
        parts.extensions.insert(TokenSubprotocol(theirs));
    }
    rewrite(tokens, &mut parts.headers);
    Ok(Some(token))
}

/// The model a request names, for routes that choose an upstream by model: the first found
/// where tokens mode looks. None for an upgrade, a file upload or a body too large to read.
/// A request whose token's model check has read its models already is not read again.
pub async fn request_model(
    generation: &Generation,
    parts: &http::request::Parts,
    body: &ClientBody,
) -> Result<Option<String>, ProxyError> {
    if let Some(NamedModel(model)) = parts.extensions.get::<NamedModel>() {
        return Ok(model.clone());
    }
    let body = inspected_body(parts, body);
    let (models, _) = inspect::request_models(generation, parts, body).await?;
    Ok(models.into_iter().next())
}

/// The first model a request names, as the token's model check found it (its body read whole).
#[derive(Clone)]
struct NamedModel(Option<String>);

/// The body to look for models in: none for an upgrade or an upload.
fn inspected_body<'b>(
    parts: &http::request::Parts,
    body: &'b ClientBody,
) -> Option<&'b ClientBody> {
    let upgrade = parts.extensions.get::<crate::http::OnUpgrade>().is_some();
    (!upgrade && inspect::body_may_name_a_model(parts.uri.path())).then_some(body)
}

/// The subprotocol entry a client sent its token in, as it sent it.
#[derive(Clone)]
struct TokenSubprotocol(HeaderValue);

fn subprotocol_entry(headers: &HeaderMap) -> Option<HeaderValue> {
    token_subprotocols(headers)
        .next()
        .and_then(|entry| HeaderValue::from_bytes(entry).ok())
}

/// An upstream that selects the subprotocol carrying the key would show the key to the client:
/// the answer names the client's own entry (its token) instead, or no subprotocol at all.
pub fn hide_key_in_answer(request: &http::Extensions, answer: &mut HeaderMap) {
    let prefix = SUBPROTOCOL_PREFIX.as_bytes();
    let names_key = answer
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .any(|v| v.as_bytes().windows(prefix.len()).any(|w| w == prefix));
    if !names_key {
        return;
    }
    match request.get::<TokenSubprotocol>() {
        Some(TokenSubprotocol(theirs)) => {
            answer.insert(SEC_WEBSOCKET_PROTOCOL, theirs.clone());
        }
        None => {
            answer.remove(SEC_WEBSOCKET_PROTOCOL);
        }
    }
}

/// The token the request carries, as `Authorization: Bearer` or as the WebSocket subprotocol
/// (both may come; then both must name the same token).
fn verify(tokens: &Tokens, headers: &HeaderMap) -> Result<Arc<Token>, ProxyError> {
    let mut authorization = headers.get_all(header::AUTHORIZATION).iter();
    let bearer =
        match authorization.next() {
            None => None,
            Some(_) if authorization.next().is_some() => {
                return Err(ProxyError::InvalidApiKey(
                    "more than one Authorization field",
                ));
            }
            Some(value) => Some(bearer_token(value.as_bytes()).ok_or(
                ProxyError::InvalidApiKey("send the token as `Authorization: Bearer TOKEN`"),
            )?),
        };
    let presented = bearer.into_iter().chain(subprotocol_tokens(headers));
    let mut found: Option<&Arc<Token>> = None;
    for token in presented {
        let token = tokens.find(token).ok_or(ProxyError::InvalidApiKey(
            "this proxy takes only the tokens it issued",
        ))?;
        if found.is_some_and(|first| !Arc::ptr_eq(first, token)) {
            return Err(ProxyError::InvalidApiKey("two different tokens"));
        }
        found = Some(token);
    }
    let token = found.ok_or(ProxyError::InvalidApiKey(
        "no token: send the token this proxy issued you as `Authorization: Bearer TOKEN`",
    ))?;
    if token.has_expired() {
        return Err(ProxyError::InvalidApiKey("this token has expired"));
    }
    Ok(token.clone())
}

/// Puts the upstream key (and organization and project) where the client's token was.
fn rewrite(tokens: &Tokens, headers: &mut HeaderMap) {
    headers.insert(header::AUTHORIZATION, tokens.key.bearer.clone());
    headers.remove(ORGANIZATION);
    headers.remove(PROJECT);
    if let Some(organization) = &tokens.organization {
        headers.insert(ORGANIZATION, organization.clone());
    }
    if let Some(project) = &tokens.project {
        headers.insert(PROJECT, project.clone());
    }
    if subprotocol_tokens(headers).next().is_none() {
        return;
    }
    let protocols: Vec<&str> = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            if p.starts_with(SUBPROTOCOL_PREFIX) {
                tokens.key.subprotocol.as_str()
            } else {
                p
            }
        })
        .collect();
    if let Ok(mut value) = HeaderValue::from_str(&protocols.join(", ")) {
        value.set_sensitive(true);
        headers.insert(SEC_WEBSOCKET_PROTOCOL, value);
    }
}

/// The token in an `Authorization: Bearer TOKEN` value; the scheme's case does not matter.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    value
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|_| value[7..].trim_ascii())
}

/// The tokens a browser sends as `openai-insecure-api-key.TOKEN` subprotocols.
fn subprotocol_tokens(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    token_subprotocols(headers).map(|entry| &entry[SUBPROTOCOL_PREFIX.len()..])
}

/// The subprotocol entries that carry a token (`openai-insecure-api-key.TOKEN`), whole.
fn token_subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|p| p.starts_with(SUBPROTOCOL_PREFIX.as_bytes()))
}

/// The token's name, once the request phase has let the request in.
pub fn token_name(extensions: &http::Extensions) -> Option<Arc<str>> {
    extensions.get::<TokenName>().map(|t| t.0.clone())
}

/// Whether the answer to this request is the model list, to be cut to the token's models; asks
/// the upstream for it unencoded, so that it can be read.
pub fn wants_model_list(grant: &Grant, parts: &mut http::request::Parts) -> bool {
    let wanted = grant.as_ref().is_some_and(|t| t.restricts_models())
        && parts.method == Method::GET
        && parts.uri.path().trim_end_matches('/') == "/v1/models";
    if wanted {
        parts.headers.remove(header::ACCEPT_ENCODING);
    }
    wanted
}

/// `GET /v1/models` with only the models the token may use.
pub async fn filter_model_list(
    grant: &Grant,
    parts: http::response::Parts,
    body: ResponseBody,
) -> Result<http::Response<ResponseBody>, ProxyError> {
    inspect::filter_model_list(grant, parts, body).await
}
