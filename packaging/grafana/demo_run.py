#!/usr/bin/env python3
"""A real run for the dashboard picture: openai-proxy in front of a small fake OpenAI API (TLS,
a CA made for the run), a Prometheus scraping its admin listener every second, and traffic
with something to see: completions, streams, refused paths, a good reload, a broken one, and
the upstream down for a while. Then render.py draws the dashboard's panels from that
Prometheus.

    python3 packaging/grafana/demo_run.py --proxy target/release/openai-proxy --out dashboard.png

Needs openssl, prometheus (Debian's package) and matplotlib. Everything listens on 127.0.0.1.
"""

import argparse
import http.client
import http.server
import json
import pathlib
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time

HERE = pathlib.Path(__file__).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_pki(dir):
    """A CA and a certificate it signed for api.openai.com."""
    run = lambda *a: subprocess.run(a, cwd=dir, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=demo CA")
    run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=api.openai.com")
    (dir / "ext").write_text("subjectAltName=DNS:api.openai.com\n")
    run("openssl", "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "ext")


class Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Every connection open, so that taking the upstream down closes the kept-alive ones too.
    open = set()

    def setup(self):
        super().setup()
        Upstream.open.add(self.connection)

    def finish(self):
        super().finish()
        Upstream.open.discard(self.connection)

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer(200, {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        if not request.get("stream"):
            time.sleep(random.uniform(0.02, 0.3))
            self.answer(200, {"id": "chatcmpl-demo", "object": "chat.completion",
                              "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi."}}]})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        time.sleep(random.uniform(0.2, 0.6))
        for i in range(random.randint(20, 60)):
            chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": f"tok{i} "}}]}
            self.chunk(f"data: {json.dumps(chunk)}\n\n".encode())
            time.sleep(0.1)
        self.chunk(b"data: [DONE]\n\n")
        self.chunk(b"")

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def serve_upstream(port, dir):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Upstream)
    server.daemon_threads = True
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(dir / "leaf.pem", dir / "leaf.key")
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def take_down(server):
    server.shutdown()
    server.server_close()
    for connection in list(Upstream.open):
        try:
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def client_loop(proxy_port, stop, kind):
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    if kind == "stream":
        body["stream"] = True
    while not stop.is_set():
        try:
            conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=30)
            if kind == "refused":
                conn.request("GET", "/admin/secret")
            else:
                conn.request("POST", "/v1/chat/completions", json.dumps(body),
                             {"content-type": "application/json", "authorization": "Bearer sk-demo"})
            conn.getresponse().read()
            conn.close()
        except (OSError, http.client.HTTPException):
            # A stream the upstream's fall cut short: part of what the run shows.
            pass
        time.sleep({"refused": 2.0, "stream": 0.2}.get(kind, 0.05))


def config(proxy_port, admin_port, upstream_port, dir, broken=False):
    text = (f'listen = ["127.0.0.1:{proxy_port}"]\n[admin]\nlisten = ["127.0.0.1:{admin_port}"]\n'
            f'[upstream]\nurl = "https://127.0.0.1:{upstream_port}"\nhost = "api.openai.com"\n'
            f'ca_file = "{dir}/ca.pem"\n[reload]\nwatch_files = false\n[log]\naccess_log = false\n')
    return text + ("[server]\ndrain_timeout = \"forever\"\n" if broken else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", default="target/release/openai-proxy")
    parser.add_argument("--seconds", type=int, default=180)
    parser.add_argument("--out", default="dashboard.png")
    args = parser.parse_args()

    dir = pathlib.Path(tempfile.mkdtemp(prefix="openai-proxy-demo-"))
    make_pki(dir)
    proxy_port, admin_port, upstream_port, prom_port = (free_port() for _ in range(4))
    upstream = serve_upstream(upstream_port, dir)
    config_path = dir / "config.toml"
    config_path.write_text(config(proxy_port, admin_port, upstream_port, dir))
    proxy = subprocess.Popen([args.proxy, "--config", str(config_path)], stderr=open(dir / "proxy.log", "w"))
    (dir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: openai-proxy\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{admin_port}']\n")
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={dir}/prometheus.yml", f"--storage.tsdb.path={dir}/data",
         f"--web.listen-address=127.0.0.1:{prom_port}"], stderr=open(dir / "prometheus.log", "w"))
    time.sleep(2)
    start = time.time()
    stop = threading.Event()
    kinds = ["chat"] * 6 + ["stream"] * 6 + ["refused"]
    for kind in kinds:
        threading.Thread(target=client_loop, args=(proxy_port, stop, kind), daemon=True).start()
    total = args.seconds
    # The script of the run, at fractions of its length: a good reload, a broken one and its fix,
    # and the upstream down for a while (502s and connect failures).
    events = [
        (0.30, "reload", lambda: proxy.send_signal(signal.SIGHUP)),
        (0.45, "broken reload", lambda: (config_path.write_text(config(proxy_port, admin_port, upstream_port, dir, True)),
                                         proxy.send_signal(signal.SIGHUP))),
        (0.50, "fixed reload", lambda: (config_path.write_text(config(proxy_port, admin_port, upstream_port, dir)),
                                        proxy.send_signal(signal.SIGHUP))),
        (0.65, "upstream down", lambda: take_down(upstream)),
    ]
    for at, what, action in events:
        time.sleep(max(0, start + at * total - time.time()))
        print(f"{time.time() - start:6.1f}s {what}", file=sys.stderr)
        action()
    time.sleep(max(0, start + 0.8 * total - time.time()))
    print(f"{time.time() - start:6.1f}s upstream back", file=sys.stderr)
    upstream = serve_upstream(upstream_port, dir)
    time.sleep(max(0, start + total - time.time()))
    stop.set()
    end = time.time()
    time.sleep(2)
    subprocess.run([sys.executable, str(HERE / "render.py"), "--prometheus", f"http://127.0.0.1:{prom_port}",
                    "--start", str(int(start)), "--end", str(int(end)), "--out", args.out], check=True)
    for process in (proxy, prometheus):
        process.terminate()
        process.wait(timeout=40)
    print(f"logs and data in {dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
