# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 3000
DEV_KEY := $(or $(FLOOD_HOME),.flood)/dev-api-key

.PHONY: run train build key serve mlflow-ui test lint clean bench bench-smoke soak stack stack-down test-containers

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: set up, train on real data (synthetic if none), register, build its Bento, promote, serve it
run: train key serve

## train: a new version with its Bento built before it becomes champion. Development only:
## it promotes a synthetic or validation-failed winner too (the report says FAILED and why);
## production (FLOOD_ENV=production) refuses both whatever the flags.
train: $(STAMP)
	$(BIN)/flood train --register --bento --promote --allow-synthetic --allow-failed

build: $(STAMP)
	$(BIN)/flood bento build

## key: a development API key (tier pro), created once, readable only by you
key: $(DEV_KEY)

$(DEV_KEY): | $(STAMP)
	$(BIN)/flood db upgrade
	umask 077 && $(BIN)/flood keys create --name local --tier pro | tail -n 1 > $@.tmp && mv $@.tmp $@
	@echo 'API key in $@: curl ... -H "X-API-Key: $$(cat $@)"'

serve: $(STAMP)
	$(BIN)/flood serve --host $(HOST) --port $(PORT)

## mlflow-ui: MLflow's UI on the project's store (runs, candidates, figures, versions) at :5000
mlflow-ui: $(STAMP)
	$(BIN)/flood mlflow ui

## test: lint, type-check and run every test (services they need must be up: see .ci/run)
test: $(STAMP) lint
	$(BIN)/pytest

## test-containers: only the image, compose stack and replica tests (`make test` runs them too;
## they need dockerd, which .ci/run starts)
test-containers: $(STAMP)
	$(BIN)/pytest -m containers tests/containers

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

## bench: our Bento vs mlflow serve vs a bare ONNX ceiling (wrk, PostgreSQL, Redis); benchmarks/results/
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.run --smoke $(BENCH_ARGS)

## soak: 10 minutes of moderate load on a served Bento (PostgreSQL, Redis), RSS sampled
soak: $(STAMP)
	$(BIN)/python -m tests.reliability.soak $(SOAK_ARGS)

## stack: the compose stack (docker-compose.yml + local stand-ins) on 127.0.0.1:$(STACK_PORT), building
## what is missing (base and stand-in images, a signed Bento of the champion, its image)
STACK_PORT ?= 3000
stack: $(STAMP)
	STACK_PORT=$(STACK_PORT) deploy/stack.sh up

## stack-down: stop the stack; its volumes (database, backups, journal) are kept
stack-down:
	deploy/stack.sh down

clean:
	rm -rf .flood .pytest_cache .mypy_cache .ruff_cache
