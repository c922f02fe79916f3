#!/usr/bin/env python3
"""openai-proxy against nginx, Caddy and HAProxy on one machine: see bench/README.md.

Run through bench/run.sh, which builds the binaries first. Everything listens on 127.0.0.1 and
every load generator is bounded in requests and time. Every process started here runs in a
process group of its own and is stopped, by its id, before this script exits.
"""

import argparse
import collections
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PROXY_BIN = REPO / "target" / "release" / "openai-proxy"
TOOL_BIN = BENCH / "tools" / "target" / "release" / "benchtool"
SHIPPED_CONFIG = REPO / "etc" / "openai-proxy" / "config.toml"
LOOPBACK = "127.0.0.1"
API_KEY = "sk-bench-0000000000000000000000000000000000000000000000"
PATH = "/v1/chat/completions"
REQUEST_BODY = (
    '{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a helpful '
    'assistant."},{"role":"user","content":"Say hello in one short sentence."}],'
    '"max_tokens":64,"stream":false}'
)

TARGETS = ["direct", "openai-proxy", "nginx", "caddy", "haproxy"]
PEERS = ["openai-proxy", "nginx", "caddy", "haproxy"]

PROFILES = {
    # A full run: about 12 minutes on this 2-core machine.
    "full": dict(
        rounds=3,
        wrk_warmup=2,
        wrk_secs=10,
        wrk_conns=64,
        oha_secs=10,
        rate=2000,
        streams=1000,
        stream_ramp_ms=1000,
        stream_events=40,
        stream_interval_ms=50,
        idle_conns=4000,
        starts=10,
        reloads=20,
        reload_load_secs=10,
        upgrades=3,
        upgrade_streams=3,
        upgrade_events=100,
        upgrade_after_ms=1000,
    ),
    # A smoke test of every step, with the same shapes and a third of the sizes.
    "quick": dict(
        rounds=2,
        wrk_warmup=1,
        wrk_secs=3,
        wrk_conns=64,
        oha_secs=3,
        rate=2000,
        streams=300,
        stream_ramp_ms=500,
        stream_events=20,
        stream_interval_ms=50,
        idle_conns=1000,
        starts=5,
        reloads=10,
        reload_load_secs=3,
        upgrades=3,
        upgrade_streams=3,
        upgrade_events=100,
        upgrade_after_ms=1000,
    ),
}


class Stop(Exception):
    """A signal asked us to stop: unwind, so that every process started here is stopped."""


def on_signal(signum, _frame):
    raise Stop(f"signal {signum}")


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port():
    """A port nothing listens on now. Each server gets a fresh one, so that a port another
    engineer's test holds, or one in TIME_WAIT from the last round, never gets in the way."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class Processes:
    """Every process this run starts, each the leader of its own process group (nginx's workers
    join their master's), so that stopping one stops all it forked and nothing else."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.live = {}
        # Processes this run caused but did not start: openai-proxy's successors after a
        # handover (children of the old proxy, then of init). pid -> (name, start time).
        self.adopted = {}

    def start(self, name, argv, env=None, pass_fds=()):
        logfile = open(self.logdir / f"{name}.log", "ab")
        logfile.write(f"\n### {time.strftime('%H:%M:%S')} {' '.join(map(str, argv))}\n".encode())
        logfile.flush()
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            pass_fds=pass_fds,
        )
        logfile.close()
        self.live[proc.pid] = (name, proc)
        return proc

    def stop(self, proc, sig=signal.SIGTERM, grace=10.0):
        if proc.pid not in self.live:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        # A worker may outlive its master for a moment; the group is ours alone.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        del self.live[proc.pid]

    def forget(self, proc):
        """A process that has exited and been waited for, whose group must not be signalled: a
        handover's successor still runs in it."""
        if proc.poll() is not None:
            self.live.pop(proc.pid, None)

    def adopt(self, name, pid):
        """Stops `pid` when the run ends, though it is not our child: openai-proxy's successor
        after a handover, named by MAINPID= on our notify socket."""
        born = start_time(pid)
        if born is not None:
            self.adopted[pid] = (name, born)

    def stop_adopted(self, pid, grace=10.0):
        """SIGTERM, then SIGKILL after `grace`, to an adopted process, by its id, as long as
        that id still names the process adopted (its start time is the same)."""
        if pid not in self.adopted:
            return
        _name, born = self.adopted.pop(pid)
        sig, deadline = signal.SIGTERM, time.monotonic() + grace
        while start_time(pid) == born:
            if sig is not None:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    return
                sig = None
            if time.monotonic() > deadline:
                sig, deadline = signal.SIGKILL, time.monotonic() + 10
            time.sleep(0.02)

    def stop_all(self):
        for pid in list(self.adopted):
            self.stop_adopted(pid, grace=5.0)
        for _pid, (_name, proc) in list(self.live.items()):
            self.stop(proc, grace=5.0)

    def run(self, name, argv, timeout, env=None):
        """Runs a load generator or tool to its end, at most `timeout` seconds; its stdout."""
        out = self.logdir / f"{name}.out"
        with open(out, "wb") as stdout, open(self.logdir / f"{name}.log", "ab") as stderr:
            stderr.write(f"\n### {time.strftime('%H:%M:%S')} {' '.join(map(str, argv))}\n".encode())
            stderr.flush()
            proc = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
                env=env,
            )
            self.live[proc.pid] = (name, proc)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.stop(proc, sig=signal.SIGKILL)
                raise RuntimeError(f"{name} did not finish within {timeout}s")
            finally:
                # Interrupted (a signal raised Stop in the wait): stop it, do not just forget it.
                if proc.pid in self.live:
                    if proc.poll() is None:
                        self.stop(proc, sig=signal.SIGKILL)
                    else:
                        del self.live[proc.pid]
        text = out.read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited {proc.returncode}: see {self.logdir / (name + '.log')}")
        return text


def start_time(pid):
    """When `pid` started (clock ticks since boot, from /proc), or None if no process, or only a
    zombie, has that id: with the id, it names one process, even if the id is used again."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])


def descendants(pid):
    """The processes whose parent is `pid` (nginx's workers), read from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name, in parentheses, may hold spaces: split after its closing one.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


def cpu_seconds(pids):
    """User and system CPU time of these processes, all their threads, from /proc."""
    user = system = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        user += int(fields[11])
        system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def memory_kib(pids):
    rss = pss = 0
    for pid in pids:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        rss += int(re.search(r"^Rss:\s+(\d+) kB", text, re.M).group(1))
        pss += int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1))
    return rss, pss


def post(port, body=REQUEST_BODY, timeout=5.0):
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request(
            "POST",
            PATH,
            body=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"},
        )
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait_serving(port, proc, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before serving")
        try:
            status = post(port, timeout=2.0)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as e:
            last = str(e)
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer 200 on port {port} within {timeout}s: {last}")


# --- The targets ---------------------------------------------------------------------------------


class Run:
    """What every target's config needs: where files go and where the upstream is."""

    def __init__(self, work, procs, certs, access_log, out):
        self.work = work
        self.procs = procs
        self.certs = certs
        self.access_log = access_log
        self.out = out
        self.upstream_port = None
        self.upstream_pid = None


def nginx_common(run, name):
    tmp = run.work / f"{name}-tmp"
    tmp.mkdir(exist_ok=True)
    return f"""
worker_rlimit_nofile 20000;
pid {run.work}/{name}.pid;
error_log {run.work}/{name}.error.log warn;
daemon off;
""", f"""
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # nginx closes a keep-alive connection after 1,000 requests by default; peers do not, and
    # a closed upstream connection costs a new TLS handshake, so lift it for a like-for-like run.
    keepalive_requests 10000000;
    keepalive_timeout 300s;
"""


def start_upstream(run, p):
    """The fake OpenAI API (benchtool upstream), one thread, so that it leaves the other core to
    the target. It answers as fast as an nginx with one worker and `return 200` (about 80,000
    req/s from wrk over TLS here, for both), and serves the streams too: one upstream for every
    phase."""
    proc = run.procs.start(
        "upstream",
        [
            TOOL_BIN, "upstream",
            "--listen", f"{LOOPBACK}:{run.upstream_port}",
            "--cert", run.certs / "cert.pem",
            "--key", run.certs / "key.pem",
            "--events", p["stream_events"],
            "--interval-ms", p["stream_interval_ms"],
        ],
    )
    wait_tls(run.upstream_port, proc, "the upstream")
    return proc


def wait_tls(port, proc, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on {port}")


class Target:
    name = ""
    # Plain HTTP/1.1 from the load generators, as an SDK pointed at OPENAI_BASE_URL sends it.
    scheme = "http"

    def __init__(self, run):
        self.run = run
        self.proc = None
        self.port = None

    def start(self, upstream_port):
        self.port = free_port()
        argv = self.configure(upstream_port)
        self.proc = self.run.procs.start(self.name, argv, env=self.env())
        wait_serving(self.port, self.proc, self.name)

    def env(self):
        return None

    def stop(self):
        if self.proc is not None:
            self.run.procs.stop(self.proc)
            self.proc = None

    def pids(self):
        return [self.proc.pid] + descendants(self.proc.pid)

    def url(self):
        return f"http://{LOOPBACK}:{self.port}{PATH}"


class OpenaiProxy(Target):
    """openai-proxy, or a variant of it (`--variant`): another binary, other config values."""

    name = "openai-proxy"

    def __init__(self, run, name=None, binary=None, settings=None):
        super().__init__(run)
        if name:
            self.name = name
        self.binary = binary or PROXY_BIN
        settings = settings or {}
        # `env.NAME=value` sets an environment variable (TOKIO_WORKER_THREADS, say) instead;
        # `append=FILE` adds a file's TOML at the end (what `section.key=value` cannot say,
        # such as `[[route]]` tables).
        self.environment = {k[4:]: v for k, v in settings.items() if k.startswith("env.")}
        self.append = settings.get("append")
        self.settings = {
            k: v for k, v in settings.items() if not k.startswith("env.") and k != "append"
        }

    def env(self):
        if not self.environment:
            return None
        env = dict(os.environ)
        env.update(self.environment)
        return env

    def config_text(self, port, upstream_port, access_log):
        # The shipped defaults for everything but where to listen and where the upstream is.
        sections = {
            "": {"listen": f'["{LOOPBACK}:{port}"]'},
            "upstream": {
                "url": f'"https://{LOOPBACK}:{upstream_port}"',
                "host": '"api.openai.com"',
                "ca_file": f'"{self.run.certs}/ca.pem"',
            },
            "log": {"access_log": "true" if access_log else "false"},
        }
        for dotted, value in self.settings.items():
            section, _, key = dotted.rpartition(".")
            sections.setdefault(section, {})[key] = value
        lines = []
        for section, values in sections.items():
            if section:
                lines.append(f"\n[{section}]")
            lines += [f"{k} = {v}" for k, v in values.items()]
        if self.append:
            lines.append(Path(self.append).read_text())
        return "\n".join(lines) + "\n"

    def configure(self, upstream_port):
        conf = self.run.work / f"{self.name}.toml"
        conf.write_text(self.config_text(self.port, upstream_port, self.run.access_log))
        return [self.binary, "--config", conf]


def parse_variant(spec):
    """`NAME=BIN[,section.key=value...]`: BIN empty for the build under test; values in TOML,
    `env.VAR=value` for the environment, or `append=FILE` for TOML added at the end."""
    name, _, rest = spec.partition("=")
    parts = rest.split(",") if rest else [""]
    binary = Path(parts[0]).resolve() if parts[0] else None
    settings = {}
    for item in parts[1:]:
        key, _, value = item.partition("=")
        if not key or not value:
            raise ValueError(f"--variant {spec!r}: settings are section.key=value")
        settings[key] = value
    if not re.fullmatch(r"[a-z0-9][a-z0-9+._-]*", name) or name in TARGETS:
        raise ValueError(f"--variant {spec!r}: a new lower-case name, then =")
    if binary and not binary.exists():
        raise ValueError(f"--variant {spec!r}: {binary} does not exist")
    return name, binary, settings


class Nginx(Target):
    name = "nginx"
    # Under valgrind: one process doing all the work, so that its instructions are counted.
    single_process = False

    def configure(self, upstream_port):
        head, http_common = nginx_common(self.run, "nginx")
        access = f"access_log {self.run.work}/nginx.access.log;" if self.run.access_log else "access_log off;"
        processes = "worker_processes auto;"
        if self.single_process:
            processes = "worker_processes 1;\nmaster_process off;"
        conf = self.run.work / "nginx.conf"
        conf.write_text(f"""{head}
{processes}
events {{ worker_connections 16000; multi_accept on; }}
http {{
    {access}
{http_common}
    upstream openai {{
        server {LOOPBACK}:{upstream_port};
        keepalive 256;
        keepalive_requests 10000000;
        keepalive_timeout 90s;
    }}
    server {{
        listen {LOOPBACK}:{self.port} backlog=4096;
        location / {{
            proxy_pass https://openai;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host api.openai.com;
            proxy_ssl_server_name on;
            proxy_ssl_name api.openai.com;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {self.run.certs}/ca.pem;
            proxy_ssl_session_reuse on;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 900s;
        }}
    }}
}}
""")
        return ["nginx", "-e", "stderr", "-p", self.run.work, "-c", conf]


class Caddy(Target):
    name = "caddy"

    def env(self):
        home = self.run.work / "caddy-home"
        home.mkdir(exist_ok=True)
        env = dict(os.environ)
        env.update(HOME=str(home), XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"))
        return env

    def configure(self, upstream_port):
        access = f"log {{\n        output file {self.run.work}/caddy.access.log\n    }}" if self.run.access_log else ""
        conf = self.run.work / "Caddyfile"
        conf.write_text(f"""{{
    admin off
    auto_https off
}}

http://{LOOPBACK}:{self.port} {{
    bind {LOOPBACK}
    {access}
    reverse_proxy https://{LOOPBACK}:{upstream_port} {{
        header_up Host api.openai.com
        flush_interval -1
        transport http {{
            tls_server_name api.openai.com
            tls_trusted_ca_certs {self.run.certs}/ca.pem
            keepalive 90s
            keepalive_idle_conns 256
            keepalive_idle_conns_per_host 256
        }}
    }}
}}
""")
        return ["caddy", "run", "--adapter", "caddyfile", "--config", conf]


class Haproxy(Target):
    name = "haproxy"

    def configure(self, upstream_port):
        logging = "    log stdout format raw local0\n" if self.run.access_log else ""
        httplog = "    option httplog\n    log global\n" if self.run.access_log else ""
        conf = self.run.work / "haproxy.cfg"
        conf.write_text(f"""global
    # Two fds per proxied connection must fit under the 20,000 open-file cap.
    maxconn 9000
    nbthread 2
{logging}
defaults
    mode http
{httplog}    timeout connect 10s
    timeout client 5m
    timeout server 15m
    timeout http-keep-alive 300s
    timeout http-request 30s

frontend openai_proxy
    bind {LOOPBACK}:{self.port}
    # Without it HAProxy holds back small writes, each SSE event among them, by ~200 ms.
    option http-no-delay
    default_backend openai

backend openai
    option http-no-delay
    http-reuse always
    http-request set-header Host api.openai.com
    server api {LOOPBACK}:{upstream_port} ssl verify required ca-file {self.run.certs}/ca.pem sni str(api.openai.com) verifyhost api.openai.com pool-max-conn 256
""")
        return ["haproxy", "-db", "-f", conf]


class Direct(Target):
    """The load generator straight to the upstream: what the machine does with no proxy."""

    name = "direct"
    scheme = "https"

    def start(self, upstream_port):
        self.port = upstream_port

    def stop(self):
        pass

    def url(self):
        return f"https://{LOOPBACK}:{self.port}{PATH}"


CLASSES = {c.name: c for c in (Direct, OpenaiProxy, Nginx, Caddy, Haproxy)}


# --- The measurements ----------------------------------------------------------------------------


def wrk_script():
    return (
        'wrk.method = "POST"\n'
        f"wrk.body = '{REQUEST_BODY}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {API_KEY}"\n'
    )


def wrk(run, target, p, name):
    script = run.work / "post.lua"
    script.write_text(wrk_script())
    argv = ["wrk", "-t2", f"-c{p['wrk_conns']}", "--latency", "-s", script]
    run.procs.run(f"{name}-warmup", argv + [f"-d{p['wrk_warmup']}s", target.url()], timeout=p["wrk_warmup"] + 30)
    # CPU time per request is steadier than requests per second when other work shares the
    # cores: it does not count the time the target waited for a core.
    pids = target.pids() if target.proc else []
    # The upstream's too: a target that makes each request cost the upstream more leaves less
    # of the shared cores to itself and to wrk.
    upstream = [run.upstream_pid] if run.upstream_pid else []
    user_before, system_before = cpu_seconds(pids)
    up_before = sum(cpu_seconds(upstream))
    text = run.procs.run(name, argv + [f"-d{p['wrk_secs']}s", target.url()], timeout=p["wrk_secs"] + 30)
    user_after, system_after = cpu_seconds(pids)
    up_after = sum(cpu_seconds(upstream))
    user, system = user_after - user_before, system_after - system_before
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    requests = int(re.search(r"(\d+) requests in", text).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(x) for x in socket_errors.groups()) if socket_errors else 0
    )

    def latency(pct):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    return {
        "rps": rps,
        "requests": requests,
        "cpu_us_per_request": (user + system) / requests * 1e6 if pids and requests else None,
        "cpu_user_us_per_request": user / requests * 1e6 if pids and requests else None,
        "cpu_system_us_per_request": system / requests * 1e6 if pids and requests else None,
        "upstream_cpu_us_per_request": (up_after - up_before) / requests * 1e6 if upstream and requests else None,
        "errors": errors,
        "p50_ms": latency(50),
        "p99_ms": latency(99),
    }


def oha(run, target, p, name, secs):
    argv = [
        "oha", "--no-tui", "--output-format", "json",
        "-z", f"{secs}s", "-q", p["rate"], "--latency-correction",
        "-c", "64", "-t", "10s",
        "-m", "POST", "-T", "application/json",
        "-H", f"Authorization: Bearer {API_KEY}",
        "-d", REQUEST_BODY,
    ]
    if target.scheme == "https":
        argv += ["--cacert", run.certs / "ca.pem"]
    text = run.procs.run(name, argv + [target.url()], timeout=secs + 40)
    result = json.loads(text)
    summary = result["summary"]
    pct = result["latencyPercentiles"]
    statuses = result.get("statusCodeDistribution", {})
    ok = sum(n for code, n in statuses.items() if code.startswith("2"))
    # Requests cut by the end of the run are not errors of the target.
    errors = sum(
        n for kind, n in result.get("errorDistribution", {}).items() if "deadline" not in kind
    ) + sum(n for code, n in statuses.items() if not code.startswith("2"))
    return {
        "rps": summary["requestsPerSec"],
        "ok": ok,
        "errors": errors,
        "error_kinds": result.get("errorDistribution", {}),
        "p50_ms": pct["p50"] * 1e3,
        "p99_ms": pct["p99"] * 1e3,
        "p999_ms": pct["p99.9"] * 1e3,
    }


def streams(run, target, p, name):
    argv = [
        TOOL_BIN, "streams", "--url", target.url(),
        "--streams", p["streams"], "--ramp-ms", p["stream_ramp_ms"],
        "--events", p["stream_events"], "--interval-ms", p["stream_interval_ms"],
        "--timeout-secs", 60,
    ]
    if target.scheme == "https":
        argv += ["--ca", run.certs / "ca.pem", "--server-name", "api.openai.com"]
    # What relaying costs the target: its CPU time over the whole run, per event delivered.
    pids = target.pids() if target.proc else []
    upstream = [run.upstream_pid] if run.upstream_pid else []
    before, up_before = sum(cpu_seconds(pids)), sum(cpu_seconds(upstream))
    result = json.loads(run.procs.run(name, argv, timeout=120))
    spent = sum(cpu_seconds(pids)) - before
    up_spent = sum(cpu_seconds(upstream)) - up_before
    events = result.get("events") or 0
    result["cpu_us_per_event"] = spent / events * 1e6 if pids and events else None
    result["upstream_cpu_us_per_event"] = up_spent / events * 1e6 if upstream and events else None
    return result


def hold(run, target, p, name):
    argv = [
        TOOL_BIN, "hold", "--url", target.url(), "--conns", p["idle_conns"],
        "--pids", ",".join(map(str, target.pids())), "--settle-ms", 1000, "--timeout-secs", 60,
    ]
    return json.loads(run.procs.run(name, argv, timeout=120))


class Notifier:
    """Our own NOTIFY_SOCKET: the proxy's READY=1 and RELOADING=1 arrive here, as at systemd."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def env(self):
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = self.path
        env.pop("LISTEN_FDS", None)
        env.pop("WATCHDOG_USEC", None)
        return env

    def wait(self, word, timeout=10.0):
        """The time at which a message holding the line `word` arrives."""
        return self.wait_for(lambda lines: word in lines, word, timeout)[0]

    def wait_for(self, test, what, timeout=10.0):
        """The first message whose lines pass `test`: the time it arrived, and its lines."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"no {what} on the notify socket within {timeout}s")
            self.sock.settimeout(left)
            now, lines = self._receive()
            if test(lines):
                return now, lines

    def _receive(self):
        data, ancdata, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        now = time.perf_counter()
        # FDSTORE=1 carries the listening socket: close our copy.
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                for i in range(0, len(payload) - len(payload) % 4, 4):
                    os.close(int.from_bytes(payload[i : i + 4], sys.byteorder))
        return now, data.decode(errors="replace").splitlines()

    def discard(self):
        """Drops the messages already queued, so that the next wait sees only new ones."""
        self.sock.settimeout(0)
        try:
            while True:
                self._receive()
        except (BlockingIOError, socket.timeout):
            pass

    def close(self):
        self.sock.close()
        os.unlink(self.path)


def lifecycle(run, p, round_no):
    """openai-proxy's start to READY=1 and SIGHUP to READY=1, with the shipped config (only the
    listen address changed); the p99 at a fixed rate while it reloads every 100 ms; and a new
    request's wait during an upgrade with streams in flight (`upgrade`)."""
    notifier = Notifier(run.work / f"notify-{round_no}.sock")
    result = {}
    try:
        port = free_port()
        shipped = SHIPPED_CONFIG.read_text()
        shipped = re.sub(r'(?m)^listen = .*$', f'listen = ["{LOOPBACK}:{port}"]', shipped)
        conf = run.work / "shipped.toml"
        conf.write_text(shipped)
        starts, reloads = [], []
        for _ in range(p["starts"]):
            begin = time.perf_counter()
            proc = run.procs.start("openai-proxy-lifecycle", [PROXY_BIN, "--config", conf], env=notifier.env())
            starts.append((notifier.wait("READY=1") - begin) * 1e3)
            run.procs.stop(proc)
        proc = run.procs.start("openai-proxy-lifecycle", [PROXY_BIN, "--config", conf], env=notifier.env())
        notifier.wait("READY=1")
        for _ in range(p["reloads"]):
            time.sleep(0.05)
            begin = time.perf_counter()
            os.kill(proc.pid, signal.SIGHUP)
            reloads.append((notifier.wait("READY=1") - begin) * 1e3)
        run.procs.stop(proc)
        result["start_ms"] = starts
        result["reload_ms"] = reloads

        # Under load: the bench config, the fake upstream, oha at the fixed rate.
        target = OpenaiProxy(run)
        target.port = free_port()
        conf = run.work / "openai-proxy-reload.toml"
        conf.write_text(target.config_text(target.port, run.upstream_port, access_log=False))
        proc = run.procs.start("openai-proxy-reload", [PROXY_BIN, "--config", conf], env=notifier.env())
        notifier.wait("READY=1")
        wait_serving(target.port, proc, "openai-proxy")
        secs = p["reload_load_secs"]
        steady = oha(run, target, p, f"oha-steady-r{round_no}", secs)
        # The same load again, with a SIGHUP every 100 ms for as long as it runs.
        load_name = f"oha-reloading-r{round_no}"
        under = []
        box = {}

        def load():
            try:
                box["result"] = oha(run, target, p, load_name, secs)
            except Exception as e:  # reported below, in the main thread
                box["error"] = e

        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        next_at = time.perf_counter() + 0.1
        while thread.is_alive():
            now = time.perf_counter()
            if now < next_at:
                time.sleep(min(0.01, next_at - now))
                continue
            begin = time.perf_counter()
            os.kill(proc.pid, signal.SIGHUP)
            under.append((notifier.wait("READY=1") - begin) * 1e3)
            next_at = begin + 0.1
        thread.join()
        run.procs.stop(proc)
        if "error" in box:
            raise box["error"]
        result["steady"] = steady
        result["reloading"] = box["result"]
        result["reloads_under_load"] = len(under)
        result["reload_under_load_ms"] = under
    finally:
        notifier.close()
    # An upgrade with long streams in flight: handover against restart.
    result["upgrade"] = upgrade(run, p, round_no)
    return result


def upgrade(run, p, round_no):
    """Issue 14: how long a new request waits while openai-proxy is upgraded with long streams in
    flight. `upgrade_streams` SSE streams of `upgrade_events` events 50 ms apart (5 s) run
    through the proxy; `upgrade_after_ms` after they start, the proxy is upgraded and a request
    on a new connection is timed from sending to its answer:
    * handover: SIGUSR2 (what a reload does once the binary on disk was replaced), the request
      at once, and another once MAINPID= has come (the old process then no longer accepts). The
      successor named by MAINPID= on our notify socket is the process handed over to next
      time; not being our child, it is stopped by its id when the run ends;
    * restart, as systemd does it with the listening socket in its fd store: SIGTERM, the
      request once the proxy says STOPPING=1, and a new proxy once the old one has exited,
      started with the socket this script holds, passed as systemd passes it (LISTEN_FDS=1,
      LISTEN_FDNAMES, LISTEN_PID), so the request waits in the backlog, never refused.
    Every stream must complete, through either."""
    notifier = Notifier(run.work / f"notify-upgrade-{round_no}.sock")
    long_port = free_port()
    long_upstream = run.procs.start(
        "upstream-long",
        [
            TOOL_BIN, "upstream",
            "--listen", f"{LOOPBACK}:{long_port}",
            "--cert", run.certs / "cert.pem",
            "--key", run.certs / "key.pem",
            "--events", p["upgrade_events"],
            "--interval-ms", p["stream_interval_ms"],
        ],
    )
    listening = socket.socket()
    result = {
        "streams": p["upgrade_streams"],
        "stream_ms": p["upgrade_events"] * p["stream_interval_ms"],
        "after_ms": p["upgrade_after_ms"],
        "handover_ms": [], "handover_mainpid_ms": [], "handover_named_ms": [], "handover_ready_ms": [],
        "restart_ms": [], "restart_ready_ms": [],
        "streams_failed": 0, "requests_failed": 0,
    }
    procs = []
    successors = []
    try:
        wait_tls(long_port, long_upstream, "the long-stream upstream")
        target = OpenaiProxy(run)

        def in_flight(name):
            """Starts the streams in the background; returns a function that waits for them."""
            box = {}
            url = f"http://{LOOPBACK}:{target.port}{PATH}"
            argv = [
                TOOL_BIN, "streams", "--url", url, "--streams", p["upgrade_streams"],
                "--ramp-ms", 100, "--events", p["upgrade_events"],
                "--interval-ms", p["stream_interval_ms"], "--timeout-secs", 60,
            ]

            def streams_run():
                try:
                    box["result"] = json.loads(run.procs.run(name, argv, timeout=90))
                except Exception as e:  # reported in the main thread
                    box["error"] = e

            thread = threading.Thread(target=streams_run, daemon=True)
            thread.start()
            time.sleep(p["upgrade_after_ms"] / 1e3)

            def done():
                thread.join()
                if "error" in box:
                    raise box["error"]
                result["streams_failed"] += box["result"]["failed"]

            return done

        def timed_request():
            begin = time.perf_counter()
            try:
                status = post(target.port, timeout=60.0)
            except OSError:
                status = None
            if status != 200:
                result["requests_failed"] += 1
            return (time.perf_counter() - begin) * 1e3

        # (a) Handover: the proxy binds its own socket, then hands it on each time.
        target.port = free_port()
        conf = run.work / f"openai-proxy-upgrade-r{round_no}.toml"
        conf.write_text(target.config_text(target.port, long_port, access_log=False))
        first = run.procs.start("openai-proxy-handover", [PROXY_BIN, "--config", conf], env=notifier.env())
        procs.append(first)
        notifier.wait("READY=1")
        wait_serving(target.port, first, "openai-proxy")
        main_pid = first.pid
        for i in range(p["upgrades"]):
            done = in_flight(f"streams-handover-r{round_no}-{i}")
            notifier.discard()
            signalled = time.perf_counter()
            os.kill(main_pid, signal.SIGUSR2)
            result["handover_ms"].append(timed_request())
            named, lines = notifier.wait_for(
                lambda lines: any(l.startswith("MAINPID=") for l in lines), "MAINPID=", timeout=40.0
            )
            old_pid = main_pid
            main_pid = int(next(l for l in lines if l.startswith("MAINPID="))[len("MAINPID="):])
            run.procs.adopt("openai-proxy-successor", main_pid)
            successors.append(main_pid)
            result["handover_mainpid_ms"].append((named - signalled) * 1e3)
            # The old process stops accepting once it has named its successor: from then on only
            # the successor can answer a new connection.
            result["handover_named_ms"].append(timed_request())
            result["handover_ready_ms"].append((notifier.wait("READY=1", timeout=10.0) - signalled) * 1e3)
            done()
            # The old process exits once its streams are done.
            if old_pid == first.pid:
                result["first_exit"] = first.wait(timeout=40)
                run.procs.forget(first)
            else:
                deadline = time.monotonic() + 40
                while start_time(old_pid) is not None and time.monotonic() < deadline:
                    time.sleep(0.02)
                run.procs.stop_adopted(old_pid)
        run.procs.stop_adopted(main_pid)
        run.procs.stop(first)

        # (b) Restart: stop, wait for the exit, start anew on the same socket.
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((LOOPBACK, 0))
        listening.listen(4096)
        target.port = listening.getsockname()[1]
        conf.write_text(target.config_text(target.port, long_port, access_log=False))
        fd = listening.fileno()
        env = notifier.env()
        env["LISTEN_FDS"] = "1"
        env["LISTEN_FDNAMES"] = f"listen-{LOOPBACK}-{target.port}"
        # LISTEN_PID must be the proxy's own: the shell's, which exec keeps; the socket at fd 3.
        move = "" if fd == 3 else f" 3<&{fd} {fd}<&-"
        argv = ["/bin/sh", "-c", f'export LISTEN_PID=$$; exec "$0" "$@"{move}', PROXY_BIN, "--config", conf]

        def start_restarted():
            proc = run.procs.start("openai-proxy-restart", argv, env=env, pass_fds=(fd,))
            procs.append(proc)
            return proc

        proc = start_restarted()
        notifier.wait("READY=1")
        wait_serving(target.port, proc, "openai-proxy")
        for i in range(p["upgrades"]):
            done = in_flight(f"streams-restart-r{round_no}-{i}")
            notifier.discard()
            box = {}

            def restart(old=proc):
                try:
                    os.kill(old.pid, signal.SIGTERM)
                    box["exit"] = old.wait(timeout=60)
                    run.procs.forget(old)
                    box["proc"] = start_restarted()
                except Exception as e:  # reported in the main thread
                    box["error"] = e

            thread = threading.Thread(target=restart, daemon=True)
            signalled = time.perf_counter()
            thread.start()
            notifier.wait("STOPPING=1", timeout=10.0)
            result["restart_ms"].append(timed_request())
            thread.join()
            if "error" in box:
                raise box["error"]
            proc = box["proc"]
            result["restart_ready_ms"].append((notifier.wait("READY=1", timeout=10.0) - signalled) * 1e3)
            result.setdefault("restart_exits", []).append(box["exit"])
            done()
        run.procs.stop(proc)
    finally:
        for pid in successors:
            run.procs.stop_adopted(pid)
        for proc in procs:
            run.procs.stop(proc)
        run.procs.stop(long_upstream)
        listening.close()
        notifier.close()
    return result


# --- Report ---------------------------------------------------------------------------------------


def versions():
    def first_line(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    git = first_line(["git", "-C", REPO, "describe", "--always", "--dirty"])
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    debian = "?"
    try:
        debian = "Debian " + Path("/etc/debian_version").read_text().strip()
    except OSError:
        pass
    return {
        "openai-proxy": f"{first_line([PROXY_BIN, '--version'])} ({git})",
        "nginx": first_line(["nginx", "-v"]).replace("nginx version: nginx/", "nginx "),
        "caddy": first_line(["caddy", "version"]).split()[0],
        "haproxy": "HAProxy " + first_line(["haproxy", "-v"]).split()[2],
        "wrk": "wrk " + first_line(["wrk", "-v"]).split()[1],
        "oha": first_line(["oha", "--version"]),
        "kernel": platform.release(),
        "os": debian,
        "cpu": f"{os.cpu_count()} x {cpu}",
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


# Each figure: where it is in a round's results, how to print it, and whether more is better.
FIGURES = [
    ("wrk req/s, 64 conns", ("wrk", "rps"), "{:,.0f}", True),
    ("wrk: target's CPU µs per request", ("wrk", "cpu_us_per_request"), "{:.1f}", False),
    ("… of which user space", ("wrk", "cpu_user_us_per_request"), "{:.1f}", False),
    ("wrk: upstream's CPU µs per request", ("wrk", "upstream_cpu_us_per_request"), "{:.1f}", False),
    ("streams: target's CPU µs per event", ("streams", "cpu_us_per_event"), "{:.1f}", False),
    ("streams: upstream's CPU µs per event", ("streams", "upstream_cpu_us_per_event"), "{:.1f}", False),
    ("wrk p99 ms (closed loop)", ("wrk", "p99_ms"), "{:.2f}", False),
    ("oha p50 ms @ rate", ("oha", "p50_ms"), "{:.3f}", False),
    ("oha p99 ms @ rate", ("oha", "p99_ms"), "{:.3f}", False),
    ("oha p99.9 ms @ rate", ("oha", "p999_ms"), "{:.3f}", False),
    ("oha errors", ("oha", "errors"), "{:.0f}", False),
    ("streams TTFE p50 ms", ("streams", "ttfe", "p50_ms"), "{:.2f}", False),
    ("streams TTFE p99 ms", ("streams", "ttfe", "p99_ms"), "{:.2f}", False),
    ("… p99 of the way to the upstream ms", ("streams", "ttfe_to_upstream", "p99_ms"), "{:.2f}", False),
    ("… p99 of the wait at the upstream ms", ("streams", "ttfe_at_upstream", "p99_ms"), "{:.2f}", False),
    ("streams gap p50 ms, all open", ("streams", "gap_all_open", "p50_ms"), "{:.2f}", False),
    ("streams gap p99 ms, all open", ("streams", "gap_all_open", "p99_ms"), "{:.2f}", False),
    ("streams gap p99 ms, whole run", ("streams", "gap", "p99_ms"), "{:.2f}", False),
    ("streams delivery lag p99 ms, all open", ("streams", "lag_all_open", "p99_ms"), "{:.2f}", False),
    ("streams failed", ("streams", "failed"), "{:.0f}", False),
    ("RSS idle MiB", ("idle", "rss_mib"), "{:.1f}", False),
    ("PSS idle MiB", ("idle", "pss_mib"), "{:.1f}", False),
    ("RSS per idle conn KiB", ("hold", "rss_per_conn_kib"), "{:.2f}", False),
    ("PSS per idle conn KiB", ("hold", "pss_per_conn_kib"), "{:.2f}", False),
]


def dig(d, path):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def medians(rounds, targets):
    """For each target and figure: the median over rounds, and the median of the per-round
    ratios to nginx (ratios within a round cancel most of the machine's drift)."""
    out = {}
    for target in targets:
        for label, path, _fmt, _more in FIGURES:
            values = [dig(r["results"].get(target, {}), path) for r in rounds]
            ratios = []
            for r in rounds:
                mine, base = dig(r["results"].get(target, {}), path), dig(r["results"].get("nginx", {}), path)
                if mine is not None and base:
                    ratios.append(mine / base)
            out.setdefault(target, {})[label] = {
                "values": values,
                "median": median(values),
                "ratio_to_nginx": median(ratios),
            }
    return out


def lifecycle_medians(rounds):
    starts = [x for r in rounds for x in r.get("lifecycle", {}).get("start_ms", [])]
    reloads = [x for r in rounds for x in r.get("lifecycle", {}).get("reload_ms", [])]
    under = [x for r in rounds for x in r.get("lifecycle", {}).get("reload_under_load_ms", [])]
    steady = [dig(r, ("lifecycle", "steady", "p99_ms")) for r in rounds]
    reloading = [dig(r, ("lifecycle", "reloading", "p99_ms")) for r in rounds]
    ratios = [b / a for a, b in zip(steady, reloading) if a and b]
    errors = [dig(r, ("lifecycle", "reloading", "errors")) for r in rounds]
    upgrades = [r["lifecycle"]["upgrade"] for r in rounds if dig(r, ("lifecycle", "upgrade"))]

    def every(key):
        return [x for u in upgrades for x in u.get(key, [])]

    def pct(values, q):
        if not values:
            return None
        values = sorted(values)
        return values[min(len(values) - 1, max(0, int(round(q / 100 * len(values) + 0.5)) - 1))]

    return {
        "start_ms_median": median(starts),
        "start_ms_max": max(starts) if starts else None,
        "reload_ms_median": median(reloads),
        "reload_ms_p90": pct(reloads, 90),
        "reload_ms_max": max(reloads) if reloads else None,
        "reload_under_load_ms_median": median(under),
        "reloads_under_load": [dig(r, ("lifecycle", "reloads_under_load")) for r in rounds],
        "steady_p99_ms": median(steady),
        "reloading_p99_ms": median(reloading),
        "p99_ratio_reloading_to_steady": median(ratios),
        "reloading_errors": errors,
        "upgrade_handover_ms_median": median(every("handover_ms")),
        "upgrade_handover_ms_max": max(every("handover_ms"), default=None),
        "upgrade_handover_ready_ms_median": median(every("handover_ready_ms")),
        "upgrade_handover_named_ms_median": median(every("handover_named_ms")),
        "upgrade_handover_named_ms_max": max(every("handover_named_ms"), default=None),
        "upgrade_restart_ms_median": median(every("restart_ms")),
        "upgrade_restart_ms_min": min(every("restart_ms"), default=None),
        "upgrade_restart_ms_max": max(every("restart_ms"), default=None),
        "upgrade_samples": len(every("handover_ms")),
        "upgrade_streams_failed": sum(u["streams_failed"] for u in upgrades) if upgrades else None,
        "upgrade_requests_failed": sum(u["requests_failed"] for u in upgrades) if upgrades else None,
        "upgrade_shape": {k: upgrades[0][k] for k in ("streams", "stream_ms", "after_ms")} if upgrades else None,
    }


def cell(value, ratio, fmt, show_ratio):
    if value is None:
        return "–"
    text = fmt.format(value)
    if show_ratio and ratio is not None:
        text += f" ({ratio:.2f}x)"
    return text


def num(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def verdicts(med, life, p, rounds):
    """The issue's targets, each with what this run says of it."""
    blank = collections.defaultdict(lambda: {"median": None, "ratio_to_nginx": None})
    op, ng, direct = (med.get(t, blank) for t in ("openai-proxy", "nginx", "direct"))

    def rounds_ahead(path, higher_is_better=False):
        """In how many rounds openai-proxy did at least as well as nginx: a p99 moves by more
        from round to round than between the two, so the median alone can mislead."""
        pairs = [(dig(r["results"].get("openai-proxy", {}), path), dig(r["results"].get("nginx", {}), path))
                 for r in rounds]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        ahead = sum((a >= b) if higher_is_better else (a <= b) for a, b in pairs)
        return f"; at least as good in {ahead} of {len(pairs)} rounds" if pairs else ""

    def mine(label):
        return op[label]["median"]

    def ratio(label):
        return op[label]["ratio_to_nginx"]

    def check(value, test):
        return None if value is None else test(value)

    rows = []
    r = ratio("wrk req/s, 64 conns")
    rows.append(("wrk req/s, 64 connections", "≥ nginx, aim 1.2x", check(r, lambda r: r >= 1.0),
                 f"{num(r)}x nginx{rounds_ahead(('wrk', 'rps'), higher_is_better=True)}"))
    r, e = ratio("oha p99 ms @ rate"), mine("oha errors")
    rows.append((f"p99 at {p['rate']} req/s, zero errors", "≤ nginx, 0 errors",
                 check(r, lambda r: r <= 1.0 and e == 0),
                 f"{num(mine('oha p99 ms @ rate'), '{:.3f}')} ms vs nginx "
                 f"{num(ng['oha p99 ms @ rate']['median'], '{:.3f}')} ms ({num(r)}x); errors {num(e, '{:.0f}')}"
                 f"{rounds_ahead(('oha', 'p99_ms'))}"))
    r = ratio("streams TTFE p99 ms")
    rows.append(("streams: time to first event, p99", "≤ nginx", check(r, lambda r: r <= 1.0),
                 f"{num(mine('streams TTFE p99 ms'))} ms vs nginx "
                 f"{num(ng['streams TTFE p99 ms']['median'])} ms ({num(r)}x)"
                 f"{rounds_ahead(('streams', 'ttfe', 'p99_ms'))}"))
    label = "streams gap p99 ms, all open"
    gap = mine(label)
    rows.append((f"streams: gap p99 with {p['streams']} streams open", f"≤ {p['stream_interval_ms']} + 2 ms",
                 check(gap, lambda g: g <= p["stream_interval_ms"] + 2),
                 f"{num(gap)} ms (direct {num(direct[label]['median'])}, nginx {num(ng[label]['median'])})"))
    rss = mine("RSS idle MiB")
    rows.append(("RSS idle", "≤ 10 MiB", check(rss, lambda x: x <= 10), f"{num(rss, '{:.1f}')} MiB"))
    per = mine("RSS per idle conn KiB")
    rows.append(("RSS per idle keep-alive connection", "≤ 4 KiB", check(per, lambda x: x <= 4),
                 f"{num(per)} KiB (nginx {num(ng['RSS per idle conn KiB']['median'])})"))
    s = life.get("start_ms_median")
    rows.append(("start to READY=1", "≤ 50 ms", check(s, lambda x: x <= 50),
                 f"median {num(s, '{:.1f}')} ms, max {num(life.get('start_ms_max'), '{:.1f}')} ms"))
    rl = life.get("reload_ms_median")
    rows.append(("reload, SIGHUP to READY=1, shipped config", "≤ 20 ms", check(rl, lambda x: x <= 20),
                 f"median {num(rl, '{:.1f}')} ms, max {num(life.get('reload_ms_max'), '{:.1f}')} ms"))
    q = life.get("p99_ratio_reloading_to_steady")
    rows.append(("p99 while reloading every 100 ms", "≤ 2x steady p99", check(q, lambda x: x <= 2),
                 f"{num(life.get('reloading_p99_ms'), '{:.3f}')} ms vs {num(life.get('steady_p99_ms'), '{:.3f}')} ms "
                 f"steady ({num(q)}x); errors {life.get('reloading_errors')}"))
    return [(w, t, "—" if ok is None else ("yes" if ok else "**no**"), ev) for w, t, ok, ev in rows]


def per_round(rounds, p):
    """Each round's key ratios, with `direct` as the control: a round in which even the direct
    path misses the stream schedule by more than 2 ms was disturbed by other work on the machine."""
    rows = []
    for r in rounds:
        res = r["results"]
        op, ng, di = res.get("openai-proxy", {}), res.get("nginx", {}), res.get("direct", {})

        def ratio(path):
            a, b = dig(op, path), dig(ng, path)
            return f"{a / b:.2f}x" if a is not None and b else "–"

        control = dig(di, ("streams", "gap_all_open", "p99_ms"))
        disturbed = control is not None and control > p["stream_interval_ms"] + 2
        rows.append(
            f"| {r['round']} | {ratio(('wrk', 'rps'))} | {ratio(('wrk', 'cpu_us_per_request'))} | "
            f"{ratio(('oha', 'p99_ms'))} | {ratio(('streams', 'ttfe', 'p99_ms'))} | "
            f"{num(dig(op, ('streams', 'gap_all_open', 'p99_ms')))} | {num(control)}"
            f"{' (disturbed)' if disturbed else ''} | {num(dig(di, ('wrk', 'rps')), '{:,.0f}')} |"
        )
    if not rows or "openai-proxy" not in rounds[0]["results"]:
        return []
    return [
        "Per round, openai-proxy against nginx (direct is the control: it has no proxy, so when",
        "its gap p99 misses the schedule by more than 2 ms, something else was using the cores):",
        "",
        "| round | wrk req/s | CPU/req | oha p99 | TTFE p99 | openai-proxy gap p99 all open | direct gap p99 all open | direct wrk req/s |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def report(meta, rounds, p):
    targets = meta["columns"]
    med = medians(rounds, targets)
    life = lifecycle_medians(rounds)
    lines = []
    v = meta["versions"]
    lines.append(f"### Benchmark run {meta['started']}")
    lines.append("")
    lines.append(
        f"Machine: {v['cpu']}, {v['memory_gib']} GiB, {v['os']}, Linux {v['kernel']}. "
        f"Versions: {v['openai-proxy']}; {v['nginx']}; Caddy {v['caddy']}; {v['haproxy']}; "
        f"{v['wrk']}; {v['oha']}."
    )
    lines.append("")
    lines.append(
        f"Profile `{meta['profile']}`: {p['rounds']} rounds (target order reversed every other "
        f"round), medians over rounds; in brackets the median of the per-round ratios to nginx. "
        f"Access logs {'ON' if meta['access_log'] else 'off'} for every target. "
        f"wrk {p['wrk_secs']} s after {p['wrk_warmup']} s warm-up; oha {p['oha_secs']} s at "
        f"{p['rate']} req/s with latency correction; {p['streams']} streams started over "
        f"{p['stream_ramp_ms']} ms, {p['stream_events']} events {p['stream_interval_ms']} ms apart; "
        f"{p['idle_conns']} idle keep-alive connections. Run took {meta['minutes']:.1f} min."
    )
    lines.append("")
    for name, v in meta.get("variants", {}).items():
        settings = ", ".join(f"{k} = {val}" for k, val in v["settings"].items()) or "the same config"
        lines.append(f"Variant `{name}`: {v['binary']} with {settings}.")
        lines.append("")
    header = ["figure"] + targets
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for label, _path, fmt, _more in FIGURES:
        if label == "oha p50 ms @ rate":
            label_shown = f"oha p50 ms @ {p['rate']}/s"
        else:
            label_shown = label.replace("@ rate", f"@ {p['rate']}/s")
        row = [label_shown]
        for target in targets:
            entry = med[target][label]
            row.append(cell(entry["median"], entry["ratio_to_nginx"], fmt, target != "nginx"))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.extend(per_round(rounds, p))
    lines.append("openai-proxy's own figures:")
    lines.append("")
    lines.append("| figure | value |")
    lines.append("|---|---|")
    fmt = lambda x, f="{:.1f}": "–" if x is None else f.format(x)
    lines.append(f"| start to READY=1, shipped config (median / max) | {fmt(life['start_ms_median'])} / {fmt(life['start_ms_max'])} ms |")
    lines.append(f"| reload SIGHUP to READY=1, shipped config (median / p90 / max) | {fmt(life['reload_ms_median'])} / {fmt(life['reload_ms_p90'])} / {fmt(life['reload_ms_max'])} ms |")
    lines.append(f"| reload SIGHUP to READY=1 under {p['rate']} req/s (median) | {fmt(life['reload_under_load_ms_median'])} ms |")
    lines.append(f"| p99 at {p['rate']} req/s, steady / reloading every 100 ms | {fmt(life['steady_p99_ms'], '{:.3f}')} / {fmt(life['reloading_p99_ms'], '{:.3f}')} ms ({fmt(life['p99_ratio_reloading_to_steady'], '{:.2f}')}x) |")
    shape = life.get("upgrade_shape")
    if shape:
        lines.append(
            f"| new request's wait during an upgrade, {shape['streams']} streams of {shape['stream_ms'] / 1e3:.0f} s "
            f"in flight, upgraded {shape['after_ms'] / 1e3:.0f} s in: handover (SIGUSR2) median / max "
            f"| {fmt(life['upgrade_handover_ms_median'])} / {fmt(life['upgrade_handover_ms_max'])} ms |"
        )
        lines.append(
            f"| the same, restart (SIGTERM, exit, start on the kept socket, as systemd) median / min / max "
            f"| {fmt(life['upgrade_restart_ms_median'])} / {fmt(life['upgrade_restart_ms_min'])} / "
            f"{fmt(life['upgrade_restart_ms_max'])} ms |"
        )
        lines.append(
            f"| handover: the same request sent once MAINPID= has come (only the successor accepts) median / max "
            f"| {fmt(life['upgrade_handover_named_ms_median'])} / {fmt(life['upgrade_handover_named_ms_max'])} ms |"
        )
        lines.append(
            f"| handover: SIGUSR2 to the successor's READY=1 (median); samples; streams / requests failed "
            f"| {fmt(life['upgrade_handover_ready_ms_median'])} ms; {life['upgrade_samples']} each; "
            f"{life['upgrade_streams_failed']} / {life['upgrade_requests_failed']} |"
        )
    lines.append("")
    lines.append("Targets (issue 5):")
    lines.append("")
    lines.append("| target | wanted | met | evidence |")
    lines.append("|---|---|---|---|")
    for what, wanted, ok, evidence in verdicts(med, life, p, rounds):
        lines.append(f"| {what} | {wanted} | {ok} | {evidence} |")
    lines.append("")
    return "\n".join(lines), med, life


# --- Profile ------------------------------------------------------------------------------------


def profile(run, target, tool, requests, secs, stamp):
    """openai-proxy under load from 64 keep-alive connections, as in the wrk figure.

    callgrind: counts instructions, the same whatever else the machine does. The proxy runs
    under valgrind; 2,000 requests warm it up, the counters are zeroed, `requests` more are sent
    with oha (a fixed count), and the counts of those alone are dumped: instructions per request,
    and the functions they go to.
    perf: samples the CPU (cpu-clock: this VM has no hardware counters) for `secs` seconds of wrk.
    """
    name = target.name
    out_dir = run.work / f"profile-{name}"
    out_dir.mkdir()
    target.port = free_port()
    if tool == "callgrind" and isinstance(target, Nginx):
        target.single_process = True
    argv = target.configure(run.upstream_port)
    if tool == "callgrind":
        argv = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir}/callgrind.out",
            "--dump-instr=no", "--separate-threads=no", *argv,
        ]
    target.proc = run.procs.start(f"profile-{name}", argv, env=target.env())
    try:
        wait_serving(target.port, target.proc, name, timeout=120)
        load = [
            "oha", "--no-tui", "--output-format", "quiet", "-c", "64",
            "-m", "POST", "-T", "application/json",
            "-H", f"Authorization: Bearer {API_KEY}", "-d", REQUEST_BODY,
        ]
        if tool == "callgrind":
            run.procs.run(f"profile-{name}-warmup", load + ["-n", 2000, target.url()], timeout=600)
            run.procs.run(f"profile-{name}-zero", ["callgrind_control", "--zero", target.proc.pid], timeout=60)
            began = time.monotonic()
            run.procs.run(f"profile-{name}-load", load + ["-n", requests, target.url()], timeout=1200)
            seconds = time.monotonic() - began
            run.procs.run(f"profile-{name}-dump", ["callgrind_control", "--dump=measured", target.proc.pid], timeout=60)
            dumps = sorted(out_dir.glob("callgrind.out.*"))
            if not dumps:
                raise RuntimeError("callgrind wrote no dump")
            dump = dumps[-1]
            totals = re.search(r"^(?:summary|totals):\s+(\d+)", dump.read_text(), re.M)
            instructions = int(totals.group(1))
            annotate = subprocess.run(
                ["callgrind_annotate", "--threshold=100", "--inclusive=no", dump],
                capture_output=True, text=True, timeout=300,
            ).stdout
            inclusive = subprocess.run(
                ["callgrind_annotate", "--threshold=99", "--inclusive=yes", dump],
                capture_output=True, text=True, timeout=300,
            ).stdout
            text = (
                f"{name} under callgrind: {requests} requests from oha -c 64 after a "
                f"2,000-request warm-up; {instructions:,} instructions, {instructions / requests:,.0f} per "
                f"request ({seconds:.0f} s under valgrind).\n\n## Self (exclusive)\n\n"
                + top_lines(annotate, 40, exclusive=True)
                + "\n\n## Inclusive\n\n"
                + top_lines(inclusive, 60)
            )
            summary = {"instructions": instructions, "per_request": instructions / requests}
        else:
            script = run.work / "post.lua"
            script.write_text(wrk_script())
            wrk_argv = ["wrk", "-t2", "-c64", f"-d{secs + 4}s", "-s", script, target.url()]
            wrk_proc = run.procs.start(f"profile-{name}-wrk", wrk_argv)
            time.sleep(2)
            data = out_dir / "perf.data"
            run.procs.run(
                f"profile-{name}-perf",
                ["perf", "record", "-e", "cpu-clock", "-F", "1999", "-o", data,
                 "-p", ",".join(map(str, target.pids())), "--", "sleep", secs],
                timeout=secs + 60,
            )
            wrk_proc.wait(timeout=secs + 30)
            run.procs.live.pop(wrk_proc.pid, None)
            wrk_text = (run.work / f"profile-{name}-wrk.log").read_text()
            rps = re.search(r"Requests/sec:\s+([\d.]+)", wrk_text)
            report_args = ["perf", "report", "-i", data, "--stdio", "--no-children"]
            by_dso = subprocess.run(report_args + ["--sort", "dso"], capture_output=True, text=True, timeout=300).stdout
            by_sym = subprocess.run(report_args + ["--sort", "dso,sym"], capture_output=True, text=True, timeout=300).stdout
            text = (
                f"{name} under wrk -t2 -c64 for {secs} s, perf record -e cpu-clock; "
                f"wrk {rps.group(1) if rps else '?'} req/s while sampled.\n\n## By object\n\n"
                + top_lines(by_dso, 12)
                + "\n\n## By symbol\n\n"
                + top_lines(by_sym, 60)
            )
            summary = {"wrk_rps": float(rps.group(1)) if rps else None}
    finally:
        target.stop()
    path = Path(run.out) / f"profile-{stamp}-{tool}-{name}.txt"
    path.write_text(text + "\n")
    log(f"{name}: {summary}; wrote {path}")
    return summary


def top_lines(report_text, n, exclusive=False):
    lines = [l for l in report_text.splitlines() if l.strip() and not l.startswith("#")]
    # callgrind_annotate: skip its header, up to the table of functions.
    for i, l in enumerate(lines):
        if l.lstrip().startswith("Ir") and "file:function" in l:
            lines = lines[i:]
            break
    if exclusive:
        # After `callgrind_control --zero`, valgrind 3.19's callgrind_annotate charges the whole
        # of each thread to its entry frames as if it were their own: drop those rows.
        lines = [l for l in lines if not re.search(r"\((100\.0|99\.\d+)%\)", l)]
    return "\n".join(lines[: n + 2])


# --- Main ------------------------------------------------------------------------------------------


PHASES = ["memory", "throughput", "streams", "lifecycle"]


def measure_target(run, t, p, round_no, results, phases):
    name = t.name
    tag = f"{name}-r{round_no}"
    res = results.setdefault(name, {})
    if name != "direct" and "memory" in phases:
        # Memory first, on a fresh process: one request, then thousands of idle connections.
        t.start(run.upstream_port)
        try:
            time.sleep(0.5)
            rss, pss = memory_kib(t.pids())
            res["idle"] = {"rss_mib": rss / 1024, "pss_mib": pss / 1024, "processes": len(t.pids())}
            res["hold"] = hold(run, t, p, f"hold-{tag}")
        finally:
            t.stop()
    if "throughput" in phases:
        t.start(run.upstream_port)
        try:
            res["wrk"] = wrk(run, t, p, f"wrk-{tag}")
            res["oha"] = oha(run, t, p, f"oha-{tag}", p["oha_secs"])
        finally:
            t.stop()
    if "streams" in phases:
        t.start(run.upstream_port)
        try:
            res["streams"] = streams(run, t, p, f"streams-{tag}")
        finally:
            t.stop()
    brief = []
    if "wrk" in res:
        cpu = res["wrk"]["cpu_us_per_request"]
        brief.append(f"wrk {res['wrk']['rps']:,.0f}/s" + (f" ({cpu:.1f} µs CPU/req)" if cpu else ""))
        brief.append(f"oha p99 {res['oha']['p99_ms']:.2f} ms (errors {res['oha']['errors']})")
    if "streams" in res:
        st = res["streams"]
        brief.append(
            f"TTFE p99 {st['ttfe']['p99_ms']} ms, gap p99 {st['gap_all_open']['p99_ms']} ms all open "
            f"({st['all_open_window_ms']:.0f} ms), streams failed {st['failed']}"
        )
    if "hold" in res:
        brief.append(f"RSS idle {res['idle']['rss_mib']:.1f} MiB, per conn {res['hold']['rss_per_conn_kib']:.2f} KiB")
    log(f"  {name}: {', '.join(brief)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 short rounds (about 3 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds (at least 2 for a table)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS))
    parser.add_argument("--access-log", action="store_true", help="access logs on for every target (default: off for all)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=[BIN][,section.key=value...]",
        help="one more column: openai-proxy built elsewhere (BIN) and/or with other config values "
        "or environment, e.g. h2-upstream=,upstream.http2=true  or  one-worker=,env.TOKIO_WORKER_THREADS=1 "
        " or  patched=/tmp/x/target/release/openai-proxy",
    )
    parser.add_argument(
        "--profile",
        choices=["callgrind", "perf"],
        help="instead of the comparison: profile openai-proxy, each --variant and nginx under load",
    )
    parser.add_argument("--profile-requests", type=int, default=20000, help="callgrind: requests measured")
    parser.add_argument("--profile-secs", type=int, default=10, help="perf: seconds sampled")
    parser.add_argument("--proxy-bin", help="the openai-proxy binary to measure (default: target/release/openai-proxy)")
    parser.add_argument("--streams", type=int, help="concurrent streams")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help="comma-separated subset of " + ",".join(PHASES) + " (throughput is wrk and oha)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    parser.add_argument("--out", default=str(BENCH / "results"), help="where the table and JSON go")
    parser.add_argument("--no-build", action="store_true", help="(for run.sh) use the binaries as built")
    args = parser.parse_args()

    p = dict(PROFILES["quick" if args.quick else "full"])
    if args.rounds:
        p["rounds"] = args.rounds
    if args.streams:
        p["streams"] = args.streams
    phases = [ph for ph in args.phases.split(",") if ph]
    for ph in phases:
        if ph not in PHASES:
            parser.error(f"unknown phase {ph}")
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in CLASSES:
            parser.error(f"unknown target {t}")
    global PROXY_BIN
    if args.proxy_bin:
        PROXY_BIN = Path(args.proxy_bin).resolve()
    variants = {}
    for spec in args.variant:
        try:
            name, binary, settings = parse_variant(spec)
        except ValueError as e:
            parser.error(str(e))
        variants[name] = (binary, settings)
    targets += list(variants)

    def make(name, run):
        if name in variants:
            binary, settings = variants[name]
            return OpenaiProxy(run, name, binary, settings)
        return CLASSES[name](run)

    if "nginx" not in targets and not args.profile:
        parser.error("nginx is the reference every ratio is taken against: keep it in --targets")
    for binary in (PROXY_BIN, TOOL_BIN):
        if not binary.exists():
            parser.error(f"{binary} is missing: run bench/run.sh, which builds it")

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    started = datetime.datetime.now(datetime.timezone.utc)
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="openai-proxy-bench."))
    procs = Processes(work)
    ok = False
    try:
        # The binary under test, copied: a rebuild in the work tree during the run (someone
        # else's `cargo build`) must not change what the later rounds measure.
        frozen = work / "openai-proxy"
        shutil.copy2(PROXY_BIN, frozen)
        PROXY_BIN = frozen
        certs = work / "certs"
        procs.run("certs", [TOOL_BIN, "certs", certs], timeout=30)
        run = Run(work, procs, certs, args.access_log, args.out)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        run.upstream_port = free_port()
        run.upstream_pid = start_upstream(run, p).pid
        if args.profile:
            stamp = started.strftime("%Y%m%d-%H%M%S")
            # nginx too, when asked for (it is by default): the reference for the instruction count.
            names = ["openai-proxy"] + list(variants) + (["nginx"] if "nginx" in targets else [])
            for name in names:
                profile(run, make(name, run), args.profile, args.profile_requests, args.profile_secs, stamp)
            ok = True
            return 0
        meta = {
            "started": started.strftime("%Y-%m-%d %H:%M UTC"),
            "profile": "quick" if args.quick else "full",
            "access_log": args.access_log,
            "params": p,
            "targets": targets,
            "columns": [t for t in TARGETS if t in targets] + list(variants),
            "variants": {n: {"binary": str(b or PROXY_BIN), "settings": st} for n, (b, st) in variants.items()},
            "versions": versions(),
        }
        log(f"work directory {work}; {p['rounds']} rounds of {', '.join(targets)}")
        rounds = []
        for round_no in range(1, p["rounds"] + 1):
            order = targets if round_no % 2 == 1 else list(reversed(targets))
            log(f"round {round_no}: {' -> '.join(order)}")
            results = {}
            for name in order:
                measure_target(run, make(name, run), p, round_no, results, phases)
            entry = {"round": round_no, "order": order, "results": results}
            if "openai-proxy" in targets and "lifecycle" in phases:
                entry["lifecycle"] = lifecycle(run, p, round_no)
                life = entry["lifecycle"]
                log(
                    f"  openai-proxy lifecycle: start {statistics.median(life['start_ms']):.1f} ms, "
                    f"reload {statistics.median(life['reload_ms']):.1f} ms, p99 steady "
                    f"{life['steady']['p99_ms']:.3f} ms vs reloading {life['reloading']['p99_ms']:.3f} ms"
                )
                up = life["upgrade"]
                log(
                    f"  upgrade with streams in flight: new request waited {statistics.median(up['handover_ms']):.1f} ms "
                    f"(handover) vs {statistics.median(up['restart_ms']):.1f} ms (restart); streams failed "
                    f"{up['streams_failed']}, requests failed {up['requests_failed']}"
                )
            rounds.append(entry)
        meta["minutes"] = (time.monotonic() - began) / 60
        table, med, life = report(meta, rounds, p)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stamp = started.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
        (out / f"{stamp}.md").write_text(table)
        (out / f"{stamp}.json").write_text(
            json.dumps({"meta": meta, "rounds": rounds, "medians": med, "openai_proxy": life}, indent=1) + "\n"
        )
        print(table)
        log(f"wrote {out / (stamp + '.md')} and .json")
        ok = True
    except Stop as e:
        log(f"stopped by {e}")
    except Exception as e:
        log(f"FAILED: {e}; logs in {work}")
        args.keep = True
        raise
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif ok:
            log(f"kept {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
