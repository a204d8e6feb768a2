#!/usr/bin/env bash
# `make images-test` (and CI, after `make test`): builds every service image from
# deploy/Dockerfile and runs the compose stack (deploy/docker-compose.yml plus the host-network
# override deploy/compose.images-test.yml) on this machine's loopback, then checks what a
# Kubernetes or compose user relies on: health and readiness, a chat streamed end to end, a
# resume with Last-Event-ID, a producer killed mid-answer and another taking over, a clean
# SIGTERM stop within each grace period with the service as PID 1, a non-root user and a
# read-only root filesystem.
#
# There is no container registry here, so nothing is pulled:
# - the runtime base (the exact tag of deploy/Dockerfile's runtime stage) is made from a
#   `debootstrap --variant=minbase` of the same Debian release, reduced to what distroless/cc
#   holds (glibc, libgcc, libstdc++, libssl, CA certificates, tzdata, the nonroot user; no shell);
# - Redis is Debian's redis-server 7.0 from the same debootstrap;
# - the Rust build stage is replaced by the Dockerfile's `prebuilt` stage (BINARIES=prebuilt):
#   the host's debug binaries, stripped of debug info, copied into the same runtime stage.
# The debootstrap tarball is cached in $HOME/.cache/llm-bridge/images.
#
# Needs root (apt-get, dockerd, debootstrap). Installs Debian's docker.io, docker-compose and
# debootstrap when missing; starts dockerd when no engine answers and stops exactly that dockerd
# at the end, as it stops and removes every container it started, also on failure.
#
# Environment:
#   CARGO_TARGET_DIR        where the binaries are built (the Makefile sets it)
#   IMAGES_TEST_KEEP=1      leave the stack running at the end (for debugging; nothing stops it)
#   DEBIAN_MIRROR=URL       mirror for debootstrap (default http://deb.debian.org/debian)

# shellcheck disable=SC2329 # cleanup() runs from traps, which shellcheck cannot see
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

: "${CARGO_TARGET_DIR:=$HOME/.cache/llm-bridge/target}"
export CARGO_TARGET_DIR
SERVICES=(gateway producer processor mock-llm)
WORK="$ROOT/.run/images-test"
CACHE="$HOME/.cache/llm-bridge/images"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PROJECT=llm-bridge-images-test
# deploy/docker-compose.yml without its `ports` (made below): published ports and host
# networking exclude each other, and an override file can add to a list but not remove it.
# Relative paths in both files stay relative to deploy/ (--project-directory).
COMPOSE_FILES=(--project-directory "$ROOT/deploy" -f "$WORK/docker-compose.yml"
    -f deploy/compose.images-test.yml)
READY_DEADLINE_SECS=60
# The packages the runtime base is cut from (distroless/cc-debian12 holds the same libraries),
# plus redis-server for the Redis image. Part of the cache key.
BASE_PACKAGES="base-files netbase tzdata libc6 libgcc-s1 libgomp1 libstdc++6 libssl3 ca-certificates"
EXTRA_PACKAGES="redis-server"

started=$SECONDS
say() { printf 'images-test: %s\n' "$*" >&2; }
fail() {
    say "FAILED: $*"
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# --- What this script started, so the trap stops exactly these -------------------------------

dockerd_pid=""
stack_up=0
sse_pid=""
stopping=0

dump_logs() {
    local name
    say "last log lines of each container:"
    for name in $(compose ps --services 2>/dev/null || true); do
        printf '  --- %s\n' "$name" >&2
        compose logs --no-color --tail 25 "$name" 2>&1 | sed 's/^/    /' >&2 || true
    done
}

cleanup() {
    local rc=$1
    ((stopping)) && return 0
    stopping=1
    trap '' INT TERM HUP
    if [ -n "$sse_pid" ]; then
        kill "$sse_pid" 2>/dev/null || true
    fi
    if ((stack_up)); then
        ((rc == 0)) || dump_logs
        if [ "${IMAGES_TEST_KEEP:-0}" = 1 ]; then
            say "IMAGES_TEST_KEEP=1: the stack keeps running (project $PROJECT)"
            return 0
        fi
        compose down --volumes --remove-orphans --timeout 40 >"$WORK/down.log" 2>&1 ||
            say "compose down failed (see ${WORK#"$ROOT"/}/down.log)"
    fi
    if [ -n "$dockerd_pid" ]; then
        # The build cache holds a copy of the binaries of every run (~150 MB each); the images
        # and the base stay for the next run. Only on an engine this script started: the cache
        # of an engine that was already running is its owner's.
        docker builder prune -af >/dev/null 2>&1 || say "docker builder prune failed"
        say "stopping the dockerd this script started (pid $dockerd_pid)"
        kill -TERM "$dockerd_pid" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while kill -0 "$dockerd_pid" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.2
        done
        if kill -0 "$dockerd_pid" 2>/dev/null; then
            say "dockerd did not stop within 30 s; sending SIGKILL"
            kill -KILL "$dockerd_pid" 2>/dev/null || true
        fi
        wait "$dockerd_pid" 2>/dev/null || true
    fi
}
on_exit() {
    local rc=$?
    cleanup "$rc"
    if ((rc == 0)); then
        say "all checks passed ($((SECONDS - started)) s)"
    fi
    exit "$rc"
}
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
trap on_exit EXIT

# --- Prerequisites --------------------------------------------------------------------------

[ "$(id -u)" = 0 ] || fail "needs root (apt-get, dockerd, debootstrap)"
mkdir -p "$WORK" "$CACHE"
# Binaries, rootfs and images need about 2 GB; say so instead of failing halfway.
for dir in "$WORK" "$CACHE" /var/lib; do
    free_kb=$(df -Pk "$dir" | awk 'NR == 2 { print $4 }')
    ((free_kb >= 2000000)) || fail "only $((free_kb / 1024)) MB free under $dir; about 2 GB are needed"
done
if [ ! -f .gitignore ] || ! grep -qxF '/.run' .gitignore; then
    printf '/.run\n' >>.gitignore
fi

# The docker.io client (20.10) drives the engine's built-in BuildKit; a newer client without
# the buildx plugin would fall back to the legacy builder, which builds every stage.
missing=()
{ [ -x /usr/bin/docker ] && have dockerd; } || missing+=(docker.io)
have docker-compose || docker compose version >/dev/null 2>&1 || missing+=(docker-compose)
have debootstrap || missing+=(debootstrap)
have curl || missing+=(curl)
have objcopy || missing+=(binutils)
if ((${#missing[@]} > 0)); then
    say "installing ${missing[*]} (Debian packages)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" \
        >"$WORK/apt.log" 2>&1 || {
        apt-get update >>"$WORK/apt.log" 2>&1 &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                "${missing[@]}" >>"$WORK/apt.log" 2>&1
    } || fail "apt-get install ${missing[*]} failed (see ${WORK#"$ROOT"/}/apt.log)"
fi
docker() { DOCKER_BUILDKIT=1 /usr/bin/docker "$@"; }
if /usr/bin/docker compose version >/dev/null 2>&1; then
    compose() { /usr/bin/docker compose -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"; }
else
    compose() { docker-compose -p "$PROJECT" "${COMPOSE_FILES[@]}" "$@"; }
fi

# --- Engine ---------------------------------------------------------------------------------

if docker info >/dev/null 2>&1; then
    say "using the Docker engine that is already running"
else
    # No bridge and no iptables rules: every container of this test uses host networking.
    setsid "$(command -v dockerd)" --bridge=none --iptables=false --ip6tables=false \
        >"$WORK/dockerd.log" 2>&1 </dev/null &
    dockerd_pid=$!
    deadline=$((SECONDS + 60))
    until docker info >/dev/null 2>&1; do
        kill -0 "$dockerd_pid" 2>/dev/null ||
            fail "dockerd exited during start: $(tail -n 5 "$WORK/dockerd.log")"
        ((SECONDS < deadline)) || fail "dockerd did not answer within 60 s"
        sleep 0.2
    done
    say "started dockerd (pid $dockerd_pid, log ${WORK#"$ROOT"/}/dockerd.log)"
fi

# --- Base images ----------------------------------------------------------------------------

# The runtime stage's base, exactly as the Dockerfile names it, and its Debian release.
base_tag=$(sed -nE 's/^FROM[[:space:]]+(\S+)[[:space:]]+AS[[:space:]]+runtime$/\1/Ip' deploy/Dockerfile)
[ -n "$base_tag" ] || fail "deploy/Dockerfile has no 'FROM <image> AS runtime' stage"
case "$base_tag" in
*debian12*) release=bookworm ;;
*debian13*) release=trixie ;;
*) fail "cannot tell the Debian release of the runtime base $base_tag" ;;
esac
redis_tag=$(sed -nE 's/^[[:space:]]+image:[[:space:]]+(\S*redis\S*)$/\1/p' deploy/compose.images-test.yml)
[ -n "$redis_tag" ] || fail "deploy/compose.images-test.yml names no Redis image"

key=$(printf '%s\n' "$release" "$MIRROR" "$BASE_PACKAGES" "$EXTRA_PACKAGES" "v1" | sha256sum | cut -c1-12)
rootfs_tar="$CACHE/$release-minbase-$key.tar"
if [ ! -s "$rootfs_tar" ]; then
    say "debootstrap --variant=minbase $release (cached afterwards in $rootfs_tar)"
    rootfs="$CACHE/rootfs-$key"
    rm -rf "$rootfs"
    include=$(tr ' ' ',' <<<"$BASE_PACKAGES $EXTRA_PACKAGES")
    debootstrap --variant=minbase --include="$include" "$release" "$rootfs" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 ||
        fail "debootstrap failed (see ${WORK#"$ROOT"/}/debootstrap.log)"
    tar -C "$rootfs" --numeric-owner -cf "$rootfs_tar.part" .
    mv "$rootfs_tar.part" "$rootfs_tar"
    rm -rf "$rootfs"
fi

image_key() { docker image inspect -f '{{ index .Config.Labels "llm-bridge.images-test.key" }}' "$1" 2>/dev/null || true; }

if [ "$(image_key "$base_tag")" != "$key" ]; then
    say "making $base_tag from the $release rootfs (distroless/cc contents, no shell)"
    stage="$WORK/base-rootfs"
    rm -rf "$stage" "$WORK/full-rootfs"
    mkdir -p "$stage" "$WORK/full-rootfs"
    tar -C "$WORK/full-rootfs" -xf "$rootfs_tar"
    # The files dpkg lists for the base packages, with directory symlinks resolved inside the
    # rootfs (merged /usr: /lib -> usr/lib), plus the certificate bundle update-ca-certificates
    # generated and the top-level symlinks.
    read -ra base_packages <<<"$BASE_PACKAGES"
    python3 - "$WORK/full-rootfs" "${base_packages[@]}" >"$WORK/base-files.txt" <<'PY'
import os, sys
root, pkgs = sys.argv[1], sys.argv[2:]
info = os.path.join(root, "var/lib/dpkg/info")
out = set()
for pkg in pkgs:
    lists = [f for f in os.listdir(info) if f in (pkg + ".list", pkg + ":amd64.list")]
    if not lists:
        sys.exit(f"package {pkg} is not in the rootfs")
    for line in open(os.path.join(info, lists[0])):
        p = line.strip()
        if not p or p == "/.":
            continue
        d = os.path.realpath(os.path.join(root, os.path.dirname(p).lstrip("/")))
        full = os.path.join(d, os.path.basename(p))
        if full.startswith(root + "/") and os.path.lexists(full):
            out.add(os.path.relpath(full, root))
for top in os.listdir(root):
    if os.path.islink(os.path.join(root, top)):
        out.add(top)
for d, _, files in os.walk(os.path.join(root, "etc/ssl/certs")):
    out.add(os.path.relpath(d, root))
    out.update(os.path.relpath(os.path.join(d, f), root) for f in files)
print("\n".join(sorted(out)))
PY
    tar -C "$WORK/full-rootfs" --no-recursion -cf - -T "$WORK/base-files.txt" | tar -C "$stage" -xf -
    # The users of distroless's :nonroot variant.
    mkdir -p "$stage/etc" "$stage/tmp" "$stage/home/nonroot" "$stage/root"
    chmod 1777 "$stage/tmp"
    chown 65532:65532 "$stage/home/nonroot"
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
        'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
        'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$stage/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'tty:x:5:' 'staff:x:50:' 'nonroot:x:65532:' \
        >"$stage/etc/group"
    if [ -e "$stage/bin/sh" ] || [ -e "$stage/usr/bin/sh" ]; then
        fail "the base image would hold a shell"
    fi
    tar -C "$stage" --numeric-owner -cf - . | docker import \
        --change 'USER 65532:65532' --change 'WORKDIR /home/nonroot' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change "LABEL llm-bridge.images-test.key=$key" \
        - "$base_tag" >/dev/null || fail "docker import of $base_tag failed"
    rm -rf "$stage" "$WORK/full-rootfs"
fi
if [ "$(image_key "$redis_tag")" != "$key" ]; then
    say "making $redis_tag (Debian's redis-server from the same rootfs)"
    docker import --change 'WORKDIR /data' --change 'CMD ["redis-server"]' \
        --change "LABEL llm-bridge.images-test.key=$key" \
        "$rootfs_tar" "$redis_tag" >/dev/null || fail "docker import of $redis_tag failed"
fi

# --- Service images -------------------------------------------------------------------------

say "building the binaries (cargo build --workspace --bins, as make test does; CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
cargo build --workspace --bins >"$WORK/cargo.log" 2>&1 ||
    fail "cargo build failed (see ${WORK#"$ROOT"/}/cargo.log)"
context="$WORK/context"
rm -rf "$context"
mkdir -p "$context"
for s in "${SERVICES[@]}"; do
    # Debug info is most of a debug binary's size and none of its behaviour.
    objcopy --strip-debug "$CARGO_TARGET_DIR/debug/$s" "$context/$s" ||
        fail "objcopy of $s into ${context#"$ROOT"/} failed (disk full? $(df -h --output=avail "$WORK" | tail -n 1) free)"
done
for s in "${SERVICES[@]}"; do
    docker build -q -f deploy/Dockerfile --build-arg BINARIES=prebuilt --target "$s" \
        -t "llm-bridge/$s:dev" "$context" >"$WORK/build-$s.log" 2>&1 ||
        fail "docker build --target $s failed: $(tail -n 15 "$WORK/build-$s.log")"
done
rm -rf "$context"
{
    printf '| image | size |\n|---|---|\n'
    for t in "$base_tag" "${SERVICES[@]/#/llm-bridge/}"; do
        [[ $t == llm-bridge/* ]] && t="$t:dev"
        printf '| %s | %s MB |\n' "\`$t\`" \
            "$(($(docker image inspect -f '{{ .Size }}' "$t") / 1000000))"
    done
} >"$WORK/sizes.md"
say "images built; sizes in ${WORK#"$ROOT"/}/sizes.md:"
sed 's/^/    /' "$WORK/sizes.md" >&2

# --- The stack ------------------------------------------------------------------------------

python3 - deploy/docker-compose.yml >"$WORK/docker-compose.yml" <<'PY' ||
import sys, yaml
compose = yaml.safe_load(open(sys.argv[1]))
for service in compose["services"].values():
    service.pop("ports", None)
print("# Made by scripts/images-test.sh from deploy/docker-compose.yml: the same without `ports`.")
print(yaml.safe_dump(compose, sort_keys=False))
PY
    fail "cannot read deploy/docker-compose.yml"

# Free loopback ports, the usual ones when free (as `make run` picks them).
read -r IT_REDIS_PORT IT_MOCK_PORT IT_GATEWAY_PORT IT_PRODUCER_PORT IT_PRODUCER2_PORT \
    IT_PROCESSOR_PORT < <(
        python3 - 6390 8090 8080 8081 8083 8082 <<'PY'
import socket, sys
held, out = [], []
for want in map(int, sys.argv[1:]):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", want))
    except OSError:
        s.close()
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
    held.append(s)
    out.append(str(s.getsockname()[1]))
print(" ".join(out))
PY
    ) || fail "cannot pick free ports"
export IT_REDIS_PORT IT_MOCK_PORT IT_GATEWAY_PORT IT_PRODUCER_PORT IT_PRODUCER2_PORT IT_PROCESSOR_PORT

# A stack left over by an interrupted run would hold the container names.
compose down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
stack_up=1
say "starting the compose stack (redis :$IT_REDIS_PORT, mock-llm :$IT_MOCK_PORT, gateway :$IT_GATEWAY_PORT, producer :$IT_PRODUCER_PORT, processor :$IT_PROCESSOR_PORT)"
compose up -d --no-build redis mock-llm processor producer gateway >"$WORK/up.log" 2>&1 ||
    fail "compose up failed: $(tail -n 15 "$WORK/up.log")"

cid() {
    local id
    # By compose's labels (docker-compose 1.x and docker compose v2 set the same ones): quicker
    # than asking compose, and it lists created and stopped containers too.
    id=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" | sed -n 1p)
    [ -n "$id" ] || fail "no container for service $1"
    printf '%s' "$id"
}

# wait_http NAME URL: polls until 2xx; fails when the container is not running any more.
wait_http() {
    local name=$1 url=$2 deadline=$((SECONDS + READY_DEADLINE_SECS)) id
    id=$(cid "$name")
    until curl -fs -o /dev/null --max-time 2 "$url"; do
        [ "$(docker inspect -f '{{ .State.Running }}' "$id")" = true ] ||
            fail "$name exited (code $(docker inspect -f '{{ .State.ExitCode }}' "$id")) before $url answered"
        ((SECONDS < deadline)) || fail "$name: $url did not answer 2xx within ${READY_DEADLINE_SECS} s"
        sleep 0.25
    done
}

declare -A port=(
    [mock-llm]=$IT_MOCK_PORT [gateway]=$IT_GATEWAY_PORT [producer]=$IT_PRODUCER_PORT
    [producer-2]=$IT_PRODUCER2_PORT [processor]=$IT_PROCESSOR_PORT
)
check_health() {
    local name=$1 base="http://127.0.0.1:${port[$1]}"
    wait_http "$name" "$base/healthz"
    if [ "$name" != mock-llm ]; then
        wait_http "$name" "$base/readyz"
    fi
    say "ok: $name healthy and ready ($base)"
}

deadline=$((SECONDS + READY_DEADLINE_SECS))
until [ "$(docker inspect -f '{{ .State.Health.Status }}' "$(cid redis)")" = healthy ]; do
    ((SECONDS < deadline)) || fail "redis not healthy within ${READY_DEADLINE_SECS} s"
    sleep 0.25
done
say "ok: redis healthy (redis-cli ping in the container)"
for s in mock-llm processor producer gateway; do
    check_health "$s"
done

# --- Security: user, read-only root, PID 1 --------------------------------------------------

# check_process NAME: the service runs as 65532 (not root), is PID 1 of its container, has a
# read-only root filesystem and no capabilities.
check_process() {
    local name=$1 id pid status
    id=$(cid "$name")
    pid=$(docker inspect -f '{{ .State.Pid }}' "$id")
    status=$(cat "/proc/$pid/status")
    grep -qE '^Uid:[[:space:]]+65532[[:space:]]+65532[[:space:]]+65532[[:space:]]+65532$' <<<"$status" ||
        fail "$name does not run as uid 65532: $(grep '^Uid:' <<<"$status")"
    grep -qE '^Gid:[[:space:]]+65532[[:space:]]' <<<"$status" ||
        fail "$name does not run as gid 65532: $(grep '^Gid:' <<<"$status")"
    grep -qE '^NSpid:.*[[:space:]]1$' <<<"$status" ||
        fail "$name is not PID 1 of its container: $(grep '^NSpid:' <<<"$status")"
    grep -qE '^CapEff:[[:space:]]+0+$' <<<"$status" ||
        fail "$name has capabilities: $(grep '^CapEff:' <<<"$status")"
    [ "$(tr '\0' ' ' <"/proc/$pid/cmdline")" = "/usr/local/bin/$name --config /etc/bridge/bridge.toml " ] ||
        fail "$name runs $(tr '\0' ' ' <"/proc/$pid/cmdline")"
    [ "$(docker inspect -f '{{ .HostConfig.ReadonlyRootfs }}' "$id")" = true ] ||
        fail "$name has a writable root filesystem"
    # The root filesystem is read-only from inside too; the image holds no shell to try it
    # with, so ask the kernel through the process's own mount table.
    awk '$5 == "/" { split($6, o, ","); if (o[1] != "ro") exit 1 }' "/proc/$pid/mountinfo" ||
        fail "$name: / is not mounted read-only"
    say "ok: $name runs as 65532:65532, PID 1, no capabilities, read-only /"
}
for s in gateway producer processor mock-llm; do
    check_process "$s"
done
if docker exec "$(cid gateway)" /bin/sh -c true >/dev/null 2>&1; then
    fail "the gateway image holds a shell (distroless has none)"
fi

# --- Chat, end to end -----------------------------------------------------------------------

gw="http://127.0.0.1:$IT_GATEWAY_PORT"
# No API keys in k8s/base/bridge.toml: the gateway generated a development key and logged it
# (the documented compose flow, docs/deploy.md).
api_key=$(compose logs --no-color gateway 2>/dev/null | sed -nE 's/.*dev_key=([^ ]+).*/\1/p' | tail -n 1)
[ -n "$api_key" ] || fail "the gateway logged no dev_key"

# json FIELD: one top-level string field of the JSON object on stdin.
json() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# start_chat SESSION PROMPT: prints the streamUrl.
start_chat() {
    local body reply
    body=$(python3 -c 'import json,sys; print(json.dumps({"sessionId": sys.argv[1], "modelId": "mock", "prompt": sys.argv[2]}))' "$1" "$2")
    reply=$(curl -sS --max-time 10 -X POST "$gw/api/chat/start" -H "Authorization: Bearer $api_key" \
        -H 'Content-Type: application/json' -d "$body" -w '\n%{http_code}') ||
        fail "POST /api/chat/start: curl failed"
    [ "$(tail -n 1 <<<"$reply")" = 200 ] || fail "POST /api/chat/start answered $(tail -n 1 <<<"$reply"): $(head -n 1 <<<"$reply")"
    head -n 1 <<<"$reply" | json streamUrl
}

# events FILE: one line per SSE message of a saved stream: "<id> <type> <sequence|attempt|reason>".
events() {
    python3 - "$1" <<'PY'
import json, sys
eid = None
for line in open(sys.argv[1], encoding="utf-8"):
    line = line.rstrip("\r\n")
    if line.startswith("id:"):
        eid = line[3:].strip()
    elif line.startswith("data:"):
        d = json.loads(line[5:])
        extra = d.get("sequence", d.get("attempt", d.get("finishReason", d.get("code", ""))))
        print(eid, d.get("type"), extra)
PY
}

session="images-test-$$"
url=$(start_chat "$session" "Tell me a story [[mock tokens=40 delay_ms=10]]")
curl -sS -N --max-time 60 "$gw$url" >"$WORK/chat.sse" || fail "the SSE stream of the chat failed"
events "$WORK/chat.sse" >"$WORK/chat.events"
[ "$(head -n 1 "$WORK/chat.events" | cut -d' ' -f2)" = start ] || fail "the stream does not begin with start: $(head -n 3 "$WORK/chat.events")"
[ "$(tail -n 1 "$WORK/chat.events" | cut -d' ' -f2-)" = "complete stop" ] || fail "the stream does not end with complete/stop: $(tail -n 3 "$WORK/chat.events")"
tokens=$(awk '$2 == "token"' "$WORK/chat.events" | wc -l)
seqs=$(awk '$2 == "token" { print $3 }' "$WORK/chat.events" | tr '\n' ' ')
[ "$seqs" = "$(seq -s ' ' 1 "$tokens") " ] || fail "token sequences are not 1..$tokens: $seqs"
((tokens >= 40)) || fail "only $tokens token events for 40 tokens"
say "ok: chat streamed end to end ($tokens tokens, start .. complete)"

# Resume: from the id of the 10th token, exactly the events after it.
resume_id=$(awk '$2 == "token" && $3 == 10 { print $1 }' "$WORK/chat.events")
[ -n "$resume_id" ] || fail "no 10th token to resume after"
curl -sS -N --max-time 30 -H "Last-Event-ID: $resume_id" "$gw$url" >"$WORK/resume.sse" ||
    fail "the resumed SSE stream failed"
events "$WORK/resume.sse" >"$WORK/resume.events"
sed -n "/^$resume_id /,\$p" "$WORK/chat.events" | tail -n +2 >"$WORK/resume.expected"
cmp -s "$WORK/resume.events" "$WORK/resume.expected" ||
    fail "the resume after $resume_id did not give exactly the later events: $(diff "$WORK/resume.expected" "$WORK/resume.events" | head -n 5)"
say "ok: resume with Last-Event-ID $resume_id gave exactly the $(wc -l <"$WORK/resume.events") later events"

# --- A producer killed mid-answer -----------------------------------------------------------

# producer-2 is created now but started only once the first producer streams the answer, so
# the request is the first producer's; `docker start` of a created container is quick.
compose up --no-start --no-build producer-2 >>"$WORK/up.log" 2>&1 || fail "compose up --no-start producer-2 failed"
session="images-test-kill-$$"
url=$(start_chat "$session" "A long one [[mock tokens=300 delay_ms=50]]")
curl -sS -N --max-time 120 "$gw$url" >"$WORK/kill.sse" 2>"$WORK/kill.curl.log" &
sse_pid=$!
deadline=$((SECONDS + 30))
until [ "$(grep -c '"type":"token"' "$WORK/kill.sse" 2>/dev/null || true)" -ge 10 ]; do
    kill -0 "$sse_pid" 2>/dev/null || fail "the stream ended before 10 tokens: $(tail -n 3 "$WORK/kill.sse")"
    ((SECONDS < deadline)) || fail "no 10 tokens within 30 s"
    sleep 0.1
done
docker start "$(cid producer-2)" >/dev/null || fail "docker start producer-2 failed"
check_health producer-2
kill -0 "$sse_pid" 2>/dev/null || fail "the answer ended before the producer could be killed (a slow start of producer-2?)"
docker kill "$(cid producer)" >/dev/null || fail "docker kill producer failed"
killed_at=$SECONDS
say "killed the producer container mid-answer; waiting for producer-2 to take over (after the 15 s lease)"
wait "$sse_pid" || fail "the stream after the kill failed (curl: $(cat "$WORK/kill.curl.log"))"
events "$WORK/kill.sse" >"$WORK/kill.events"
grep -q ' restart 2$' "$WORK/kill.events" || fail "no restart with attempt 2 after the kill: $(tail -n 3 "$WORK/kill.events")"
[ "$(tail -n 1 "$WORK/kill.events" | cut -d' ' -f2-)" = "complete stop" ] ||
    fail "the restarted request did not complete: $(tail -n 3 "$WORK/kill.events")"
after=$(sed -n '/ restart 2$/,$p' "$WORK/kill.events" | awk '$2 == "token"' | wc -l)
((after >= 300)) || fail "attempt 2 streamed $after tokens, not 300"
# Only producer-2 can have written attempt 2: the killed container stayed down (restart: no).
[ "$(docker inspect -f '{{ .State.Running }}' "$(cid producer)")" = false ] ||
    fail "the killed producer container is running again"
# Into a file first: `grep -q` stops reading at the first match, and under pipefail the
# SIGPIPE of the writer would fail the check.
compose logs --no-color producer-2 >"$WORK/producer-2.log" 2>&1 || true
grep -q 'took over a job whose producer was lost' "$WORK/producer-2.log" ||
    fail "producer-2's log shows no job taken over (${WORK#"$ROOT"/}/producer-2.log)"
say "ok: producer killed; producer-2 took over: restart attempt 2, complete with $after tokens $((SECONDS - killed_at)) s after the kill"

# --- SIGTERM: each service stops cleanly within its grace period ----------------------------

# Grace periods as compose applies them (stop_grace_period, merged over both files).
declare -A grace
while read -r name secs; do
    grace[$name]=$secs
done < <(compose config 2>/dev/null | python3 -c '
import re, sys, yaml
for name, s in (yaml.safe_load(sys.stdin).get("services") or {}).items():
    g = str(s.get("stop_grace_period", "10s"))
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", g)
    print(name, int(m.group(1) or 0) * 60 + int(m.group(2) or 0) if m else 10)
')
((${#grace[@]} >= 6)) || fail "cannot read the grace periods from compose config"

# The killed producer comes back for its own stop check.
docker start "$(cid producer)" >/dev/null || fail "cannot restart the producer container"
check_health producer

# stop_check NAME: docker stop within the grace period, exit code 0 (SIGTERM handled, not killed).
stop_check() {
    local name=$1 id t0 ms code
    id=$(cid "$name")
    t0=$(date +%s%N)
    docker stop -t "${grace[$name]}" "$id" >/dev/null || fail "docker stop $name failed"
    ms=$((($(date +%s%N) - t0) / 1000000))
    code=$(docker inspect -f '{{ .State.ExitCode }}' "$id")
    [ "$code" = 0 ] || fail "$name exited with $code on SIGTERM after $ms ms (grace ${grace[$name]} s)"
    ((ms < grace[$name] * 1000)) || fail "$name took $ms ms to stop (grace ${grace[$name]} s)"
    printf '| %s | %s ms | %s s |\n' "$name" "$ms" "${grace[$name]}" >>"$WORK/stops.md"
    say "ok: $name stopped on SIGTERM in $ms ms (exit 0, grace ${grace[$name]} s)"
}
printf '| service | stopped in | grace |\n|---|---|---|\n' >"$WORK/stops.md"
stop_check producer-2

# The producer stopped mid-answer finishes that answer first (producer.shutdown_grace_secs)
# and only then exits: the client sees it complete, with no restart.
session="images-test-drain-$$"
url=$(start_chat "$session" "Finish this [[mock tokens=100 delay_ms=50]]")
curl -sS -N --max-time 60 "$gw$url" >"$WORK/drain.sse" 2>"$WORK/drain.curl.log" &
sse_pid=$!
deadline=$((SECONDS + 30))
until [ "$(grep -c '"type":"token"' "$WORK/drain.sse" 2>/dev/null || true)" -ge 5 ]; do
    kill -0 "$sse_pid" 2>/dev/null || fail "the stream ended before 5 tokens: $(tail -n 3 "$WORK/drain.sse")"
    ((SECONDS < deadline)) || fail "no 5 tokens within 30 s"
    sleep 0.1
done
stop_check producer
wait "$sse_pid" || fail "the stream of the draining producer failed (curl: $(cat "$WORK/drain.curl.log"))"
events "$WORK/drain.sse" >"$WORK/drain.events"
! grep -qE ' (restart|error) ' "$WORK/drain.events" ||
    fail "the answer in flight at SIGTERM was restarted or failed: $(grep -E ' (restart|error) ' "$WORK/drain.events" | head -n 2)"
[ "$(tail -n 1 "$WORK/drain.events" | cut -d' ' -f2-)" = "complete stop" ] ||
    fail "the answer in flight at SIGTERM did not complete: $(tail -n 3 "$WORK/drain.events")"
say "ok: the producer finished the answer in flight ($(awk '$2 == "token"' "$WORK/drain.events" | wc -l) tokens) before it exited"

# The rest front to back, as a rollout or `compose down` would.
for s in gateway processor mock-llm redis; do
    stop_check "$s"
done
