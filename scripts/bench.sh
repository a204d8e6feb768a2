#!/usr/bin/env bash
# Benchmarks for `make bench` / `make bench-quick`: not written yet, so this fails honestly
# instead of printing numbers nobody measured.
set -euo pipefail

echo "benchmarks are not implemented yet (issue: Benchmarks)" >&2
exit 1
