# metabp: build the book, run the tests.  See README.md ("Quick start").
#
#   make book   (default) install .venv if needed, render the book to _build/html
#   make lint   ruff check, ruff format --check and mypy (seconds; CI runs it first)
#   make test   unit tests, nbval over every notebook, then a strict book build
#               and the site test in a real browser (tests_browser)
#   make test-kernels  the unit tests and the cheapest chapters again on another kernel path
#   make venv   create/refresh .venv from requirements.txt and pyproject.toml
#   make notebooks  re-execute the chapters in place (NB=path for one)
#   make clean  remove _build

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Strict Sphinx build: warnings are errors (-W), nitpicky cross-references (-n),
# and report every warning before failing (--keep-going).
JB_FLAGS      := -W -n --keep-going
NBVAL_WORKERS ?= 2

# Launch buttons (book/_ext/book_links.py): the repository's address, from git
# unless given (BOOK_REPOSITORY_URL= for none); a GitHub address gives each chapter
# Binder, repository and issues buttons. Exported to the builds and the site test.
export BOOK_REPOSITORY_URL ?= $(shell git remote get-url origin 2>/dev/null)
export BOOK_REPOSITORY_BRANCH ?= main

.DEFAULT_GOAL := book
.PHONY: venv book lint test test-kernels notebooks clean

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

# Lint (src, tests, benchmarks, the chapters' code cells), the format, and the types
# of src/metabp; settings in pyproject.toml. .pre-commit-config.yaml runs the same.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Notebooks are committed executed and the book does not execute them
# (_config.yml: execute_notebooks "off"); nbval re-runs every notebook in a
# fresh kernel and compares the outputs, so the rendered outputs are proven current.
# --nbval-current-env: run the kernels on .venv's interpreter, whatever PATH says.
# --dist loadscope: each notebook stays on one worker, its cells in order.
# env -u MPLBACKEND: .ci/run exports MPLBACKEND=Agg for headless unit tests, but a
# kernel started with it keeps Agg instead of the inline backend, so figures would
# vanish from the fresh outputs and every cell that draws one would fail.
# OMP_NUM_THREADS=1: NBVAL_WORKERS kernels share the cores, one thread each. Two
# kernels with two threads each on two cores oversubscribe them, which slows
# small torch operations many times over; and the stored outputs are made with
# the same setting (`make notebooks`), so floating-point reductions match.
NB_ENV := env -u MPLBACKEND OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

test: venv
	$(BIN)/python -m pytest tests
	$(NB_ENV) $(BIN)/python -m pytest --nbval notebooks --nbval-current-env \
	    --nbval-sanitize-with tests/nbval_sanitize.cfg \
	    -n $(NBVAL_WORKERS) --dist loadscope
	rm -rf _build
	$(BIN)/jupyter-book build . $(JB_FLAGS)
	$(BIN)/python -m pytest tests_browser

# The same proof on a second kernel path: ATEN_CPU_CAPABILITY=default makes PyTorch
# use its portable, non-SIMD CPU kernels instead of the AVX2/AVX-512 ones it picks
# on this machine, so floating-point results differ in their last digits as they do
# on another CPU. The unit tests (which check numbers with tolerances) and the
# cheapest chapters must pass there too (CONTRIBUTING.md, "Outputs and tolerances").
# `.ci/run` runs it after `make test`.
KERNEL_ENV      := ATEN_CPU_CAPABILITY=default
KERNEL_CHAPTERS ?= notebooks/01_background.ipynb notebooks/02_core_concepts.ipynb
# The unit tests that check numbers (meta-gradients against closed forms, finite
# differences and the other libraries; training runs and their resumption); the
# packaging, command-line, browser and distributed tests do not depend on kernels.
KERNEL_TESTS    ?= tests/test_bilevel.py tests/test_core.py tests/test_closed_form.py tests/test_variants.py \
                   tests/test_faces.py tests/test_l2l_and_listing.py tests/test_tasks_training.py \
                   tests/test_training_loop.py tests/test_metarl.py tests/test_episodes.py

test-kernels: venv
	$(KERNEL_ENV) $(BIN)/python -m pytest $(KERNEL_TESTS)
	$(KERNEL_ENV) $(NB_ENV) $(BIN)/python -m pytest --nbval $(KERNEL_CHAPTERS) --nbval-current-env \
	    --nbval-sanitize-with tests/nbval_sanitize.cfg \
	    -n $(NBVAL_WORKERS) --dist loadscope

# Re-execute chapters in place, as `make test` will check them: NB=notebooks/03_algorithm.ipynb
# for one, all of them by default.
NB ?= notebooks/*.ipynb
notebooks: venv
	for nb in $(NB); do \
	    $(NB_ENV) $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
	        --ExecutePreprocessor.timeout=1200 --ExecutePreprocessor.record_timing=False $$nb || exit 1; \
	done

clean:
	rm -rf _build
