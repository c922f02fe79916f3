//! The official OpenAI SDKs, Python (PyPI `openai`) and Node (npm `openai`), pointed at the real
//! proxy in front of the fake upstream: the scripts in tests/clients/ make the calls and check what
//! the SDK returned; these tests check what reached the upstream.
//!
//! The SDKs are not optional: when one is missing the test fails and says how to install it, since
//! a skipped test would let CI pass without ever running a real client.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::AsyncReadExt;

const CLIENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");
const KEY: &str = "sk-test-SECRET-KEY-123";
/// Generous for an interpreter's start on a busy 2-core CI machine, short enough to fail a hang.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
const PYTHON_INSTALL: &str = "pip install -r tests/clients/requirements.txt";
const NODE_INSTALL: &str = "cd tests/clients && npm ci";

#[derive(Clone, Copy, Debug)]
enum Sdk {
    Python,
    Node,
}

impl Sdk {
    fn script(self) -> PathBuf {
        Path::new(CLIENTS).join(match self {
            Sdk::Python => "python_sdk.py",
            Sdk::Node => "node_sdk.mjs",
        })
    }

    fn interpreter(self) -> String {
        match self {
            Sdk::Python => std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()),
            Sdk::Node => std::env::var("NODE").unwrap_or_else(|_| "node".into()),
        }
    }

    /// What the SDK puts in User-Agent and X-Stainless-Lang: proof that the SDK made the request.
    fn user_agent_prefix(self) -> &'static str {
        match self {
            Sdk::Python => "OpenAI/Python ",
            Sdk::Node => "OpenAI/JS ",
        }
    }

    fn lang(self) -> &'static str {
        match self {
            Sdk::Python => "python",
            Sdk::Node => "js",
        }
    }

    /// Fails, saying how to install it, unless the SDK can be loaded; returns its version.
    fn require_installed(self) -> String {
        let (probe, install): (&[&str], _) = match self {
            Sdk::Python => (
                &["-c", "import openai; print(openai.__version__)"],
                PYTHON_INSTALL,
            ),
            Sdk::Node => (
                &[
                    "--input-type=module",
                    "-e",
                    "const { VERSION } = await import('openai/version'); console.log(VERSION)",
                ],
                NODE_INSTALL,
            ),
        };
        let interpreter = self.interpreter();
        let out = std::process::Command::new(&interpreter)
            .args(probe)
            .current_dir(CLIENTS)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `{interpreter}` for the {self:?} SDK test ({e}); install it")
            });
        assert!(
            out.status.success(),
            "the official {self:?} `openai` SDK is not installed; run: {install}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs the script with `args` and the client's own key, killing it if it overruns; fails
    /// unless it exits 0.
    async fn run(self, args: &[&str]) -> String {
        self.run_with_key(args, KEY).await
    }

    /// Runs the script with `args`, the SDK given `api_key`.
    async fn run_with_key(self, args: &[&str], api_key: &str) -> String {
        let mut command = tokio::process::Command::new(self.interpreter());
        command
            .arg(self.script())
            .args(args)
            .current_dir(CLIENTS)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            // Loopback must be reached directly, whatever proxy the machine is set up with.
            .env("NO_PROXY", "127.0.0.1,localhost")
            .env("no_proxy", "127.0.0.1,localhost");
        // The SDKs read these; the test's requests must depend only on what the scripts pass.
        for var in [
            "OPENAI_API_KEY",
            "OPENAI_BASE_URL",
            "OPENAI_ORG_ID",
            "OPENAI_PROJECT_ID",
            "OPENAI_LOG",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "NODE_OPTIONS",
        ] {
            command.env_remove(var);
        }
        command.env("OPENAI_PROXY_TEST_API_KEY", api_key);
        let started = Instant::now();
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", self.script()));
        let stdout = drain(child.stdout.take().unwrap());
        let stderr = drain(child.stderr.take().unwrap());
        let status = match tokio::time::timeout(SCRIPT_TIMEOUT, child.wait()).await {
            Ok(status) => Some(status.unwrap()),
            Err(_) => {
                let _ = child.kill().await;
                None
            }
        };
        let stdout = stdout.await.unwrap();
        let stderr = stderr.await.unwrap();
        let report = format!(
            "{:?} {args:?}\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}",
            self.script()
        );
        match status {
            None => panic!("killed after {SCRIPT_TIMEOUT:?}: {report}"),
            Some(status) => assert!(status.success(), "exited with {status}: {report}"),
        }
        println!("{:.1}s {report}", started.elapsed().as_secs_f64());
        stdout
    }
}

/// Reads a child's pipe to the end, so a chatty child never blocks on a full pipe.
fn drain(
    mut pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        // A killed child closes its pipes; the bound covers a grandchild that kept one open.
        let _ = tokio::time::timeout(Duration::from_secs(5), pipe.read_to_end(&mut bytes)).await;
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// A fine-tuning file of some 400 KB, large enough to cross the proxy in many body chunks, with
/// non-ASCII text so that any re-encoding on the way shows.
fn training_file(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut text = String::new();
    for i in 0..4000 {
        text.push_str(&format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"question {i} ünïcødé\"}},{{\"role\":\"assistant\",\"content\":\"answer {i}\"}}]}}\n"
        ));
    }
    let path = dir.join("train.jsonl");
    std::fs::write(&path, &text).unwrap();
    (path, text.into_bytes())
}

/// The parts of a multipart/form-data body as (part headers, content), checked to be well formed
/// from the first boundary to the closing one.
fn multipart_parts(content_type: &str, body: &[u8]) -> Vec<(String, Vec<u8>)> {
    assert!(
        content_type.starts_with("multipart/form-data"),
        "{content_type}"
    );
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .unwrap_or_else(|| panic!("no boundary in {content_type}"))
        .trim_matches('"');
    let delimiter = format!("--{boundary}");
    let between = format!("\r\n--{boundary}");
    assert!(
        body.starts_with(delimiter.as_bytes()),
        "the body starts with the boundary of its Content-Type"
    );
    let mut rest = &body[delimiter.len()..];
    let mut parts = Vec::new();
    while !rest.starts_with(b"--") {
        rest = rest
            .strip_prefix(b"\r\n")
            .expect("a line break after a boundary");
        let end = find(rest, between.as_bytes()).expect("every part is closed by a boundary");
        let part = &rest[..end];
        let split = find(part, b"\r\n\r\n").expect("part headers end with a blank line");
        parts.push((
            String::from_utf8_lossy(&part[..split]).to_lowercase(),
            part[split + 4..].to_vec(),
        ));
        rest = &rest[end + between.len()..];
    }
    let epilogue = &rest[2..];
    assert!(
        epilogue.is_empty() || epilogue == b"\r\n",
        "nothing after the closing boundary, got {} bytes",
        epilogue.len()
    );
    parts
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

fn header<'a>(seen: &'a Received, name: &str) -> &'a str {
    seen.headers
        .get(name)
        .unwrap_or_else(|| panic!("{} {} arrived without {name}", seen.method, seen.uri))
        .to_str()
        .unwrap()
}

fn path_of(seen: &Received) -> String {
    seen.uri.parse::<http::Uri>().unwrap().path().to_owned()
}

/// How the SDK's key is taken: passed through, or (tokens mode) a token of the proxy's that the
/// proxy swaps for its own key.
#[derive(Clone, Copy, PartialEq)]
enum Auth {
    Passthrough,
    Tokens,
}

async fn sdk_round_trip(sdk: Sdk, auth: Auth) {
    let version = sdk.require_installed();
    for alpn in [Alpn::Both, Alpn::Http1Only] {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, alpn).await;
        let (proxy, api_key, upstream_key) = match auth {
            Auth::Passthrough => (
                Proxy::start(&basic_config(&upstream, &pki, "")),
                KEY.to_owned(),
                KEY,
            ),
            Auth::Tokens => {
                let issued = issue("sdk");
                (
                    start_tokens(&upstream, &pki, &issued.table, &[]),
                    issued.token,
                    UPSTREAM_KEY,
                )
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let (file, content) = training_file(dir.path());
        sdk.run_with_key(&[&proxy.url("/v1"), file.to_str().unwrap()], &api_key)
            .await;

        let received = upstream.received();
        let paths: Vec<String> = received.iter().map(path_of).collect();
        assert_eq!(
            paths,
            [
                "/v1/chat/completions",
                "/v1/chat/completions",
                "/v1/embeddings",
                "/v1/files"
            ],
            "the upstream saw exactly the SDK's four calls"
        );
        for seen in &received {
            let what = format!("{sdk:?} {} {}", seen.method, seen.uri);
            assert_eq!(seen.method, http::Method::POST, "{what}");
            assert_eq!(seen.sni.as_deref(), Some("api.openai.com"), "{what}");
            assert_eq!(seen.host(), "api.openai.com", "{what}");
            assert_eq!(
                header(seen, "authorization"),
                format!("Bearer {upstream_key}"),
                "{what}: the key goes up (the client's unchanged, or the proxy's for a token)"
            );
            if auth == Auth::Tokens {
                for (name, value) in &seen.headers {
                    let value = String::from_utf8_lossy(value.as_bytes());
                    assert!(
                        !value.contains(&api_key),
                        "{what}: the token went up in {name}"
                    );
                }
            }
            let agent = header(seen, "user-agent");
            assert_eq!(
                agent,
                format!("{}{version}", sdk.user_agent_prefix()),
                "{what}"
            );
            assert_eq!(header(seen, "x-stainless-lang"), sdk.lang(), "{what}");
            assert!(!seen.headers.contains_key("x-forwarded-for"), "{what}");
            if let Some(length) = seen.headers.get("content-length") {
                assert_eq!(
                    length.to_str().unwrap(),
                    seen.body.len().to_string(),
                    "{what}"
                );
            }
        }

        let chat = json(&received[0].body);
        assert_eq!(chat["model"], "gpt-4o-mini");
        assert_eq!(chat["messages"][0]["content"], "Say hello");
        assert_ne!(
            chat["stream"], true,
            "the plain call did not ask for a stream"
        );
        assert!(header(&received[0], "content-type").starts_with("application/json"));

        let stream = json(&received[1].body);
        assert_eq!(
            stream["stream"], true,
            "the streamed call asked for a stream"
        );
        assert_eq!(header(&received[1], "x-test-events"), "6");
        let stream_id = header(&received[1], "x-test-stream");
        assert_eq!(
            upstream.sent_events.lock().unwrap()[stream_id].len(),
            6,
            "the upstream sent every event"
        );

        let embeddings = json(&received[2].body);
        assert_eq!(embeddings["input"], "The quick brown fox");
        assert_eq!(embeddings["model"], "text-embedding-3-small");
        assert_eq!(embeddings["encoding_format"], "float");

        let files = &received[3];
        let parts = multipart_parts(header(files, "content-type"), &files.body);
        let part = |name: &str| {
            parts
                .iter()
                .find(|(headers, _)| headers.contains(&format!("name=\"{name}\"")))
                .unwrap_or_else(|| panic!("no {name:?} part in {parts:?}"))
        };
        assert_eq!(part("purpose").1, b"fine-tune");
        let (file_headers, file_content) = part("file");
        assert!(
            file_headers.contains("filename=\"train.jsonl\""),
            "{file_headers}"
        );
        assert_eq!(
            file_content.len(),
            content.len(),
            "the file arrived whole inside the multipart body"
        );
        assert!(*file_content == content, "the file arrived byte for byte");
        assert_eq!(parts.len(), 2, "only the file and its purpose were sent");

        // Once the upload's access line is in, every line of this run is.
        let logs = eventually(Duration::from_secs(5), "the upload's access line", || {
            let logs = proxy.logs();
            logs.contains("POST /v1/files 200").then_some(logs)
        })
        .await;
        assert!(!logs.contains("SECRET"), "the key never reaches the log");
        assert!(!logs.contains(&api_key), "the token never reaches the log");
    }
}

async fn sdk_sees_proxy_errors(sdk: Sdk) {
    sdk.require_installed();
    let proxy = Proxy::start(&down_upstream_config("connect_timeout = \"2s\"\n"));
    // What the proxy itself says is the reference the SDK's error must carry word for word.
    let answer = send(
        &http_client(),
        post_json(
            &proxy.url("/v1/chat/completions"),
            serde_json::json!({"model": "gpt-4o-mini", "messages": []}),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let error = answer.json()["error"].clone();
    assert_eq!(error["code"], "upstream_unreachable", "{error}");
    let out = sdk
        .run(&[
            &proxy.url("/v1"),
            "--expect-error",
            "502",
            &error.to_string(),
        ])
        .await;
    for call in ["chat:", "stream:", "embeddings:", "upload 1/"] {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(&format!("ok {call}"))),
            "{call} saw the 502: {out}"
        );
    }
}

/// A token the proxy did not issue: the SDK raises its authentication error, carrying the
/// proxy's own 401 word for word, and nothing reaches the upstream.
async fn sdk_sees_authentication_error(sdk: Sdk) {
    sdk.require_installed();
    let pki = Pki::new();
    let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
    let proxy = start_tokens(&upstream, &pki, &issue("sdk").table, &[]);
    let wrong = issue("nobody").token;
    let mut request = post_json(
        &proxy.url("/v1/chat/completions"),
        serde_json::json!({"model": "gpt-4o-mini", "messages": []}),
    );
    let bearer = format!("Bearer {wrong}").parse().unwrap();
    request.headers_mut().insert("authorization", bearer);
    let answer = send(&http_client(), request).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    let error = answer.json()["error"].clone();
    assert_eq!(error["code"], "invalid_api_key", "{error}");
    let args = [
        &proxy.url("/v1"),
        "--expect-error",
        "401",
        &error.to_string(),
    ];
    let out = sdk.run_with_key(&args, &wrong).await;
    for call in ["chat:", "stream:", "embeddings:", "upload 1/"] {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(&format!("ok {call}"))
                    && l.contains("AuthenticationError 401 invalid_api_key")),
            "{call} raised the SDK's AuthenticationError: {out}"
        );
    }
    assert!(
        upstream.received().is_empty(),
        "nothing reached the upstream"
    );
}

/// A token held to one request in flight, with a stream holding it: the SDK raises its
/// RateLimitError with the proxy's Retry-After (1 s), and its own retries wait that long between
/// attempts (their default first backoff is under 0.5 s) until the stream ends and a retry is let
/// in.
async fn sdk_honours_retry_after(sdk: Sdk) {
    sdk.require_installed();
    let pki = Pki::new();
    let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
    let issued = issue("sdk");
    let table = format!("{}max_concurrent = 1\n", issued.table);
    let proxy = start_tokens(&upstream, &pki, &table, &[]);
    let body = serde_json::json!({"model": "gpt-4o-mini", "stream": true, "messages": []});
    let mut hold = post_json(&proxy.url("/v1/chat/completions"), body);
    let headers = hold.headers_mut();
    headers.insert(
        "authorization",
        format!("Bearer {}", issued.token).parse().unwrap(),
    );
    headers.insert("x-test-events", "1000".parse().unwrap());
    headers.insert("x-test-gap-ms", "50".parse().unwrap());
    let held = http_client().request(hold).await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);

    let (base, token) = (proxy.url("/v1"), issued.token.clone());
    let script =
        tokio::spawn(async move { sdk.run_with_key(&[&base, "--rate-limited"], &token).await });
    // The call without retries, then two attempts of the retrying one.
    let refusals = || refusal_times(&proxy.logs());
    eventually(SCRIPT_TIMEOUT, "three refusals", || {
        (refusals().len() >= 3).then_some(())
    })
    .await;
    drop(held);
    let out = script.await.unwrap();
    assert!(
        out.contains("RateLimitError 429 rate_limit_exceeded, Retry-After 1"),
        "{out}"
    );
    assert!(out.contains("retried: chat:"), "{out}");
    let times = refusals();
    let waited = times[2] - times[1];
    assert!(
        waited >= 0.9,
        "the SDK retried after {waited:.2}s, not Retry-After's 1s: {times:?}"
    );
}

/// When each 429 of a chat completion was logged, in seconds of the day (the log line's UTC
/// timestamp).
fn refusal_times(logs: &str) -> Vec<f64> {
    logs.lines()
        .filter(|l| l.contains("POST /v1/chat/completions 429"))
        .filter_map(|l| {
            let time = l.split_whitespace().next()?.split_once('T')?.1;
            let mut hms = time.trim_end_matches('Z').split(':');
            let (h, m, s) = (hms.next()?, hms.next()?, hms.next()?);
            Some(
                h.parse::<f64>().ok()? * 3600.0
                    + m.parse::<f64>().ok()? * 60.0
                    + s.parse::<f64>().ok()?,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_honours_the_proxys_retry_after() {
    sdk_honours_retry_after(Sdk::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sdk_honours_the_proxys_retry_after() {
    sdk_honours_retry_after(Sdk::Node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_through_the_proxy() {
    bounded(150, sdk_round_trip(Sdk::Python, Auth::Passthrough)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sdk_through_the_proxy() {
    bounded(150, sdk_round_trip(Sdk::Node, Auth::Passthrough)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_with_a_token_of_the_proxys() {
    bounded(150, sdk_round_trip(Sdk::Python, Auth::Tokens)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sdk_with_a_token_of_the_proxys() {
    bounded(150, sdk_round_trip(Sdk::Node, Auth::Tokens)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_raises_its_authentication_error_on_a_wrong_token() {
    bounded(90, sdk_sees_authentication_error(Sdk::Python)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sdk_raises_its_authentication_error_on_a_wrong_token() {
    bounded(90, sdk_sees_authentication_error(Sdk::Node)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_sees_the_proxys_own_errors() {
    bounded(90, sdk_sees_proxy_errors(Sdk::Python)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_sdk_sees_the_proxys_own_errors() {
    bounded(90, sdk_sees_proxy_errors(Sdk::Node)).await;
}
