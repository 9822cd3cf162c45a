# Two commands on a fresh machine: `make demo` and `make test`.
# torch is installed first and pinned: an unpinned torch makes pip pull gigabytes of CUDA packages,
# where the CPU build of torch==2.13.0 does (pyproject.toml keeps the looser torch>=2.5 for users).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test lint setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/zephyr demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) outputs data/demo
