//! The Redis backend: counters shared by every instance pointed at the same Redis.
//!
//! A minimal RESP2 client of our own: one connection, on a thread of its own, with the commands
//! of every request pipelined on it (replies come back in order). Admission is one round trip
//! (a Lua script that checks and counts atomically, with keys that expire with their window);
//! charging tokens after a response is sent without waiting for the reply. A caller never waits
//! longer than its timeout: while the connection is down, calls fail at once, and the thread
//! reconnects in the background.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};

use super::{Now, Quota, Row, Tally, Used};
use crate::config::limits::RedisUrl as Url;

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Nil,
    Int(i64),
    Text(Vec<u8>),
    Array(Vec<Value>),
}

type Reply = Result<Value, String>;

/// Encoded commands, and where the reply to the last goes (None: nobody waits for it).
struct Call {
    bytes: Vec<u8>,
    commands: usize,
    reply: Option<oneshot::Sender<Reply>>,
}

pub struct Client {
    url: Url,
    /// Started by the first call, so that `openai-proxy check` connects nowhere.
    calls: OnceLock<mpsc::Sender<Call>>,
}

/// Checks a request against the windows and counts it, atomically. Returns 1 and the counts
/// before it when let in, 0 and the counts when refused.
const ADMIT: &str = r"
local r = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = tonumber(redis.call('GET', KEYS[2]) or '0')
local d = tonumber(redis.call('GET', KEYS[3]) or '0')
local rpm, tpm, tpd = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if (rpm > 0 and r >= rpm) or (tpm > 0 and t >= tpm) or (tpd > 0 and d >= tpd) then
  return {0, r, t, d}
end
if redis.call('INCR', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], 120) end
return {1, r, t, d}
";

/// The admission script's SHA-1 in hex, as EVALSHA names it.
fn admit_sha() -> &'static [u8] {
    static SHA: OnceLock<Vec<u8>> = OnceLock::new();
    SHA.get_or_init(|| {
        let digest =
            ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, ADMIT.as_bytes());
        digest
            .as_ref()
            .iter()
            .flat_map(|b| format!("{b:02x}").into_bytes())
            .collect()
    })
}

/// Minute keys outlive their minute a little (clocks differ); day keys their day.
const MINUTE_TTL: &str = "120";
const DAY_TTL: &str = "172800";

/// A day's usage records: one hash, its fields `TOKEN<TAB>MODEL<TAB>KIND` (token names hold no
/// control character; a model's tabs are made spaces).
fn usage_key(day: u64) -> Vec<u8> {
    format!("openai-proxy:usage:{day}").into_bytes()
}

const FIELD_SEPARATOR: char = '\t';
/// Usage records are kept about 400 days.
const USAGE_TTL: &str = "34560000";

fn kinds(tally: &Tally) -> [(&'static str, u64); 5] {
    [
        ("requests", tally.requests),
        ("prompt", tally.prompt),
        ("completion", tally.completion),
        ("cached", tally.cached),
        ("reasoning", tally.reasoning),
    ]
}

fn key(name: &str, window: &str, number: u64) -> Vec<u8> {
    format!("openai-proxy:limits:{name}:{window}:{number}").into_bytes()
}

impl Client {
    pub fn new(url: Url) -> Self {
        Self {
            url,
            calls: OnceLock::new(),
        }
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    fn send(&self, call: Call) -> Result<(), String> {
        let calls = self.calls.get_or_init(|| start(self.url.clone()));
        calls
            .try_send(call)
            .map_err(|_| "Redis is not keeping up".to_owned())
    }

    /// Checks the windows of `quota` and counts the request: the counts before it, and whether
    /// it was let in. One round trip.
    pub async fn admit(
        &self,
        name: &str,
        quota: &Quota,
        now: &Now,
    ) -> Result<(bool, Used), String> {
        let limit = |l: Option<super::Limit>| l.map_or(0, |l| l.0).to_string().into_bytes();
        // The script by its SHA-1, as Redis caches it; sent whole only when Redis lacks it (its
        // first use since Redis started, or after SCRIPT FLUSH), which costs a second round trip.
        let mut args: Vec<Vec<u8>> = vec![
            b"EVALSHA".to_vec(),
            admit_sha().to_vec(),
            b"3".to_vec(),
            key(name, "rpm", now.minute),
            key(name, "tpm", now.minute),
            key(name, "tpd", now.day),
            limit(quota.requests_per_minute),
            limit(quota.tokens_per_minute),
            limit(quota.tokens_per_day),
        ];
        let reply = match self.call(&args).await {
            Err(error) if error.starts_with("NOSCRIPT") => {
                args[0] = b"EVAL".to_vec();
                args[1] = ADMIT.as_bytes().to_vec();
                self.call(&args).await?
            }
            reply => reply?,
        };
        let number = |v: Option<&Value>| match v {
            Some(Value::Int(n)) => Ok(u64::try_from(*n).unwrap_or(0)),
            _ => Err(format!("unexpected reply from Redis: {reply:?}")),
        };
        let Value::Array(items) = &reply else {
            return Err(format!("unexpected reply from Redis: {reply:?}"));
        };
        let used = Used {
            requests_minute: number(items.get(1))?,
            tokens_minute: number(items.get(2))?,
            tokens_day: number(items.get(3))?,
        };
        Ok((number(items.first())? == 1, used))
    }

    /// Records a finished request: its tokens in its minute and day, and its usage in the
    /// day's usage hash. Sent without waiting for Redis.
    pub fn charge(&self, name: &str, model: &str, tally: &Tally, now: &Now) {
        let mut bytes = Vec::new();
        let mut commands = 0;
        let mut add = |args: &[&[u8]]| {
            let args: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
            encode(&mut bytes, &args);
            commands += 1;
        };
        let tokens = tally.tokens().to_string();
        if tally.tokens() > 0 {
            for (window, number, ttl) in
                [("tpm", now.minute, MINUTE_TTL), ("tpd", now.day, DAY_TTL)]
            {
                let key = key(name, window, number);
                add(&[b"INCRBY", &key, tokens.as_bytes()]);
                add(&[b"EXPIRE", &key, ttl.as_bytes()]);
            }
        }
        let usage = usage_key(now.day);
        let model = model.replace(FIELD_SEPARATOR, " ");
        for (kind, value) in kinds(tally) {
            let field = format!("{name}{FIELD_SEPARATOR}{model}{FIELD_SEPARATOR}{kind}");
            add(&[
                b"HINCRBY",
                &usage,
                field.as_bytes(),
                value.to_string().as_bytes(),
            ]);
        }
        add(&[b"EXPIRE", &usage, USAGE_TTL.as_bytes()]);
        if let Err(error) = self.send(Call {
            bytes,
            commands,
            reply: None,
        }) {
            tracing::debug!(%error, "usage not recorded in Redis");
        }
    }

    /// Sends one command and waits for its reply.
    async fn call(&self, args: &[Vec<u8>]) -> Reply {
        let (tx, rx) = oneshot::channel();
        let mut bytes = Vec::new();
        encode(&mut bytes, args);
        self.send(Call {
            bytes,
            commands: 1,
            reply: Some(tx),
        })?;
        rx.await
            .map_err(|_| "the connection to Redis closed".to_owned())?
    }

    /// The usage records of the days `days`, of one token or all.
    pub async fn rows(
        &self,
        days: std::ops::RangeInclusive<u64>,
        token: Option<&str>,
    ) -> Result<Vec<Row>, String> {
        let mut rows: Vec<Row> = Vec::new();
        for day in days {
            let reply = self.call(&[b"HGETALL".to_vec(), usage_key(day)]).await?;
            let Value::Array(items) = reply else {
                return Err(format!("unexpected reply from Redis: {reply:?}"));
            };
            for pair in items.chunks(2) {
                if let [Value::Text(field), Value::Text(value)] = pair {
                    add_field(&mut rows, day, field, value, token);
                }
            }
        }
        Ok(rows)
    }
}

/// Adds one field of a day's usage hash to the rows, unless it is another token's.
fn add_field(rows: &mut Vec<Row>, day: u64, field: &[u8], value: &[u8], token: Option<&str>) {
    let field = String::from_utf8_lossy(field);
    let mut parts = field.split(FIELD_SEPARATOR);
    let (Some(name), Some(model), Some(kind)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    if token.is_some_and(|t| t != name) {
        return;
    }
    let value: u64 = String::from_utf8_lossy(value).parse().unwrap_or(0);
    let at = rows
        .iter()
        .position(|r| r.day == day && r.token == name && r.model == model);
    let index = at.unwrap_or_else(|| {
        rows.push(Row {
            day,
            token: name.to_owned(),
            model: model.to_owned(),
            tally: Tally::default(),
        });
        rows.len() - 1
    });
    let tally = &mut rows[index].tally;
    match kind {
        "requests" => tally.requests = value,
        "prompt" => tally.prompt = value,
        "completion" => tally.completion = value,
        "cached" => tally.cached = value,
        "reasoning" => tally.reasoning = value,
        _ => {}
    }
}

pub fn encode(out: &mut Vec<u8>, args: &[Vec<u8>]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// Reads one reply; a Redis error reply is an `Err` with its text.
pub async fn read_value<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> std::io::Result<Reply> {
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    if !line.ends_with(b"\r\n") {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a RESP2 reply");
    let text = &line[1..line.len() - 2];
    let number = || {
        std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .ok_or_else(bad)
    };
    Ok(match line[0] {
        b'+' => Ok(Value::Text(text.to_vec())),
        b'-' => Err(String::from_utf8_lossy(text).into_owned()),
        b':' => Ok(Value::Int(number()?)),
        b'$' => match number()? {
            n if n < 0 => Ok(Value::Nil),
            n => {
                let mut data = vec![0; n as usize + 2];
                reader.read_exact(&mut data).await?;
                data.truncate(n as usize);
                Ok(Value::Text(data))
            }
        },
        b'*' => match number()? {
            n if n < 0 => Ok(Value::Nil),
            n => {
                let mut items = Vec::with_capacity(n.min(64) as usize);
                for _ in 0..n {
                    items.push(
                        Box::pin(read_value(reader))
                            .await?
                            .map_err(std::io::Error::other)?,
                    );
                }
                Ok(Value::Array(items))
            }
        },
        _ => return Err(bad()),
    })
}

/// The connection's thread: connects, serves calls until the connection fails, and again.
fn start(url: Url) -> mpsc::Sender<Call> {
    let (tx, rx) = mpsc::channel(4096);
    let spawned = std::thread::Builder::new()
        .name("limits-redis".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the Redis connection");
            runtime.block_on(run(url, rx));
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the Redis connection's thread");
    }
    tx
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_AFTER: Duration = Duration::from_millis(200);

async fn run(url: Url, mut calls: mpsc::Receiver<Call>) {
    loop {
        let served = match tokio::time::timeout(CONNECT_TIMEOUT, connect(&url)).await {
            Ok(Ok(stream)) => serve(stream, &mut calls).await,
            Ok(Err(error)) => Err(error),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        };
        if let Err(error) = served {
            tracing::debug!(%error, redis = ?url, "Redis connection failed; reconnecting");
        }
        // Until it retries, calls fail at once (their reply dropped) rather than wait.
        let retry = tokio::time::sleep(RETRY_AFTER);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                () = &mut retry => break,
                call = calls.recv() => if call.is_none() { return },
            }
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A connection, authenticated and on its database.
async fn connect(url: &Url) -> std::io::Result<Box<dyn Stream>> {
    let tcp = tokio::net::TcpStream::connect((url.host.as_str(), url.port)).await?;
    tcp.set_nodelay(true)?;
    let mut stream: Box<dyn Stream> = if url.tls {
        Box::new(tls(url, tcp).await?)
    } else {
        Box::new(tcp)
    };
    let mut setup = Vec::new();
    let mut commands = 0;
    if let Some(password) = &url.password {
        let mut args = vec![b"AUTH".to_vec()];
        args.extend(url.user.clone().map(String::into_bytes));
        args.push(password.clone().into_bytes());
        encode(&mut setup, &args);
        commands += 1;
    }
    if url.db != 0 {
        encode(
            &mut setup,
            &[b"SELECT".to_vec(), url.db.to_string().into_bytes()],
        );
        commands += 1;
    }
    if commands > 0 {
        stream.write_all(&setup).await?;
        let mut reader = BufReader::new(&mut stream);
        for _ in 0..commands {
            // Redis's own words (WRONGPASS, NOAUTH, DB index out of range) hold no secret.
            read_value(&mut reader)
                .await?
                .map_err(std::io::Error::other)?;
        }
    }
    Ok(stream)
}

async fn tls(
    url: &Url,
    tcp: tokio::net::TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name =
        rustls::pki_types::ServerName::try_from(url.host.clone()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Writes the calls as they come and hands each reply to its caller, in order, until the
/// connection fails. Callers still waiting then see their reply dropped.
async fn serve(stream: Box<dyn Stream>, calls: &mut mpsc::Receiver<Call>) -> std::io::Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read);
    let (pending_tx, mut pending_rx) =
        mpsc::unbounded_channel::<(usize, Option<oneshot::Sender<Reply>>)>();
    let replies = async move {
        while let Some((commands, reply)) = pending_rx.recv().await {
            let mut last = Ok(Value::Nil);
            for _ in 0..commands {
                last = read_value(&mut reader).await?;
            }
            if let Some(reply) = reply {
                let _ = reply.send(last);
            }
        }
        Ok(())
    };
    let requests = async move {
        let mut batch = VecDeque::new();
        while let Some(call) = calls.recv().await {
            batch.push_back(call);
            // Whatever else is already queued goes in the same write.
            while let Ok(call) = calls.try_recv() {
                batch.push_back(call);
            }
            let mut bytes = Vec::new();
            for call in batch.drain(..) {
                bytes.extend_from_slice(&call.bytes);
                let _ = pending_tx.send((call.commands, call.reply));
            }
            write.write_all(&bytes).await?;
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        result = replies => result,
        result = requests => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replies_parse() {
        let bytes = b"*3\r\n:1\r\n$3\r\nabc\r\n$-1\r\n-ERR no\r\n+OK\r\n".to_vec();
        let mut reader = BufReader::new(&bytes[..]);
        let value = read_value(&mut reader).await.unwrap().unwrap();
        assert_eq!(
            value,
            Value::Array(vec![
                Value::Int(1),
                Value::Text(b"abc".to_vec()),
                Value::Nil
            ])
        );
        assert_eq!(read_value(&mut reader).await.unwrap(), Err("ERR no".into()));
        assert_eq!(
            read_value(&mut reader).await.unwrap(),
            Ok(Value::Text(b"OK".to_vec()))
        );
    }
}
