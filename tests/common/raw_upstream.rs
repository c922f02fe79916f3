//! Raw TCP upstreams: a TLS server on 127.0.0.1 that runs a test's script on each connection,
//! reading requests off the wire and writing whatever bytes the script says, for the cases a
//! well-behaved HTTP server never makes (cut bodies, interim responses, lingering closes).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::{Pki, TlsServer, eventually, find, last_of};

/// How long a raw upstream waits for the proxy.
const WAIT: Duration = Duration::from_secs(10);

/// A request as the upstream read it off the wire, body decoded.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The upstream connection it came on, counting from 1 in the order they were accepted.
    pub conn: usize,
    pub request_line: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the body came chunked (rather than by Content-Length).
    pub chunked: bool,
}

impl Seen {
    pub fn path(&self) -> &str {
        self.request_line.split(' ').nth(1).unwrap_or("")
    }

    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.header_all(name).first().copied()
    }
}

/// One accepted upstream connection, as a test's script drives it.
pub struct Conn {
    pub index: usize,
    pub stream: TlsStream<TcpStream>,
    /// Read off the socket, not yet taken.
    buf: Vec<u8>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Conn {
    /// Reads what has arrived into the buffer; false at the end of the stream (or an error).
    pub async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 << 10];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The bytes up to and including the first `delimiter`; None if the stream ends first.
    pub async fn take_through(&mut self, delimiter: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = find(&self.buf, delimiter) {
                return Some(self.buf.drain(..i + delimiter.len()).collect());
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next `n` bytes; None if the stream ends first.
    pub async fn take(&mut self, n: usize) -> Option<Vec<u8>> {
        while self.buf.len() < n {
            if !self.fill().await {
                return None;
            }
        }
        Some(self.buf.drain(..n).collect())
    }

    /// The next request head, not recorded; None when the proxy closes the connection instead.
    pub async fn read_head(&mut self) -> Option<Seen> {
        let head = self.take_through(b"\r\n\r\n").await?;
        let text = String::from_utf8(head).expect("a request head is text");
        let mut lines = text[..text.len() - 4].split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_owned();
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').expect("a field is name: value");
                (name.to_owned(), value.trim().to_owned())
            })
            .collect();
        Some(Seen {
            conn: self.index,
            request_line,
            headers,
            body: Vec::new(),
            chunked: false,
        })
    }

    /// The body `seen`'s head announces, by length or chunked, decoded into `seen.body`.
    pub async fn read_body(&mut self, seen: &mut Seen) -> Option<()> {
        let chunked = seen
            .header("transfer-encoding")
            .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
        if !chunked {
            let length = seen
                .header("content-length")
                .map_or(0, |v| v.parse().expect("a valid Content-Length"));
            seen.body = self.take(length).await?;
            return Some(());
        }
        seen.chunked = true;
        loop {
            let line = String::from_utf8(self.take_through(b"\r\n").await?).unwrap();
            let size = line.trim_end().split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(size, 16).expect("a chunk size in hex");
            if size == 0 {
                // Trailer fields, up to an empty line.
                while self.take_through(b"\r\n").await? != b"\r\n" {}
                return Some(());
            }
            let data = self.take(size + 2).await?;
            assert_eq!(&data[size..], b"\r\n", "chunk data ends with CRLF");
            seen.body.extend_from_slice(&data[..size]);
        }
    }

    pub fn record(&self, seen: &Seen) {
        self.seen.lock().unwrap().push(seen.clone());
    }

    /// Reads a whole request and records it; None when the proxy closes the connection instead.
    pub async fn read_request(&mut self) -> Option<Seen> {
        let mut seen = self.read_head().await?;
        self.read_body(&mut seen).await?;
        self.record(&seen);
        Some(seen)
    }

    /// Writes and flushes. A failed write is the proxy's to notice, not the script's.
    pub async fn write(&mut self, bytes: impl AsRef<[u8]>) {
        let _ = self.stream.write_all(bytes.as_ref()).await;
        let _ = self.stream.flush().await;
    }

    /// Writes `bytes` in pieces of `size`, each flushed on its own: a TLS record each, and with
    /// no delay, a TCP segment each.
    pub async fn write_in_pieces(&mut self, bytes: impl AsRef<[u8]>, size: usize) {
        for piece in bytes.as_ref().chunks(size) {
            self.write(piece).await;
        }
    }

    /// Sends close_notify and FIN, then closes at once: data still unread resets the connection.
    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Sends close_notify and FIN, then reads and discards until the proxy closes too, the way
    /// nginx's lingering close does, so that nothing is reset under the answer just sent.
    pub async fn linger_close(mut self) {
        let _ = self.stream.shutdown().await;
        let _ = tokio::time::timeout(WAIT, async {
            self.buf.clear();
            while self.fill().await {
                self.buf.clear();
            }
        })
        .await;
    }

    /// Writes back whatever arrives (what is already read first) until the proxy closes.
    pub async fn echo(mut self) {
        let pending = std::mem::take(&mut self.buf);
        if !pending.is_empty() {
            self.write(pending).await;
        }
        while self.fill().await {
            let got = std::mem::take(&mut self.buf);
            self.write(got).await;
        }
    }
}

/// A TLS upstream on 127.0.0.1 that runs a test's script on each connection it accepts.
pub struct RawUpstream {
    pub addr: SocketAddr,
    server: TlsServer,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// The connections whose script has returned, by index.
    ended: Arc<Mutex<Vec<usize>>>,
}

impl RawUpstream {
    pub async fn start<F, Fut>(pki: &Pki, script: F) -> Self
    where
        F: Fn(Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut tls = (*pki.server).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let seen = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(Mutex::new(Vec::new()));
        let (log, done) = (seen.clone(), ended.clone());
        let server = TlsServer::start(Arc::new(tls), move |stream, index| {
            let conn = Conn {
                index,
                stream,
                buf: Vec::new(),
                seen: log.clone(),
            };
            let (script, ended) = (script(conn), done.clone());
            async move {
                script.await;
                ended.lock().unwrap().push(index);
            }
        })
        .await;
        Self {
            addr: server.addr,
            server,
            seen,
            ended,
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.server.accepted.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn last(&self) -> Seen {
        last_of(&self.seen)
    }

    pub async fn wait_ended(&self, index: usize, what: &str) {
        eventually(WAIT, what, || {
            self.ended.lock().unwrap().contains(&index).then_some(())
        })
        .await;
    }

    /// One worker, so one upstream pool, and HTTP/1.1 to the upstream whatever ALPN offers.
    pub fn proxy_config(&self, pki: &Pki) -> String {
        format!(
            "listen = [\"127.0.0.1:0\"]\n[server]\nworkers = 1\n[upstream]\nurl = \"https://127.0.0.1:{}\"\nhost = \"api.openai.com\"\nca_file = \"{}\"\nhttp2 = false\n",
            self.addr.port(),
            pki.ca_pem.display()
        )
    }
}

/// Answers every request on the connection with `answer(request)` until the proxy closes it.
pub async fn serve(mut conn: Conn, answer: impl Fn(&Seen) -> String) {
    while let Some(seen) = conn.read_request().await {
        conn.write(answer(&seen)).await;
    }
}

/// A response framed by Content-Length.
pub fn response(status: &str, fields: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{fields}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

pub fn ok(body: &str) -> String {
    response("200 OK", "Content-Type: text/plain\r\n", body)
}

/// What the default route says: which path it answered.
pub fn answer_to(seen: &Seen) -> String {
    ok(&format!("answer to {}", seen.path()))
}

pub fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}
