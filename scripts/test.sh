#!/usr/bin/env bash
# `make test` (and CI through .ci/run): every check and test suite, in order, failing fast,
# with the elapsed time of each step.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${CARGO_TARGET_DIR:=$HOME/.cache/llm-bridge/target}"
export CARGO_TARGET_DIR

started=$SECONDS

# step NAME COMMAND...: runs one step, prints its time, stops everything if it fails.
step() {
    local name=$1 t0=$SECONDS rc=0
    shift
    printf '\n==> %s: %s\n' "$name" "$*"
    "$@" || rc=$?
    if ((rc != 0)); then
        printf '\n==> FAILED: %s (exit %d after %ds): %s\n' "$name" "$rc" "$((SECONDS - t0))" "$*" >&2
        exit "$rc"
    fi
    printf '==> ok: %s (%ds)\n' "$name" "$((SECONDS - t0))"
}

step "redis" scripts/ensure-redis.sh

# The SDK clients, schemathesis and Chromium are installed beside the checks and the build
# (scripts/test-tools.sh); the "test tools" step waits for them and shows what they printed.
tools_log=$(mktemp -t llm-bridge-test-tools.XXXXXX)
scripts/test-tools.sh >"$tools_log" 2>&1 &
tools_pid=$!
# Never left running, nor cut off mid-install (an interrupted dpkg leaves the machine's
# packages half configured): an early failure waits for it.
finish_tools() {
    if kill -0 "$tools_pid" 2>/dev/null; then
        printf '\n==> waiting for the test tools being installed (scripts/test-tools.sh)\n' >&2
        wait "$tools_pid" || true
    fi
    rm -f "$tools_log"
}
trap finish_tools EXIT
tools_ready() {
    local rc=0
    wait "$tools_pid" || rc=$?
    cat "$tools_log"
    return "$rc"
}

step "format" cargo fmt --all -- --check
step "clippy" cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests spawn the real binaries, so they must be built first.
step "build" cargo build --workspace --bins
# The published SDKs (Python venv, npm dir) the e2e tests `openai_sdk::` and `aisdk::` drive,
# schemathesis and Chromium.
step "test tools" tools_ready

if cargo nextest --version >/dev/null 2>&1; then
    step "tests" cargo nextest run --workspace
else
    step "tests" cargo test --workspace
fi

# Checks beyond the Rust tests, each as one `step` line.
step "deploy manifests" scripts/validate-deploy.sh
step "schemathesis" scripts/schemathesis.sh
step "browser" scripts/browser-test.sh

printf '\n==> all steps passed (%ds, CARGO_TARGET_DIR=%s)\n' "$((SECONDS - started))" "$CARGO_TARGET_DIR"
