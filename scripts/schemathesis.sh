#!/usr/bin/env bash
# Property-based API testing of the gateway with schemathesis, driven by the gateway's own
# `GET /openapi.json`: a throwaway redis-server, mock-llm, producer and gateway on free loopback
# ports, then `schemathesis run` with the checks below. Every process this script starts is
# stopped on exit, by its PID. Takes about a minute.
#
# Env: CARGO_TARGET_DIR (binaries in $CARGO_TARGET_DIR/debug, built by `make build`),
# SCHEMATHESIS_MAX_EXAMPLES (cases per operation and phase), SCHEMATHESIS_SEED (reproduce a run),
# SCHEMATHESIS_KEEP=1 (keep the temp dir with configs, logs and the report).
# `--install-only`: only install the pinned schemathesis into its venv, then stop.
set -euo pipefail

install_only=false
case "${1:-}" in
    --install-only) install_only=true ;;
    "") ;;
    *)
        echo "schemathesis.sh: unknown argument: $1 (usage: scripts/schemathesis.sh [--install-only])" >&2
        exit 2
        ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${CARGO_TARGET_DIR:=$HOME/.cache/llm-bridge/target}"
# Pinned: a new schemathesis brings new checks and generation strategies; upgrade on purpose.
SCHEMATHESIS_VERSION=4.32.5
VENV="$HOME/.cache/llm-bridge/venv-schemathesis"
MAX_EXAMPLES=${SCHEMATHESIS_MAX_EXAMPLES:-200}
BIN="$CARGO_TARGET_DIR/debug"

command -v python3 >/dev/null || { echo "schemathesis.sh: python3 not found" >&2; exit 1; }

# CPython before 3.11.8 / 3.12.2 raises "AST constructor recursion depth mismatch" inside
# Hypothesis while schemathesis builds its coverage cases (gh-106905): prefer a fixed Python.
python_ok='import sys; v = sys.version_info[:3]; sys.exit(0 if v >= (3, 12, 2) or (3, 11, 8) <= v < (3, 12) else 1)'
pick_python() {
    local candidate
    for candidate in python3.13 python3.12 "$HOME"/.pyenv/versions/3.1[2-9].*/bin/python3 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$python_ok" 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo python3
}

if [[ "$("$VENV/bin/schemathesis" --version 2>/dev/null)" != *" $SCHEMATHESIS_VERSION" ]] ||
    { ! "$VENV/bin/python" -c "$python_ok" 2>/dev/null && [[ "$(pick_python)" != python3 ]]; }; then
    python=$(pick_python)
    echo "installing schemathesis $SCHEMATHESIS_VERSION into $VENV (with $python)"
    rm -rf "$VENV"
    "$python" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
if $install_only; then
    exit 0
fi
for binary in redis-server curl sha256sum; do
    command -v "$binary" >/dev/null || { echo "schemathesis.sh: $binary not found" >&2; exit 1; }
done
for service in gateway producer mock-llm; do
    [[ -x "$BIN/$service" ]] || { echo "schemathesis.sh: $BIN/$service missing; run make build" >&2; exit 1; }
done
phases=examples,coverage,fuzzing,stateful
if ! "$VENV/bin/python" -c "$python_ok"; then
    echo "schemathesis.sh: no Python >= 3.11.8 found; skipping the coverage phase (gh-106905)" >&2
    phases=examples,fuzzing,stateful
fi

work=$(mktemp -d -t llm-bridge-schemathesis.XXXXXX)
pids=()
cleanup() {
    local rc=$?
    # Only our own children, by PID; then wait so none outlives the script.
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    if ((rc != 0)) || [[ "${SCHEMATHESIS_KEEP:-}" == 1 ]]; then
        echo "schemathesis.sh: logs, config and report kept in $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# A port the kernel just handed out (never 6379: that one is outside the ephemeral range).
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_ok URL NAME: until URL answers 2xx, for at most 30 s.
wait_ok() {
    local deadline=$((SECONDS + 30))
    until curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "schemathesis.sh: $2 not ready at $1; its log:" >&2
            tail -n 30 "$work/$2.log" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
}

redis_port=$(free_port)
mock_port=$(free_port)
gateway_port=$(free_port)
producer_port=$(free_port)
api_key="sk-schemathesis-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
key_hash=$(printf '%s' "$api_key" | sha256sum | cut -d' ' -f1)

cat >"$work/bridge.toml" <<EOF
[redis]
url = "redis://127.0.0.1:$redis_port"

[models.mock]
base_url = "http://127.0.0.1:$mock_port/v1"
upstream_model = "mock"

[models."gpt-4"]
base_url = "http://127.0.0.1:$mock_port/v1"
upstream_model = "mock-gpt-4"

[auth]
stream_token_secret = "schemathesis-secret"
api_keys = [{ id = "schemathesis", sha256 = "$key_hash" }]

[telemetry]
log_level = "warn"

[mock_llm]
addr = "127.0.0.1:$mock_port"
token_delay_ms = 1
default_tokens = 5

[gateway]
addr = "127.0.0.1:$gateway_port"

[producer]
addr = "127.0.0.1:$producer_port"
claim_block_ms = 500
EOF

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
    --dir "$work" --logfile "$work/redis.log" </dev/null >/dev/null 2>&1 &
pids+=($!)
for service in mock-llm producer gateway; do
    "$BIN/$service" --config "$work/bridge.toml" </dev/null >"$work/$service.log" 2>&1 &
    pids+=($!)
done
wait_ok "http://127.0.0.1:$mock_port/healthz" mock-llm
# Alive is enough: the producer only runs the chats that start (no check depends on them).
wait_ok "http://127.0.0.1:$producer_port/healthz" producer
wait_ok "http://127.0.0.1:$gateway_port/readyz" gateway

seed=()
[[ -n "${SCHEMATHESIS_SEED:-}" ]] && seed=(--seed "$SCHEMATHESIS_SEED")

# Checks: no 5xx; statuses, content types, headers and bodies as documented; schema-invalid
# input refused; auth not ignored; other methods 405 with Allow. Not `positive_data_acceptance`:
# JSON Schema cannot say "prompt or messages, and not only whitespace", so some schema-valid
# bodies are rightly 400. The stateful phase follows the document's links from a started chat
# (cancel, session token, connections). The SSE endpoint is tested too: generated tokens never
# verify, so it answers 4xx at once; `--request-timeout` turns any stream that stayed open
# (one without `requestId` never ends) into an error instead of a stuck build.
# From the temp dir: schemathesis keeps a `.schemathesis/` cache in the working directory.
cd "$work"
"$VENV/bin/schemathesis" run "http://127.0.0.1:$gateway_port/openapi.json" \
    --header "Authorization: Bearer $api_key" \
    --checks "${SCHEMATHESIS_CHECKS:-not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,ignored_auth,missing_required_header,unsupported_method,allow_header_conformance}" \
    --phases "$phases" \
    --max-examples "$MAX_EXAMPLES" \
    --request-timeout 10 \
    --workers 2 \
    --suppress-health-check too_slow \
    --report junit --report-dir "$work/report" \
    "${seed[@]}"
