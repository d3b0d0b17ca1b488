# agentid: `make run` starts the service on the embedded default; `make test` checks everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF := node_modules/.bin/buf
GEN := gen/python
DEV_CONFIG := var/dev/agentid.toml
DEV_IDP_CONFIG := var/dev/idp/config.json
GO ?= $(shell command -v go || echo /usr/local/go/bin/go)

.PHONY: run node-check test install proto proto-check go-check lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	@# xds-protos overwrites files of these two with stale copies (pyproject.toml): restore them.
	$(BIN)/pip install --quiet --no-deps --force-reinstall -c constraints.txt \
		opentelemetry-proto googleapis-common-protos
	touch $@

install: $(VENV)/.installed

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(DEV_CONFIG): | $(VENV)/.installed
	$(BIN)/agentid dev init

node-check:
	@command -v node >/dev/null && command -v npm >/dev/null || { \
	  echo "make: Node.js (20 or later, with npm) is needed: buf, and the dev IdP of make run" >&2; \
	  exit 2; }

# agentid (gRPC 127.0.0.1:50051, HTTP 127.0.0.1:8080, console at /console/) and the dev IdP
# (127.0.0.1:9000); `agentid dev users` prints the dev users' passwords.
run: node-check $(VENV)/.installed $(DEV_CONFIG) $(BUF)
	./scripts/run-dev $(DEV_CONFIG) $(DEV_IDP_CONFIG) $(BIN)/agentid

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

unit: $(VENV)/.installed $(BUF)  # $(BUF): npm ci, for the dev IdP (oidc-provider) in tests
	$(BIN)/pytest

test: lint typecheck proto-check go-check unit

bench: $(VENV)/.installed
	./bench/run-all

clean:
	rm -rf $(VENV) node_modules .mypy_cache .pytest_cache .ruff_cache .hypothesis
