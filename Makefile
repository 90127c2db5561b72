# The commands a newcomer needs: `make demo` (see the system work), `make test` (pass the tests) and, with
# Docker, `make deploy-test` (the compose stack built and run for real).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test deploy-test lint venv services artifacts eval bench mutation clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned first: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

services:
	@bash scripts/ensure-services.sh

## Run the test suite against real Postgres and Redis (started or installed when needed).
test: $(STAMP) services
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Build the image and run the compose stack for real: rollout, every item searchable, Prometheus, dashboard.
## Needs Docker (or ../shared/tools/sandbox-docker); see the README's "Run the full stack".
deploy-test: $(STAMP)
	bash scripts/deploy-test.sh

## Lint and type-check.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

## The live demo on embedded defaults (SQLite + embedded Redis): load, upgrade, measure through /search.
demo: $(STAMP)
	@bash scripts/ensure-dataset.sh
	$(BIN)/backfill demo

## Retrain the shipped v1, v2 and their compatibility pack (<= 15 min on 2 cores).
artifacts: $(STAMP)
	@bash scripts/ensure-dataset.sh
	$(BIN)/backfill train all --out artifacts

## Offline backfill curves for the shipped pair.
eval: $(STAMP)
	@bash scripts/ensure-dataset.sh
	$(BIN)/backfill eval curve --out runs/eval

## Benchmarks (ratios measured side by side in one run).
bench: $(STAMP)
	$(BIN)/backfill bench

## Mutation testing of the modules that guard the invariants (mutmut; CPU-heavy, not run by CI).
mutation: $(STAMP) services
	$(BIN)/python scripts/mutation.py --fresh

clean:
	rm -rf runs data .pytest_cache .mypy_cache .ruff_cache
