# wat_nb: the two commands are `make reproduce` and `make test`; both create .venv on first use.
# TORCH is the torch build to install; override it for your CUDA, e.g. `make TORCH="torch torchvision" test`.
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: reproduce test test-fast figures export clean-nbs lab lab-check docs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev,docs]'
	touch $(STAMP)

# Run every experiment and regenerate the paper's tables and figures (mini profile) into figures/, skipping what is
# done; executed notebooks go to runs/reproduce/logs/. Driver options through ARGS, e.g.
# `make reproduce ARGS=--dry-run`, `make reproduce ARGS=--smoke`, `make reproduce ARGS="--only 'paper/table4*'"`.
# JOBS independent steps run at once (2 suits a 2-core CPU; on a single GPU use JOBS=1).
ARGS ?=
JOBS ?= 2
reproduce: $(STAMP)
	$(BIN)/python -m wat_nb.reproduce --jobs $(JOBS) $(ARGS)

# Library checks (export drift, clean notebooks, lint), every notebook under nbdev_test, pytest, the driver's smoke
# setting (what CI runs). `make test-fast`: the checks, the library notebooks and the tests not marked slow.
test: $(STAMP)
	bash .ci/test.sh

test-fast: $(STAMP)
	bash .ci/test.sh fast

figures: reproduce

# The documentation site from the notebooks into _docs/ (open _docs/index.html): the library notebooks executed
# (about 2.5 min on 2 cores), the entry and paper notebooks as committed or from runs/reproduce/logs/, an API page
# per module, the guides of docs/*.md. Fails on a missing file, image or broken link. `make docs DOCS_ARGS=--no-execute`: about 20 s.
DOCS_ARGS ?=
docs: $(STAMP)
	$(BIN)/python docs/build.py $(DOCS_ARGS)

# Developer helpers: export the library from the notebooks, strip outputs before committing, start JupyterLab at the repository root on nbs/index.ipynb.
export: $(STAMP)
	$(BIN)/nbdev_export

clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=. $(if $(filter 0,$(shell id -u)),--allow-root,) nbs/index.ipynb

# A real browser drives JupyterLab: nbs/train.ipynb edited and Run All in headless Chromium (a tiny mini-profile run
# on the CPU), PASS / FAIL per check, screenshots in .ci/out/lab/. Needs Debian's chromium (apt-get install -y
# chromium); without it the check prints SKIP and exits 3. About a minute on 2 CPU cores.
lab-check: $(STAMP)
	$(BIN)/python benchmarks/lab_check.py --out .ci/out/lab
