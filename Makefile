# scopegate: every task is one command. `make demo` and `make test` set everything up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps demo serve cluster test test-fast check lint types model bench load soak clean

setup: $(STAMP) .tools/bin/openfga

# The client distribution (client/) is a dependency of the server: both from this checkout.
$(STAMP): pyproject.toml client/pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ./client -e '.[dev]'
	touch $(STAMP)

.tools/bin/openfga: scripts/install-openfga
	scripts/install-openfga

# Debian packages only the test suite needs (PostgreSQL, Chromium, e2fsprogs): installed
# when missing (as root), a no-op when present, a clear failure otherwise.
system-deps:
	scripts/install-system-deps

demo: setup
	$(VENV)/bin/scopegate demo --data-dir .scopegate-demo

serve: setup
	$(VENV)/bin/scopegate serve --data-dir .scopegate

# The scaled-out shape on this machine (docs/deployment.md): PostgreSQL, two OpenFGA
# processes, Chroma, three gateway replicas and HAProxy, on loopback ports, state in
# .scopegate-cluster. `scripts/cluster status` shows each part, `scripts/cluster down` stops it.
cluster: setup system-deps
	scripts/cluster up

# Two pytest workers (the tests wait on servers as much as they compute); a test file
# runs whole on one worker, with its own OpenFGA and PostgreSQL.
test: setup system-deps
	$(VENV)/bin/fga model test --tests 'fga_models/scopegate/*.fga.yaml'
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

check: setup lint types

lint:
	$(VENV)/bin/ruff check gateway connectors client tests bench scripts
	$(VENV)/bin/ruff format --check gateway connectors client

types:
	$(VENV)/bin/mypy gateway connectors client/src

model: setup
	$(VENV)/bin/fga model transform --file fga_models/scopegate/model.fga > fga_models/scopegate/model.json

bench: setup
	$(PY) bench/retrieval.py
	$(PY) bench/staleness.py

# Two minutes of 32 concurrent agents by default: make load LOAD_ARGS="--duration 600".
# Up to 5% may fail closed (an audited 503) when the machine cannot keep every request
# inside the 10 s request deadline; --max-shed 0 makes any of those fail the run.
LOAD_ARGS ?= --duration 120 --concurrency 32 --max-shed 0.05
load: setup
	$(PY) bench/load.py $(LOAD_ARGS)

# Only the long tests: the leak oracle's many worlds, the schema fuzzing soak and minutes
# of load (SCOPEGATE_ORACLE_SOAK_WORLDS sets the number of worlds, 300 by default).
soak: setup
	$(PY) -m pytest -q --soak -m soak

clean:
	rm -rf .scopegate .scopegate-demo
