# The two commands of the README: `make run` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test unit lint bench clean

# torch's CUDA build and its nvidia wheels are ~3 GB downloaded and ~4.6 GB installed (the venv: ~6 GB). pip unpacks
# into TMPDIR, which on some machines is a small tmpfs, and keeps every wheel a command downloads until that command
# ends: keep its temporary files on the venv's disk, cache nothing, and install torch (pinned in setup.py) by itself
# first, so that its downloads are gone before the rest come.
PIP_TMP := $(VENV)/.pip-tmp
PIP := TMPDIR=$(abspath $(PIP_TMP)) $(PY) -m pip install --quiet --no-cache-dir
TORCH := $(shell sed -n 's/^TORCH = "\(.*\)"$$/\1/p' setup.py)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(PIP_TMP)
	$(PIP) --upgrade pip
	$(PIP) '$(TORCH)'
	$(PIP) -e '.[dev]'
	rm -rf $(PIP_TMP)
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
