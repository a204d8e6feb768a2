#!/usr/bin/env bash
# Instructions per delivered token of one service (`make bench-instructions`), counted by
# valgrind's callgrind under a small fixed load: a count, not a time, so it repeats on a noisy
# VM where CPU-seconds swing by ±8 % between runs (bench/results/profiles-gateway.md). For
# judging a change of a few percent: run it on both builds and compare.
#
#   scripts/callgrind.sh SERVICE [LOAD] [SECONDS]
#     SERVICE  gateway, producer or processor: the one that runs under callgrind
#     LOAD     paced load as STREAMSxRATE (tokens/s per stream) [default: 20x20]; callgrind
#              runs a service about 50x slower, so keep it to a few hundred tokens/s
#     SECONDS  the counted window [default: 20]
#
# It builds the release binaries, copies them into a fresh directory (the bench starts the
# services found next to its own executable) with SERVICE replaced by a wrapper that runs it
# under callgrind, and runs `bench --only LOAD:WINDOW`. Once delivery is steady it zeroes the
# counters, waits SECONDS, dumps them, and divides by the tokens the gateway delivered in
# between (its `gateway_tokens_delivered_total`). Prints the figure and the functions with the
# largest inclusive share; the profile stays in the directory it names (open it with
# callgrind_annotate or kcachegrind). BRIDGE__* variables reach the services, e.g.
# BRIDGE__GATEWAY__READER_BLOCK_MAX_STREAMS=0 for the gateway's announced reads.
#
# The count moves a little with batching (a slower build reads more entries per round), so
# compare builds at the same LOAD, and repeat: runs of one build agree within a few percent.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/llm-bridge/target}"
export CARGO_TARGET_DIR

say() { printf 'callgrind: %s\n' "$*" >&2; }
fail() { say "$*"; exit 1; }
have() { command -v "$1" >/dev/null 2>&1; }

service=${1:-}
load=${2:-20x20}
seconds=${3:-20}
case "$service" in
    gateway | producer | processor) ;;
    *) fail "usage: scripts/callgrind.sh gateway|producer|processor [STREAMSxRATE] [SECONDS]" ;;
esac
[[ "$load" =~ ^[0-9]+x[0-9]+$ ]] || fail "LOAD is STREAMSxRATE, e.g. 20x20 (got '$load')"
[[ "$seconds" =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] || fail "SECONDS is a whole number (got '$seconds')"

if ! have valgrind || ! have callgrind_control; then
    have apt-get || fail "valgrind is not installed and apt-get is not available"
    say "valgrind not found; installing the Debian package valgrind"
    if [ "$(id -u)" -eq 0 ]; then sudo_cmd=(); else sudo_cmd=(sudo); fi
    ${sudo_cmd[@]+"${sudo_cmd[@]}"} env DEBIAN_FRONTEND=noninteractive apt-get install -y valgrind \
        || fail "could not install valgrind"
fi
scripts/ensure-redis.sh
have curl || fail "curl is needed to read the gateway's metrics"
have ss || fail "ss (iproute2) is needed to find the gateway's port"

say "building release binaries"
cargo build --release --workspace --bins

dir=$(mktemp -d "${TMPDIR:-/tmp}/callgrind-$service.XXXXXX")
for binary in bench gateway producer processor mock-llm; do
    cp "$CARGO_TARGET_DIR/release/$binary" "$dir/"
done
mv "$dir/$service" "$dir/$service.real"
cat > "$dir/$service" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.%p.out" "$dir/$service.real" "\$@"
EOF
chmod +x "$dir/$service"

# Warm-up and window long enough for callgrind's start, the wait for steady delivery and the
# counted seconds; the bench ends the run (and stops every service) after its window.
window=$((seconds + 60))
"$dir/bench" --only "$load:$window" --repeats 1 --idle 0 --out "$dir/run.md" > "$dir/bench.log" 2>&1 &
bench_pid=$!

# The traced service's command line is valgrind's, with the binary's path in it.
pid_of() { pgrep -f "$1" | head -n 1 || true; }
port_of() { ss -ltnpH 2>/dev/null | awk -v p="pid=$1," 'index($0, p) { sub(/.*:/, "", $4); print $4; exit }'; }

traced="" gateway_port=""
for _ in $(seq 1 120); do
    kill -0 "$bench_pid" 2>/dev/null || fail "the bench ended early; see $dir/bench.log"
    traced=$(pid_of "$dir/$service.real ")
    if [ "$service" = gateway ]; then gateway_pid=$traced; else gateway_pid=$(pid_of "^$dir/gateway "); fi
    [ -n "$gateway_pid" ] && gateway_port=$(port_of "$gateway_pid")
    [ -n "$traced" ] && [ -n "$gateway_port" ] && break
    sleep 1
done
[ -n "$traced" ] && [ -n "$gateway_port" ] || fail "the services did not come up; see $dir/bench.log"

delivered() {
    curl -sf "http://127.0.0.1:$gateway_port/metrics" \
        | awk '/^gateway_tokens_delivered_total / { printf "%d", $2 }'
}

# Steady delivery: the load's chats are open and tokens flow (past what the warm-up needs).
streams=${load%x*}
rate=${load#*x}
steady=$((streams * rate * 3))
for _ in $(seq 1 180); do
    count=$(delivered || true)
    [ -n "$count" ] && [ "$count" -ge "$steady" ] && break
    kill -0 "$bench_pid" 2>/dev/null || fail "the bench ended early; see $dir/bench.log"
    sleep 1
done
[ -n "${count:-}" ] && [ "$count" -ge "$steady" ] \
    || fail "delivery did not reach $steady tokens; see $dir/bench.log"

before=$(delivered)
callgrind_control --zero "$traced" > /dev/null
started=$(date +%s.%N)
sleep "$seconds"
callgrind_control --dump "$traced" > /dev/null
after=$(delivered)
ended=$(date +%s.%N)

say "waiting for the bench to end its window"
wait "$bench_pid" || say "the bench failed after the counted window; see $dir/bench.log"

profile=$(ls -t "$dir"/callgrind.*.out.* 2>/dev/null | head -n 1)
[ -n "$profile" ] || fail "callgrind wrote no dump into $dir"
instructions=$(awk '/^(summary|totals):/ { print $2; exit }' "$profile")
tokens=$((after - before))
[ "$tokens" -gt 0 ] || fail "no token was delivered in the window"

commit=$(git rev-parse --short HEAD)
dirty=$(git status --porcelain --untracked-files=no | head -n 1)
echo "service:      $service (commit $commit${dirty:+, uncommitted changes})"
echo "load:         $load (streams x tokens/s)"
env | grep '^BRIDGE__' | sed 's/^/settings:     /' || true
echo "window:       $(awk -v a="$started" -v b="$ended" 'BEGIN { printf "%.1f", b - a }') s, $tokens tokens delivered"
echo "instructions: $instructions"
echo "per token:    $((instructions / tokens))"
echo "profile:      $profile"
echo
echo "largest inclusive shares (recursion, std and the runtime's own frames left out):"
{
    callgrind_annotate --inclusive=yes --auto=no --threshold=99 "$profile" 2> /dev/null \
        | grep -E '^ *[0-9,]+ \(' \
        | grep -vE "'[0-9]|/rustc/|PROGRAM TOTALS|tokio-[0-9.]+/src/(runtime|task)/|/csu/|/nptl/|clone\.S|\?\?\?:" \
        | sed -E 's#[^ ]*/registry/src/[^/]+/##; s#'"$PWD"'/##; s# \[[^]]*\]$##' \
        | head -n 40
} || true
