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
step "format" cargo fmt --all -- --check
step "clippy" cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests spawn the real binaries, so they must be built first.
step "build" cargo build --workspace --bins
# The published OpenAI SDKs (Python venv, npm dir) the e2e test `openai_sdk::` drives.
step "sdk clients" scripts/sdk-clients.sh

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
