#!/usr/bin/env bash
# Installs the published client SDKs the e2e tests `openai_sdk::` and `aisdk::` drive against
# the gateway: the `openai` Python package (a venv) and the `openai` and `ai` npm packages (an
# npm dir with tests/clients/package.json), under $HOME/.cache/llm-bridge/sdk-clients. Also
# installs (npm ci, pinned by tests/clients/usechat/package-lock.json) and bundles with esbuild
# the React app of tests/clients/usechat, the README's `useChat` snippet, which the browser
# test `browser::the_usechat_app_...` serves. Idempotent: a second run with nothing changed
# does nothing (the bundle is rebuilt only when its sources change). Prints the paths the
# tests read:
#   BRIDGE_SDK_PYTHON=<venv python>   BRIDGE_SDK_NODE_DIR=<dir with node_modules>
#   BRIDGE_USECHAT_DIR=<the built app: index.html, app.js>
# The tests fail (never skip) when they are missing, naming this script.
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

# The useChat app: dependencies once per lockfile change, the bundle once per source change.
app_src=tests/clients/usechat
app_dir="$root/usechat"
mkdir -p "$app_dir"
if ! cmp -s "$app_src/package-lock.json" "$app_dir/package-lock.json" \
    || [ ! -d "$app_dir/node_modules/@ai-sdk/react" ]; then
    say "installing the npm packages of $app_src/package-lock.json in $app_dir"
    cp "$app_src/package.json" "$app_src/package-lock.json" "$app_dir/"
    (cd "$app_dir" && npm ci --silent --no-audit --no-fund)
fi
app_hash=$(cat "$app_src/package-lock.json" "$app_src/index.html" "$app_src"/src/* | sha256sum | cut -d' ' -f1)
if [ "$(cat "$app_dir/dist/.source-hash" 2>/dev/null || true)" != "$app_hash" ]; then
    say "bundling $app_src into $app_dir/dist"
    rm -rf "$app_dir/src" "$app_dir/dist"
    cp -r "$app_src/src" "$app_dir/src"
    mkdir -p "$app_dir/dist"
    cp "$app_src/index.html" "$app_dir/dist/index.html"
    (cd "$app_dir" && npm run --silent build)
    echo "$app_hash" >"$app_dir/dist/.source-hash"
fi

echo "BRIDGE_SDK_PYTHON=$venv/bin/python"
echo "BRIDGE_SDK_NODE_DIR=$node_dir"
echo "BRIDGE_USECHAT_DIR=$app_dir/dist"
