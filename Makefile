# agentid: `make run` starts the service on the embedded default; `make test` checks everything.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUF := node_modules/.bin/buf
# The Python client (agentid-client); scripts/gen-protos writes the agentid.v1 stubs into its agentid/.
CLIENT := clients/python
GEN := $(CLIENT)
TS := clients/typescript
TS_DEPS := $(TS)/node_modules/.package-lock.json
DEV_CONFIG := var/dev/agentid.toml
DEV_IDP_CONFIG := var/dev/idp/config.json
GO ?= $(shell command -v go || echo /usr/local/go/bin/go)

.PHONY: run node-check test install proto proto-check go-check ts-check lint typecheck unit bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The Python client (its own distribution, agentid-client, with its `mcp` extra: the MCP guard
# and its tests) first, then the server, which depends on it: one resolution, both editable;
# constraints.txt holds the measured grpcio (1.78.0).
$(VENV)/.installed: $(BIN)/python pyproject.toml $(CLIENT)/pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e "./$(CLIENT)[mcp]" -e ".[dev]"
	@# xds-protos overwrites files of these two with stale copies (pyproject.toml): restore them.
	$(BIN)/pip install --quiet --no-deps --force-reinstall -c constraints.txt \
		opentelemetry-proto googleapis-common-protos
	touch $@

install: $(VENV)/.installed

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The TypeScript client's own dependencies (protoc-gen-es, tsc, its runtime libraries).
$(TS_DEPS): $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund --loglevel=error
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

proto: $(VENV)/.installed $(BUF) $(TS_DEPS)
	$(BUF) format -w
	$(BUF) lint
	./scripts/gen-protos $(GEN)
	./scripts/gen-go-protos
	./scripts/gen-ts-protos

proto-check: $(VENV)/.installed $(BUF) $(TS_DEPS)
	$(BUF) format --diff --exit-code
	$(BUF) lint
	./scripts/gen-protos --check $(GEN)
	./scripts/gen-ts-protos --check

# The Go client (clients/go): generated code up to date, gofmt'd, go vet clean.
go-check: $(VENV)/.installed
	./scripts/gen-go-protos --check
	@unformatted=$$($(dir $(GO))gofmt -l clients/go); \
	  if [ -n "$$unformatted" ]; then echo "not gofmt'd: $$unformatted" >&2; exit 1; fi
	cd clients/go && $(GO) vet ./...

# The TypeScript client (clients/typescript): prettier'd, compiled with tsc (strict) into dist/,
# which tests/integration/test_typescript_client.py runs against a real server.
ts-check: $(TS_DEPS)
	cd $(TS) && npm run --silent format-check
	cd $(TS) && npm run --silent build

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy
	$(BIN)/mypy bench
	$(BIN)/lint-imports

unit: $(VENV)/.installed $(BUF) $(TS_DEPS)  # npm ci: the dev IdP (oidc-provider), the TS client
	$(BIN)/pytest

test: lint typecheck proto-check go-check ts-check unit

bench: $(VENV)/.installed
	./bench/run-all

clean:
	rm -rf $(VENV) node_modules $(TS)/node_modules $(TS)/dist .mypy_cache .pytest_cache .ruff_cache .hypothesis
