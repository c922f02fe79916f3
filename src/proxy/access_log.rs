//! One access log line per request, written when its response ends, however it ends.
//!
//! The line carries structured fields (journald turns them into `REQUEST_ID=…`, `STATUS=…`).
//! It never carries headers or the query string: that is where API keys travel.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderValue, Method, Uri};
use tokio::time::Instant;

use super::ResponseBody;
use crate::body::BodyError;
use crate::usage::{Reading, Usage};

/// Our id for a request, sent back in `x-proxy-request-id` and written in the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(u64);

impl RequestId {
    pub const HEADER: &'static str = "x-proxy-request-id";

    /// Unique within a process and, through the start-time seed, across restarts.
    pub fn next() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let seed = *SEED.get_or_init(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ (u64::from(std::process::id()) << 40)
        });
        Self(splitmix64(
            seed.wrapping_add(COUNTER.fetch_add(1, Ordering::Relaxed)),
        ))
    }

    pub fn header_value(self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 16];
        for (i, byte) in text.iter_mut().enumerate() {
            *byte = HEX[(self.0 >> (60 - 4 * i) & 0xf) as usize];
        }
        HeaderValue::from_bytes(&text).expect("hex is a valid header value")
    }
}

/// A bijection on u64, so distinct counters give distinct ids that do not look sequential.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// logging: the record, completed from the request and its answer, goes with the response body,
/// which writes it when the response ends (or hands it on to a WebSocket tunnel).
pub fn logging(
    mut record: AccessRecord,
    request: &http::request::Parts,
    response: &mut http::Response<ResponseBody>,
) {
    record.token = super::auth::token_name(&request.extensions);
    record.upstream = request
        .extensions
        .get::<crate::routes::UpstreamName>()
        .map(|n| n.0.clone());
    record.stream = crate::metrics::Open::stream_if_sse(response.headers());
    record.status = response.status().as_u16();
    record.time_to_headers = record.started.elapsed();
    response.body_mut().set_record(record);
}

pub struct AccessRecord {
    pub id: RequestId,
    pub method: Method,
    pub uri: Uri,
    pub client: SocketAddr,
    pub generation: u64,
    pub started: Instant,
    pub status: u16,
    pub time_to_headers: Duration,
    pub bytes_in: Arc<AtomicU64>,
    pub bytes_out: u64,
    /// The name of the client's token, in tokens mode.
    pub token: Option<Arc<str>>,
    /// The upstream's token figures, once its response has shown them; `None`: not known.
    pub usage: Option<Usage>,
    /// Counts the response among the event streams open while it is relayed.
    pub stream: Option<crate::metrics::Open>,
    /// The model the upstream named in its answer.
    pub model: Option<Box<str>>,
    /// Why `usage` is None where the answer should have shown it (`unknown`, `compressed`).
    usage_unknown: Option<&'static str>,
    /// The request's place under its token's limits: settled with `usage` when this drops.
    pub permit: Option<crate::limits::Permit>,
    /// The name of the upstream the request went to.
    pub upstream: Option<Arc<str>>,
    cut: Option<String>,
    enabled: bool,
}

impl AccessRecord {
    pub fn new(
        id: RequestId,
        method: &Method,
        uri: &Uri,
        client: SocketAddr,
        generation: u64,
        enabled: bool,
    ) -> Self {
        Self {
            id,
            method: method.clone(),
            uri: uri.clone(),
            client,
            generation,
            started: Instant::now(),
            status: 0,
            time_to_headers: Duration::ZERO,
            bytes_in: Arc::default(),
            bytes_out: 0,
            token: None,
            usage: None,
            stream: None,
            model: None,
            usage_unknown: None,
            permit: None,
            upstream: None,
            cut: None,
            enabled,
        }
    }

    /// What the answer showed of its usage.
    pub fn note_usage(&mut self, reading: Reading) {
        self.usage = reading.usage;
        self.model = reading.model;
        self.usage_unknown = reading.unknown;
    }

    pub fn note_cut(&mut self, error: &BodyError) {
        self.cut = Some(error.to_string());
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        if let Some(mut permit) = self.permit.take() {
            if let Some(model) = &self.model {
                permit.name_model(model);
            }
            permit.settle(self.usage);
        }
        let total = self.started.elapsed();
        let path = self.uri.path();
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        crate::metrics::request(&crate::metrics::Request {
            method: &self.method,
            path,
            status: self.status,
            time_to_headers: self.time_to_headers,
            duration: total,
            bytes_in,
            bytes_out: self.bytes_out,
            upstream: self.upstream.as_deref(),
            token: self.token.as_deref(),
            model: self.model.as_deref(),
            usage: self
                .usage
                .map(|u| [u.prompt, u.completion, u.cached, u.reasoning]),
        });
        if !self.enabled {
            return;
        }
        let ttfb_ms = self.time_to_headers.as_secs_f64() * 1e3;
        let duration_ms = total.as_secs_f64() * 1e3;
        // One set of fields; a cut response is a warning, the rest are info.
        macro_rules! access {
            ($level:expr) => {
                tracing::event!(
                    target: "openai_proxy::access",
                    $level,
                    request_id = %self.id,
                    method = %self.method,
                    path,
                    status = self.status,
                    bytes_in,
                    bytes_out = self.bytes_out,
                    ttfb_ms,
                    duration_ms,
                    client = %self.client,
                    generation = self.generation,
                    token = self.token.as_deref().map(tracing::field::display),
                    prompt_tokens = self.usage.map(|u| u.prompt),
                    completion_tokens = self.usage.map(|u| u.completion),
                    cached_tokens = self.usage.map(|u| u.cached),
                    reasoning_tokens = self.usage.map(|u| u.reasoning),
                    usage = self.usage_unknown.map(tracing::field::display),
                    model = self.model.as_deref().map(tracing::field::display),
                    upstream = self.upstream.as_deref().map(tracing::field::display),
                    cut = self.cut.as_deref(),
                    "{} {} {}",
                    self.method,
                    path,
                    self.status,
                )
            };
        }
        match self.cut {
            None => access!(tracing::Level::INFO),
            Some(_) => access!(tracing::Level::WARN),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_distinct_hex() {
        let a = RequestId::next().to_string();
        let b = RequestId::next().to_string();
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        let id = RequestId::next();
        assert_eq!(id.header_value(), id.to_string().as_str());
    }
}
