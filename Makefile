# diffcore: build the book, run the tests, open the notebooks.
#
#   make book    build the book, executing every notebook, into _build/html
#   make test    ruff, then one pytest run: unit tests, notebooks (nbval), book build, browser
#   make notebooks  re-execute every notebook in place (quick mode), to commit its outputs
#   make lab     open JupyterLab on notebooks/ (JupyterLab is pinned in requirements.txt)
#   make clean   remove build outputs and caches (keeps .venv)
#
# book, test and lab first bring .venv up to date with requirements.txt and pyproject.toml;
# that step does nothing when neither file has changed since the last install.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffcore-installed

NPM_PREFIX := .cache/npm
MATHJAX_VERSION := 3.2.2
MATHJAX := $(NPM_PREFIX)/node_modules/mathjax/es5/tex-mml-chtml.js

# JupyterLab refuses to run as root without --allow-root (containers often run as root).
LAB_ARGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

# A notebook cell that runs past 600 s (the book's limit too; the slowest takes under a
# minute) fails the run instead of holding it until the CI limit.
PYTEST_ARGS := tests notebooks --nbval-lax --nbval-current-env \
	--nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout 600 -n 2 --dist loadfile

.PHONY: help venv book test notebooks lab mathjax clean distclean

help:
	@echo "make book    build the book, executing every notebook, into _build/html"
	@echo "make test    lint and run all tests (unit, notebooks, book build, browser)"
	@echo "make notebooks  re-execute every notebook in place (quick mode) before committing"
	@echo "make lab     open JupyterLab on notebooks/"
	@echo "make clean   remove build outputs and caches (make distclean also removes .venv)"

venv: $(STAMP)

# requirements.txt pins packages (numpy, scipy, diffusers, ...) that need Python 3.11 or newer.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -c 'import sys; v = sys.version.split()[0]; sys.exit(None \
	if sys.version_info >= (3, 11) else f"requirements.txt needs Python 3.11 or newer, \
	but $(PYTHON) is Python {v}: run make with PYTHON=python3.11 (or newer)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

# The quick-mode models are small: one thread per kernel is the fastest on a CPU, and
# spares the cores a busy machine shares (export OMP_NUM_THREADS to choose otherwise).
book: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/jupyter-book build . --all -W -n --keep-going

# A local MathJax for the browser test (tests/test_book.py), which serves it in place of
# the CDN. Without npm the browser test skips, unless DIFFCORE_REQUIRE_BROWSER=1.
mathjax:
	@if [ -f $(MATHJAX) ]; then \
		true; \
	elif command -v npm >/dev/null 2>&1; then \
		echo "npm install mathjax@$(MATHJAX_VERSION) into $(NPM_PREFIX)"; \
		npm install --prefix $(NPM_PREFIX) --no-save --no-audit --no-fund --loglevel=error \
			mathjax@$(MATHJAX_VERSION); \
	else \
		echo "npm not found: the browser test will be skipped (install Node.js and npm)"; \
	fi

# pytest exits with 5 when it collects no test: that is not a failure here.
test: $(STAMP) mathjax
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@rc=0; OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; \
	exit $$rc

# Notebooks are committed executed in quick mode, top to bottom, with their outputs.
notebooks: $(STAMP)
	@for nb in notebooks/[0-9]*.ipynb; do \
		echo "executing $$nb"; \
		DIFFCORE_FULL=0 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -c 'import sys, nbformat, nbclient; nb = nbformat.read(sys.argv[1], 4); nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": "notebooks"}}).execute(); nbformat.write(nb, sys.argv[1])' "$$nb" || exit 1; \
	done

lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks/

clean:
	rm -rf _build .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -type d \
		\( -name __pycache__ -o -name .ipynb_checkpoints \) -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .cache node_modules
