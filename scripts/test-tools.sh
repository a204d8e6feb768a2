#!/usr/bin/env bash
# Installs what `make test`'s later steps take from the network: the SDK clients (pip, npm;
# scripts/sdk-clients.sh), the pinned schemathesis (pip) and Chromium with ChromeDriver (apt).
# Each is skipped when already there. `scripts/test.sh` runs this beside the Rust build: the
# installs mostly wait on downloads and disks, the build wants the CPU, and one after the other
# they took minutes of `make test` on a new machine.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/sdk-clients.sh
scripts/schemathesis.sh --install-only
scripts/browser-test.sh --install-only
