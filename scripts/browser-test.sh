#!/usr/bin/env bash
# The demo pages in a real browser: headless Chromium, driven through ChromeDriver by the e2e
# tests `browser::` (tests/tests/e2e/browser.rs) against a whole stack each starts itself.
#
# Installs Debian's chromium and chromium-driver when they are missing (as root, or via sudo),
# builds the service binaries and the useChat app (scripts/sdk-clients.sh) if needed, then
# runs the tests, which are #[ignore]d in the plain test run because they need the browser. A screenshot lands in tests/artifacts/demo-page.png.
#
# Usage: scripts/browser-test.sh [--update-screenshot | --install-only]
#   --update-screenshot   also copy the screenshot to docs/demo-page.png (the README's picture)
#   --install-only        only install (and check) Chromium and ChromeDriver, then stop
# Environment:
#   CHROMIUM, CHROMEDRIVER   use these binaries instead of chromium/chromedriver on PATH
#   CARGO_TARGET_DIR         where the binaries are built (the Makefile sets it)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${CARGO_TARGET_DIR:=$HOME/.cache/llm-bridge/target}"
export CARGO_TARGET_DIR

say() { printf 'browser-test: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

fail() {
    say "$*"
    say "install Chromium and its ChromeDriver yourself (Debian/Ubuntu: apt-get install -y" \
        "--no-install-recommends chromium chromium-driver), or point CHROMIUM and" \
        "CHROMEDRIVER at a matching pair."
    exit 1
}

install_only=false
case "${1:-}" in
    --update-screenshot) export BRIDGE_UPDATE_DEMO_SCREENSHOT=1 ;;
    --install-only) install_only=true ;;
    "") ;;
    *)
        say "unknown argument: $1 (usage: scripts/browser-test.sh [--update-screenshot | --install-only])"
        exit 2
        ;;
esac

chromium_bin=${CHROMIUM:-}
driver_bin=${CHROMEDRIVER:-}
find_browser() {
    if [ -z "${CHROMIUM:-}" ]; then
        chromium_bin=""
        for name in chromium chromium-browser google-chrome; do
            if have "$name"; then
                chromium_bin=$(command -v "$name")
                break
            fi
        done
    fi
    if [ -z "${CHROMEDRIVER:-}" ]; then
        driver_bin=$(command -v chromedriver 2>/dev/null || true)
    fi
    [ -n "$chromium_bin" ] && [ -x "$chromium_bin" ] && [ -n "$driver_bin" ] && [ -x "$driver_bin" ]
}

if ! find_browser; then
    if [ -n "${CHROMIUM:-}${CHROMEDRIVER:-}" ]; then
        fail "CHROMIUM=${CHROMIUM:-} or CHROMEDRIVER=${CHROMEDRIVER:-} is not an executable."
    fi
    say "Chromium or ChromeDriver not found; installing the Debian packages chromium and chromium-driver"
    have apt-get || fail "apt-get is not available, so I cannot install them."
    sudo_cmd=()
    if [ "$(id -u)" -ne 0 ]; then
        have sudo || fail "not running as root and sudo is not available."
        sudo_cmd=(sudo)
    fi
    apt_get() {
        ${sudo_cmd[@]+"${sudo_cmd[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get "$@"
    }
    # Without the recommended packages (a desktop's: systemd, CUPS, Samba, Perl, PulseAudio,
    # about 130 in all on Debian 12): headless Chromium needs none of them, and they were most
    # of the install's time on a new machine.
    packages=(--no-install-recommends chromium chromium-driver)
    # Fresh containers often have no package lists yet: refresh them only if the install fails.
    if ! apt_get install -y "${packages[@]}"; then
        apt_get update || fail "apt-get update failed."
        apt_get install -y "${packages[@]}" ||
            fail "apt-get install -y ${packages[*]} failed."
    fi
    find_browser || fail "chromium and chromium-driver were installed but are still not on PATH."
fi

# A driver for another browser version refuses to start a session; say so up front.
browser_version=$("$chromium_bin" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9.]+' | head -n1 || true)
driver_version=$("$driver_bin" --version 2>/dev/null | grep -oE '[0-9]+\.[0-9.]+' | head -n1 || true)
say "browser $chromium_bin ($browser_version), driver $driver_bin ($driver_version)"
if [ -z "$browser_version" ] || [ "${browser_version%%.*}" != "${driver_version%%.*}" ]; then
    fail "Chromium $browser_version and ChromeDriver $driver_version are different major versions."
fi
export CHROMIUM=$chromium_bin CHROMEDRIVER=$driver_bin
if $install_only; then
    exit 0
fi

scripts/ensure-redis.sh
# The useChat app the test `browser::the_usechat_app_...` serves (installed and bundled once).
scripts/sdk-clients.sh >/dev/null
# The test starts the real binaries; `make test` has built them already, so this is quick.
cargo build --workspace --bins

# `--workspace` with a filter, not `-p e2e`: the same feature set as `make test`'s test step, so
# its build is reused (`-p e2e` alone unifies features differently and rebuilds dependencies).
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --run-ignored only --no-fail-fast \
        -E 'package(e2e) and test(/^browser::/)'
else
    cargo test --workspace --test e2e -- --ignored browser::
fi
say "screenshot: tests/artifacts/demo-page.png"
