//! `[server]`: how clients' connections are served.

use serde::Deserialize;

use super::{ByteSize, Duration, Timeout};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// For a client to send a request's headers (and to finish a TLS handshake): slowloris guard.
    pub header_read_timeout: Timeout,
    /// How long a kept-alive HTTP/1.1 connection may wait for its next request.
    pub keepalive_timeout: Timeout,
    pub max_header_size: ByteSize,
    /// OpenAI accepts uploads up to 512 MB.
    pub max_request_body: ByteSize,
    /// Connections past this are answered 503 and closed.
    pub max_connections: Limit,
    /// Concurrent requests on one HTTP/2 connection.
    pub max_streams_per_connection: u32,
    /// How long requests, streams and WebSockets in flight may take to finish at shutdown, or
    /// when a reload removes their listener, before they are cut.
    pub drain_timeout: Duration,
    /// Worker threads; 0: one per CPU. Read at start only.
    pub workers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            header_read_timeout: Timeout::secs(30),
            keepalive_timeout: Timeout::secs(75),
            max_header_size: ByteSize(64 << 10),
            max_request_body: ByteSize(512 << 20),
            max_connections: Limit(10_000),
            max_streams_per_connection: 256,
            drain_timeout: Duration::secs(30),
            workers: 0,
        }
    }
}

/// A count that must be at least one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub usize);

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match usize::deserialize(d)? {
            0 => Err(serde::de::Error::custom("a limit must be at least 1")),
            n => Ok(Self(n)),
        }
    }
}
