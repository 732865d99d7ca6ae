# weir — build, demo, test, bench. One release build serves everything.
CARGO_TARGET_DIR ?= /var/tmp/weir-target
export CARGO_TARGET_DIR
CARGO ?= cargo
BIN := $(CARGO_TARGET_DIR)/release

.PHONY: all build demo test test-services ci fmt-check clippy bench clean

all: build

build:
	$(CARGO) build --release --workspace --bins

## Run a loopback sender/receiver pair through the link simulator (~20 s).
demo: build
	$(BIN)/weir-demo

## Unit, property, simulation and end-to-end tests (no services needed).
test: build
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --release --workspace --no-fail-fast; \
	else \
		$(CARGO) test --release --workspace --no-fail-fast; \
	fi

## Tests against the real brokers and databases (see .ci/run for starting them).
test-services: build
	@echo "service-backed suite: no sink or source uses a broker yet (file, stdout and tcp only); nothing to run"

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

ci: fmt-check clippy test

## Throughput against a raw UDP ceiling on this machine (not a test).
bench: build
	$(BIN)/weir-bench

clean:
	$(CARGO) clean
