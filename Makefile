# Two commands do all set-up: `make demo` and `make test` (both create .venv when needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.imgfeat-installed
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
export TF_CPP_MIN_LOG_LEVEL := 2
# Always test and run this checkout's code (also in git worktrees sharing one .venv).
export PYTHONPATH := $(abspath lib)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: setup demo test test-unit test-integration lint bench dist clean

setup: $(STAMP)

$(STAMP): requirements.lock setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(PY) -m imgfeat.demo

test: setup
	$(PY) -m ruff check lib jobs tests bench notebooks
	$(PY) -m pytest -q -m "not integration" tests

test-integration: setup
	$(PY) -m pytest -q -m integration tests

bench: setup
	bash bench/run_benchmarks.sh

lint: setup
	$(PY) -m ruff check lib jobs tests bench notebooks

clean:
	rm -rf build dist *.egg-info lib/*.egg-info .pytest_cache
