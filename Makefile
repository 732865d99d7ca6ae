# weir — build, demo, test, bench. One release build serves everything.
CARGO_TARGET_DIR ?= /var/tmp/weir-target
export CARGO_TARGET_DIR
CARGO ?= cargo
BIN := $(CARGO_TARGET_DIR)/release

.PHONY: all build demo test test-services ci fmt-check clippy bench floor fec-table fuzz clean deb deb-check sbom deny

all: build

build:
	$(CARGO) build --release --workspace --bins

## Run a loopback sender/receiver pair through the link simulator (~20 s).
demo: build
	$(BIN)/weir-demo

## Unit, property, simulation and end-to-end tests (no services needed).
## SKIP_SERVICE_TESTS=1 leaves the service tests (below) to `make
## test-services`, so .ci/run runs each of them once, not twice.
ifeq ($(SKIP_SERVICE_TESTS),1)
TEST_FILTER := -E 'not (binary(mqtt) | binary(modbus) | binary(opcua) | binary(postgres) | binary(http) | binary(nats) | binary(kafka) | binary(statuspage))'
endif
test: build
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --release --workspace --no-fail-fast $(TEST_FILTER); \
	else \
		$(CARGO) test --release --workspace --no-fail-fast; \
	fi

## Tests against the real brokers and databases (see .ci/run for starting them):
## mqtt.rs (Mosquitto on :1883), modbus.rs and opcua.rs (pymodbus, asyncua in /var/tmp/weir-venv),
## postgres.rs (PostgreSQL on :5432), http.rs (a server of its own), nats.rs
## (nats-server on :4222), kafka.rs (tansu on :9092), statuspage.rs (Debian's
## chromium, headless). `--workspace` resolves features as `make test` does, so
## this reuses its build instead of rebuilding crates for `-p weir-tests`. `make
## test` runs them too but skips them (saying why) when the service is
## missing; here WEIR_SERVICES=1 makes a missing service a failure.
SERVICE_TESTS := --test mqtt --test modbus --test opcua --test postgres --test http --test nats --test kafka --test statuspage
test-services: build
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		WEIR_SERVICES=1 $(CARGO) nextest run --release --workspace $(SERVICE_TESTS) --no-fail-fast; \
	else \
		WEIR_SERVICES=1 $(CARGO) test --release --workspace $(SERVICE_TESTS) --no-fail-fast; \
	fi

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

ci: fmt-check clippy test

## Issue 9's table on this machine (not a test): raw-UDP ceiling, bulk
## goodput, CPU and peak RSS per side, small-record rates, latency, a
## lagging sink; also written to /var/tmp/weir-bench/bench.json.
## Then MQTT messages/s (Mosquitto :1883), records/s into postgres, nats,
## kafka (each skipped when nothing answers on its port) and http, and
## files MB/s and files/s. BENCH_FLAGS adds e.g. "--runs 5", "--compare",
## "--only services,files" or "--skip core".
BENCH_FLAGS ?=
bench: build
	$(BIN)/weir-bench $(BENCH_FLAGS)

## What the bulk path's unavoidable work costs here (not a test): TCP in
## and out, log write + fsync + read back, UDP GSO/GRO, frame sealing,
## opening and RS parity, in CPU s/GB per side beside issue 9's budget
## (docs/performance.md, "The floor"). FLOOR_FLAGS adds e.g. "--bytes 2G".
FLOOR_FLAGS ?=
floor: build
	$(BIN)/weir-floor $(FLOOR_FLAGS)

## The FEC tolerance table of docs/wire-format.md, from the seeded
## simulation: 10,000,000 records per row, at 1 Gbit/s and at 200 Mbit/s
## (a few minutes on 2 cores). FEC_TABLE_FLAGS adds e.g. "--interleave 8".
FEC_TABLE_FLAGS ?=
fec-table: build
	$(BIN)/weir-fec-table --rate 1Gbit $(FEC_TABLE_FLAGS)
	@echo
	$(BIN)/weir-fec-table --rate 200Mbit $(FEC_TABLE_FLAGS)

## Fuzz the parsers and the decoder with cargo-fuzz (nightly), each target
## FUZZ_SECONDS long, one after the other; see docs/fuzzing.md.
FUZZ_SECONDS ?= 600
FUZZ_TARGET_DIR ?= /var/tmp/weir-fuzz-target
# decoder_frames before decoder_datagrams: its corpus, replayed with
# WEIR_FUZZ_DUMP_DATAGRAMS, seeds decoder_datagrams with valid frames.
FUZZ_TARGETS ?= frame_parse decoder_frames decoder_datagrams record_decode segment_read
# Extra libFuzzer flags, e.g. "-fork=1 -ignore_crashes=1" to keep going past a crash.
FUZZ_FLAGS ?=
# cargo-fuzz build flags: the default has overflow checks on; "-O" fuzzes
# the arithmetic as the release build ships it (wrapping).
FUZZ_BUILD ?=
fuzz:
	@command -v cargo-fuzz >/dev/null || { echo "make fuzz needs cargo-fuzz and a nightly toolchain: cargo install cargo-fuzz; rustup toolchain install nightly"; exit 1; }
	@mkdir -p $(FUZZ_TARGET_DIR)/logs; failed=""; \
	for t in $(FUZZ_TARGETS); do \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s (log: $(FUZZ_TARGET_DIR)/logs/$$t.log)"; \
		if [ $$t = decoder_datagrams ] && [ -d fuzz/corpus/decoder_frames ]; then \
			mkdir -p fuzz/corpus/decoder_datagrams; \
			( cd fuzz && WEIR_FUZZ_DUMP_DATAGRAMS=$$PWD/corpus/decoder_datagrams \
				cargo +nightly fuzz run --sanitizer none $(FUZZ_BUILD) --target-dir $(FUZZ_TARGET_DIR) decoder_frames -- -runs=0 ) \
				> $(FUZZ_TARGET_DIR)/logs/seed-decoder_datagrams.log 2>&1 || echo "seeding decoder_datagrams failed: see $(FUZZ_TARGET_DIR)/logs/seed-decoder_datagrams.log"; \
		fi; \
		( cd fuzz && cargo +nightly fuzz run --sanitizer none $(FUZZ_BUILD) --target-dir $(FUZZ_TARGET_DIR) $$t -- \
			-max_total_time=$(FUZZ_SECONDS) -timeout=10 -max_len=16384 $(FUZZ_FLAGS) ) \
			> $(FUZZ_TARGET_DIR)/logs/$$t.log 2>&1 || failed="$$failed $$t"; \
		grep -E "^#[0-9]+.*(DONE|cov:)" $(FUZZ_TARGET_DIR)/logs/$$t.log | tail -1; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes or errors in:$$failed (inputs under fuzz/artifacts/, logs in $(FUZZ_TARGET_DIR)/logs)"; exit 1; fi

## Debian packages of both sides (cargo-deb, installed under $(TOOLS) when
## missing) into $(CARGO_TARGET_DIR)/debian/; see docs/operations.md.
TOOLS ?= /var/tmp/weir-tools
export PATH := $(TOOLS)/bin:$(PATH)
deb: build
	@command -v cargo-deb >/dev/null || (unset CARGO_TARGET_DIR; $(CARGO) install --locked cargo-deb --root $(TOOLS))
	$(CARGO) deb -p weir-sender --no-build --strip
	$(CARGO) deb -p weir-receiver --no-build --strip

## Unpack each package into a scratch root (dpkg -x) and run check-config on
## its shipped example configuration (packaging/deb-check.sh).
deb-check: deb
	packaging/deb-check.sh

## CycloneDX SBOMs of both binaries (cargo-cyclonedx) into sbom/.
sbom:
	@command -v cargo-cyclonedx >/dev/null || (unset CARGO_TARGET_DIR; $(CARGO) install --locked cargo-cyclonedx --root $(TOOLS))
	$(CARGO) cyclonedx --format json --spec-version 1.5 --override-filename weir.cdx
	@mkdir -p sbom
	@for c in sender receiver; do mv $$c/weir.cdx.json sbom/weir-$$c.cdx.json; done
	@rm -f protocol/weir.cdx.json store/weir.cdx.json ops/weir.cdx.json tests/weir.cdx.json
	@ls -l sbom/

## Licences, sources, bans (and advisories when the advisory database can be
## fetched) with cargo-deny and deny.toml.
deny:
	@command -v cargo-deny >/dev/null || (unset CARGO_TARGET_DIR; $(CARGO) install --locked cargo-deny --root $(TOOLS))
	$(CARGO) deny check

clean:
	$(CARGO) clean
