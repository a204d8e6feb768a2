#!/usr/bin/env bash
# Makes sure redis-server and redis-cli are on PATH (make run, make test and the e2e tests need
# them), installing the Debian package redis-server when they are missing.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

fail() {
    echo "ensure-redis: $*" >&2
    echo "ensure-redis: install Redis yourself (Debian/Ubuntu: apt-get install -y redis-server;" \
        "macOS: brew install redis) so that redis-server and redis-cli are on PATH." >&2
    exit 1
}

if have redis-server && have redis-cli; then
    exit 0
fi

echo "ensure-redis: redis-server/redis-cli not found; installing the Debian package redis-server" >&2

have apt-get || fail "apt-get is not available, so I cannot install redis-server."

sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
    have sudo || fail "not running as root and sudo is not available."
    sudo_cmd=(sudo)
fi

apt_get() {
    ${sudo_cmd[@]+"${sudo_cmd[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get "$@"
}

# Fresh containers often have no package lists yet: refresh them only if the install fails.
if ! apt_get install -y redis-server; then
    apt_get update || fail "apt-get update failed."
    apt_get install -y redis-server || fail "apt-get install -y redis-server failed."
fi

if ! have redis-server || ! have redis-cli; then
    fail "redis-server was installed but redis-server/redis-cli are still not on PATH."
fi
echo "ensure-redis: installed $(redis-server --version | head -n 1)" >&2
