# One entry point for set-up, services, Airflow, tests and benchmarks. Every target does its own
# set-up, so each works on a fresh clone: `make run` and `make test` are the two to know.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)/plugins
export WILDFIRE_TEST_DATABASE_URL ?= postgresql://wildfire:wildfire@127.0.0.1:5432/wildfire
# rustup installs cargo under ~/.cargo/bin and puts it on PATH only through shell start-up files, which a
# non-interactive CI shell may not read.
export PATH := $(if $(wildcard $(HOME)/.cargo/bin),$(HOME)/.cargo/bin:,)$(PATH)

.PHONY: help venv native native-optional compose-env services services-down services-status topics db-upgrade run stop demo test test-unit lint loadtest \
        constraints clean bench bench-pipeline screenshot report cluster cluster-down cluster-status

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

# The compiled FIRMS fast path: any change to its sources rebuilds and reinstalls it (release build by
# the maturin pinned in requirements-dev.txt, hence no isolated build environment to download; its
# PEP 517 hook runs `maturin` from PATH, so the venv's bin/ goes first).
NATIVE := native/firms_fast
NATIVE_SRC := $(NATIVE)/Cargo.toml $(NATIVE)/Cargo.lock $(NATIVE)/pyproject.toml $(wildcard $(NATIVE)/src/*.rs)

# Two stamps: the Python dependencies (all that `make run` and `make demo` need) and the compiled extension
# (required by `make test`, which tests it against the polars parser; optional for run/demo, which use the
# polars parser with the same output when there is no Rust toolchain).
NATIVE_STAMP := $(VENV)/.native
NO_RUST_NOTICE := notice: no Rust toolchain (cargo), so the FIRMS fast path is not built: the polars parser is in use (same records, slower); 'make test' needs Rust

$(STAMP): requirements-airflow.txt requirements.txt requirements-dev.txt constraints.txt
	@command -v $(PYTHON_SYS) >/dev/null || { echo "need $(PYTHON_SYS) (Python 3.11)"; exit 1; }
	@[ -x $(PY) ] || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -r requirements-airflow.txt -r requirements.txt -r requirements-dev.txt
	@touch $@

$(NATIVE_STAMP): $(STAMP) $(NATIVE_SRC)
	@command -v cargo >/dev/null || { echo "need cargo (Rust) to build $(NATIVE): install rustup (https://rustup.rs, then 'rustup default stable') and put ~/.cargo/bin on PATH"; exit 1; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pip install -q --no-build-isolation --force-reinstall --no-deps ./$(NATIVE)
	@touch $@

venv: $(STAMP) $(NATIVE_STAMP)  ## create .venv, install pinned dependencies and build the FIRMS extension (Rust)

native: $(NATIVE_STAMP)  ## build the compiled FIRMS fast path (needs cargo)

# run/demo: build the extension where cargo exists, keep one built earlier, else say once that polars parses.
native-optional: $(STAMP)
	@if command -v cargo >/dev/null; then $(MAKE) --no-print-directory $(NATIVE_STAMP); \
	elif $(PY) -c "import wildfire_firms_fast" 2>/dev/null; then :; \
	else echo "$(NO_RUST_NOTICE)"; fi

compose-env:  ## write .env for docker-compose.yaml: your uid and generated secrets (kept if it exists)
	$(PYTHON_SYS) deploy/docker/compose_env.py

services: $(STAMP)  ## start Kafka (KRaft), PostgreSQL and Mosquitto on loopback; create topics
	bash scripts/services.sh up
	$(PY) -m wildfire.topics
	@if [ -n "$(CLUSTER)" ]; then [ "$(CLUSTER)" = 3 ] || { echo "CLUSTER=$(CLUSTER): only 3 is supported"; exit 1; }; \
	  $(MAKE) --no-print-directory cluster; fi

# CLUSTER=3: also the local 3-node Kafka cluster (make cluster), beside the single broker.
CLUSTER ?=
CLUSTER_BOOTSTRAP := 127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094

cluster: $(STAMP)  ## a local 3-node KRaft cluster on 127.0.0.1:19092-19094 (RF 3, min ISR 2) with the project's topics
	bash scripts/services.sh cluster-up
	WILDFIRE__KAFKA__BOOTSTRAP_SERVERS=$(CLUSTER_BOOTSTRAP) $(PY) -m wildfire.topics
	@echo "cluster up: WILDFIRE__KAFKA__BOOTSTRAP_SERVERS=$(CLUSTER_BOOTSTRAP) points the project at it"

cluster-down:  ## stop the local 3-node cluster (its data stays in .local/kafka-cluster)
	bash scripts/services.sh cluster-down

cluster-status:  ## which nodes of the local cluster answer
	bash scripts/services.sh cluster-status

services-down:  ## stop the local services
	bash scripts/services.sh down

services-status:  ## show which local services answer
	bash scripts/services.sh status

topics: $(STAMP)  ## create the Kafka topics declared in config/stream_config.yaml
	$(PY) -m wildfire.topics

db-upgrade: $(STAMP)  ## apply the storage schema migrations (storage.database_url, else the SQLite file)
	$(PY) -m wildfire.storage.migrate upgrade --url "$${WILDFIRE__STORAGE__DATABASE_URL:-postgresql://wildfire:wildfire@127.0.0.1:5432/wildfire}"

run: services native-optional db-upgrade  ## start Airflow (standalone) with the project's DAGs on http://localhost:8080
	bash scripts/airflow.sh start

stop:  ## stop Airflow, the demo replay and every process they started
	bash scripts/demo.sh stop
	bash scripts/airflow.sh stop

demo: services native-optional db-upgrade  ## the main job: an offline wildfire scenario run by the Airflow DAGs (DEMO_MINUTES=4)
	bash scripts/demo.sh run

test: services $(NATIVE_STAMP)  ## set up everything, lint, and run the whole test suite against the real services
	$(VENV)/bin/ruff check plugins dags tests
	bash scripts/ensure_chromium.sh
	$(PY) -m pytest

test-unit: $(NATIVE_STAMP)  ## only the tests that need no service
	$(PY) -m pytest tests/unit

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check plugins dags tests

loadtest: services $(NATIVE_STAMP)  ## load and fault validation (~20 min, machine to itself): docs/loadtest/ results + report, not in make test
	$(PY) tests/performance/loadtest.py --scenario all --seconds 40 --out docs/loadtest

bench: services $(NATIVE_STAMP)  ## every micro-benchmark (results in docs/results/*.json; then make report)
	$(PY) tests/performance/bench_streaming.py
	$(PY) tests/performance/bench_connectors.py
	$(PY) tests/performance/bench_publish.py --records 100000
	$(PY) tests/performance/bench_spool_layout.py
	$(PY) tests/performance/bench_storage.py
	$(PY) tests/performance/bench_scaleout.py
	$(PY) tests/performance/bench_pipeline.py --records 100000 --rounds 3
	$(PY) tests/performance/bench_worker_idle.py --seconds 20
	$(PY) tests/performance/bench_decode_steps.py
	$(PY) tests/performance/bench_critical_lane.py
	$(PY) tests/performance/bench_group_commit.py

bench-pipeline: services $(NATIVE_STAMP)  ## the limit: bare Kafka->COPY beside our whole pipeline, alternately (~2-3 min)
	$(PY) tests/performance/bench_pipeline.py --records 100000 --rounds 3

report: $(STAMP)  ## regenerate docs/benchmarks.md's table and docs/loadtest/report.md from the results files
	$(PY) tests/performance/report.py

screenshot: services  ## refresh docs/img/: ops-page.png, connections.png and trigger-form.png (captured by the browser tests)
	bash scripts/ensure_chromium.sh
	WILDFIRE_SCREENSHOT=$(CURDIR)/docs/img/ops-page.png $(PY) -m pytest tests/plugin/test_ops_page_browser.py -k live_numbers
	WILDFIRE_SCREENSHOT_DIR=$(CURDIR)/docs/img $(PY) -m pytest tests/ui/test_airflow_ui_browser.py

constraints: $(STAMP)  ## regenerate constraints.txt from the installed venv
	{ echo "# Resolved constraints for Python 3.11 (pip freeze of a clean install of requirements*.txt)."; \
	  echo "# Regenerate with: make constraints"; $(PY) -m pip freeze --exclude wildfire-firms-fast; } > constraints.txt

clean: stop services-down  ## stop everything and remove .local (all local data)
	rm -rf .local
