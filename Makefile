# `make run` and `make test` set everything up on a fresh machine: they create .venv when it
# is missing (or when pyproject.toml changed), installing the CPU build of torch first so pip
# never pulls a multi-GB CUDA build, then the project with its dev extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
WORKDIR ?= vidops-work

.PHONY: run test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/vidops run --config tiny --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m benchmarks.curation
	$(BIN)/python -m benchmarks.encode
	$(BIN)/python -m benchmarks.training
	$(BIN)/python -m benchmarks.adherence

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(WORKDIR) .pytest_cache
