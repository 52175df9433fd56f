# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test repro lint clean

install: $(STAMP)

# pip (not uv/poetry) so torch==2.14.1 and torchvision==0.29.1 come from the machine's wheel store.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install  ## the whole Prefect flow on the offline default data set
	$(BIN)/shrinkflow run

test: install  ## the whole test suite, two workers (a test file stays on one worker)
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=15

repro: install  ## the same pipeline stage by stage through DVC
	$(BIN)/dvc repro

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

clean:  ## remove pipeline outputs and local tracking state (not the venv)
	rm -rf data/prepared artifacts reports/candidates.csv mlflow.db mlartifacts .prefect runs
