# MoE Lab. The two commands are `make lab` and `make test`; every target creates .venv when it is missing.
#   make lab      install, then open JupyterLab on notebooks/ (127.0.0.1, token kept; LAB_PORT=8888)
#   make test     install, then the linter, the unit tests and nbval over every notebook (two at a time): exact on
#                 the reference platform, portable elsewhere (tests/nbval_portable.py)
#   make test-fast  the linter and the unit tests not marked slow (no ranks, no training, no notebooks): ~1 minute
#   make test-portable  every notebook again on other CPU kernels than the reference's (ATen's plain ones, which sum
#                 floats in another order, as an ARM or AVX-512 CPU does), compared portably (tests/nbval_portable.py)
#   make execute  re-run every notebook (exercises and solutions too) in place exactly as the tests run it
#   make bench    run every script in benchmarks/ (results in benchmarks/results/*.json), then update README
#   make lock     re-resolve the pins of pyproject.toml in a scratch venv and rewrite constraints.txt
#   make ui-test  browser test of notebook 02's capacity widget: JupyterLab + Galata/Playwright on Debian's chromium
#                 (needs node/npm and /usr/bin/chromium; screenshot in ui-tests/results/; see ui-tests/README.md)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Notebook outputs are compared exactly, so notebooks run with progress bars off and a fixed thread count: one
# torch thread per process, so that two pytest workers share 2 cores without OpenMP's spinning threads slowing
# each other many times over (the course's models are small: a second thread gains a notebook little).
NB_ENV := TQDM_DISABLE=1 MOELAB_THREADS=1 OMP_NUM_THREADS=1 PYTHONHASHSEED=0
# Benchmarks run alone and time with both cores.
BENCH_ENV := TQDM_DISABLE=1 MOELAB_THREADS=2 PYTHONHASHSEED=0
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=600
# Everything on two pytest workers (pytest-xdist; each file whole on one worker, so a notebook's cells run in
# order in one kernel), the chapters first: the long ones start early and the short unit tests fill the end.
XDIST  := -n 2 --dist loadfile
CHAPTERS := $(wildcard notebooks/[0-9][0-9]_*.ipynb)
# `make execute` merges each cell's printed lines into one output, as a quiet machine would have printed them.
EXECUTE := --ExecutePreprocessor.timeout=600 --ExecutePreprocessor.record_timing=False \
  --NotebookExporter.preprocessors=nbconvert.preprocessors.CoalesceStreamsPreprocessor \
  --CoalesceStreamsPreprocessor.enabled=True
LINT   := $(BIN)/ruff check src tests benchmarks tools conftest.py
ROOT   := $(if $(filter 0,$(shell id -u 2>/dev/null)),--allow-root,)
LAB_PORT ?= 8888

.PHONY: lab test test-fast test-portable lint execute bench lock ui-test

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "MoE Lab needs Python >= 3.11; run e.g. 'make PYTHON=python3.11 test'"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[lab,test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name moelab --display-name "Python (moelab)" >/dev/null
	@touch $@

lab: $(STAMP)
	$(BIN)/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks \
	  --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) $(ROOT)

lint: $(STAMP)
	$(LINT)

test: $(STAMP)
	$(LINT)
	$(NB_ENV) $(BIN)/python -m pytest $(XDIST) $(NBVAL) $(CHAPTERS) notebooks/exercises notebooks/solutions tests

test-fast: $(STAMP)
	$(LINT)
	$(NB_ENV) $(BIN)/python -m pytest -m "not slow" tests

# The reference platform runs ATen's AVX2 kernels; the plain (`default`) ones sum in another order, as an ARM laptop's
# or an AVX-512 CPU's do. Notebook 01 resumes its checkpoint in runs/, so it is removed before (to train under these
# kernels) and after (so that the next `make test` does not resume a run made under them).
PORTABLE := $(NB_ENV) MOELAB_NBVAL=portable ATEN_CPU_CAPABILITY=default
test-portable: $(STAMP)
	rm -f runs/01_dense_baseline.pt
	$(PORTABLE) $(BIN)/python -m pytest $(XDIST) $(NBVAL) $(CHAPTERS) notebooks/exercises notebooks/solutions
	rm -f runs/01_dense_baseline.pt

execute: $(STAMP)
	$(NB_ENV) $(BIN)/jupyter nbconvert --to notebook --execute --inplace $(EXECUTE) \
	  notebooks/*.ipynb notebooks/exercises/*.ipynb notebooks/solutions/*.ipynb

bench: $(STAMP)
	@for script in $(filter-out benchmarks/report.py,$(wildcard benchmarks/*.py)); do \
	  echo "== $$script"; $(BENCH_ENV) $(BIN)/python $$script || exit 1; done
	$(BIN)/python benchmarks/report.py

lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --disable-pip-version-check -e '.[lab,test]'
	{ sed -n '1,4p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/'; } \
	  > constraints.new && mv constraints.new constraints.txt && rm -rf .venv-lock

CHROMIUM   ?= /usr/bin/chromium
UI_TIMEOUT ?= 600
UI_NPM     := ui-tests/node_modules/.npm-ci-done

$(UI_NPM): ui-tests/package.json ui-tests/package-lock.json
	cd ui-tests && npm ci --no-audit --no-fund
	@touch $@

ui-test: $(STAMP)
	@command -v npm >/dev/null || { echo "make ui-test needs Node.js (>= 18) and npm: e.g. 'apt-get install -y nodejs npm'"; exit 1; }
	@test -x $(CHROMIUM) || { echo "make ui-test needs Chromium at $(CHROMIUM): 'apt-get install -y chromium' (or CHROMIUM=/path/to/chromium); no Playwright browser download is used"; exit 1; }
	@$(MAKE) --no-print-directory $(UI_NPM)
	cd ui-tests && CHROMIUM=$(CHROMIUM) VENV_BIN=$(CURDIR)/$(BIN) timeout $(UI_TIMEOUT) ./node_modules/.bin/playwright test
