# metabp: build the book, run the tests.  See README.md ("Quick start").
#
#   make book   (default) install .venv if needed, render the book to _build/html
#   make test   unit tests, nbval over every notebook, then a strict book build
#   make venv   create/refresh .venv from requirements.txt and pyproject.toml
#   make clean  remove _build

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Strict Sphinx build: warnings are errors (-W), nitpicky cross-references (-n),
# and report every warning before failing (--keep-going).
JB_FLAGS      := -W -n --keep-going
NBVAL_WORKERS ?= 2

.DEFAULT_GOAL := book
.PHONY: venv book test clean

venv: $(STAMP)

# Create the virtualenv only when its interpreter is missing (order-only below,
# so an existing .venv is never recreated).
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install whenever the requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip wheel setuptools cython
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install -e . --no-deps
	touch $@

book: venv
	$(BIN)/jupyter-book build . $(JB_FLAGS)

# Notebooks are committed executed and the book does not execute them
# (_config.yml: execute_notebooks "off"); nbval re-runs every notebook in a
# fresh kernel and compares the outputs, so the rendered outputs are proven current.
# --nbval-current-env: run the kernels on .venv's interpreter, whatever PATH says.
# --dist loadscope: each notebook stays on one worker, its cells in order.
# env -u MPLBACKEND: .ci/run exports MPLBACKEND=Agg for headless unit tests, but a
# kernel started with it keeps Agg instead of the inline backend, so figures would
# vanish from the fresh outputs and every cell that draws one would fail.
test: venv
	$(BIN)/python -m pytest tests
	env -u MPLBACKEND $(BIN)/python -m pytest --nbval notebooks --nbval-current-env \
	    --nbval-sanitize-with tests/nbval_sanitize.cfg \
	    -n $(NBVAL_WORKERS) --dist loadscope
	rm -rf _build
	$(BIN)/jupyter-book build . $(JB_FLAGS)

clean:
	rm -rf _build
