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

.PHONY: setup browser demo test test-unit test-integration lint bench dist clean

# The local JVM's class-data archive (imgfeat.jvm_archive): built once per Java and pyspark (~50 s), then a no-op.
setup: $(STAMP)
	@$(PY) -m imgfeat.jvm_archive || echo "make setup: no JVM class archive (sessions start without it)"

# The lock is a complete closure (pip freeze), installed without the resolver: it would stop at the one known
# conflict between petastorm (setuptools<70) and torch's metadata (setuptools>=77), which torch needs only to
# build C++ extensions. torch is pinned to the +cpu build (a local wheel here): never the CUDA packages.
$(STAMP): requirements.lock setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Debian's chromium for the serving page's browser test (Playwright drives it; it never downloads a browser).
# Best effort: needs root and Debian's package mirror; without it that one test is skipped (CI requires it).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
	  || echo "make browser: could not install chromium (not root, or no apt): the browser test will be skipped"; }

demo: setup
	$(PY) -m imgfeat.demo

test: setup browser
	$(PY) -m ruff check lib jobs tests bench notebooks
	$(PY) -m pytest -q -m "not integration" tests

test-integration: setup
	$(PY) -m pytest -q -m integration tests

bench: setup
	bash bench/run_benchmarks.sh

lint: setup
	$(PY) -m ruff check lib jobs tests bench notebooks

# `make dist`: dist/imgfeat-<version>-py3-none-any.whl and dist/imgfeat-env.tar.gz, a packed virtual
# environment: exactly the pins of requirements.lock (a complete closure, hence --no-deps) minus pyspark and
# py4j, which the cluster's Spark puts on the workers' path, plus the wheel
# for `spark-submit --archives dist/imgfeat-env.tar.gz#environment`. venv-pack does not copy Python itself:
# the nodes need the same Python version at the same prefix, or pass DIST_PYTHON_PREFIX=/usr (say) to link
# ./environment/bin/python to <prefix>/bin/python3.X there. Does not touch .venv.
DIST_ENV ?= build/dist-env
DIST_PYTHON ?= $(shell $(PY) -c "import sys; print(sys._base_executable)")
DIST_PYTHON_PREFIX ?=
dist:
	test -x $(PY) || $(MAKE) setup
	rm -rf build/lib build/bdist.* dist/imgfeat-*.whl
	$(PY) -m build --wheel --no-isolation --outdir dist .
	rm -rf $(DIST_ENV)
	$(DIST_PYTHON) -m venv $(DIST_ENV)
	grep -vE '^(pyspark|py4j)==' requirements.lock > build/dist-requirements.txt
	$(DIST_ENV)/bin/python -I -m pip install -q --no-deps -r build/dist-requirements.txt
	$(DIST_ENV)/bin/python -I -m pip install -q --no-deps dist/imgfeat-*.whl
	$(DIST_ENV)/bin/python -I -c "import imgfeat, tensorflow, PIL, pyarrow; print('dist env ok:', imgfeat.__file__)"
	$(PY) -m venv_pack --prefix $(DIST_ENV) --output dist/imgfeat-env.tar.gz --force --quiet \
		$(if $(DIST_PYTHON_PREFIX),--python-prefix $(DIST_PYTHON_PREFIX))
	ls -lh dist

clean:
	rm -rf build dist *.egg-info lib/*.egg-info .pytest_cache
