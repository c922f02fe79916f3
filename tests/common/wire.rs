//! Raw HTTP/1.1 spoken to the proxy's plain listener, for what no well-behaved client sends.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Proxy;

/// How long a raw read waits for what it expects.
const RAW_WAIT: Duration = Duration::from_secs(10);

pub async fn connect(proxy: &Proxy) -> TcpStream {
    let url = proxy.url("");
    TcpStream::connect(url.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Sends `request` and reads until the proxy closes the connection.
pub async fn exchange(proxy: &Proxy, request: &[u8]) -> String {
    let mut stream = connect(proxy).await;
    stream.write_all(request).await.unwrap();
    read_to_close(&mut stream).await
}

pub async fn read_to_close(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(RAW_WAIT, stream.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads until `text` has arrived; returns everything read so far.
pub async fn read_until(stream: &mut TcpStream, text: &str) -> String {
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    while find(&out, text.as_bytes()).is_none() {
        let n = tokio::time::timeout(RAW_WAIT, stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{text:?} within {RAW_WAIT:?}; got {:?}",
                    String::from_utf8_lossy(&out)
                )
            })
            .unwrap_or_else(|e| {
                panic!(
                    "{e} before {text:?}; got {:?}",
                    String::from_utf8_lossy(&out)
                )
            });
        assert!(
            n > 0,
            "closed before {text:?}: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads one response with a Content-Length body (or none) from a kept-alive connection;
/// returns it whole.
pub async fn read_response(stream: &mut TcpStream) -> String {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(RAW_WAIT, stream.read(&mut buf))
            .await
            .expect("a response within the wait")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let length: usize = text[..end]
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        if bytes.len() >= end + 4 + length {
            return text;
        }
    }
}

/// What follows a raw response's head.
pub fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
