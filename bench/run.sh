#!/usr/bin/env bash
# openai-proxy's benchmark against nginx, Caddy and HAProxy: builds what it runs, then runs it.
#   bench/run.sh            the full run (3 rounds, about 12 minutes on 2 cores)
#   bench/run.sh --quick    2 short rounds, about 3 minutes: a smoke test of the whole thing
# Other options: bench/run.sh --help. Results land in bench/results/; see bench/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")

missing=()
for tool in nginx caddy haproxy wrk oha python3 cargo; do
    command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool ]] || missing+=("$tool")
done
if ((${#missing[@]})); then
    echo "bench/run.sh: missing ${missing[*]}; install with:" >&2
    echo "  apt-get install -y nginx-light caddy haproxy wrk && cargo install oha --locked" >&2
    exit 2
fi

if [[ " $* " != *" --no-build "* && " $* " != *" --help "* && " $* " != *" -h "* ]]; then
    echo "building openai-proxy (release) and the bench tools..." >&2
    cargo build --release --quiet --manifest-path "$repo/Cargo.toml"
    cargo build --release --quiet --manifest-path "$here/tools/Cargo.toml" \
        --target-dir "$here/tools/target"
fi

# The Python driver starts every server and load generator in a process group of its own and
# stops each of them on exit, however it exits; exec so that a signal sent to this script
# reaches it.
PATH="$PATH:/usr/sbin:$HOME/.cargo/bin" exec python3 "$here/bench.py" "$@"
