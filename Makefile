# scopegate: every task is one command. `make demo` and `make test` set everything up.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo serve test test-fast check lint types model bench load soak clean

setup: $(STAMP) .tools/bin/openfga

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

.tools/bin/openfga: scripts/install-openfga
	scripts/install-openfga

demo: setup
	$(VENV)/bin/scopegate demo --data-dir .scopegate-demo

serve: setup
	$(VENV)/bin/scopegate serve --data-dir .scopegate

test: setup
	$(VENV)/bin/fga model test --tests 'fga_models/scopegate/*.fga.yaml'
	$(PY) -m pytest -q

check: setup lint types

lint:
	$(VENV)/bin/ruff check gateway connectors tests bench scripts
	$(VENV)/bin/ruff format --check gateway connectors

types:
	$(VENV)/bin/mypy gateway connectors

model: setup
	$(VENV)/bin/fga model transform --file fga_models/scopegate/model.fga > fga_models/scopegate/model.json

bench: setup
	$(PY) bench/retrieval.py
	$(PY) bench/staleness.py

load: setup
	$(PY) bench/load.py

soak: setup
	$(PY) -m pytest -q --soak

clean:
	rm -rf .scopegate .scopegate-demo
