//! The upstream reached through an egress proxy: tinyproxy (HTTP CONNECT with Basic auth, and
//! behind a TLS front as an `https://` proxy) and microsocks (SOCKS5 with user and password),
//! both Debian's, started by the tests. Plain requests, streams, HTTP/2 to the upstream and a
//! WebSocket go through each; a refusing or absent proxy gives a 502 that names it.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{StatusCode, Version};
use tokio_tungstenite::tungstenite::Message;

const USER: &str = "egress-user";
const PASSWORD: &str = "egress-PASSWORD-7f3a";

/// tinyproxy with Basic auth, letting CONNECT through to `connect_port` alone.
async fn tinyproxy(dir: &Path, connect_port: u16) -> Daemon {
    let port = free_port();
    let conf = dir.join(format!("tinyproxy-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 100\nAllow 127.0.0.1\n\
             BasicAuth {USER} {PASSWORD}\nConnectPort {connect_port}\nLogLevel Info\n"
        ),
    )
    .unwrap();
    let mut command = Command::new("/usr/bin/tinyproxy");
    command.arg("-d").arg("-c").arg(&conf);
    Daemon::spawn(command, port).await
}

/// microsocks, asking for a user name and password.
async fn microsocks() -> Daemon {
    let port = free_port();
    let mut command = Command::new("/usr/bin/microsocks");
    command.args([
        "-i",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-u",
        USER,
        "-P",
        PASSWORD,
    ]);
    Daemon::spawn(command, port).await
}

/// A TLS front for `behind` (tinyproxy), making it an `https://` proxy; counts its handshakes.
async fn tls_front(pki: &Pki, behind: u16) -> (u16, Arc<AtomicUsize>, TlsServer) {
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = handshakes.clone();
    let front = TlsServer::start(pki.server.clone(), move |mut tls, _| {
        counted.fetch_add(1, Ordering::Relaxed);
        async move {
            let Ok(mut plain) = tokio::net::TcpStream::connect(("127.0.0.1", behind)).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        }
    })
    .await;
    (front.addr.port(), handshakes, front)
}

/// The proxy with its upstream at `url_host` (the fake upstream's port) reached through `proxy`,
/// the egress password (`password`) in a file beside its config, logging at debug.
fn start_through(
    upstream: &FakeUpstream,
    pki: &Pki,
    url_host: &str,
    proxy: &str,
    password: &str,
) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let password_path = dir.path().join("egress-password");
    write_with_mode(&password_path, &format!("{password}\n"), 0o600);
    let config = through_config(upstream, pki, url_host, proxy);
    Proxy::start_in(dir, &config, ProxyOptions::default())
}

fn through_config(upstream: &FakeUpstream, pki: &Pki, url_host: &str, proxy: &str) -> String {
    format!(
        "listen = [\"127.0.0.1:0\"]\n[log]\nlevel = \"debug\"\n[upstream]\n\
         url = \"https://{url_host}:{}\"\nhost = \"api.openai.com\"\nca_file = \"{}\"\n\
         proxy = \"{proxy}\"\nproxy_password_file = \"egress-password\"\n",
        upstream.addr.port(),
        pki.ca_pem.display()
    )
}

/// A chat completion, a stream and a WebSocket through the proxy and its egress proxy, with
/// HTTP/2 to the upstream and its TLS verified end to end under the upstream's name.
async fn exercise(proxy: &Proxy, upstream: &FakeUpstream) {
    let client = http_client();
    let answer = send(
        &client,
        post_json(&proxy.url("/v1/chat/completions"), chat()),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let seen = upstream.last();
    assert_eq!(seen.sni.as_deref(), Some("api.openai.com"));
    assert_eq!(seen.alpn.as_deref(), Some("h2"));
    assert_eq!(seen.version, Version::HTTP_2);

    stream_chat(&client, &proxy.url("/v1/chat/completions"), "egress", 5, 10).await;

    let url = format!(
        "ws://{}/v1/realtime?model=gpt-4o-realtime-preview",
        proxy.http.unwrap()
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("a WebSocket through the egress proxy");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws.send(Message::text("through the egress proxy"))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("through the egress proxy")
    );
    ws.close(None).await.unwrap();
    assert_eq!(upstream.last().version, Version::HTTP_11);
    assert_logs_hide(proxy, "upstream connection opened", PASSWORD).await;
}

/// Once the proxy has logged `marker` (its logs arrive through a pipe), they hold no `secret`.
async fn assert_logs_hide(proxy: &Proxy, marker: &str, secret: &str) {
    eventually(Duration::from_secs(5), marker, || {
        proxy.logs().contains(marker).then_some(())
    })
    .await;
    let logs = proxy.logs();
    assert!(
        !logs.contains(secret),
        "the password is in the logs: {logs}"
    );
}

/// tinyproxy's log shows the tunnel to the upstream.
async fn assert_tunneled(tinyproxy: &Daemon, upstream: &FakeUpstream) {
    let connect = format!("CONNECT 127.0.0.1:{}", upstream.addr.port());
    eventually(Duration::from_secs(5), "tinyproxy's CONNECT log", || {
        tinyproxy.output().contains(&connect).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_http_proxy_with_basic_auth() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let egress = tinyproxy(pki.dir.path(), upstream.addr.port()).await;
        let url = format!("http://{USER}@127.0.0.1:{}", egress.port);
        let proxy = start_through(&upstream, &pki, "127.0.0.1", &url, PASSWORD);
        exercise(&proxy, &upstream).await;
        assert_tunneled(&egress, &upstream).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_https_proxy_tls_to_the_proxy_and_end_to_end() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let egress = tinyproxy(pki.dir.path(), upstream.addr.port()).await;
        let (front, handshakes, _front) = tls_front(&pki, egress.port).await;
        let url = format!("https://{USER}@localhost:{front}");
        let proxy = start_through(&upstream, &pki, "127.0.0.1", &url, PASSWORD);
        exercise(&proxy, &upstream).await;
        // The pooled connection and the WebSocket's own, at least.
        let handshakes = handshakes.load(Ordering::Relaxed);
        assert!(handshakes >= 2, "TLS to the egress proxy: {handshakes}");
        assert_tunneled(&egress, &upstream).await;
    })
    .await;
}

/// `socks5h://` gives microsocks the upstream's name (`localhost`) to resolve; `socks5://`
/// resolves it here and gives an address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_socks5_with_user_and_password() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let egress = microsocks().await;
        for scheme in ["socks5h", "socks5"] {
            let url = format!("{scheme}://{USER}@127.0.0.1:{}", egress.port);
            let proxy = start_through(&upstream, &pki, "localhost", &url, PASSWORD);
            exercise(&proxy, &upstream).await;
        }
    })
    .await;
}

/// The 502 a request gets, and its message.
async fn refused(proxy: &Proxy) -> String {
    let answer = send(
        &http_client(),
        post_json(&proxy.url("/v1/chat/completions"), chat()),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    let body = answer.json();
    assert_eq!(body["error"]["code"], "egress_proxy_error");
    assert_eq!(body["error"]["type"], "upstream_error");
    body["error"]["message"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_or_absent_egress_proxy_gives_a_502_naming_it() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let wrong = "not-the-PASSWORD-9c1d";

        let http = tinyproxy(pki.dir.path(), upstream.addr.port()).await;
        let proxy = start_through(
            &upstream,
            &pki,
            "127.0.0.1",
            &format!("http://{USER}@127.0.0.1:{}", http.port),
            wrong,
        );
        // tinyproxy answers a CONNECT with wrong credentials 401, where RFC 9110 says 407.
        let message = refused(&proxy).await;
        let refusal = format!("egress proxy 127.0.0.1:{} refused CONNECT: ", http.port);
        assert!(
            [
                format!("{refusal}401 Unauthorized"),
                format!("{refusal}407 Proxy Authentication Required")
            ]
            .contains(&message),
            "{message}"
        );
        assert_logs_hide(&proxy, "answered by the proxy", wrong).await;

        let socks = microsocks().await;
        let proxy = start_through(
            &upstream,
            &pki,
            "127.0.0.1",
            &format!("socks5h://{USER}@127.0.0.1:{}", socks.port),
            wrong,
        );
        assert_eq!(
            refused(&proxy).await,
            format!(
                "egress proxy 127.0.0.1:{} refused the user name or password",
                socks.port
            )
        );
        assert_logs_hide(&proxy, "answered by the proxy", wrong).await;

        let down = free_port();
        let proxy = start_through(
            &upstream,
            &pki,
            "127.0.0.1",
            &format!("socks5h://{USER}@127.0.0.1:{down}"),
            PASSWORD,
        );
        assert_eq!(
            refused(&proxy).await,
            format!("egress proxy 127.0.0.1:{down} is unreachable: connection refused")
        );
        assert_logs_hide(&proxy, "answered by the proxy", PASSWORD).await;
        assert!(
            upstream.received().is_empty(),
            "nothing reached the upstream"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_proxy_applies_on_reload() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let down = free_port();
        let mut proxy = start_through(
            &upstream,
            &pki,
            "127.0.0.1",
            &format!("http://{USER}@127.0.0.1:{down}"),
            PASSWORD,
        );
        assert!(refused(&proxy).await.contains("is unreachable"));

        let socks = microsocks().await;
        let seen = proxy.notify.messages().len();
        let via = format!("socks5h://127.0.0.1:{}", socks.port);
        proxy.write_config(&through_config(
            &upstream,
            &pki,
            "127.0.0.1",
            &format!("socks5h://{USER}@127.0.0.1:{}", socks.port),
        ));
        proxy.signal("HUP");
        let ready = proxy.wait_ready(seen);
        let status = proxy.notify.messages()[ready].clone();
        assert!(status.contains(&format!(" via {via}")), "{status}");
        assert!(!status.contains(USER), "{status}");
        let answer = send(
            &http_client(),
            post_json(&proxy.url("/v1/chat/completions"), chat()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    })
    .await;
}

/// `openai-proxy check` on `config`, beside a password file (readable by all).
fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("egress-password"), PASSWORD).unwrap();
    check_in(dir.path(), config)
}

#[test]
fn config_errors_point_at_the_key_and_never_show_the_password() {
    let base = "listen = [\"127.0.0.1:0\"]\n[upstream]\n";
    let (ok, text) = check(&format!(
        "{base}proxy = \"http://{USER}:{PASSWORD}@127.0.0.1:3128\"\n"
    ));
    assert!(!ok);
    assert!(text.contains("config.toml:3:9: "), "{text}");
    assert!(text.contains("proxy_password_file"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");

    let (ok, text) = check(&format!(
        "{base}proxy = \"http://127.0.0.1:3128\"\nproxy_password_file = \"egress-password\"\n"
    ));
    assert!(!ok);
    assert!(text.contains("config.toml:4:23: "), "{text}");
    assert!(text.contains("needs a proxy url with a user"), "{text}");

    // Readable by others: refused, as the key file is.
    let (ok, text) = check(&format!(
        "{base}proxy = \"socks5h://{USER}@127.0.0.1:1080\"\nproxy_password_file = \"egress-password\"\n"
    ));
    assert!(!ok);
    assert!(text.contains("may be read by others"), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");

    let (ok, text) = check(&format!("{base}proxy = \"ftp://127.0.0.1:21\"\n"));
    assert!(!ok);
    assert!(text.contains("socks5h://"), "{text}");
}
