PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint types pytest bench dev clean browser ops-tools postgres screenshots

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet -e examples/plugin-echo
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/kernelflow demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: $(STAMP)
	$(BIN)/mypy

# The Web UI test reads pages with Debian's chromium. Installed when possible (root with apt);
# without it that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not installed: the Web UI test will be skipped"

# The TLS and metrics tests run Debian's nginx (gRPC TLS terminator) and prometheus (scraping a
# worker). Installed when possible (root with apt); without them those tests are skipped and say why.
ops-tools:
	@{ command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } && command -v prometheus >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq nginx prometheus >/dev/null) ; } || \
	  echo "nginx/prometheus not installed: the TLS and Prometheus tests will be skipped"

# The shadow store's PostgreSQL test runs Debian's postgresql (a server in a temporary directory).
# Installed when possible (root with apt); without it that test is skipped and says why.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq postgresql >/dev/null) ; } || \
	  echo "postgresql not installed: the shadow store's PostgreSQL test will be skipped"

pytest: $(STAMP) browser ops-tools postgres
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest

test: lint types pytest

# Refreshes the console's screenshots in docs/console/ and the comparison report's in docs/ (the tests take
# them; not part of `make test`).
screenshots: $(STAMP) browser
	KERNELFLOW_SCREENSHOTS="$(CURDIR)/docs/console" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest tests/test_console.py -q
	KERNELFLOW_SCREENSHOTS="$(CURDIR)/docs" PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest tests/test_compare.py -q -k html

# Benchmarks get their own environment: the LiteLLM baseline pins an older openai SDK than the tests use.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	PATH="$(CURDIR)/$(BENCH_VENV)/bin:$$PATH" $(BENCH_VENV)/bin/python -m bench $(if $(QUICK),--quick,)

dev: $(STAMP)
	$(BIN)/kernelflow dev

clean:
	rm -rf $(VENV) $(BENCH_VENV) .state .mypy_cache .pytest_cache .ruff_cache
