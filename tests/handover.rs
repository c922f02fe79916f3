//! Handing the service over to a new process (an upgrade): the new binary serves at once while
//! the old process finishes what is in flight; a successor that cannot start changes nothing.
//! The notify socket is the test's own, so MAINPID= and both processes' READY=1 are seen.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio_tungstenite::tungstenite::Message;

const SECOND: Duration = Duration::from_secs(1);

/// The proxy started from a copy of its binary, which the test can then replace.
fn proxy_from_copy(config: &str) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("openai-proxy");
    std::fs::copy(BIN, &bin).unwrap();
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut command = Proxy::command(&bin, &config_path);
    command.env("RUNTIME_DIRECTORY", dir.path());
    Proxy::spawn_command(dir, config_path, command, true)
}

/// `openai-proxy reload PID`, as the unit's ExecReload runs it: its exit status and its words.
async fn reload_command(proxy: &Proxy) -> (bool, String) {
    let out = tokio::process::Command::new(BIN)
        .arg("reload")
        .arg(proxy.child.id().to_string())
        .env("RUNTIME_DIRECTORY", proxy.dir.path())
        .output()
        .await
        .unwrap();
    let words = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    (out.status.success(), words.into_owned())
}

/// Puts `contents` at `bin` the way dpkg does: written beside it, then renamed over it.
fn replace_binary(bin: &Path, contents: &[u8]) {
    let new = bin.with_extension("dpkg-new");
    std::fs::write(&new, contents).unwrap();
    std::fs::set_permissions(&new, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&new, bin).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_after_the_binary_was_replaced_hands_over_while_the_old_process_finishes() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let mut proxy = proxy_from_copy(&basic_config(&upstream, &pki, ""));
        let bin = proxy.dir.path().join("openai-proxy");
        let old_pid = proxy.child.id();
        let url = proxy.url("/v1/chat/completions");
        let stream_url = url.clone();
        let stream =
            tokio::spawn(
                async move { stream_chat(&http_client(), &stream_url, "long", 30, 100).await },
            );
        eventually(10 * SECOND, "the stream to be in flight", || {
            let sent = upstream.sent_events.lock().unwrap();
            (sent.get("long").map_or(0, Vec::len) >= 2).then_some(())
        })
        .await;

        let ws_url = format!("ws://{}/v1/realtime?model=m", proxy.http.unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();

        replace_binary(&bin, &std::fs::read(BIN).unwrap());
        let seen = proxy.notify.messages().len();
        let (reloaded, words) = reload_command(&proxy).await;
        assert!(reloaded && words.contains("handed over to PID"), "{words}");
        let (named, new_pid) = proxy.notify.wait_main_pid(seen, 10 * SECOND);
        let _successor = Successor(new_pid);
        assert_ne!(new_pid, old_pid);
        // The successor's own READY=1, once it knows it is the main process.
        proxy.wait_ready(named + 1);

        // A new connection is answered at once, by the new process, while the stream flows on.
        let asked = Instant::now();
        let client = http_client();
        assert_eq!(
            status(&client, &proxy.url("/v1/models")).await,
            Some(StatusCode::OK)
        );
        let waited = asked.elapsed();
        assert!(waited < 2 * SECOND, "a new request waited {waited:?}");
        assert!(!stream.is_finished(), "the old stream is still in flight");
        // The WebSocket opened before the handover goes on in the old process, then closes.
        for text in ["after the handover", "still here"] {
            ws.send(Message::text(text)).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
        }
        ws.close(None).await.unwrap();

        let arrivals = stream
            .await
            .expect("the stream completes in the old process");
        assert_eq!(arrivals.len(), 30);
        assert_eq!(
            proxy.wait_exit(10 * SECOND).code(),
            Some(0),
            "the old process drained"
        );
        let exe = std::fs::read_link(format!("/proc/{new_pid}/exe")).unwrap();
        assert_eq!(exe, bin, "the new process runs the new binary");
        assert_eq!(
            status(&client, &proxy.url("/v1/models")).await,
            Some(StatusCode::OK)
        );
        let logs = proxy.logs();
        assert!(
            logs.contains("handed over; finishing what is in flight"),
            "{logs}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_cannot_start_leaves_the_old_process_serving() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let config = basic_config(&upstream, &pki, "[reload]\nwatch_files = false\n");
        let proxy = proxy_from_copy(&config);
        let bin = proxy.dir.path().join("openai-proxy");
        let client = http_client();
        let models = proxy.url("/v1/models");

        // USR2 forces a handover; the successor reads a broken config and says why it fails.
        proxy.write_config("listen = [\"127.0.0.1:0\"]\n[upstream]\nurl = 7\n");
        let seen = proxy.notify.messages().len();
        proxy.signal("USR2");
        let failed = proxy
            .notify
            .wait_for(seen, 40 * SECOND, "a failed handover", |m| {
                m.contains("READY=1") && m.contains("handover failed")
            });
        let message = &proxy.notify.messages()[failed];
        assert!(
            message.contains("config.toml:3:7"),
            "the reason, with its place: {message}"
        );
        proxy.write_config(&config);

        // A binary that dies at once: the reload that finds it replaced fails the same way.
        replace_binary(&bin, b"#!/bin/sh\nexit 7\n");
        let seen = proxy.notify.messages().len();
        let (reloaded, words) = reload_command(&proxy).await;
        assert!(!reloaded, "the reload command fails: {words}");
        assert!(
            words.contains("handover failed") && words.contains("exit status: 7"),
            "{words}"
        );
        let failed = proxy
            .notify
            .wait_for(seen, 40 * SECOND, "a failed handover", |m| {
                m.contains("READY=1") && m.contains("handover failed")
            });
        let message = &proxy.notify.messages()[failed];
        assert!(message.contains("exit status: 7"), "{message}");

        assert!(
            proxy
                .notify
                .messages()
                .iter()
                .all(|m| !m.contains("MAINPID=")),
            "no one else was named the main process"
        );
        assert_eq!(status(&client, &models).await, Some(StatusCode::OK));
        let mut proxy = proxy;
        assert!(
            proxy.child.try_wait().unwrap().is_none(),
            "the old process serves on"
        );
    })
    .await;
}

/// Processes running the binary at `bin`, by PID.
fn running(bin: &Path) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == bin))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handovers_asked_for_at_once_leave_one_successor() {
    bounded(60, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let mut proxy = proxy_from_copy(&basic_config(&upstream, &pki, ""));
        let bin = proxy.dir.path().join("openai-proxy");
        replace_binary(&bin, &std::fs::read(BIN).unwrap());
        let seen = proxy.notify.messages().len();
        for signal in ["USR2", "HUP", "USR2", "HUP"] {
            proxy.signal(signal);
        }
        let (named, successor) = proxy.notify.wait_main_pid(seen, 10 * SECOND);
        let _successor = Successor(successor);
        proxy.wait_ready(named + 1);
        assert_eq!(proxy.wait_exit(10 * SECOND).code(), Some(0));
        let named: Vec<_> = proxy.notify.messages()[seen..]
            .iter()
            .filter(|m| m.contains("MAINPID="))
            .cloned()
            .collect();
        assert_eq!(named.len(), 1, "{named:?}");
        assert_eq!(
            running(&bin),
            [successor],
            "one process is left, the successor"
        );
        let client = http_client();
        assert_eq!(
            status(&client, &proxy.url("/v1/models")).await,
            Some(StatusCode::OK)
        );
    })
    .await;
}
