//! The Redis backend: counters shared by every instance pointed at the same Redis.
//!
//! A minimal RESP2 client of our own: one connection, on a thread of its own. Whatever is
//! queued while a write is in flight goes out in the next single write, and the replies come
//! back in order. The checks live in one Lua script that checks and counts atomically, with
//! keys that expire with their window.
//!
//! How the round trip is kept off the request path:
//! - Admission without waiting (with `on_backend_error = "allow"`, the default). Each answer of
//!   the script updates what this instance knows of the token (`lease`): Redis's counts, and
//!   for a requests limit a few admissions counted ahead (credits) while the minute has room
//!   for them. A request whose token has a credit left, and whose token limits Redis's recent
//!   counts leave far from reached, is let in at once; the instance asks for more credits and
//!   newer counts, without waiting, before it runs out. An unknown token, counts older than a
//!   second, a token limit near, or no credit left: the request waits for the script, as near
//!   a limit it must, so the shared limit holds exactly. Credits are counted in Redis before
//!   they are spent, so instances never admit more than a requests limit together; unspent
//!   ones lapse with their minute. With `"deny"` every request waits for Redis's word, so that
//!   none passes while Redis cannot be reached.
//! - Charging: a finished request's tokens and usage record are summed with the others of the
//!   same token and model and written a moment later, without waiting (`pending`).
//! - The timeout: a caller that waits never waits longer than `redis_timeout`; while the
//!   connection is down, calls fail at once, and the thread reconnects in the background.

mod lease;
mod pending;

pub use lease::size as lease_size;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, mpsc, oneshot};

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

/// What becomes of the reply to a call's last command (None: nothing). Run on the
/// connection's thread; dropped uncalled when the connection fails first.
type OnReply = Box<dyn FnOnce(Reply) + Send>;

/// Encoded commands, and what becomes of the reply to the last.
struct Call {
    bytes: Vec<u8>,
    commands: usize,
    reply: Option<OnReply>,
}

/// What the callers and the connection's thread share besides the calls.
#[derive(Default)]
struct Shared {
    leases: lease::Leases,
    pending: pending::Pending,
    /// Something was added to `pending`: a flush is due.
    wake: Notify,
}

pub struct Client {
    url: Url,
    /// Started by the first call, so that `openai-proxy check` connects nowhere.
    calls: OnceLock<mpsc::Sender<Call>>,
    shared: Arc<Shared>,
}

/// Checks a request against the windows and counts it, atomically, with up to ARGV[4]
/// admissions in all counted ahead while the minute has room (an eighth of what is left at
/// most, and at least the request itself). Returns 1, the counts before it and how many it
/// counted when let in; 0, the counts and 0 when refused. ARGV[4] = 0 only reads the counts.
const ADMIT: &str = r"
local r = tonumber(redis.call('GET', KEYS[1]) or '0')
local t = tonumber(redis.call('GET', KEYS[2]) or '0')
local d = tonumber(redis.call('GET', KEYS[3]) or '0')
local rpm, tpm, tpd = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local want = tonumber(ARGV[4])
if (rpm > 0 and r >= rpm) or (tpm > 0 and t >= tpm) or (tpd > 0 and d >= tpd) then
  return {0, r, t, d, 0}
end
local grant = want
if rpm > 0 and want > 1 then grant = math.max(1, math.min(want, math.floor((rpm - r) / 8))) end
if grant > 0 and redis.call('INCRBY', KEYS[1], grant) == grant then
  redis.call('EXPIRE', KEYS[1], 120)
end
return {1, r, t, d, grant}
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

/// The script's answer: whether the request was let in, the counts before it, and how many
/// admissions it counted (the request's own and credits to spare).
struct Admission {
    admitted: bool,
    used: Used,
    counted: u64,
}

impl Admission {
    fn parse(reply: &Value) -> Result<Self, String> {
        let unexpected = || format!("unexpected reply from Redis: {reply:?}");
        let Value::Array(items) = reply else {
            return Err(unexpected());
        };
        let number = |at: usize| match items.get(at) {
            Some(Value::Int(n)) => Ok(u64::try_from(*n).unwrap_or(0)),
            _ => Err(unexpected()),
        };
        Ok(Self {
            admitted: number(0)? == 1,
            used: Used {
                requests_minute: number(1)?,
                tokens_minute: number(2)?,
                tokens_day: number(3)?,
            },
            counted: number(4)?,
        })
    }
}

/// How the admission script is named in its command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    /// By its SHA-1 (`EVALSHA`), as Redis caches it.
    Sha,
    /// Whole (`EVAL`), when Redis lacks it.
    Whole,
}

/// The admission script's command.
fn admit_command(script: Script, name: &str, quota: &Quota, now: &Now, want: u64) -> Vec<u8> {
    let limit = |l: Option<super::Limit>| l.map_or(0, |l| l.0).to_string().into_bytes();
    let (verb, script) = match script {
        Script::Whole => (b"EVAL".to_vec(), ADMIT.as_bytes().to_vec()),
        Script::Sha => (b"EVALSHA".to_vec(), admit_sha().to_vec()),
    };
    let args: Vec<Vec<u8>> = vec![
        verb,
        script,
        b"3".to_vec(),
        key(name, "rpm", now.minute),
        key(name, "tpm", now.minute),
        key(name, "tpd", now.day),
        limit(quota.requests_per_minute),
        limit(quota.tokens_per_minute),
        limit(quota.tokens_per_day),
        want.to_string().into_bytes(),
    ];
    let mut bytes = Vec::new();
    encode(&mut bytes, &args);
    bytes
}

impl Client {
    pub fn new(url: Url) -> Self {
        Self {
            url,
            calls: OnceLock::new(),
            shared: Arc::default(),
        }
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    fn send(&self, call: Call) -> Result<(), String> {
        let calls = self
            .calls
            .get_or_init(|| start(self.url.clone(), self.shared.clone()));
        calls
            .try_send(call)
            .map_err(|_| "Redis is not keeping up".to_owned())
    }

    /// Admits a request at once if what is known of its token allows (see the module's doc);
    /// false: it is to wait for `admit`. Asks Redis for more credits or newer counts without
    /// waiting when they run low or old.
    pub fn admit_at_once(&self, name: &Arc<str>, quota: &Quota, now: &Now) -> bool {
        let Some(taken) = self.shared.leases.take(name, quota, now) else {
            return false;
        };
        if taken.uncounted && self.shared.pending.count(name, now) {
            self.flush_soon();
        }
        if let Some(want) = taken.refill {
            let bytes = admit_command(Script::Sha, name, quota, now, want);
            let on_reply = self.on_admission(name, now, 0, |_| {});
            let sent = self.send(Call {
                bytes,
                commands: 1,
                reply: Some(on_reply),
            });
            if let Err(error) = sent {
                tracing::debug!(%error, "no refill asked of Redis");
            }
        }
        true
    }

    /// Checks the windows of `quota` and counts the request, with up to `want` admissions in
    /// all counted ahead: the counts before it, and whether it was let in. One round trip.
    pub async fn admit(
        &self,
        name: &Arc<str>,
        quota: &Quota,
        now: &Now,
        want: u64,
    ) -> Result<(bool, Used), String> {
        // The script by its SHA-1, as Redis caches it (loaded on connecting); sent whole only
        // when Redis lacks it (after SCRIPT FLUSH), which costs a second round trip.
        let mut script = Script::Sha;
        loop {
            let (tx, rx) = oneshot::channel();
            let on_reply = self.on_admission(name, now, 1, move |answer| {
                let _ = tx.send(answer);
            });
            self.send(Call {
                bytes: admit_command(script, name, quota, now, want.max(1)),
                commands: 1,
                reply: Some(on_reply),
            })?;
            let answer = rx
                .await
                .map_err(|_| "the connection to Redis closed".to_owned())?;
            match answer {
                Err(error) if error.starts_with("NOSCRIPT") && script == Script::Sha => {
                    script = Script::Whole;
                }
                answer => return answer.map(|a| (a.admitted, a.used)),
            }
        }
    }

    /// What becomes of the script's reply to a call for `own` requests (1: one waits for it;
    /// 0: a refill): what is known of the token is updated (on the connection's thread, whether
    /// or not anyone still waits), then `then` has the answer.
    fn on_admission(
        &self,
        name: &Arc<str>,
        now: &Now,
        own: u64,
        then: impl FnOnce(Result<Admission, String>) + Send + 'static,
    ) -> OnReply {
        let (shared, name, now) = (self.shared.clone(), name.clone(), *now);
        Box::new(move |reply| {
            let answer = reply.and_then(|value| Admission::parse(&value));
            if let Ok(answer) = &answer {
                super::health::up();
                let spare = answer.counted.saturating_sub(own);
                shared.leases.answered(&name, &now, answer.used, spare);
            }
            then(answer);
        })
    }

    /// Records a finished request: its tokens in its minute and day, and its usage in the
    /// day's usage hash. Summed with the others and written a moment later, without waiting.
    pub fn charge(&self, name: &Arc<str>, model: &str, tally: &Tally, now: &Now) {
        self.shared.leases.charged(name, tally.tokens(), now);
        if self.shared.pending.charge(name, model, tally, now) {
            self.flush_soon();
        }
    }

    /// Has the connection's thread write what is pending in a moment.
    fn flush_soon(&self) {
        self.calls
            .get_or_init(|| start(self.url.clone(), self.shared.clone()));
        self.shared.wake.notify_one();
    }

    /// Sends one command and waits for its reply.
    async fn call(&self, args: &[Vec<u8>]) -> Reply {
        let (tx, rx) = oneshot::channel();
        let mut bytes = Vec::new();
        encode(&mut bytes, args);
        self.send(Call {
            bytes,
            commands: 1,
            reply: Some(Box::new(move |reply| {
                let _ = tx.send(reply);
            })),
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
fn start(url: Url, shared: Arc<Shared>) -> mpsc::Sender<Call> {
    let (tx, rx) = mpsc::channel(4096);
    let spawned = std::thread::Builder::new()
        .name("limits-redis".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the Redis connection");
            runtime.block_on(run(url, rx, shared));
        });
    if let Err(error) = spawned {
        tracing::error!(%error, "cannot start the Redis connection's thread");
    }
    tx
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_AFTER: Duration = Duration::from_millis(200);
/// How long charges gather before they are written.
const FLUSH_AFTER: Duration = Duration::from_millis(5);

async fn run(url: Url, mut calls: mpsc::Receiver<Call>, shared: Arc<Shared>) {
    loop {
        let served = match tokio::time::timeout(CONNECT_TIMEOUT, connect(&url)).await {
            Ok(Ok(stream)) => serve(stream, &mut calls, &shared).await,
            Ok(Err(error)) => Err(error),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        };
        if let Err(error) = served {
            tracing::debug!(%error, redis = ?url, "Redis connection failed; reconnecting");
        }
        // Until it retries, calls fail at once (their reply dropped) rather than wait, and
        // charges are dropped: what passes meanwhile is uncounted.
        let retry = tokio::time::sleep(RETRY_AFTER);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                () = &mut retry => break,
                call = calls.recv() => if call.is_none() { return },
                () = shared.wake.notified() => {
                    shared.pending.take();
                    tracing::debug!("usage not recorded in Redis");
                }
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
    // The admission script, so that EVALSHA finds it.
    encode(
        &mut setup,
        &[
            b"SCRIPT".to_vec(),
            b"LOAD".to_vec(),
            ADMIT.as_bytes().to_vec(),
        ],
    );
    commands += 1;
    stream.write_all(&setup).await?;
    let mut reader = BufReader::new(&mut stream);
    for _ in 0..commands {
        // Redis's own words (WRONGPASS, NOAUTH, DB index out of range) hold no secret.
        read_value(&mut reader)
            .await?
            .map_err(std::io::Error::other)?;
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

/// Writes the calls as they come, and what is pending `FLUSH_AFTER` after it was first added,
/// and hands each reply to its call, in order, until the connection fails. Calls still waiting
/// for a reply are then dropped.
async fn serve(
    stream: Box<dyn Stream>,
    calls: &mut mpsc::Receiver<Call>,
    shared: &Shared,
) -> std::io::Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    let mut reader = BufReader::new(read);
    let (pending_tx, mut pending_rx) = mpsc::unbounded_channel::<(usize, Option<OnReply>)>();
    let replies = async move {
        while let Some((commands, on_reply)) = pending_rx.recv().await {
            let mut last = Ok(Value::Nil);
            for _ in 0..commands {
                last = read_value(&mut reader).await?;
            }
            if let Some(on_reply) = on_reply {
                on_reply(last);
            }
        }
        Ok(())
    };
    let requests = async move {
        let mut flush_at: Option<tokio::time::Instant> = None;
        loop {
            let flush = async {
                match flush_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let mut bytes = Vec::new();
            tokio::select! {
                call = calls.recv() => {
                    let Some(call) = call else { return Ok(()) };
                    bytes.extend_from_slice(&call.bytes);
                    let _ = pending_tx.send((call.commands, call.reply));
                }
                () = shared.wake.notified(), if flush_at.is_none() => {
                    flush_at = Some(tokio::time::Instant::now() + FLUSH_AFTER);
                    continue;
                }
                () = flush => {
                    flush_at = None;
                    let (charges, commands) = shared.pending.take();
                    bytes = charges;
                    let _ = pending_tx.send((commands, None));
                }
            }
            // Whatever else is already queued goes in the same write.
            while let Ok(call) = calls.try_recv() {
                bytes.extend_from_slice(&call.bytes);
                let _ = pending_tx.send((call.commands, call.reply));
            }
            write.write_all(&bytes).await?;
        }
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
