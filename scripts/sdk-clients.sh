#!/usr/bin/env bash
# Installs the published client SDKs the e2e test `openai_sdk::` drives against the gateway:
# the `openai` Python package (a venv) and the `openai` and `ai` npm packages (an npm dir
# with tests/clients/package.json), under $HOME/.cache/llm-bridge/sdk-clients. Idempotent: a
# second run with nothing changed does nothing. Prints the two paths the test reads:
#   BRIDGE_SDK_PYTHON=<venv python>   BRIDGE_SDK_NODE_DIR=<dir with node_modules>
# The test fails (never skips) when they are missing, naming this script.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

root=${BRIDGE_SDK_DIR:-$HOME/.cache/llm-bridge/sdk-clients}
say() { printf 'sdk-clients: %s\n' "$*" >&2; }
mkdir -p "$root"

python=${PYTHON:-python3}
venv="$root/venv"
if ! "$venv/bin/python" -c 'import openai' >/dev/null 2>&1; then
    say "creating $venv with the openai package"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check 'openai>=1.40,<3'
fi

node_dir="$root/node"
mkdir -p "$node_dir"
if ! cmp -s tests/clients/package.json "$node_dir/package.json" \
    || [ ! -d "$node_dir/node_modules/openai" ] || [ ! -d "$node_dir/node_modules/ai" ]; then
    say "installing the npm packages of tests/clients/package.json in $node_dir"
    cp tests/clients/package.json "$node_dir/package.json"
    (cd "$node_dir" && npm install --silent --no-audit --no-fund)
fi

echo "BRIDGE_SDK_PYTHON=$venv/bin/python"
echo "BRIDGE_SDK_NODE_DIR=$node_dir"
