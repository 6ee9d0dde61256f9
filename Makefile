# The two front-door commands: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint bench browser

$(BIN)/eclipse-prior: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# img2dataset drags in the PyPI `dataclasses` backport, which shadows the stdlib
	# module and breaks Prefect's server (`unexpected keyword argument 'slots'`).
	$(BIN)/pip uninstall -q -y dataclasses || true
	touch $@

setup: $(BIN)/eclipse-prior

# The whole DAG on the embedded default (a synthetic world), on a CPU, no internet needed.
demo: setup
	$(BIN)/eclipse-prior demo --out runs/demo

# pytest-xdist: TEST_WORKERS processes (0: none), one group of tests at a time each, longest first (tests/conftest.py).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

test: setup
	$(BIN)/ruff check .
	$(PYTEST); rc=$$?; [ $$rc -eq 5 ] && echo "no tests collected" || exit $$rc

test-fast: setup
	$(PYTEST) -m "not slow"

# Headless Chromium for the report's browser test (tests/test_report.py), from apt: Debian or Ubuntu, as root.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium (apt-get) for the report's browser test"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  timeout 300 sh -c 'apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }'; }

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/store_io.py
	$(BIN)/python benchmarks/encode.py
	$(BIN)/python benchmarks/train.py
