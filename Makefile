# The README's two commands: `make run` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test bench bench-fleet chaos schema lint clean help

help:
	@echo "make run    - install into $(VENV) and start NATS + Postgres + hub (cowork up)"
	@echo "make test   - install with dev extras (and Debian's chromium) and run the whole test suite"
	@echo "make bench  - install the dev and bench extras, run the benchmarks (results in docs/performance.md)"
	@echo "make bench-fleet DESKTOPS=N GATEWAYS=M [SOAK_MINUTES=60] - the fleet benchmark (docs/scale.md)"
	@echo "make chaos  - the whole chaos suite: NATS cluster, hub replicas, faults mid-flight (~5 min)"
	@echo "make lint   - ruff (lint + format check), mypy, and the import-linter room contracts"
	@echo "make schema - regenerate docs/schemas and docs/asyncapi.json from schemas/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files: reinstall only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[local]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

# The benchmarks also need the bench extra (FastStream, measured against nats-py).
$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@ $(VENV)/.installed-dev $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/cowork up

# The console's browser tests drive Debian's chromium (never a downloaded browser);
# installed once if missing (needs root and the Debian archive).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The suite runs on TEST_WORKERS pytest-xdist workers (most tests wait on real
# servers, not the CPU), a module's tests on one worker (--dist loadfile: module
# fixtures are built once); each worker starts its own nats-server and PostgreSQL
# on ephemeral ports. TEST_WORKERS=0 runs it in one process. The session's temp
# root is its own (--basetemp): another pytest run resetting /tmp/pytest-of-<user>
# to 0700 would lock out the postgres OS user mid-test. Kept when a test failed.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-dev | $(CHROMIUM)
	@tmp=$$(mktemp -d /tmp/cowork-test-XXXXXX); \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --basetemp=$$tmp $(PYTEST_ARGS); \
	status=$$?; if [ $$status -eq 0 ]; then rm -rf $$tmp; else echo "make test: temp files in $$tmp"; fi; \
	exit $$status

# Exit 5 is pytest's "no test selected": say so rather than fail obscurely.
bench: $(VENV)/.installed-bench
	@COWORK_TEST_EVENT_LOOP=$${COWORK_TEST_EVENT_LOOP:-uvloop} $(BIN)/python -m pytest -m bench -o addopts="-p no:cacheprovider" -s $(PYTEST_ARGS); \
	status=$$?; if [ $$status -eq 5 ]; then \
	  echo "make bench: no test marked 'bench' was selected"; exit 1; fi; exit $$status

# The fleet on one hub (tests/bench/test_bench_fleet.py); ends with
# `fleet: desktops=N gateways=M hub_cpu_pct=X pg_cpu_pct=Y cmd_p99_ms=Z online=K/N`.
DESKTOPS ?= 2000
GATEWAYS ?= 200
SOAK_MINUTES ?= 0
bench-fleet: $(VENV)/.installed-bench
	COWORK_TEST_EVENT_LOOP=$${COWORK_TEST_EVENT_LOOP:-uvloop} \
	FLEET_DESKTOPS=$(DESKTOPS) FLEET_GATEWAYS=$(GATEWAYS) SOAK_MINUTES=$(SOAK_MINUTES) \
	  $(BIN)/python -m pytest -m bench -o addopts="-p no:cacheprovider" -s \
	  tests/bench/test_bench_fleet.py $(PYTEST_ARGS)

# Every fault, one after another; ends with `chaos: faults=N lost=0 ...`.
chaos: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m chaos -o addopts="-p no:cacheprovider" -s tests/chaos $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

schema: $(VENV)/.installed
	$(BIN)/cowork schema export

clean:
	rm -rf $(VENV) .cowork build *.egg-info
