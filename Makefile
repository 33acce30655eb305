# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 3000

.PHONY: run train build serve test lint clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or make PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: set up, train on real data (synthetic if none), register, promote, build a Bento, serve it
run: train build serve

train: $(STAMP)
	$(BIN)/flood train --register --promote --allow-synthetic

build: $(STAMP)
	$(BIN)/flood bento build

serve: $(STAMP)
	$(BIN)/flood serve --host $(HOST) --port $(PORT)

## test: lint, type-check and run every test (services they need must be up: see .ci/run)
test: $(STAMP) lint
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

clean:
	rm -rf .flood .pytest_cache .mypy_cache .ruff_cache
