//! Errors the proxy answers itself, in OpenAI's error shape.
//!
//! Every such error knows which side caused it, so that the status tells an SDK user
//! whether to fix their request, retry later, or look at the proxy's upstream.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};

/// Who is at fault: decides the status class and the OpenAI `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Proxy,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("CONNECT is refused: this is a reverse proxy for the OpenAI API, not a forward proxy")]
    ConnectRefused,
    #[error("absolute-form request targets are refused: this is not a forward proxy")]
    AbsoluteFormRefused,
    #[error("the path {0:?} is not served by this proxy")]
    PathNotAllowed(String),
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("request body exceeds the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error(
        "request body exceeds {limit} bytes, the most this proxy reads to find the model of a token limited to some models"
    )]
    InspectTooLarge { limit: u64 },
    /// Never holds what the client sent: only which check failed.
    #[error("Incorrect API key provided: {0}")]
    InvalidApiKey(&'static str),
    #[error("the model {0:?} is not allowed for this token")]
    ModelNotAllowed(String),
    #[error("request head exceeds the limit of {limit} bytes")]
    HeadersTooLarge { limit: u64 },
    #[error("the request body from the client failed: {0}")]
    ClientBody(String),
    #[error("the proxy is at its connection limit; retry shortly")]
    Overloaded,
    /// A token's limit ([limits]): 429, with Retry-After and OpenAI's rate-limit headers.
    #[error("{}", .0.message)]
    RateLimited(Box<RateLimited>),
    #[error("the proxy cannot reach the backend that keeps its rate limits; retry shortly")]
    LimitsUnavailable,
    /// What failed (an address, a lookup) is logged, never shown to the client.
    #[error("could not connect to the upstream")]
    UpstreamUnreachable(String),
    #[error("TLS to the upstream failed: {0}")]
    UpstreamTls(String),
    #[error("the upstream did not send response headers within {0:?}")]
    UpstreamTimeout(std::time::Duration),
    #[error("the upstream connection failed: {0}")]
    UpstreamProtocol(String),
    /// Names the egress proxy by host and port and says what it answered; never its password.
    #[error("{0}")]
    EgressProxy(String),
}

impl ProxyError {
    pub fn side(&self) -> Side {
        match self {
            Self::ConnectRefused
            | Self::AbsoluteFormRefused
            | Self::PathNotAllowed(_)
            | Self::Malformed(_)
            | Self::BodyTooLarge { .. }
            | Self::InspectTooLarge { .. }
            | Self::InvalidApiKey(_)
            | Self::ModelNotAllowed(_)
            | Self::HeadersTooLarge { .. }
            | Self::ClientBody(_)
            | Self::RateLimited(_) => Side::Client,
            Self::Overloaded | Self::LimitsUnavailable => Side::Proxy,
            Self::UpstreamUnreachable(_)
            | Self::UpstreamTls(_)
            | Self::UpstreamTimeout(_)
            | Self::UpstreamProtocol(_)
            | Self::EgressProxy(_) => Side::Upstream,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::ConnectRefused | Self::AbsoluteFormRefused => StatusCode::FORBIDDEN,
            Self::PathNotAllowed(_) => StatusCode::NOT_FOUND,
            Self::Malformed(_) | Self::ClientBody(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } | Self::InspectTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::InvalidApiKey(_) => StatusCode::UNAUTHORIZED,
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::Overloaded | Self::LimitsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamUnreachable(_)
            | Self::UpstreamTls(_)
            | Self::UpstreamProtocol(_)
            | Self::EgressProxy(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The machine-readable `code` an SDK user can match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::ConnectRefused | Self::AbsoluteFormRefused => "proxy_request_refused",
            Self::PathNotAllowed(_) => "path_not_allowed",
            Self::Malformed(_) => "malformed_request",
            Self::BodyTooLarge { .. } | Self::InspectTooLarge { .. } => "request_too_large",
            Self::InvalidApiKey(_) => "invalid_api_key",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::HeadersTooLarge { .. } => "request_headers_too_large",
            Self::ClientBody(_) => "client_body_error",
            Self::Overloaded => "proxy_overloaded",
            Self::RateLimited(_) => "rate_limit_exceeded",
            Self::LimitsUnavailable => "limits_unavailable",
            Self::UpstreamUnreachable(_) => "upstream_unreachable",
            Self::UpstreamTls(_) => "upstream_tls_error",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamProtocol(_) => "upstream_error",
            Self::EgressProxy(_) => "egress_proxy_error",
        }
    }

    fn openai_type(&self) -> &'static str {
        if let Self::RateLimited(limited) = self {
            return limited.kind;
        }
        match self.side() {
            Side::Client => "invalid_request_error",
            Side::Upstream => "upstream_error",
            Side::Proxy => "server_error",
        }
    }

    /// `{"error":{"message":…,"type":…,"param":null,"code":…}}`, as OpenAI's SDKs parse it.
    pub fn body(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.openai_type(),
                "param": null,
                "code": self.code(),
            }
        });
        Bytes::from(body.to_string())
    }

    pub fn into_response<B>(self, body: impl FnOnce(Bytes) -> B) -> http::Response<B> {
        let mut response = http::Response::new(body(self.body()));
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Self::RateLimited(limited) = &self {
            response.headers_mut().extend(limited.headers.clone());
        }
        response
    }
}

/// A request over one of its token's limits, as the 429 tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    /// Which limit, its value and when to try again.
    pub message: String,
    /// OpenAI's error `type` for rate limits: "requests" or "tokens".
    pub kind: &'static str,
    /// `Retry-After` and the `x-ratelimit-*` fields.
    pub headers: HeaderMap,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() {
        let err = ProxyError::BodyTooLarge { limit: 10 };
        let v: serde_json::Value = serde_json::from_slice(&err.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "request_too_large");
        assert!(v["error"]["param"].is_null());
        assert!(v["error"]["message"].as_str().unwrap().contains("10 bytes"));
        assert_eq!(err.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
