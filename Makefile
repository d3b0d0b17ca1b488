# agentid: `make run` starts the service on the embedded default; `make test` checks everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF := node_modules/.bin/buf
GEN := gen/python
DEV_CONFIG := var/dev/agentid.toml

.PHONY: run test install proto proto-check lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(DEV_CONFIG): | $(VENV)/.installed
	$(BIN)/agentid dev init

run: $(VENV)/.installed $(DEV_CONFIG)
	$(BIN)/agentid serve --config $(DEV_CONFIG)

proto: $(VENV)/.installed $(BUF)
	$(BUF) format -w
	$(BUF) lint
	./scripts/gen-protos $(GEN)

proto-check: $(VENV)/.installed $(BUF)
	$(BUF) format --diff --exit-code
	$(BUF) lint
	./scripts/gen-protos --check $(GEN)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy
	$(BIN)/mypy bench
	$(BIN)/lint-imports

unit: $(VENV)/.installed
	$(BIN)/pytest

test: lint typecheck proto-check unit

bench: $(VENV)/.installed
	./bench/run-all

clean:
	rm -rf $(VENV) node_modules .mypy_cache .pytest_cache .ruff_cache .hypothesis
