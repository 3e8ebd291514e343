# Every target documents itself: `make help`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
PORT ?= 8080
export PATH := $(HOME)/.cargo/bin:$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup tools build run test test-rust test-python test-js test-fast autobahn autobahn-tls autobahn-full bench lint clean fuzz fuzz-smoke fuzz-python

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "maturin>=1.7,<2"
	touch $(STAMP)

setup: $(STAMP) ## Create the virtualenv with the build tool

tools: setup ## Test servers built from crates.io into target/tools: s3s-fs, the S3 server of tests/media (about 80 s the first time)
	PYTHONPATH=tests $(PY) -m support.s3

build: setup tools ## Build the Rust engine into gateway._core (release) and install the package with test extras
	$(VENV)/bin/maturin develop --release --extras test -q
	cargo build --release -p gw-load -q

run: build ## Build everything and run the gateway on its embedded default (ws://localhost:8080/ws, demo at http://localhost:8080/)
	$(VENV)/bin/gateway run --dev --port $(PORT)

test: build lint test-rust fuzz-smoke test-python test-js ## Run every test: Rust unit tests, Python (unit, integration, Redis, conformance, browser), JS SDK

test-rust: ## Rust unit tests (codec, handshake, deflate, queues, hub, load client)
	cargo test -q --workspace --exclude gateway-py

test-python: ## Python tests (real servers, real sockets); needs `make build` first
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-js: ## JS SDK tests under Node against a real gateway
	tests/js/run.sh

test-fast: ## Python unit tests only
	$(PY) -m pytest -q tests/unit

autobahn: build ## Autobahn|Testsuite quick set against the engine's echo app (about 10 s)
	tools/autobahn.sh --quick

autobahn-tls: build ## The Autobahn quick set over wss:// (the engine's TLS listener, certificate verified against a test CA)
	tools/autobahn.sh --tls --quick

autobahn-full: build ## Autobahn|Testsuite cases 1-13, including performance and permessage-deflate (about 10 min)
	tools/autobahn.sh

bench: build ## Benchmarks under loadtest/bench (see loadtest/README.md)
	$(PY) loadtest/bench/run.py --quick

fuzz: build ## Fuzz the codec, handshake parser, permessage-deflate, PROXY header parser (cargo-fuzz) and the client-protocol parser (atheris), 10 min per target (fuzz/README.md)
	tools/fuzz.sh 600
	$(MAKE) fuzz-python FUZZ_SECONDS=600

fuzz-smoke: build ## Fuzz every target for 30 s and replay the bugs the fuzzers found (part of make test; first build about 1 min)
	cd fuzz && cargo test -q --release --test regressions
	tools/fuzz.sh 30
	$(MAKE) fuzz-python FUZZ_SECONDS=30

FUZZ_SECONDS ?= 600
fuzz-python: ## Fuzz the client-protocol parser with atheris for FUZZ_SECONDS (new inputs go to a temp dir; the committed corpus is read only)
	mkdir -p fuzz/artifacts/python_parse && set -o pipefail; work=$$(mktemp -d) && trap 'rm -rf "$$work"' EXIT && \
	PYTHONPATH=python $(PY) fuzz/python/parse_fuzz.py "$$work" fuzz/corpus/python_parse -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 -artifact_prefix=fuzz/artifacts/python_parse/ 2>&1 | tail -12

lint: build ## clippy, rustfmt, ruff, mypy --strict on python/gateway, stubtest of gateway._core against _core.pyi
	cargo clippy --workspace --exclude gateway-py -q -- -D warnings
	cargo fmt --check
	$(VENV)/bin/ruff check python/gateway
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m mypy.stubtest gateway._core --allowlist python/gateway/_core.stubtest-allowlist

clean: ## Remove build artefacts and the virtualenv
	cargo clean
	rm -rf $(VENV) .pytest_cache
