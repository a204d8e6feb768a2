#!/usr/bin/env bash
# Benchmarks (issue 10): `make bench`, `make bench-quick`, `make bench-peers`.
#
# Builds the release binaries, makes sure redis-server and redis-benchmark are installed, raises
# the open-files limit (10,000 idle SSE clients need as many descriptors in the gateway and in
# the load generator), for --peers installs LiteLLM into a venv, then runs the `bench` binary,
# which starts its own Redis and services on free ports and writes the report:
#   (none)   full matrix, 3 repeats        → bench/results/bench.md (+ .json, -latency.svg, -throughput.svg)
#   --quick  small matrix, 1 repeat        → bench/results/quick/quick.md (not committed)
#   --peers  full matrix + LiteLLM proxy   → bench/results/peers.md
#   --capacity  the figures docs/capacity.md plans with → bench/results/capacity.md
#   --soak   memory soak (`make bench-memory`; 200 streams, 30 min) → bench/results/soak.md
#            (+ .json, .svg); exits non-zero when a service or Redis grows past the margin
# Extra arguments go to the binary (e.g. --repeats 1, --out FILE.md). The committed report's
# hand-written analysis (bench/results/notes.md) belongs to that run only; it is added with
#   bench --render bench/results/peers.json --idle-from bench/results/idle.json \
#         --notes bench/results/notes.md
#
# Environment: CARGO_TARGET_DIR (the Makefile sets it); BRIDGE__* variables reach the services
# (tuning experiments) and are listed in the report.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/llm-bridge/target}"
export CARGO_TARGET_DIR
LITELLM_VENV="$HOME/.cache/llm-bridge/venv-litellm"

say() { printf 'bench: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

args=()
peers=0
case "${1:-}" in
    --quick) args+=(--quick); shift ;;
    --peers) args+=(--peers); peers=1; shift ;;
    --soak) args+=(--soak); shift ;;
    --capacity) args+=(--capacity); shift ;;
esac
args+=("$@")

scripts/ensure-redis.sh
if ! have redis-benchmark; then
    say "redis-benchmark not found; installing redis-tools"
    if [ "$(id -u)" -eq 0 ]; then sudo_cmd=(); else sudo_cmd=(sudo); fi
    ${sudo_cmd[@]+"${sudo_cmd[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y redis-tools \
        || say "could not install redis-tools: the report will have no XADD reference"
fi

# As many descriptors as allowed, up to what 10,000 clients plus the services need.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -ge 30000 ]; then ulimit -n 30000; else ulimit -n "$hard"; fi
if [ "$(ulimit -n)" -lt 20000 ]; then
    say "open-files limit is $(ulimit -n); the 10,000-idle-client step may fail (needs ~20,000)"
fi

if [ "$peers" = 1 ] && [ ! -x "$LITELLM_VENV/bin/litellm" ]; then
    say "installing litellm[proxy] into $LITELLM_VENV (once)"
    if ! { python3 -m venv "$LITELLM_VENV" \
        && "$LITELLM_VENV/bin/pip" install --quiet --upgrade pip \
        && "$LITELLM_VENV/bin/pip" install --quiet 'litellm[proxy]'; }; then
        say "LiteLLM could not be installed; the report will say so and show the bridge alone"
    fi
fi

say "building release binaries"
cargo build --release --workspace --bins
exec "$CARGO_TARGET_DIR/release/bench" "${args[@]}"
