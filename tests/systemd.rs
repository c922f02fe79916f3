//! The Debian package's whole life under a real systemd: built with cargo-deb, checked by lintian,
//! installed with dpkg into a systemd booted as PID 1 in a private pid+mount namespace, then
//! started, reloaded (well and badly), restarted under load, read back from the journal,
//! upgraded under load, removed and purged.
//!
//! The namespace shares the machine's network and files, so the package really lands in the
//! machine's /etc and /usr and dpkg database: the test refuses to run over an existing install,
//! and its guard purges the package and stops its systemd whatever happens.

mod common;

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const UNIT: &str = "openai-proxy.service";
const PACKAGE: &str = "openai-proxy";
const CONFIG: &str = "/etc/openai-proxy/config.toml";
/// Outside /tmp, which the unit's PrivateTmp= (and the namespace) hide, and world-readable for
/// the dynamic user.
const CA_FILE: &str = "/etc/openai-proxy/test-upstream-ca.pem";
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The private /tmp and /var/tmp keep systemd's boot-time cleanup away from the machine's own;
/// the private journal directory keeps this boot's logs (and so the step 5 checks) to itself.
/// The namespace's mounts are made shared, as systemd makes them at boot but not in a container:
/// a unit's credentials are mounted in a child namespace and reach the service only by
/// propagation. The namespace's copies are private to it, so the machine's mounts are untouched.
const BOOT: &str = "mount -t tmpfs tmpfs /tmp && mount -t tmpfs tmpfs /var/tmp && \
    { [ ! -d /var/log/journal ] || mount -t tmpfs tmpfs /var/log/journal; } && \
    mount --make-rshared / && \
    exec env container=other /lib/systemd/systemd --system --unit=basic.target";

#[test]
fn shipped_unit_exposure_is_at_most_1_1() {
    let unit = Path::new(MANIFEST_DIR).join("systemd").join(UNIT);
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .env("SYSTEMD_COLORS", "0")
        .output()
        .expect("systemd-analyze runs");
    assert!(exposure(&out) <= 1.1, "{}", stdout(&out));
}

/// The overall exposure `systemd-analyze security` gives the unit.
fn exposure(out: &Output) -> f64 {
    let text = stdout(out);
    text.lines()
        .find_map(|l| {
            l.split("Overall exposure level for openai-proxy.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{text}\n{}", stderr(out)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_lives_its_whole_life_under_a_real_systemd() {
    if !is_root() {
        eprintln!(
            "SKIPPED the_package_lives_its_whole_life_under_a_real_systemd: it boots systemd as \
             PID 1 in a namespace and installs the .deb with dpkg, which needs root"
        );
        return;
    }
    let mut guard = Guard::default();
    // The release build with fat LTO takes minutes on two shared cores; the rest about one.
    bounded(40 * 60, async {
        preconditions();
        let debs = build_debs().await;
        eprintln!("booting systemd in a private pid+mount namespace");
        let ns = guard.boot().await;
        install(&ns, &debs, &mut guard).await;
        let mut life = Life::new(ns, &debs).await;
        life.start_and_ready().await;
        life.reload().await;
        life.broken_reload().await;
        life.restart_under_load().await;
        life.journal_holds_the_access_log().await;
        life.upgrade_under_load().await;
        eprintln!(
            "step 7: a new binary that cannot start: the reload fails, the old process serves"
        );
        failed_handover(&life.ns, &life.client, &life.pid, life.a).await;
        life.low_port_drop_in().await;
        eprintln!("step 8: tokens mode, the OpenAI key given as a systemd credential");
        tokens_with_a_credential(&life.ns, &life.client, &life.upstream, life.low).await;
        life.remove_and_purge(&mut guard).await;
    })
    .await;
    guard.passed = true;
}

/// The package, built twice: version 1, and the same build as version `bumped`, for the upgrade.
struct Debs {
    _dir: tempfile::TempDir,
    v1: PathBuf,
    v2: PathBuf,
    bumped: String,
}

/// Builds the two packages with cargo-deb and checks the first with lintian.
async fn build_debs() -> Debs {
    eprintln!("building the .deb (release build)");
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("openai-proxy_1.deb");
    let v2 = dir.path().join("openai-proxy_2.deb");
    let version = env!("CARGO_PKG_VERSION");
    cargo_deb(&["deb", "--output", path_str(&v1)]).await;
    let bumped = format!("{version}-2");
    cargo_deb(&[
        "deb",
        "--no-build",
        "--deb-version",
        &bumped,
        "--output",
        path_str(&v2),
    ])
    .await;
    lintian_is_clean(&v1).await;
    Debs {
        _dir: dir,
        v1,
        v2,
        bumped,
    }
}

/// Installs version 1 with dpkg in the namespace and checks what it installed.
async fn install(ns: &Ns, debs: &Debs, guard: &mut Guard) {
    eprintln!("installing the package");
    // The package files live under this machine's /tmp, which the namespace hides: copy them in.
    ns.copy_in(&debs.v1, "/var/tmp/openai-proxy_1.deb").await;
    ns.copy_in(&debs.v2, "/var/tmp/openai-proxy_2.deb").await;
    guard.installed = true;
    ok(
        &ns.run(&["dpkg", "-i", "/var/tmp/openai-proxy_1.deb"]).await,
        "dpkg -i",
    );
    installed_as_specified(ns).await;
}

/// `http://127.0.0.1:PORT/PATH`, where the packaged proxy listens.
fn local_url(port: u16, path: &str) -> String {
    format!("http://127.0.0.1:{port}{path}")
}

/// What the steps share: the booted namespace, the fake OpenAI and the configs pointing the
/// packaged proxy at it, and what earlier steps saw.
struct Life {
    ns: Ns,
    client: HttpClient,
    _pki: Pki,
    upstream: FakeUpstream,
    /// The listening ports: `a` from the start, `b` added by generation 2, `low` below 1024.
    a: u16,
    b: u16,
    low: u16,
    gen2: String,
    /// The version the upgrade installs.
    bumped: String,
    /// The service's main process.
    pid: String,
    first_request_id: String,
    gen2_request_id: String,
    /// Requests answered 200 so far by the proxy, as the access log must hold them.
    served: usize,
    /// The longest a request waited during the restart, to compare with the upgrade.
    restart_slowest: Duration,
}

impl Life {
    /// Starts the fake OpenAI, writes its CA where the service can read it, and the two
    /// generations of config; stops the service the install started, so that step 1 is a
    /// real start.
    async fn new(ns: Ns, debs: &Debs) -> Self {
        let pki = Pki::new();
        let upstream = FakeUpstream::start(&pki, Alpn::Both).await;
        std::fs::copy(&pki.ca_pem, CA_FILE).unwrap();
        set_mode(Path::new(CA_FILE), 0o644);
        let a = free_port();
        let b = std::iter::repeat_with(free_port).find(|&b| b != a).unwrap();
        let gen1 = config(a, None, "", upstream.addr);
        let gen2 = config(
            a,
            Some(b),
            "[proxy]\nallowed_path_prefixes = [\"/v1/\", \"/v2/\"]\n",
            upstream.addr,
        );
        ok(
            &ns.run(&["systemctl", "stop", UNIT]).await,
            "systemctl stop",
        );
        std::fs::write(CONFIG, &gen1).unwrap();
        Self {
            ns,
            client: http_client(),
            _pki: pki,
            upstream,
            a,
            b,
            low: 0,
            gen2,
            bumped: debs.bumped.clone(),
            pid: String::new(),
            first_request_id: String::new(),
            gen2_request_id: String::new(),
            served: 0,
            restart_slowest: Duration::ZERO,
        }
    }

    async fn start_and_ready(&mut self) {
        eprintln!(
            "step 1: systemctl start returns after READY; status; a request reaches upstream"
        );
        let (ns, client, a) = (self.ns, &self.client, self.a);
        ok(
            &ns.run(&["systemctl", "start", UNIT]).await,
            "systemctl start",
        );
        // No retry: when start has returned, READY=1 was sent, so the listener must answer.
        let answer = send(
            client,
            post_json(&local_url(a, "/v1/chat/completions"), chat()),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        assert_eq!(answer.json()["object"], "chat.completion");
        self.first_request_id = answer.headers["x-proxy-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let seen = self.upstream.last();
        assert!(seen.uri.ends_with("/v1/chat/completions"), "{}", seen.uri);
        assert_eq!(seen.sni.as_deref(), Some("api.openai.com"));
        assert_eq!(
            seen.headers["authorization"],
            format!("Bearer {CLIENT_KEY}")
        );
        let props = ns.props().await;
        assert_eq!(props.get("ActiveState"), "active");
        assert_eq!(props.get("SubState"), "running");
        let expected_status = format!(
            "listening on http://127.0.0.1:{a}; upstream https://127.0.0.1:{} (Host api.openai.com)",
            self.upstream.addr.port()
        );
        let status_text = props.get("StatusText");
        assert!(
            status_text.starts_with("generation 1 loaded ")
                && status_text.ends_with(&expected_status),
            "StatusText={status_text}"
        );
        let status = ns
            .run(&["systemctl", "status", "--no-pager", "--full", UNIT])
            .await;
        let shown = stdout(&status);
        assert!(
            shown.contains(&format!("Status: \"{status_text}\"")),
            "systemctl status does not show our STATUS line:\n{shown}"
        );
        assert_eq!(
            props.get("NFileDescriptorStore"),
            "1",
            "the listener is in the fd store"
        );
        self.pid = props.get("MainPID").to_owned();
        runs_confined(&ns, &self.pid).await;
    }

    async fn reload(&mut self) {
        eprintln!("step 2: reload with a changed valid config");
        let (ns, client, a, b) = (self.ns, &self.client, self.a, self.b);
        // Nothing serves /v2/ yet: the proxy itself answers 404.
        let answer = send(client, post_json(&local_url(a, "/v2/models"), chat())).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        std::fs::write(CONFIG, &self.gen2).unwrap();
        ok(
            &ns.run(&["systemctl", "reload", UNIT]).await,
            "systemctl reload",
        );
        // On 252 the reload job may end when `kill -HUP` returns, a moment before the new
        // generation is in: wait for the proxy to say it is.
        let props = ns
            .props_until("generation 2 is in", |p| {
                p.get("StatusText").starts_with("generation 2 ")
            })
            .await;
        for port in [a, b] {
            let answer = send(client, post_json(&local_url(port, "/v2/models"), chat())).await;
            assert_eq!(
                answer.status,
                StatusCode::OK,
                "port {port}: {:?}",
                answer.body
            );
            assert_eq!(answer.json()["path"], "/v2/models");
            self.gen2_request_id = answer.headers["x-proxy-request-id"]
                .to_str()
                .unwrap()
                .to_owned();
        }
        nothing_failed(&props, &self.pid);
        assert!(
            props
                .get("StatusText")
                .contains(&format!("http://127.0.0.1:{b}"))
        );
        assert_eq!(
            props.get("NFileDescriptorStore"),
            "2",
            "the new listener went to the fd store"
        );
    }

    async fn broken_reload(&mut self) {
        eprintln!("step 3: reload with a broken config fails, and the old config serves");
        let ns = self.ns;
        let broken = format!("{}\n[server]\nmax_request_body = 0\n", self.gen2);
        let broken_line = broken.lines().count();
        std::fs::write(CONFIG, &broken).unwrap();
        let reload = ns.run(&["systemctl", "reload", UNIT]).await;
        assert!(
            !reload.status.success(),
            "reload of a broken config succeeded"
        );
        assert!(stderr(&reload).contains("failed"), "{}", stderr(&reload));
        let why = format!("{CONFIG}:{broken_line}:20: a size limit must be more than 0");
        let journal = ns.run(&["journalctl", "--no-pager", "-u", UNIT]).await;
        assert!(
            stdout(&journal).contains(&why),
            "the journal does not say why:\n{}",
            stdout(&journal)
        );
        let props = ns.props().await;
        nothing_failed(&props, &self.pid);
        assert!(
            props.get("StatusText").starts_with("generation 2 "),
            "{}",
            props.get("StatusText")
        );
        let url = local_url(self.a, "/v2/models");
        let answer = send(&self.client, post_json(&url, chat())).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "the old config no longer serves"
        );
        std::fs::write(CONFIG, &self.gen2).unwrap();
    }

    async fn restart_under_load(&mut self) {
        eprintln!("step 4: systemctl restart under load, with an SSE stream in flight");
        let ns = self.ns;
        let old_pid = self.pid.clone();
        let served_before = access_entries(&ns).await.len();
        let restart = under_load(
            &ns,
            &self.client,
            &self.upstream,
            self.a,
            "restart",
            || async {
                ok(
                    &ns.run(&["systemctl", "restart", UNIT]).await,
                    "systemctl restart",
                );
            },
        )
        .await;
        let props = ns.props().await;
        let pid = props.get("MainPID").to_owned();
        assert_ne!(pid, old_pid, "systemctl restart started a new process");
        assert_eq!(props.get("ActiveState"), "active");
        handed_over(&ns, &old_pid, &pid, 2, "systemd").await;
        self.pid = pid;
        self.served = served_before + restart.served;
        self.restart_slowest = restart.slowest_during;
    }

    async fn journal_holds_the_access_log(&self) {
        eprintln!("step 5: the journal holds the access log, and no API key");
        let ns = self.ns;
        let expected = self.served + 1;
        let entries = ns
            .journal_until("every request in the access log", |entries| {
                (access(entries).count() >= expected).then_some(())
            })
            .await;
        let by_id = |id: &str| {
            access(&entries)
                .find(|e| field(e, "REQUEST_ID") == id)
                .unwrap_or_else(|| panic!("request {id} is not in the access log"))
                .clone()
        };
        let first = by_id(&self.first_request_id);
        for (name, value) in [
            ("METHOD", "POST"),
            ("PATH", "/v1/chat/completions"),
            ("STATUS", "200"),
            ("GENERATION", "1"),
            ("SYSLOG_IDENTIFIER", "openai-proxy"),
            ("_SYSTEMD_UNIT", UNIT),
        ] {
            assert_eq!(field(&first, name), value, "{name} in {first:#}");
        }
        for name in ["BYTES_IN", "BYTES_OUT", "TTFB_MS", "DURATION_MS"] {
            let n: f64 = field(&first, name)
                .parse()
                .unwrap_or_else(|_| panic!("{name} in {first:#}"));
            assert!(n > 0.0, "{name} in {first:#}");
        }
        assert!(
            field(&first, "CLIENT").starts_with("127.0.0.1:"),
            "{first:#}"
        );
        assert_eq!(field(&by_id(&self.gen2_request_id), "GENERATION"), "2");
        let everything = ns.run(&["journalctl", "--no-pager", "-o", "json"]).await;
        let everything = stdout(&everything);
        assert!(
            everything.contains(&self.first_request_id),
            "the whole journal was read"
        );
        assert!(
            !everything.contains(CLIENT_KEY),
            "an API key reached the journal"
        );
        assert!(
            !everything.contains("SECRET"),
            "part of an API key reached the journal"
        );
    }

    async fn upgrade_under_load(&mut self) {
        eprintln!("step 6: an upgrade under load hands over: no new request waits for old streams");
        let ns = self.ns;
        let old_pid = self.pid.clone();
        let mut ws = Realtime::open(self.a).await;
        let run = under_load(
            &ns,
            &self.client,
            &self.upstream,
            self.a,
            "upgrade",
            || async {
                ok(
                    &ns.run(&["dpkg", "-i", "/var/tmp/openai-proxy_2.deb"]).await,
                    "dpkg -i (upgrade)",
                );
            },
        )
        .await;
        ws.echo("the WebSocket opened before the upgrade goes on")
            .await;
        ws.close().await;
        assert!(
            run.slowest_during < Duration::from_secs(2),
            "a request sent during the upgrade waited {:?} (restart: {:?})",
            run.slowest_during,
            self.restart_slowest
        );
        let installed = ns
            .run(&["dpkg-query", "-W", "-f", "${Version}", PACKAGE])
            .await;
        assert_eq!(stdout(&installed), self.bumped);
        assert_eq!(
            std::fs::read_to_string(CONFIG).unwrap(),
            self.gen2,
            "the upgrade kept the edit"
        );
        let leftovers: Vec<String> = std::fs::read_dir("/etc/openai-proxy")
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.contains(".dpkg-"))
            .collect();
        assert!(leftovers.is_empty(), "dpkg left {leftovers:?}");
        let props = ns.props().await;
        let pid = props.get("MainPID").to_owned();
        assert_ne!(pid, old_pid, "the upgrade handed over to a new process");
        assert_eq!(props.get("ActiveState"), "active");
        assert_eq!(props.get("NRestarts"), "0", "a handover, not a restart");
        handed_over(&ns, &old_pid, &pid, 2, "predecessor").await;
        let exe = ns.run(&["readlink", &format!("/proc/{pid}/exe")]).await;
        assert_eq!(
            stdout(&exe),
            "/usr/bin/openai-proxy",
            "the new process runs the new binary"
        );
        self.old_process_leaves().await;
        assert_eq!(props.get("NFileDescriptorStore"), "2");
        self.pid = pid;
    }

    /// Waits until one openai-proxy process is left in the namespace.
    async fn old_process_leaves(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let count = self.ns.run(&["pgrep", "-c", "-x", "openai-proxy"]).await;
            if stdout(&count).trim() == "1" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the old process did not leave: {}",
                stdout(&count)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn low_port_drop_in(&mut self) {
        eprintln!("  the man page's drop-in for a port below 1024");
        let ns = self.ns;
        let low = free_low_port();
        let drop_in = "/run/systemd/system/openai-proxy.service.d";
        let settings = [
            "[Service]",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
            "PrivateUsers=no",
        ];
        let script = format!(
            "mkdir -p {drop_in} && printf '%s\\n' {} > {drop_in}/low-port.conf",
            settings.map(|line| format!("'{line}'")).join(" ")
        );
        ok(&ns.run(&["sh", "-c", &script]).await, "writing the drop-in");
        ok(
            &ns.run(&["systemctl", "daemon-reload"]).await,
            "daemon-reload",
        );
        std::fs::write(CONFIG, config(low, None, "", self.upstream.addr)).unwrap();
        ok(
            &ns.run(&["systemctl", "restart", UNIT]).await,
            "restart on a low port",
        );
        let answer = send(
            &self.client,
            post_json(&local_url(low, "/v1/chat/completions"), chat()),
        )
        .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "port {low}: {:?}",
            answer.body
        );
        // The new process let go of the two stored sockets its config no longer lists.
        assert_eq!(ns.props().await.get("NFileDescriptorStore"), "1");
        self.low = low;
    }

    async fn remove_and_purge(&self, guard: &mut Guard) {
        let ns = self.ns;
        ok(&ns.run(&["dpkg", "-r", PACKAGE]).await, "dpkg -r");
        let active = ns.run(&["systemctl", "is-active", UNIT]).await;
        assert_eq!(stdout(&active), "inactive", "dpkg -r stops the service");
        for port in [self.a, self.b, self.low] {
            let refused = std::net::TcpStream::connect(("127.0.0.1", port));
            assert!(
                refused.is_err(),
                "port {port} still accepts after dpkg -r: no socket is left"
            );
        }
        assert!(!Path::new("/usr/bin/openai-proxy").exists());
        assert!(Path::new(CONFIG).exists(), "dpkg -r keeps the conffile");
        std::fs::remove_file(CA_FILE).unwrap();
        ok(&ns.run(&["dpkg", "-P", PACKAGE]).await, "dpkg -P");
        guard.installed = false;
        assert!(
            !Path::new("/etc/openai-proxy").exists(),
            "dpkg -P removes the config"
        );
        assert!(
            !Path::new("/etc/systemd/system/multi-user.target.wants")
                .join(UNIT)
                .exists()
        );
        let gone = ns.run(&["dpkg-query", "-W", PACKAGE]).await;
        assert!(
            !gone.status.success(),
            "the package is still known: {}",
            stdout(&gone)
        );
    }
}

/// The package installs and starts as specified, and its unit passes `systemd-analyze`.
async fn installed_as_specified(ns: &Ns) {
    let files = stdout(&ns.run(&["dpkg", "-L", PACKAGE]).await);
    for path in [
        "/usr/bin/openai-proxy",
        "/usr/lib/systemd/system/openai-proxy.service",
        "/usr/share/man/man8/openai-proxy.8.gz",
        "/usr/share/doc/openai-proxy/copyright",
        "/usr/share/doc/openai-proxy/changelog.Debian.gz",
        CONFIG,
    ] {
        assert!(
            files.lines().any(|l| l == path),
            "{path} not in the package:\n{files}"
        );
    }
    let conffiles = stdout(
        &ns.run(&["dpkg-query", "-W", "-f", "${Conffiles}", PACKAGE])
            .await,
    );
    assert!(conffiles.contains(CONFIG), "not a conffile: {conffiles}");
    let shipped = std::fs::read(Path::new(MANIFEST_DIR).join("systemd").join(UNIT)).unwrap();
    assert_eq!(
        std::fs::read("/usr/lib/systemd/system/openai-proxy.service").unwrap(),
        shipped
    );

    let enabled = ns.run(&["systemctl", "is-enabled", UNIT]).await;
    assert_eq!(
        stdout(&enabled),
        "enabled",
        "installing enables the service"
    );
    let props = ns.props().await;
    if props.get("ActiveState") == "active" {
        assert!(
            props
                .get("StatusText")
                .ends_with("upstream https://api.openai.com")
        );
    } else {
        // The shipped config listens on 127.0.0.1:8080, which something else on this machine
        // may hold: then the start was tried, and failed for that reason alone.
        let journal = stdout(&ns.run(&["journalctl", "--no-pager", "-u", UNIT]).await);
        assert!(
            journal.contains("cannot listen on 127.0.0.1:8080"),
            "installing did not start the service:\n{journal}"
        );
        eprintln!("note: 127.0.0.1:8080 is taken on this machine, so the install's start failed");
    }

    let verify = ns
        .run(&[
            "systemd-analyze",
            "verify",
            "/usr/lib/systemd/system/openai-proxy.service",
        ])
        .await;
    assert!(
        verify.status.success() && verify.stdout.is_empty() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        stdout(&verify),
        stderr(&verify)
    );
    let security = ns
        .run(&["systemd-analyze", "security", "--no-pager", UNIT])
        .await;
    // The unit as the running systemd loaded it, not only the file: the same verdict.
    assert!(exposure(&security) <= 1.1, "{}", stdout(&security));
}

/// What the kernel says about the running proxy: not root, no capability, no new privileges,
/// a seccomp filter.
async fn runs_confined(ns: &Ns, pid: &str) {
    let status = stdout(&ns.run(&["cat", &format!("/proc/{pid}/status")]).await);
    let line = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in:\n{status}"))
            .trim()
            .to_owned()
    };
    let uids: Vec<String> = line("Uid:").split_whitespace().map(str::to_owned).collect();
    assert!(uids.iter().all(|u| u != "0"), "runs as root: Uid {uids:?}");
    for caps in ["CapEff:", "CapPrm:", "CapAmb:", "CapBnd:"] {
        assert_eq!(line(caps), "0000000000000000", "{caps}");
    }
    assert_eq!(line("NoNewPrivs:"), "1");
    assert_eq!(line("Seccomp:"), "2");
}

fn nothing_failed(props: &Props, pid: &str) {
    assert_eq!(props.get("MainPID"), pid, "the process was not replaced");
    assert_eq!(props.get("ActiveState"), "active");
    assert_eq!(props.get("SubState"), "running");
    assert_eq!(props.get("NRestarts"), "0");
    assert_eq!(props.get("Result"), "success");
    assert!(
        !props.get("StatusText").contains("FAILED"),
        "{}",
        props.get("StatusText")
    );
}

/// The old process drained what it had and cut nothing; the new one took over every listening
/// socket (`from` systemd's fd store after a restart, or its predecessor in a handover) instead
/// of binding afresh.
async fn handed_over(ns: &Ns, old_pid: &str, new_pid: &str, listeners: usize, from: &str) {
    let entries = ns
        .journal_until(
            "the new process adopted the sockets, the old one drained",
            |entries| {
                let adopted = entries
                    .iter()
                    .filter(|e| field(e, "_PID") == new_pid)
                    .filter(|e| field(e, "MESSAGE") == "adopted a listening socket")
                    .filter(|e| field(e, "FROM") == from)
                    .count();
                let drained = entries.iter().any(|e| {
                    field(e, "_PID") == old_pid && field(e, "MESSAGE") == "drained; exiting"
                });
                (adopted == listeners && drained).then_some(())
            },
        )
        .await;
    let drained = entries
        .iter()
        .find(|e| field(e, "_PID") == old_pid && field(e, "MESSAGE") == "drained; exiting")
        .expect("found above");
    assert_eq!(field(drained, "CUT"), "0", "nothing was cut: {drained:#}");
    let in_flight: usize = field(drained, "IN_FLIGHT").parse().unwrap();
    assert!(
        in_flight >= 1,
        "the SSE stream was in flight at the drain: {drained:#}"
    );
    eprintln!(
        "  process {old_pid} drained {} (in_flight) and handed {listeners} sockets to {new_pid}",
        field(drained, "IN_FLIGHT")
    );
}

/// `[auth] mode = "tokens"` with the key in a root-only file that the unit hands the
/// service as a credential (`LoadCredential=`, as the man page shows): a client's token gets in
/// and the upstream sees the key; the client's own key is refused; neither the key nor the
/// token reaches the journal. Leaves the unit and /etc/openai-proxy as it found them.
async fn tokens_with_a_credential(
    ns: &Ns,
    client: &HttpClient,
    upstream: &FakeUpstream,
    port: u16,
) {
    const KEY: &str = "sk-proj-CREDENTIAL-KEY-77";
    let key_file = "/etc/openai-proxy/openai-key";
    let tokens_file = "/etc/openai-proxy/tokens.toml";
    write_with_mode(Path::new(key_file), &format!("{KEY}\n"), 0o600);
    let issued = ok(
        &ns.run(&["openai-proxy", "token", "new", "alice"]).await,
        "openai-proxy token new",
    );
    let (token, table) = issued.split_once('\n').unwrap();
    write_with_mode(Path::new(tokens_file), table, 0o644);
    let drop_in = "/run/systemd/system/openai-proxy.service.d/credential.conf";
    let script =
        format!("printf '%s\\n' '[Service]' 'LoadCredential=openai-key:{key_file}' > {drop_in}");
    ok(
        &ns.run(&["sh", "-c", &script]).await,
        "writing the credential drop-in",
    );
    ok(
        &ns.run(&["systemctl", "daemon-reload"]).await,
        "daemon-reload",
    );
    let auth = "[auth]\nmode = \"tokens\"\nupstream_key_file = \"openai-key\"\ntokens_file = \"tokens.toml\"\n";
    std::fs::write(CONFIG, config(port, None, auth, upstream.addr)).unwrap();
    ok(
        &ns.run(&["systemctl", "restart", UNIT]).await,
        "restart in tokens mode",
    );

    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let with = |bearer: &str| post_json_as(&url, chat(), Some(bearer));
    let answer = send(client, with(token)).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    assert_eq!(
        upstream.last().headers["authorization"],
        format!("Bearer {KEY}")
    );
    let before = upstream.received().len();
    let answer = send(client, with(CLIENT_KEY)).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{:?}", answer.body);
    assert_eq!(upstream.received().len(), before, "nothing went upstream");
    let journal = stdout(&ns.run(&["journalctl", "--no-pager", "-o", "json"]).await);
    assert!(
        journal.contains("\"TOKEN\":\"alice\""),
        "the access log names the token"
    );
    assert!(!journal.contains(KEY), "the key reached the journal");
    assert!(!journal.contains(token), "the token reached the journal");

    ok(&ns.run(&["rm", drop_in]).await, "removing the drop-in");
    ok(
        &ns.run(&["systemctl", "daemon-reload"]).await,
        "daemon-reload",
    );
    std::fs::remove_file(key_file).unwrap();
    std::fs::remove_file(tokens_file).unwrap();
}

/// A Realtime WebSocket through the proxy, echoed by the fake upstream.
struct Realtime(
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
);

impl Realtime {
    async fn open(port: u16) -> Self {
        let url = format!("ws://127.0.0.1:{port}/v1/realtime?model=gpt-4o-realtime-preview");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        let hello = tokio_tungstenite::tungstenite::Message::text("hello");
        futures_util::SinkExt::send(&mut ws, hello.clone())
            .await
            .unwrap();
        let echoed = futures_util::StreamExt::next(&mut ws)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echoed, hello);
        Self(ws)
    }

    async fn echo(&mut self, text: &str) {
        let message = tokio_tungstenite::tungstenite::Message::text(text);
        futures_util::SinkExt::send(&mut self.0, message.clone())
            .await
            .expect("the WebSocket is still open");
        let echoed = futures_util::StreamExt::next(&mut self.0).await;
        assert_eq!(echoed.unwrap().unwrap(), message);
    }

    async fn close(mut self) {
        self.0.close(None).await.unwrap();
    }
}

/// A new binary that cannot start (here, one that exits 7 when run as the daemon): the reload
/// that would hand over to it fails and says why, and the running process serves on.
async fn failed_handover(ns: &Ns, client: &HttpClient, pid: &str, port: u16) {
    let real = "/usr/local/lib/openai-proxy-real";
    let script = format!(
        "cp /usr/bin/openai-proxy {real} && printf '%s\\n' '#!/bin/sh' \
         'case \"$1\" in check|reload) exec {real} \"$@\";; esac' 'exit 7' > /usr/bin/openai-proxy.new \
         && chmod 755 /usr/bin/openai-proxy.new && mv /usr/bin/openai-proxy.new /usr/bin/openai-proxy"
    );
    ok(
        &ns.run(&["sh", "-c", &script]).await,
        "installing a broken binary",
    );
    let reload = ns.run(&["systemctl", "reload", UNIT]).await;
    assert!(
        !reload.status.success(),
        "the reload to a broken binary succeeded"
    );
    let props = ns.props().await;
    assert_eq!(
        props.get("MainPID"),
        pid,
        "the old process is still the main one"
    );
    assert_eq!(props.get("ActiveState"), "active");
    let status = props.get("StatusText");
    assert!(
        status.contains("handover failed") && status.contains("exit status: 7"),
        "StatusText={status}"
    );
    let answer = send(
        client,
        post_json(
            &format!("http://127.0.0.1:{port}/v1/chat/completions"),
            chat(),
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "the old process serves");
    ok(
        &ns.run(&["mv", real, "/usr/bin/openai-proxy"]).await,
        "restoring the binary",
    );
}

struct LoadRun {
    /// Requests answered 200, all of them.
    served: usize,
    /// The longest a request sent while the action ran took to be answered.
    slowest_during: Duration,
}

/// Runs `action` while a client opens a new connection for a request every 10ms and an SSE
/// stream is in flight; every request must succeed, the stream must complete, and requests must
/// have been sent while the action ran.
async fn under_load<F, Fut>(
    ns: &Ns,
    client: &HttpClient,
    upstream: &FakeUpstream,
    port: u16,
    id: &str,
    action: F,
) -> LoadRun
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    let load = Load::start(url.clone());
    eventually(Duration::from_secs(10), "the load is served", || {
        (load.ok.load(Ordering::SeqCst) >= 5).then_some(())
    })
    .await;
    let stream = {
        let (client, url, id) = (client.clone(), url.clone(), id.to_owned());
        tokio::spawn(async move { stream_chat(&client, &url, &id, 40, 100).await })
    };
    eventually(Duration::from_secs(10), "the stream is in flight", || {
        let sent = upstream.sent_events.lock().unwrap();
        (sent.get(id).map_or(0, Vec::len) >= 2).then_some(())
    })
    .await;
    let began = Instant::now();
    action().await;
    let ended = Instant::now();
    // The new process must serve too, not only the backlog it inherited.
    let after = load.ok.load(Ordering::SeqCst);
    eventually(
        Duration::from_secs(30),
        "the load is served after the action",
        || (load.ok.load(Ordering::SeqCst) >= after + 20).then_some(()),
    )
    .await;
    let arrivals = stream
        .await
        .expect("the SSE stream completed with every event");
    assert!(
        arrivals[0] < began && *arrivals.last().unwrap() > began,
        "the stream was in flight when the action began"
    );
    let outcomes = load.stop().await;
    let failures: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        outcomes.len(),
        failures
            .iter()
            .take(5)
            .map(|o| &o.result)
            .collect::<Vec<_>>()
    );
    let during: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.started >= began && o.started < ended)
        .collect();
    let slowest_during = during.iter().map(|o| o.took).max().unwrap_or_default();
    let during = during.len();
    assert!(
        during >= 10,
        "only {during} requests were sent while the action ran"
    );
    let props = ns.props().await;
    eprintln!(
        "  {} requests ({during} sent during it, the slowest answered in {slowest_during:?}) and one SSE stream all served; action took {:?}; MainPID now {}",
        outcomes.len(),
        ended - began,
        props.get("MainPID")
    );
    LoadRun {
        served: outcomes.len(),
        slowest_during,
    }
}

struct Outcome {
    started: Instant,
    took: Duration,
    result: Result<(), String>,
}

/// Paced new connections, each with one request; a refused connection, a reset, a timeout or a
/// wrong answer all count as a failure.
struct Load {
    ok: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Outcome>>,
}

impl Load {
    fn start(url: String) -> Self {
        // No pooling: each request connects anew, so each one tests that the port accepts.
        let client: HttpClient = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(HttpConnector::new());
        let ok = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopped) = (ok.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut requests = tokio::task::JoinSet::new();
            // Paced, not flat out: the point is connections arriving all through the restart,
            // and journald's rate limit (10000 messages in 30s) must not drop access records.
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut sent = 0;
            while !stopped.load(Ordering::SeqCst) && sent < 6000 {
                tick.tick().await;
                sent += 1;
                let (client, url, counter) = (client.clone(), url.clone(), counter.clone());
                requests.spawn(async move {
                    let started = Instant::now();
                    let request = post_json(&url, chat());
                    let result = match tokio::time::timeout(Duration::from_secs(60), async {
                        let response = client
                            .request(request)
                            .await
                            .map_err(|e| format!("{e:?}"))?;
                        let status = response.status();
                        let body = response
                            .into_body()
                            .collect()
                            .await
                            .map_err(|e| format!("{e:?}"))?;
                        let body = body.to_bytes();
                        if status != StatusCode::OK || find(&body, b"chat.completion").is_none() {
                            return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
                        }
                        Ok(())
                    })
                    .await
                    {
                        Ok(result) => result,
                        Err(_) => Err("no answer within 60s".to_owned()),
                    };
                    if result.is_ok() {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                    Outcome {
                        started,
                        took: started.elapsed(),
                        result,
                    }
                });
            }
            let mut outcomes = Vec::new();
            while let Some(outcome) = requests.join_next().await {
                outcomes.push(outcome.expect("a request task"));
            }
            outcomes
        });
        Self { ok, stop, task }
    }

    async fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

fn config(a: u16, b: Option<u16>, extra: &str, upstream: SocketAddr) -> String {
    let listen = match b {
        Some(b) => format!("\"127.0.0.1:{a}\", \"127.0.0.1:{b}\""),
        None => format!("\"127.0.0.1:{a}\""),
    };
    format!(
        "# Written by tests/systemd.rs.\nlisten = [{listen}]\n{extra}\n[upstream]\n\
         url = \"https://127.0.0.1:{}\"\nhost = \"api.openai.com\"\nca_file = \"{CA_FILE}\"\n\n\
         # Reloads come from `systemctl reload` alone, so that the test sees that path.\n\
         [reload]\nwatch_files = false\n",
        upstream.port()
    )
}

/// A port below 1024 that nothing listens on (binding it needs root, which the test has).
fn free_low_port() -> u16 {
    (900..1024)
        .find(|port| std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port in 900..1024")
}

fn is_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        .unwrap_or(false)
}

/// The test installs into the machine itself: it must not take over a real installation.
fn preconditions() {
    let known = Command::new("dpkg-query")
        .args(["-W", PACKAGE])
        .output()
        .unwrap();
    assert!(
        !known.status.success(),
        "openai-proxy is installed (or left configured) on this machine; purge it first: {}",
        String::from_utf8_lossy(&known.stdout)
    );
    assert!(
        !Path::new("/etc/openai-proxy").exists(),
        "/etc/openai-proxy exists; move it away first"
    );
    for tool in [
        "/usr/bin/unshare",
        "/usr/bin/nsenter",
        "/lib/systemd/systemd",
        "/usr/bin/lintian",
    ] {
        assert!(Path::new(tool).exists(), "{tool} is missing");
    }
}

async fn cargo_deb(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut argv = vec![cargo];
    argv.extend(args.iter().map(|a| a.to_string()));
    let out = run(argv, Duration::from_secs(30 * 60), Env::Inherit).await;
    assert!(
        out.status.success(),
        "cargo {args:?} failed (is cargo-deb installed? `cargo install cargo-deb --locked`):\n{}",
        stderr(&out)
    );
}

async fn lintian_is_clean(deb: &Path) {
    let argv = ["lintian", "--fail-on", "error,warning", path_str(deb)];
    let out = run(
        argv.map(String::from).to_vec(),
        Duration::from_secs(300),
        Env::Clean,
    )
    .await;
    let report = stdout(&out);
    let complaints: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "lintian:\n{report}\n{}",
        stderr(&out)
    );
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// The systemd we booted, by its PID as the machine sees it.
#[derive(Clone, Copy)]
struct Ns {
    pid: u32,
}

impl Ns {
    fn argv(&self, args: &[&str]) -> Vec<String> {
        let mut argv: Vec<String> = ["nsenter", "-t", &self.pid.to_string(), "-m", "-p"]
            .map(String::from)
            .to_vec();
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    async fn run(&self, args: &[&str]) -> Output {
        run(self.argv(args), Duration::from_secs(180), Env::Clean).await
    }

    fn run_blocking(&self, args: &[&str], timeout: Duration) -> Output {
        run_blocking(&self.argv(args), timeout, Env::Clean, None)
    }

    async fn copy_in(&self, from: &Path, to: &str) {
        let argv = self.argv(&["sh", "-c", &format!("cat > {to}")]);
        let from = from.to_owned();
        let out = tokio::task::spawn_blocking(move || {
            run_blocking(&argv, Duration::from_secs(60), Env::Clean, Some(&from))
        })
        .await
        .unwrap();
        ok(&out, "copying a package into the namespace");
    }

    async fn props(&self) -> Props {
        let names = "MainPID,ActiveState,SubState,StatusText,NRestarts,Result,NFileDescriptorStore";
        let out = self.run(&["systemctl", "show", "-p", names, UNIT]).await;
        Props(ok(&out, "systemctl show"))
    }

    async fn props_until(&self, what: &str, check: impl Fn(&Props) -> bool) -> Props {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let props = self.props().await;
            if check(&props) {
                return props;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}: {props:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// This unit's journal as JSON entries, polled until `check` accepts it.
    async fn journal_until(
        &self,
        what: &str,
        check: impl Fn(&[serde_json::Value]) -> Option<()>,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self
                .run(&["journalctl", "--no-pager", "-o", "json", "-u", UNIT])
                .await;
            let entries: Vec<serde_json::Value> = stdout(&out)
                .lines()
                .map(|l| serde_json::from_str(l).expect("journalctl -o json prints JSON lines"))
                .collect();
            if check(&entries).is_some() {
                return entries;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what} in the journal"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn access_entries(ns: &Ns) -> Vec<serde_json::Value> {
    let entries = ns.journal_until("the journal", |_| Some(())).await;
    access(&entries).cloned().collect()
}

fn access(entries: &[serde_json::Value]) -> impl Iterator<Item = &serde_json::Value> {
    entries
        .iter()
        .filter(|e| e.get("REQUEST_ID").is_some() && field(e, "_SYSTEMD_UNIT") == UNIT)
}

/// A journal field as text (journalctl writes repeated fields as arrays; we take the first).
fn field(entry: &serde_json::Value, name: &str) -> String {
    match entry.get(name) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(values)) => values
            .first()
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

#[derive(Debug)]
struct Props(String);

impl Props {
    fn get(&self, name: &str) -> &str {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {name} in `systemctl show`:\n{}", self.0))
    }
}

#[derive(Clone, Copy)]
enum Env {
    /// As the test got it: cargo needs its own variables.
    Inherit,
    /// Only what a root shell would have, so nothing of the test's environment leaks into the
    /// namespace's commands.
    Clean,
}

async fn run(argv: Vec<String>, timeout: Duration, env: Env) -> Output {
    tokio::task::spawn_blocking(move || run_blocking(&argv, timeout, env, None))
        .await
        .unwrap()
}

/// Runs a command to its end, killing it (and failing) past `timeout`.
fn run_blocking(argv: &[String], timeout: Duration, env: Env, stdin: Option<&Path>) -> Output {
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]);
    if let Env::Clean = env {
        command
            .env_clear()
            .env("PATH", PATH_ENV)
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0");
    }
    command
        .stdin(match stdin {
            Some(path) => Stdio::from(File::open(path).unwrap()),
            None => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {argv:?}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{argv:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim_end().to_owned()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

/// Stops what the test started, whatever happened: purges the package, removes the test's CA
/// file, prints the journal if the test did not pass, and stops the namespace's systemd.
#[derive(Default)]
struct Guard {
    booted: Option<Booted>,
    installed: bool,
    passed: bool,
}

struct Booted {
    ns: Ns,
    /// `unshare`, whose child is our systemd.
    unshare: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Guard {
    async fn boot(&mut self) -> Ns {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("systemd.log");
        let file = File::create(&log).unwrap();
        let unshare = Command::new("setsid")
            .args([
                "unshare",
                "--pid",
                "--fork",
                "--mount",
                "--propagation",
                "private",
            ])
            .args(["--mount-proc", "sh", "-c", BOOT])
            .env_clear()
            .env("PATH", PATH_ENV)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("setsid unshare starts");
        // Not a process group leader, so setsid runs unshare in this very process.
        let parent = unshare.id();
        let pid = eventually(Duration::from_secs(10), "systemd to start", || {
            child_named(parent, "systemd")
        })
        .await;
        let ns = Ns { pid };
        self.booted = Some(Booted {
            ns,
            unshare,
            log,
            _dir: dir,
        });
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = ns.run(&["systemctl", "is-system-running"]).await;
            let state = stdout(&out);
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not finish booting: {state}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Timers would start apt, man-db and the like, which take dpkg's lock or the network.
        ns.run(&["systemctl", "stop", "timers.target", "*.timer"])
            .await;
        // This machine's policy-rc.d forbids maintainer scripts to start services; inside the
        // namespace only, let them, as on a normal system.
        if Path::new("/usr/sbin/policy-rc.d").exists() {
            let out = ns
                .run(&["mount", "--bind", "/bin/true", "/usr/sbin/policy-rc.d"])
                .await;
            ok(&out, "bind-mounting /bin/true over policy-rc.d");
        }
        ns
    }
}

/// The child of `parent` with the given command name, by a scan of /proc.
fn child_named(parent: u32, name: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`; comm may hold spaces, so split at the last ')'.
        let (head, tail) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1;
        let ppid: u32 = tail.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent && comm == name).then_some(pid)
    })
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(mut booted) = self.booted.take() else {
            return;
        };
        let ns = booted.ns;
        let quick = Duration::from_secs(60);
        if !self.passed {
            let status = ns.run_blocking(
                &["systemctl", "status", "--no-pager", "--full", UNIT],
                quick,
            );
            let unit = [
                "journalctl",
                "--no-pager",
                "-o",
                "short-precise",
                "-u",
                UNIT,
            ];
            let unit = ns.run_blocking(&unit, quick);
            let tail = [
                "journalctl",
                "--no-pager",
                "-o",
                "short-precise",
                "-n",
                "150",
            ];
            let tail = ns.run_blocking(&tail, quick);
            eprintln!(
                "--- systemctl status {UNIT} ---\n{}\n--- journalctl -u {UNIT} ---\n{}\n\
                 --- the last of the whole journal ---\n{}\n--- systemd's console ---\n{}",
                stdout(&status),
                stdout(&unit),
                stdout(&tail),
                std::fs::read_to_string(&booted.log).unwrap_or_default()
            );
        }
        if self.installed {
            let out = ns.run_blocking(&["dpkg", "--purge", PACKAGE], Duration::from_secs(180));
            if !out.status.success() {
                eprintln!("cleanup: dpkg --purge failed: {}", stderr(&out));
            }
        }
        let _ = std::fs::remove_file(CA_FILE);
        let _ = std::fs::remove_dir("/etc/openai-proxy");
        let _ = ns.run_blocking(&["systemctl", "exit"], quick);
        let deadline = Instant::now() + quick;
        while booted.unshare.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                eprintln!("cleanup: systemd did not exit; killing it and so its namespace");
                let _ = Command::new("kill")
                    .args(["-KILL", &ns.pid.to_string()])
                    .status();
                let _ = booted.unshare.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
