# agentid: `make run` starts the service on the embedded default; `make test` checks everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF := node_modules/.bin/buf
GEN := gen/python
DEV_CONFIG := var/dev/agentid.toml
GO ?= $(shell command -v go || echo /usr/local/go/bin/go)

.PHONY: run test install proto proto-check go-check lint typecheck unit bench clean

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
	./scripts/gen-go-protos

proto-check: $(VENV)/.installed $(BUF)
	$(BUF) format --diff --exit-code
	$(BUF) lint
	./scripts/gen-protos --check $(GEN)

# The Go client (clients/go): generated code up to date, gofmt'd, go vet clean.
go-check: $(VENV)/.installed
	./scripts/gen-go-protos --check
	@unformatted=$$($(dir $(GO))gofmt -l clients/go); \
	  if [ -n "$$unformatted" ]; then echo "not gofmt'd: $$unformatted" >&2; exit 1; fi
	cd clients/go && $(GO) vet ./...

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy
	$(BIN)/mypy bench
	$(BIN)/lint-imports

unit: $(VENV)/.installed
	$(BIN)/pytest

test: lint typecheck proto-check go-check unit

bench: $(VENV)/.installed
	./bench/run-all

clean:
	rm -rf $(VENV) node_modules .mypy_cache .pytest_cache .ruff_cache .hypothesis
