# The two commands of the README: `make run` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test unit lint bench clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	$(PY) -m deploy.jars

run: setup
	$(PY) -m deploy.demo

test: setup
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest -m "not integration"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --strict --ignore-missing-imports model flink_job/stages flink_job/schema.py
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m benchmarks.throughput --events 1000000

clean:
	rm -rf .run
