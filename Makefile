# The two commands of the README:
#   make up    install (first time) and run the whole pipeline on this machine
#   make test  install (first time) and run lint, type checks and the tests
# Both create or reuse .venv; nothing needs root, Docker or a GPU.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install up test lint docs docs-check demo-weights clean-data

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11+ needed"' \
	  || { echo "error: $(PYTHON) is older than 3.11; run e.g. make PYTHON=python3.11"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) \
	  || { echo "error: cannot create a virtual environment: install python3-venv"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to 2.13.0 in pyproject.toml: the CPU build on machines that carry it.
	$(BIN)/python -m pip install --quiet -e '.[dev,docs]'
	@touch $@

install: $(STAMP)

demo-weights: $(STAMP)
	$(BIN)/dicom-pipeline models build-demo

up: demo-weights
	$(BIN)/dicom-pipeline up

# import-linter: the stages import only the stages below them, frameworks stay at the edges
# (the contracts are in pyproject.toml; docs/development/architecture.md lists them).
lint: $(STAMP)
	$(BIN)/ruff check pipeline tests
	$(BIN)/ruff format --check pipeline tests
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The docs site (docs/, mkdocs.yml): the generated reference pages must be current, and the
# strict build fails on a broken link or anchor. `make docs` serves it on http://127.0.0.1:8000.
docs-check: $(STAMP)
	$(BIN)/python -m tests.reference --check
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# pytest exits 5 when it collected no test: make treats that as the failure it is.
# The demo weights are trained first (once; minutes on a small CPU machine), so their training
# does not count against the tests' per-test timeout.
test: lint docs-check demo-weights
	$(BIN)/python -m pytest

clean-data:
	rm -rf data
