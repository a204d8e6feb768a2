#!/usr/bin/env bash
# `make run`: builds and starts the whole local system (Redis when needed, mock-llm, processor,
# producer, gateway) in the background, waits until each is ready, prints how to try it, and
# on Ctrl-C stops exactly the processes it started.
#
# Environment:
#   BRIDGE_REDIS_URL=redis://...  use this Redis (BRIDGE__REDIS__URL is honoured the same way)
#   BRIDGE_OWN_REDIS=1            always start a private redis-server, even if 6379 answers
#   CARGO_TARGET_DIR              where the binaries are built (the Makefile sets it)

# shellcheck disable=SC2329 # cleanup() and its helpers run from traps, which shellcheck cannot see
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${CARGO_TARGET_DIR:=$HOME/.cache/llm-bridge/target}"
export CARGO_TARGET_DIR
BIN_DIR="$CARGO_TARGET_DIR/debug"
RUN_DIR="$PWD/.run"
LOG_DIR="$RUN_DIR/logs"
CONFIG="$RUN_DIR/config.toml"
READY_DEADLINE_SECS=60
# Above producer.shutdown_grace_secs (20 s): in-flight streams may finish before we escalate.
STOP_DEADLINE_SECS=30

say() { printf 'run: %s\n' "$*" >&2; }
have() { command -v "$1" >/dev/null 2>&1; }

# What this script started, so the trap stops exactly these and nothing else.
names=()
pids=()
redis_pid=""
stopping=0

# Sends SIGTERM to one PID and waits for it (SIGKILL after the deadline).
stop_pid() {
    local name=$1 pid=$2 deadline=$((SECONDS + $3))
    kill -TERM "$pid" 2>/dev/null || return 0
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        say "$name (pid $pid) did not stop within $3 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Stops services in reverse start order (gateway first, mock-llm last), then our Redis, so a
# stopping producer can still finish its streams against mock-llm and Redis.
cleanup() {
    ((stopping)) && return 0
    stopping=1
    # A second Ctrl-C must not abandon the children half-stopped; every wait below is bounded.
    trap '' INT TERM HUP
    local i
    if ((${#pids[@]} > 0)) || [ -n "$redis_pid" ]; then
        say "stopping..."
    fi
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        stop_pid "${names[i]}" "${pids[i]}" "$STOP_DEADLINE_SECS"
    done
    if [ -n "$redis_pid" ]; then
        stop_pid redis-server "$redis_pid" 10
    fi
    if ((${#pids[@]} > 0)) || [ -n "$redis_pid" ]; then
        say "stopped (logs kept in ${LOG_DIR#"$PWD"/})"
    fi
}
on_exit() {
    local rc=$?
    cleanup
    exit "$rc"
}
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM
trap 'cleanup; exit 129' HUP
trap on_exit EXIT

# Starts a command in the background in its own session, so a terminal Ctrl-C reaches only
# this script and the trap stops the children in order. The child is not a process-group
# leader, so setsid execs in place and $! is the program's own PID.
spawn() {
    local log=$1
    shift
    if have setsid; then
        setsid "$@" >"$log" 2>&1 </dev/null &
    else
        "$@" >"$log" 2>&1 </dev/null &
    fi
}

# Prints one port per argument: the wanted port if it is free on 127.0.0.1, else (or for 0) a
# free ephemeral one; all distinct.
pick_ports() {
    if have python3; then
        python3 - "$@" <<'PY'
import socket, sys
held, out = [], []
for want in map(int, sys.argv[1:]):
    s = socket.socket()
    try:
        if want == 0:
            raise OSError
        # Like the services' listeners: a port in TIME_WAIT counts as free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", want))
    except OSError:
        s.close()
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
    held.append(s)  # held open until all are chosen, so the choices are distinct
    out.append(str(s.getsockname()[1]))
print(" ".join(out))
PY
    else
        # Without python3: a port is taken when something accepts a connection on it.
        local want port chosen=()
        for want in "$@"; do
            port=$want
            while ((port == 0)) || (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null ||
                [[ " ${chosen[*]-} " == *" $port "* ]]; do
                port=$((20000 + RANDOM % 10000))
            done
            chosen+=("$port")
        done
        echo "${chosen[*]}"
    fi
}

# Fails the run: names the service, shows the end of its log.
fail_service() {
    local name=$1 why=$2 log="$LOG_DIR/$1.log"
    say "$name $why"
    if [ -s "$log" ]; then
        say "last lines of ${log#"$PWD"/}:"
        tail -n 30 "$log" | sed 's/^/    /' >&2
    fi
    exit 1
}

# Polls a URL until it answers 2xx; fails early if the process died.
wait_ready() {
    local name=$1 pid=$2 url=$3 deadline=$((SECONDS + READY_DEADLINE_SECS))
    until curl -fs -o /dev/null --max-time 2 "$url"; do
        kill -0 "$pid" 2>/dev/null || fail_service "$name" "exited during start"
        ((SECONDS < deadline)) || fail_service "$name" "not ready after ${READY_DEADLINE_SECS} s ($url)"
        sleep 0.25
    done
    say "$name ready ($url)"
}

# The URL without its password, for printing.
redact() { sed -E 's#(://)[^@/]*@#\1***@#' <<<"$1"; }

random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

sha256_hex() {
    if have sha256sum; then
        printf '%s' "$1" | sha256sum | cut -d' ' -f1
    else
        printf '%s' "$1" | shasum -a 256 | cut -d' ' -f1
    fi
}

toml_str() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

# --- Prerequisites and build ----------------------------------------------------------------

have curl || { say "curl is required"; exit 1; }
scripts/ensure-redis.sh
mkdir -p "$LOG_DIR" "$RUN_DIR/redis"
if [ ! -f .gitignore ] || ! grep -qxF '/.run' .gitignore; then
    printf '/.run\n' >>.gitignore
fi

say "building (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --workspace --bins

overrides=$(compgen -e | grep '^BRIDGE__' | grep -v '^BRIDGE__REDIS__URL$' || true)
if [ -n "$overrides" ]; then
    say "note: these variables override .run/config.toml in every service: $(echo "$overrides" | tr '\n' ' ')"
fi

# --- Redis ----------------------------------------------------------------------------------

read -r gateway_port producer_port processor_port mock_port redis_port \
    < <(pick_ports 8080 8081 8082 8090 0) || { say "cannot pick free ports"; exit 1; }

redis_url=${BRIDGE_REDIS_URL:-${BRIDGE__REDIS__URL:-}}
if [ -n "$redis_url" ]; then
    redis_note="from BRIDGE_REDIS_URL / BRIDGE__REDIS__URL"
elif [ "${BRIDGE_OWN_REDIS:-0}" != 1 ] &&
    [ "$(timeout 3 redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null || true)" = PONG ]; then
    redis_url="redis://127.0.0.1:6379"
    redis_note="already running on 127.0.0.1:6379; set BRIDGE_OWN_REDIS=1 for a private one"
    say "using the Redis that answers PING on 127.0.0.1:6379 (BRIDGE_OWN_REDIS=1 starts a private one)"
else
    spawn "$LOG_DIR/redis.log" redis-server --port "$redis_port" --bind 127.0.0.1 \
        --save "" --appendonly no --dir "$RUN_DIR/redis"
    redis_pid=$!
    deadline=$((SECONDS + 10))
    until [ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null || true)" = PONG ]; do
        kill -0 "$redis_pid" 2>/dev/null || fail_service redis "exited during start"
        ((SECONDS < deadline)) || fail_service redis "did not answer PING within 10 s"
        sleep 0.1
    done
    redis_url="redis://127.0.0.1:$redis_port"
    redis_note="private redis-server, pid $redis_pid, no persistence"
    say "started redis-server on 127.0.0.1:$redis_port (pid $redis_pid)"
fi

# --- API key --------------------------------------------------------------------------------

# A development API key kept across runs (so pasted curl commands keep working); the config
# holds only its hash, as in production.
key_file="$RUN_DIR/dev-api-key"
if [ ! -s "$key_file" ]; then
    (umask 077 && printf 'sk-dev-%s\n' "$(random_hex 24)" >"$key_file")
fi
api_key=$(head -n 1 "$key_file")
api_key_sha256=$(sha256_hex "$api_key")
# Signs stream tokens; a new one each run (tokens from an earlier run stop working).
stream_token_secret=$(random_hex 32)

# --- Config ---------------------------------------------------------------------------------

mock_base="http://127.0.0.1:$mock_port/v1"
(
    umask 077 # the Redis URL may carry a password
    cat >"$CONFIG" <<EOF
# Generated by scripts/run.sh for \`make run\`; rewritten on every run.
# Every key, with its default, is documented in config/local.example.toml.

[redis]
url = $(toml_str "$redis_url")

[gateway]
addr = "127.0.0.1:$gateway_port"

[producer]
addr = "127.0.0.1:$producer_port"

[processor]
addr = "127.0.0.1:$processor_port"

[mock_llm]
addr = "127.0.0.1:$mock_port"

[auth]
api_keys = [{ id = "dev", sha256 = "$api_key_sha256", role = "admin" }]
stream_token_secret = "$stream_token_secret"

[models.mock]
base_url = "$mock_base"
upstream_model = "mock"

[models."gpt-4"]
base_url = "$mock_base"
upstream_model = "mock-gpt-4"
EOF
)

# --- Services -------------------------------------------------------------------------------

# Start order; the trap stops them in reverse.
declare -A ready_url=(
    [mock-llm]="http://127.0.0.1:$mock_port/healthz"
    [processor]="http://127.0.0.1:$processor_port/readyz"
    [producer]="http://127.0.0.1:$producer_port/readyz"
    [gateway]="http://127.0.0.1:$gateway_port/readyz"
)
for name in mock-llm processor producer gateway; do
    spawn "$LOG_DIR/$name.log" "$BIN_DIR/$name" --config "$CONFIG"
    names+=("$name")
    pids+=("$!")
done
for i in "${!names[@]}"; do
    wait_ready "${names[i]}" "${pids[i]}" "${ready_url[${names[i]}]}"
done

base="http://127.0.0.1:$gateway_port"
auth_header="Authorization: Bearer $api_key"
body='{"sessionId":"demo","modelId":"mock","prompt":"Tell me a story about a dragon"}'
cat <<EOF

  The Redis Streams LLM Bridge is running.

  Demo page:   $base/
  API key:     $api_key   (development key, kept in .run/dev-api-key)
  Redis:       $(redact "$redis_url") ($redis_note)
  Services:    mock-llm :$mock_port, processor :$processor_port, producer :$producer_port, gateway :$gateway_port
  Config:      .run/config.toml        Logs: .run/logs/<service>.log

  Start a chat (the answer holds a streamUrl), then stream its tokens:
    curl -sS -X POST $base/api/chat/start -H '$auth_header' \\
      -H 'Content-Type: application/json' -d '$body'
    curl -N "$base<streamUrl>"

  Or both in one line:
    curl -N "$base\$(curl -sS -X POST $base/api/chat/start -H '$auth_header' -H 'Content-Type: application/json' -d '$body' | sed -n 's/.*"streamUrl":"\\([^"]*\\)".*/\\1/p')"

  Press Ctrl-C to stop.

EOF

# Block until Ctrl-C (the trap stops everything) or until a child exits on its own.
wait -n || true
for i in "${!names[@]}"; do
    kill -0 "${pids[i]}" 2>/dev/null || fail_service "${names[i]}" "exited unexpectedly"
done
if [ -n "$redis_pid" ] && ! kill -0 "$redis_pid" 2>/dev/null; then
    fail_service redis "exited unexpectedly"
fi
fail_service run "stopped waiting for an unknown reason"
