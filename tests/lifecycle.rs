//! The daemon's life under real signals and file changes: readiness, reload, drain, adoption of
//! sockets handed over by systemd. The notify socket is the test's own, recording every message.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

const SECOND: Duration = Duration::from_secs(1);

fn is_ready(m: &str) -> bool {
    m.lines().any(|l| l == "READY=1")
}

fn status_of(m: &str) -> &str {
    m.lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_reloading_stopping_and_watchdog() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let config = basic_config(&upstream, &pki, "");
        let mut proxy = Proxy::start_with(
            &config,
            ProxyOptions {
                env: vec![("WATCHDOG_USEC".into(), "300000".into())],
                ..Default::default()
            },
        );
        // READY=1 came only once the listener accepts.
        let messages = proxy.notify.messages();
        let ready = messages.iter().position(|m| is_ready(m)).unwrap();
        assert!(
            messages[..ready].iter().any(|m| m.contains("FDSTORE=1")),
            "{messages:?}"
        );
        assert!(
            status_of(&messages[ready]).contains("generation 1"),
            "{messages:?}"
        );
        assert_eq!(
            status(&http_client(), &proxy.url("/v1/models")).await,
            Some(StatusCode::OK)
        );

        // The watchdog pings at half of WATCHDOG_USEC.
        let first = proxy
            .notify
            .wait_for(0, 5 * SECOND, "WATCHDOG=1", |m| m.contains("WATCHDOG=1"));
        proxy
            .notify
            .wait_for(first + 1, 5 * SECOND, "a second WATCHDOG=1", |m| {
                m.contains("WATCHDOG=1")
            });

        // SIGHUP: RELOADING=1 and MONOTONIC_USEC= in one message, then READY=1.
        let seen = proxy.notify.messages().len();
        proxy.signal("HUP");
        let reloading = proxy.notify.wait_for(seen, 5 * SECOND, "RELOADING=1", |m| {
            m.contains("RELOADING=1")
        });
        let message = &proxy.notify.messages()[reloading];
        let usec: u64 = message
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .expect("MONOTONIC_USEC in the RELOADING message")
            .parse()
            .unwrap();
        assert!(usec > 0);
        assert!(message.contains("STATUS="), "{message}");
        let ready = proxy.wait_ready(reloading);
        assert!(status_of(&proxy.notify.messages()[ready]).contains("generation 2"));

        // A file change does the same.
        let seen = proxy.notify.messages().len();
        proxy.write_config(&format!("{config}\n# touched\n"));
        let reloading =
            proxy
                .notify
                .wait_for(seen, 5 * SECOND, "RELOADING=1 on file change", |m| {
                    m.contains("RELOADING=1")
                });
        let ready = proxy.wait_ready(reloading);
        assert!(status_of(&proxy.notify.messages()[ready]).contains("generation 3"));

        // SIGTERM: STOPPING=1, then exit 0.
        let seen = proxy.notify.messages().len();
        proxy.signal("TERM");
        proxy
            .notify
            .wait_for(seen, 5 * SECOND, "STOPPING=1", |m| m.contains("STOPPING=1"));
        assert_eq!(proxy.wait_exit(10 * SECOND).code(), Some(0));
    })
    .await;
}

/// The config for one step of the reload test: valid ones open an extra path prefix named for
/// the step, so the test can tell which config serves.
fn step_config(base: &str, step: usize, valid: bool, watch_files: bool) -> String {
    if valid {
        format!(
            "{base}\n[proxy]\nallowed_path_prefixes = [\"/v1/\", \"/step{step}/\"]\n[reload]\nwatch_files = {watch_files}\n"
        )
    } else {
        // A different kind of mistake each time.
        match step % 6 {
            1 => format!("{base}\n[proxy]\nallowed_path_prefixes = [\"/v1/\", \"/step{step}/\"\n"),
            3 => format!("{base}\n[server]\nmax_connections = 0\n"),
            5 => format!("{base}\n[proxy]\nunknown_key_{step} = true\n"),
            _ => format!(
                "{base}\n[tls]\nlisten = [\"127.0.0.2:0\"]\ncert_file = \"/nonexistent/{step}.pem\"\nkey_file = \"/nonexistent/key.pem\"\n"
            ),
        }
    }
}

/// Ways tools replace a file, each of which the watcher must notice.
fn rewrite(path: &Path, text: &str, how: usize) {
    let dir = path.parent().unwrap();
    match how % 4 {
        // In place, like `echo > file`.
        0 => std::fs::write(path, text).unwrap(),
        // Write a temporary file and rename it over, like vim, sed -i and Ansible.
        1 => {
            let tmp = dir.join(".config.toml.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        // Delete, then create anew.
        2 => {
            std::fs::remove_file(path).unwrap();
            std::fs::write(path, text).unwrap();
        }
        // Point a symlink at a new file, swapped in atomically.
        _ => {
            let target = dir.join(format!("config-{}.toml", rand_suffix()));
            std::fs::write(&target, text).unwrap();
            let link = dir.join(".config.link.tmp");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            std::fs::rename(&link, path).unwrap();
        }
    }
}

fn rand_suffix() -> u128 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(0u8) as u128
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_lose_nothing() {
    bounded(240, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let base = basic_config(&upstream, &pki, "");
        let mut proxy = Proxy::start(&step_config(&base, 0, true, false));
        let url = proxy.url("");

        // Load: plain requests on HTTP/1.1 and HTTP/2, and SSE streams, all the time.
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed, streams) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let mut load = Vec::new();
        for (i, client) in [http_client(), http2_client(), http_client(), http2_client()]
            .into_iter()
            .enumerate()
        {
            let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
            load.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let request = post_json(
                        &format!("{url}/v1/chat/completions"),
                        serde_json::json!({"model": "m", "worker": i}),
                    );
                    let outcome = match client.request(request).await {
                        Ok(r) if r.status() == StatusCode::OK => r
                            .into_body()
                            .collect()
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string()),
                        Ok(r) => Err(format!("status {}", r.status())),
                        Err(e) => Err(e.to_string()),
                    };
                    match outcome {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("request failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
        for (i, client) in [http_client(), http2_client()].into_iter().enumerate() {
            let (stop, streams, url) = (stop.clone(), streams.clone(), url.clone());
            load.push(tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    // stream_chat asserts every event arrives and the stream ends with [DONE].
                    stream_chat(
                        &client,
                        &format!("{url}/v1/chat/completions"),
                        &format!("s{i}-{n}"),
                        10,
                        30,
                    )
                    .await;
                    streams.fetch_add(1, Ordering::Relaxed);
                    n += 1;
                }
            }));
        }

        let client = http_client();
        let mut last_valid = 0;
        for step in 1..=50 {
            let valid = step % 2 == 0;
            let by_signal = step <= 20;
            // The SIGHUP half runs with watching off, so that only the signal triggers.
            let text = step_config(&base, step, valid, !by_signal || step == 20);
            let seen = proxy.notify.messages().len();
            if by_signal {
                std::fs::write(&proxy.config_path, &text).unwrap();
                proxy.signal("HUP");
            } else {
                rewrite(&proxy.config_path, &text, step);
            }
            // Settled: a READY=1 saying what we expect (a tool's rewrite may show an
            // intermediate state first, e.g. an empty file, which is refused like any other).
            proxy
                .notify
                .wait_for(seen, 10 * SECOND, &format!("step {step} settles"), |m| {
                    is_ready(m) && (status_of(m).contains("FAILED") != valid)
                });
            if valid {
                last_valid = step;
                assert_eq!(
                    status(&client, &format!("{url}/step{step}/x")).await,
                    Some(StatusCode::OK),
                    "step {step}"
                );
                if step > 2 {
                    let old = step - 2;
                    assert_eq!(
                        status(&client, &format!("{url}/step{old}/x")).await,
                        Some(StatusCode::NOT_FOUND)
                    );
                }
            } else {
                assert_eq!(
                    status(&client, &format!("{url}/step{last_valid}/x")).await,
                    Some(StatusCode::OK),
                    "step {step}: a broken config changed nothing"
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
        for task in load {
            task.await
                .expect("no stream was cut and no load task failed");
        }
        let (ok, failed, streams) = (
            ok.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
            streams.load(Ordering::Relaxed),
        );
        eprintln!("{ok} requests and {streams} streams across 50 reloads");
        assert_eq!(failed, 0, "failed requests");
        assert!(
            ok > 100 && streams > 10,
            "the load ran: {ok} requests, {streams} streams"
        );
        eventually(5 * SECOND, "reload failures in the log", || {
            proxy.logs().contains("reload failed").then_some(())
        })
        .await;
        let messages = proxy.notify.messages();
        let last = messages.iter().rev().find(|m| is_ready(m)).unwrap();
        assert!(!status_of(last).contains("FAILED"));
        proxy.wait_ready(0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_is_reported_with_its_location() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let base = basic_config(&upstream, &pki, "[reload]\nwatch_files = false\n");
        let proxy = Proxy::start(&base);
        let seen = proxy.notify.messages().len();
        proxy.write_config(&format!("{base}[server]\ndrain_timeout = \"forever\"\n"));
        proxy.signal("HUP");
        let index =
            proxy
                .notify
                .wait_for(seen, 5 * SECOND, "READY after a failed reload", is_ready);
        let status = status_of(&proxy.notify.messages()[index]).to_owned();
        let location = format!("{}:", proxy.config_path.display());
        assert!(
            status.contains("last reload FAILED") && status.contains(&location),
            "{status}"
        );
        assert!(
            status.contains("generation 1"),
            "the old generation serves: {status}"
        );
        eventually(5 * SECOND, "file:line:column in the log", || {
            proxy.logs().contains(&location).then_some(())
        })
        .await;
        assert_eq!(super_status(&proxy).await, Some(StatusCode::OK));
    })
    .await;
}

async fn super_status(proxy: &Proxy) -> Option<StatusCode> {
    status(&http_client(), &proxy.url("/v1/models")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_style_configmap_swap_reloads() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let base = basic_config(&upstream, &pki, "");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // config.toml -> ..data/config.toml, ..data -> ..v1: how kubelet lays out a ConfigMap.
        std::fs::create_dir(d.join("..v1")).unwrap();
        std::fs::write(
            d.join("..v1/config.toml"),
            step_config(&base, 1, true, true),
        )
        .unwrap();
        std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/config.toml", d.join("config.toml")).unwrap();
        let config_path = d.join("config.toml");
        let mut proxy = Proxy::spawn(dir, config_path, ProxyOptions::default());
        let client = http_client();
        assert_eq!(
            status(&client, &proxy.url("/step1/x")).await,
            Some(StatusCode::OK)
        );

        let d = proxy.dir.path().to_owned();
        for (step, old) in [(2, "..v1"), (3, "..v2")] {
            let new = format!("..v{step}");
            std::fs::create_dir(d.join(&new)).unwrap();
            std::fs::write(
                d.join(&new).join("config.toml"),
                step_config(&base, step, true, true),
            )
            .unwrap();
            let seen = proxy.notify.messages().len();
            std::os::unix::fs::symlink(&new, d.join("..data_tmp")).unwrap();
            std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
            std::fs::remove_dir_all(d.join(old)).unwrap();
            let ready = proxy
                .notify
                .wait_for(seen, 5 * SECOND, "reload after the swap", |m| {
                    is_ready(m) && !status_of(m).contains("FAILED")
                });
            proxy.wait_ready(ready);
            assert_eq!(
                status(&client, &proxy.url(&format!("/step{step}/x"))).await,
                Some(StatusCode::OK),
                "step {step}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_tls_certificate_applies_to_new_handshakes() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let first = Pki::new();
        let second = Pki::new();
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::copy(&first.cert_pem, &cert).unwrap();
        std::fs::copy(&first.key_pem, &key).unwrap();
        let extra = format!(
            "[tls]\nlisten = [\"127.0.0.2:0\"]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        );
        let mut proxy = Proxy::start(&basic_config(&upstream, &pki, &extra));
        let https = proxy.https.unwrap();
        let handshake = |trust: &Pki| {
            let config = trust.client.clone();
            async move {
                let stream = tokio::net::TcpStream::connect(https).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await
                    .is_ok()
            }
        };
        assert!(handshake(&first).await);
        assert!(!handshake(&second).await);
        // Replace the key pair the way certbot's deploy hooks do: new files renamed over.
        let seen = proxy.notify.messages().len();
        std::fs::copy(&second.key_pem, dir.path().join("key.tmp")).unwrap();
        std::fs::copy(&second.cert_pem, dir.path().join("cert.tmp")).unwrap();
        std::fs::rename(dir.path().join("key.tmp"), &key).unwrap();
        std::fs::rename(dir.path().join("cert.tmp"), &cert).unwrap();
        let ready = proxy
            .notify
            .wait_for(seen, 5 * SECOND, "reload on the new certificate", |m| {
                is_ready(m) && !status_of(m).contains("FAILED")
            });
        proxy.wait_ready(ready);
        assert_eq!(proxy.https, Some(https), "the TLS listener kept its socket");
        assert!(
            handshake(&second).await,
            "new handshakes get the new certificate"
        );
        assert!(!handshake(&first).await);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_kept_and_removed_by_reload() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let upstream_toml = upstream.upstream_toml(&pki);
        let mut proxy = Proxy::start(&format!("listen = [\"127.0.0.1:0\"]\n[reload]\nwatch_files = false\n{upstream_toml}"));
        let first = proxy.http.unwrap();
        // A keep-alive connection on the first listener, to see it survive.
        let kept = http_client();
        assert_eq!(status(&kept, &format!("http://{first}/v1/a")).await, Some(StatusCode::OK));

        // Add a listener.
        let seen = proxy.notify.messages().len();
        proxy.write_config(&format!("listen = [\"127.0.0.1:0\", \"127.0.0.2:0\"]\n[reload]\nwatch_files = false\n{upstream_toml}"));
        proxy.signal("HUP");
        let ready = proxy.wait_ready(seen);
        let status_line = status_of(&proxy.notify.messages()[ready]).to_owned();
        let second: std::net::SocketAddr = status_line
            .split(['"', ' ', ',', ';'])
            .find_map(|w| w.strip_prefix("http://127.0.0.2:").map(|p| format!("127.0.0.2:{p}")))
            .expect("the new listener is in STATUS")
            .parse()
            .unwrap();
        assert!(status_line.contains(&format!("http://{first}")), "unchanged listener kept its port: {status_line}");
        assert_eq!(status(&http_client(), &format!("http://{second}/v1/b")).await, Some(StatusCode::OK));
        assert_eq!(status(&kept, &format!("http://{first}/v1/c")).await, Some(StatusCode::OK));

        // A stream in flight on the first listener when a reload removes it: it finishes.
        let stream_url = format!("http://{first}/v1/chat/completions");
        let in_flight = tokio::spawn(async move { stream_chat(&http_client(), &stream_url, "removed", 10, 100).await });
        eventually(5 * SECOND, "the stream to start", || upstream.sent_events.lock().unwrap().contains_key("removed").then_some(())).await;
        let seen = proxy.notify.messages().len();
        proxy.write_config(&format!("listen = [\"127.0.0.2:0\"]\n[reload]\nwatch_files = false\n{upstream_toml}"));
        proxy.signal("HUP");
        proxy.wait_ready(seen);
        assert_eq!(proxy.http, Some(second), "the remaining listener kept its socket");
        let refused = tokio::net::TcpStream::connect(first).await;
        assert!(refused.is_err(), "the removed listener no longer accepts");
        let arrivals = in_flight.await.expect("the stream on the removed listener completed");
        assert_eq!(arrivals.len(), 10);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_and_closes_keep_alive() {
    bounded(30, async {
        let (_pki, upstream, mut proxy) = proxy_and_upstream("").await;
        let url = proxy.url("/v1/chat/completions");
        let stream_url = url.clone();
        let stream =
            tokio::spawn(
                async move { stream_chat(&http_client(), &stream_url, "drain", 8, 100).await },
            );
        // A keep-alive client whose request is in flight at SIGTERM.
        let keep_alive = http_client();
        let mut slow = post_json(&url, serde_json::json!({"model": "m"}));
        slow.headers_mut()
            .insert("x-test-delay-headers-ms", "500".parse().unwrap());
        let slow = tokio::spawn(async move { keep_alive.request(slow).await });
        eventually(5 * SECOND, "both requests to reach the upstream", || {
            (upstream.received().len() >= 2).then_some(())
        })
        .await;
        let seen = proxy.notify.messages().len();
        proxy.signal("TERM");
        proxy
            .notify
            .wait_for(seen, 5 * SECOND, "STOPPING=1", |m| m.contains("STOPPING=1"));
        let response = slow
            .await
            .unwrap()
            .expect("the request in flight is answered");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["connection"], "close");
        let arrivals = stream.await.expect("the SSE stream in flight completes");
        assert_eq!(arrivals.len(), 8);
        assert_eq!(proxy.wait_exit(10 * SECOND).code(), Some(0));
        assert!(
            tokio::net::TcpStream::connect(proxy.http.unwrap())
                .await
                .is_err()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_cuts_what_is_left_and_a_second_signal_exits_at_once() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        for (drain_timeout, second_signal) in [("1s", false), ("60s", true)] {
            let extra = format!(
                "[server]\ndrain_timeout = \"{drain_timeout}\"\n[log]\nlevel = \"debug\"\n"
            );
            let mut proxy = Proxy::start(&basic_config(&upstream, &pki, &extra));
            let id = format!("long-{drain_timeout}");
            let request = Request::post(proxy.url("/v1/chat/completions"))
                .header("x-test-stream", &id)
                .header("x-test-events", "100")
                .header("x-test-gap-ms", "100")
                .body(Full::new(Bytes::from(r#"{"model":"m","stream":true}"#)))
                .unwrap();
            let response = http_client().request(request).await.unwrap();
            let mut body = response.into_body();
            assert!(body.frame().await.unwrap().is_ok(), "the stream started");
            let started = Instant::now();
            proxy.signal("TERM");
            if second_signal {
                let seen = 0;
                proxy
                    .notify
                    .wait_for(seen, 5 * SECOND, "STOPPING=1", |m| m.contains("STOPPING=1"));
                proxy.signal("TERM");
            }
            let code = proxy.wait_exit(10 * SECOND).code();
            let took = started.elapsed();
            assert_eq!(code, Some(3), "a stop that cut a stream says so");
            if second_signal {
                assert!(
                    took < Duration::from_secs(3),
                    "second signal exits at once, took {took:?}"
                );
                // Even this exit writes out the log lines still queued.
                eventually(5 * SECOND, "the last log line", || {
                    proxy.logs().contains("second stop signal").then_some(())
                })
                .await;
            } else {
                assert!(
                    took >= Duration::from_millis(900) && took < Duration::from_secs(4),
                    "drain timeout 1s, took {took:?}"
                );
                // The log says what the cut connection was still waiting for.
                eventually(5 * SECOND, "the cut connection's log line", || {
                    proxy
                        .logs()
                        .lines()
                        .any(|l| {
                            l.contains("cut by the drain timeout")
                                && l.contains("the rest of its response")
                        })
                        .then_some(())
                })
                .await;
            }
            // The stream was cut, not completed.
            let mut completed = false;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        completed |= f
                            .data_ref()
                            .is_some_and(|d| d.windows(6).any(|w| w == b"[DONE]"))
                    }
                    Err(_) => break,
                }
            }
            assert!(!completed);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_passed_by_systemd_are_adopted_and_stale_ones_dropped() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let port = |addr: &str| {
            std::net::TcpListener::bind(addr)
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (kept, stale) = (port("127.0.0.1:0"), port("127.0.0.1:0"));
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.toml");
        std::fs::write(
            &config_path,
            format!(
                "listen = [\"127.0.0.1:{kept}\"]\n{}",
                upstream.upstream_toml(&pki)
            ),
        )
        .unwrap();
        // systemd-socket-activate sets LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES as systemd
        // does when it hands back its fd store, and starts the proxy on the first connection.
        let mut command = Command::new("systemd-socket-activate");
        command
            .arg(format!("--listen=127.0.0.1:{kept}"))
            .arg(format!("--listen=127.0.0.1:{stale}"))
            .arg(format!(
                "--fdname=listen-127.0.0.1-{kept}:listen-127.0.0.1-{stale}"
            ))
            .arg(format!(
                "--setenv=NOTIFY_SOCKET={}",
                dir.path().join("notify.sock").display()
            ))
            .arg(BIN)
            .arg("--config")
            .arg(&config_path);
        let proxy = Proxy::spawn_command(dir, config_path, command, false);
        // This connection reaches the socket before the proxy exists: it waits in the backlog.
        let client = http_client();
        let url = format!("http://127.0.0.1:{kept}/v1/models");
        let answered = eventually_async(10 * SECOND, "an answer", || status(&client, &url)).await;
        assert_eq!(answered, StatusCode::OK);
        let messages = proxy.notify.messages();
        assert!(messages.iter().any(|m| is_ready(m)), "{messages:?}");
        assert!(
            messages.iter().any(|m| m.contains("FDSTOREREMOVE=1")
                && m.contains(&format!("FDNAME=listen-127.0.0.1-{stale}"))),
            "the stale socket is removed from the store: {messages:?}"
        );
        assert!(
            !messages.iter().any(|m| m.contains("FDSTORE=1\n")),
            "an adopted socket is not stored twice: {messages:?}"
        );
        eventually(5 * SECOND, "the adoption in the log", || {
            proxy
                .logs()
                .contains("adopted a listening socket")
                .then_some(())
        })
        .await;
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", stale))
                .await
                .is_err(),
            "the stale socket is closed"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_follows_reload() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let base = basic_config(&upstream, &pki, "[reload]\nwatch_files = false\n");
        let proxy = Proxy::start(&base);
        let client = http_client();
        assert_eq!(
            status(&client, &proxy.url("/v1/before")).await,
            Some(StatusCode::OK)
        );
        eventually(5 * SECOND, "the access log line", || {
            proxy.logs().contains("/v1/before").then_some(())
        })
        .await;
        let seen = proxy.notify.messages().len();
        proxy.write_config(&format!("{base}[log]\nlevel = \"warn\"\n"));
        proxy.signal("HUP");
        proxy.notify.wait_for(seen, 5 * SECOND, "reload", |m| {
            is_ready(m) && !status_of(m).contains("FAILED")
        });
        assert_eq!(
            status(&client, &proxy.url("/v1/after")).await,
            Some(StatusCode::OK)
        );
        // A later warning proves the log is still flowing, so the missing line is really filtered.
        let seen = proxy.notify.messages().len();
        proxy.write_config("not toml at all");
        proxy.signal("HUP");
        proxy
            .notify
            .wait_for(seen, 5 * SECOND, "failed reload", |m| {
                is_ready(m) && status_of(m).contains("FAILED")
            });
        eventually(5 * SECOND, "the reload failure in the log", || {
            proxy.logs().contains("reload failed").then_some(())
        })
        .await;
        assert!(
            !proxy.logs().contains("/v1/after"),
            "info lines are gone at level warn"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_to_a_new_upstream_connects_to_it_ahead_of_requests() {
    bounded(30, async {
        let pki = Pki::new();
        let first = FakeUpstream::start(&pki, Alpn::Both).await;
        let second = FakeUpstream::start(&pki, Alpn::Both).await;
        let workers = "[server]\nworkers = 1\n";
        let mut proxy = Proxy::start(&basic_config(&first, &pki, workers));
        eventually(5 * SECOND, "a connection to the first upstream", || {
            (first.connections_opened() == 1).then_some(())
        })
        .await;
        let seen = proxy.notify.messages().len();
        proxy.write_config(&basic_config(&second, &pki, workers));
        proxy.signal("HUP");
        proxy.wait_ready(seen);
        eventually(5 * SECOND, "a connection to the new upstream", || {
            (second.connections_opened() == 1).then_some(())
        })
        .await;
        assert!(second.received().is_empty(), "before any request");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_descriptor_table_is_sized_at_start_and_the_soft_limit_raised() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.toml");
        std::fs::write(
            &config_path,
            basic_config(&upstream, &pki, "[server]\nmax_connections = 1000\n"),
        )
        .unwrap();
        // Started with a soft limit of 512 under a hard one of 4096.
        let mut command = Command::new("prlimit");
        command
            .arg("--nofile=512:4096")
            .arg(BIN)
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("LISTEN_FDS");
        let proxy = Proxy::spawn_command(dir, config_path, command, true);
        let pid = proxy.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let table: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .expect("FDSize in /proc/PID/status")
            .trim()
            .parse()
            .unwrap();
        // 1,000 connections need about 2,256 descriptors; the kernel sizes in powers of two.
        // Grown later, each doubling would stall every thread that accepts (see descriptors.rs).
        assert!(table >= 2048, "descriptor table of {table} at start");
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let open_files: Vec<&str> = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("the open files limit")
            .split_whitespace()
            .collect();
        assert_eq!(
            &open_files[3..5],
            ["4096", "4096"],
            "soft limit raised to the hard one"
        );
    })
    .await;
}

/// Opens `count` connections, each carrying one request and then kept alive, idle.
async fn idle_connections(addr: std::net::SocketAddr, count: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    futures_util::future::join_all((0..count).map(|_| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /v1/models HTTP/1.1\r\nHost: proxy\r\n\r\n")
            .await
            .unwrap();
        let response = read_response(&mut stream).await.to_ascii_lowercase();
        let head = &response[..response.find("\r\n\r\n").unwrap()];
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        stream
    }))
    .await
}

/// How long after `since` each connection saw its end of stream.
async fn closed_after(connections: Vec<tokio::net::TcpStream>, since: Instant) -> Vec<Duration> {
    use tokio::io::AsyncReadExt;
    futures_util::future::join_all(connections.into_iter().map(|mut stream| async move {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(10 * SECOND, stream.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0))), "EOF, not {read:?}");
        since.elapsed()
    }))
    .await
}

/// The drain reaches every idle connection, however many there are and whichever thread they
/// live on: each sees its end at once and the drain finishes with nothing cut. The race it once
/// lost was timing-dependent, so the test runs the scenario several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_closes_every_idle_kept_alive_connection_at_once() {
    bounded(90, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let extra = "[server]\ndrain_timeout = \"6s\"\n";
        for round in 0..5 {
            let mut proxy = Proxy::start(&basic_config(&upstream, &pki, extra));
            let idle = idle_connections(proxy.http.unwrap(), 200).await;
            let started = Instant::now();
            proxy.signal("TERM");
            let slowest = *closed_after(idle, started).await.iter().max().unwrap();
            assert!(
                slowest < 2 * SECOND,
                "round {round}: every idle connection closed at once; the last after {slowest:?}"
            );
            assert_eq!(proxy.wait_exit(10 * SECOND).code(), Some(0));
            let took = started.elapsed();
            assert!(took < 2 * SECOND, "round {round}: the drain took {took:?}");
            let logs = proxy.logs();
            let drained = logs
                .lines()
                .find(|l| l.contains("drained; exiting"))
                .unwrap();
            assert!(
                drained.contains("in_flight=200") && drained.contains("cut=0"),
                "round {round}: {drained}"
            );
        }
    })
    .await;
}

/// A WebSocket is one piece of work in flight, counted once, and cut once at the drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_counts_once_in_the_drain() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let extra = "[server]\ndrain_timeout = \"1s\"\n";
        let mut proxy = Proxy::start(&basic_config(&upstream, &pki, extra));
        let url = format!("ws://{}/v1/realtime?model=m", proxy.http.unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        proxy.signal("TERM");
        proxy.wait_exit(10 * SECOND);
        let logs = proxy.logs();
        let drained = logs
            .lines()
            .find(|l| l.contains("drained; exiting"))
            .unwrap();
        assert!(
            drained.contains("in_flight=1 cut=1"),
            "one WebSocket, counted once: {drained}"
        );
    })
    .await;
}

/// Writes `text` into the file in place, as a shell's `>>` does.
fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

fn reloads_since(proxy: &Proxy, seen: usize) -> usize {
    proxy.notify.messages()[seen..]
        .iter()
        .filter(|m| m.lines().any(|l| l == "RELOADING=1"))
        .count()
}

/// A config written a piece at a time is read only once whole: a prefix that parses (every
/// table but the last) is never loaded, though the writer pauses longer than an editor's save.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_written_piece_by_piece_is_loaded_only_whole() {
    bounded(30, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let base = basic_config(&upstream, &pki, "");
        let first = format!("{base}\n[proxy]\nallowed_path_prefixes = [\"/first/\"]\n");
        let proxy = Proxy::start(&first);
        let seen = proxy.notify.messages().len();
        std::fs::write(&proxy.config_path, "").unwrap();
        append(&proxy.config_path, &base);
        tokio::time::sleep(Duration::from_millis(600)).await;
        append(
            &proxy.config_path,
            "\n[proxy]\nallowed_path_prefixes = [\"/whole/\"]\n",
        );
        let client = http_client();
        let url = proxy.url("/whole/x");
        eventually_async(10 * SECOND, "a 200", || async {
            (status(&client, &url).await == Some(StatusCode::OK)).then_some(())
        })
        .await;
        assert_eq!(
            reloads_since(&proxy, seen),
            1,
            "no reload of a half-written file"
        );
    })
    .await;
}

/// A file in the config's directory written all the time neither holds back the reload of an
/// edit nor causes one; a SIGHUP reload is not followed by a second reload of the same files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_neighbour_file_delays_no_reload_and_sighup_is_not_reloaded_twice() {
    bounded(40, async {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        let base = basic_config(&upstream, &pki, "[log]\nlevel = \"debug\"\n");
        let config =
            |prefix: &str| format!("{base}\n[proxy]\nallowed_path_prefixes = [\"/{prefix}/\"]\n");
        let mut proxy = Proxy::start(&config("a"));
        let stop = Arc::new(AtomicBool::new(false));
        let neighbour = proxy.dir.path().join("neighbour.log");
        let writer = {
            let stop = stop.clone();
            std::fs::write(&neighbour, "").unwrap();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    append(&neighbour, "a line of a busy log\n");
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let seen = proxy.notify.messages().len();
        let edited = Instant::now();
        proxy.write_config(&config("b"));
        proxy.wait_ready(seen);
        let took = edited.elapsed();
        assert!(took < 3 * SECOND, "the edit was reloaded after {took:?}");
        assert_eq!(reloads_since(&proxy, seen), 1);

        // An edit reloaded by SIGHUP: the watcher sees the same files and reloads nothing.
        let seen = proxy.notify.messages().len();
        let settled = proxy.logs().matches("watched files settled").count();
        proxy.write_config(&config("c"));
        proxy.signal("HUP");
        proxy.wait_ready(seen);
        eventually(10 * SECOND, "the watcher to look at the edit", || {
            (proxy.logs().matches("watched files settled").count() > settled).then_some(())
        })
        .await;
        assert_eq!(reloads_since(&proxy, seen), 1, "one reload for one edit");
        let client = http_client();
        assert_eq!(
            status(&client, &proxy.url("/c/x")).await,
            Some(StatusCode::OK)
        );
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
    })
    .await;
}

/// Signals that mean nothing here are logged and ignored, not fatal; QUIT drains like TERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_signals_do_not_kill_and_quit_drains() {
    bounded(30, async {
        let (_pki, _upstream, mut proxy) = proxy_and_upstream("").await;
        let client = http_client();
        for signal in ["USR1", "ALRM"] {
            let before = proxy.logs().matches("signal ignored").count();
            proxy.signal(signal);
            eventually(5 * SECOND, "the signal to be logged", || {
                (proxy.logs().matches("signal ignored").count() > before).then_some(())
            })
            .await;
            assert_eq!(
                status(&client, &proxy.url("/v1/models")).await,
                Some(StatusCode::OK),
                "still serving after SIG{signal}"
            );
        }
        proxy.signal("QUIT");
        assert_eq!(proxy.wait_exit(10 * SECOND).code(), Some(0));
        assert!(proxy.logs().contains("drained; exiting"));
    })
    .await;
}
