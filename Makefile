# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test test-scenarios test-large repro lint clean

install: $(STAMP)

# pip (not uv/poetry) so torch==2.14.1 and torchvision==0.29.1 come from the machine's wheel store.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,dask]'
	touch $(STAMP)

run: install  ## the whole Prefect flow on the offline default data set
	$(BIN)/shrinkflow run

# Two workers; a test file stays on one worker, so its module fixtures are built once.
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadfile --durations=15

test: install  ## the suite without the long scenarios (under 10 minutes on 2 cores)
	$(PYTEST) -m "not scenario"

test-scenarios: install  ## the long end-to-end scenarios (DVC, real servers, runners, the torchvision zoo)
	$(PYTEST) -m "scenario and not large"

test-large: install  ## the full-size torchvision networks (ViT-B/16, ConvNeXt-T, Swin) and the benchmark's smoke run
	$(PYTEST) -m large

repro: install  ## the same pipeline stage by stage through DVC
	$(BIN)/dvc repro

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

clean:  ## remove pipeline outputs and local tracking state (not the venv)
	rm -rf data/prepared artifacts reports/candidates.csv mlflow.db mlartifacts .prefect runs
