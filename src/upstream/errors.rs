//! What went wrong with the upstream, as the `ProxyError` that names where: a failed exchange
//! (`failure`), a failed TLS handshake (`tls_failure`), and the rustls error under an I/O one.

use std::io;

use crate::error::ProxyError;

/// Names where a failed request went wrong, from the error's chain of causes.
pub(super) fn failure(error: &hyper::Error) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(body) = e.downcast_ref::<crate::body::BodyError>() {
            return body.to_proxy_error();
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return ProxyError::UpstreamTls(tls.to_string());
        }
        source = cause(e);
    }
    ProxyError::UpstreamProtocol(chain(error))
}

/// A failed TLS handshake: a rustls error or a connection lost on the way.
pub(super) fn tls_failure(error: &io::Error) -> ProxyError {
    match tls_error(error) {
        Some(tls) => ProxyError::UpstreamTls(tls.to_string()),
        None => ProxyError::UpstreamUnreachable(format!("TLS handshake: {}", chain(error))),
    }
}

/// The rustls error an I/O error carries, however deep io::Error's wrapping put it.
pub(super) fn tls_error(error: &io::Error) -> Option<&rustls::Error> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        source = cause(e);
    }
    None
}

/// The next error in the chain. An io::Error's source() skips the error it wraps (which may
/// itself be an io::Error wrapping a rustls::Error), so step into it instead.
fn cause<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a (dyn std::error::Error + 'static)> {
    match error
        .downcast_ref::<io::Error>()
        .and_then(io::Error::get_ref)
    {
        Some(inner) => Some(inner),
        None => error.source(),
    }
}

/// The error's text and its sources', outermost first.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
