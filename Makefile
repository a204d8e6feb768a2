# Entry points for developers and CI. Kept thin: each target is a cargo call or a script in
# scripts/ (STYLE.md, "Keep the Makefile thin"). `make` alone lists the targets.

# Build outside the clone so fresh CI clones and worktrees reuse one build cache.
CARGO_TARGET_DIR ?= $(HOME)/.cache/llm-bridge/target
export CARGO_TARGET_DIR

.DEFAULT_GOAL := help
.PHONY: help run test lint fmt build bench bench-quick bench-peers bench-memory bench-capacity bench-instructions clean-logs k8s-validate images-test

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z0-9-]*:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

run: ## Start Redis (if needed), mock-llm, producer, processor and gateway; Ctrl-C stops all
	@scripts/run.sh

test: ## Everything CI checks: fmt, clippy, build, all test suites
	@scripts/test.sh

lint: ## rustfmt check and clippy with warnings denied
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt: ## Format the workspace
	cargo fmt --all

build: ## Build the four binaries (into $CARGO_TARGET_DIR/debug)
	cargo build --workspace --bins

k8s-validate: ## Offline checks of deploy/ and k8s/ (hadolint, kustomize, schemas, config test)
	@scripts/validate-deploy.sh
	cargo test -p service-kit --test k8s_config

images-test: ## Build the images, run the compose stack in Docker and check it (root; CI)
	@scripts/images-test.sh

bench: ## Full benchmark (~20 min): report, JSON and plots in bench/results/bench.*
	@scripts/bench.sh

bench-quick: ## Short benchmark (< 2 min once built): bench/results/quick/quick.md
	@scripts/bench.sh --quick

bench-peers: ## Full benchmark with a LiteLLM proxy side by side: bench/results/peers.*
	@scripts/bench.sh --peers

bench-memory: ## 30-min soak, 200 streams: RSS of each service and Redis memory flat after warm-up (fails over the margin): bench/results/soak.md
	@scripts/bench.sh --soak

bench-capacity: ## Measured figures of docs/capacity.md (~2 min once built): bench/results/capacity.md
	@scripts/bench.sh --capacity

bench-instructions: ## Instructions per delivered token of one service under callgrind, a count that repeats on a noisy VM (SERVICE=gateway LOAD=20x20 WINDOW=20)
	@scripts/callgrind.sh $(or $(SERVICE),gateway) $(or $(LOAD),20x20) $(or $(WINDOW),20)

clean-logs: ## Remove logs of `make run` and of test-spawned processes
	rm -rf .run/logs "$(CARGO_TARGET_DIR)/test-logs"
