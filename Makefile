# dicom-gateway: the same targets locally and in CI.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Debian packages the tests talk to (real peers, not mocks).
DEB_PACKAGES := dcmtk mosquitto prometheus systemd
# The benchmarks' peers: the tests' packages and Orthanc (not needed by `make test`).
BENCH_DEB_PACKAGES := $(DEB_PACKAGES) orthanc
STAMP := $(VENV)/.installed
LINT_PATHS := gateway simulators tests $(wildcard bench)

.PHONY: venv debs bench-debs test test-quick lint typecheck format demo bench bench-quick chaos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

# Installs the Debian packages the tests need, only when one is missing (needs root).
# python3-venv too, where the interpreter cannot make a venv (Debian splits it out).
debs:
	@missing=""; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="python3-venv"; \
	for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: debs venv
	$(BIN)/pytest -q

# The long chaos suites (~7-9 min on 2 cores; `make test` runs their short versions): kill -9 loop,
# power-loss model, PACS outage backlog, slow and stalled PACS, MQTT/UPS outages, full spool. Each prints
# its summary; CHAOS_RESULTS=FILE appends one JSON line per suite; CHAOS_SEED=N replays a run.
chaos: debs venv
	CHAOS_LONG=1 $(BIN)/pytest -q -s tests/test_chaos.py -p no:cacheprovider --timeout=1500
	CHAOS_LONG=1 $(BIN)/pytest -q -s tests/test_hostile.py -k "fuzzed or over_the_wire" -p no:cacheprovider --timeout=1500

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

format: venv
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

typecheck: venv
	$(BIN)/mypy --strict gateway simulators

demo: venv
	$(BIN)/python -m simulators.demo

# As `debs`, for the benchmarks' packages. While installing, a policy-rc.d that answers 101 keeps
# a package's own service (Debian starts orthanc on 4242/8042) from starting and skewing the numbers;
# the benchmark runs its own Orthanc.
bench-debs:
	@missing=""; \
	for p in $(BENCH_DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  policy=/usr/sbin/policy-rc.d; own_policy=; \
	  if [ ! -e $$policy ]; then printf '#!/bin/sh\nexit 101\n' > $$policy; chmod 755 $$policy; own_policy=1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  status=$$?; [ -z "$$own_policy" ] || rm -f $$policy; exit $$status; \
	fi

# The full benchmark (~8-12 min on 2 cores): `bench/RESULTS.md` holds a run and how to read it.
bench: bench-debs venv
	$(BIN)/python -m bench.run

# A smaller run (~1.5 min) that checks every part works; its numbers are noisier.
bench-quick: bench-debs venv
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
