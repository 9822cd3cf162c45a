# Two commands on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned: an unpinned torch makes pip pull gigabytes of CUDA packages,
# where the CPU build of torch==2.13.0 does (pyproject.toml keeps the looser torch>=2.5 for users).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test lint setup browser clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/zephyr demo

test: setup browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The web chat page's test drives Debian's Chromium. Installing it needs root and the Debian mirror; when either
# is missing the install is skipped here and that one test skips, saying why.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1) \
		|| echo "chromium not installed: the browser test will skip"; }

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) outputs data/demo
