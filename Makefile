# chatd's two everyday commands: `make run` and `make test`. Both set everything up first:
# a virtualenv in .venv with chatd and its dev tools, and PostgreSQL's server binaries for the
# embedded database (installed with apt-get when missing and possible).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
CHATD_HOME ?= .chatd

.PHONY: help run test lint typecheck pytest postgres bench clean

help:
	@echo "make run    start chatd on http://127.0.0.1:8080 with a demo model: a fake one in-process,"
	@echo "           or OpenAI / Anthropic if OPENAI_API_KEY / ANTHROPIC_API_KEY is set"
	@echo "           (embedded PostgreSQL unless CHATD_DATABASE_URL is set)"
	@echo "make test   lint, type-check and run the whole test suite"
	@echo "make bench  the load sweep (shards x concurrent chats) into the scratch folder"
	@echo "           .chatd/bench; narrow it with BENCH_ARGS, e.g. make bench"
	@echo "           BENCH_ARGS='--shards 64 --chats 100'; BENCH_ARGS='--out-dir benchmarks/results'"
	@echo "           updates the committed results"
	@echo "make clean  remove .venv and chatd's local data ($(CHATD_HOME))"
	@echo "the chatd command itself is $(BIN)/chatd (or run 'source $(BIN)/activate' first)"

$(BIN)/python:
	@scripts/make-venv.sh "$(PYTHON)" "$(VENV)"

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --editable '.[dev]'
	@touch $@

postgres:
	@scripts/ensure-postgres.sh

# Debian's Chromium for the browser test of the web page (tests/e2e/test_page.py).
.PHONY: chromium
chromium:
	@scripts/ensure-chromium.sh

run: $(STAMP)
	@if [ -z "$$CHATD_DATABASE_URL" ]; then scripts/ensure-postgres.sh; fi
	$(BIN)/chatd serve --demo --home "$(CHATD_HOME)" --admin-token-file "$(CHATD_HOME)/admin-token"

test: $(STAMP) postgres lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

# In parallel, one test process per core (at most 4), each with its own PostgreSQL: most of the
# end-to-end tests wait on the processes they start. PYTEST_ARGS narrows or adds, e.g.
# make pytest PYTEST_ARGS='-n 0 tests/unit' for one process.
PYTEST_ARGS ?=
pytest: $(STAMP) postgres chromium
	$(BIN)/pytest -n auto --maxprocesses 4 $(PYTEST_ARGS)

# The sweep draws its charts with matplotlib, the optional `bench` extra.
$(BENCH_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --editable '.[dev,bench]'
	@touch $@

bench: $(BENCH_STAMP) postgres
	$(BIN)/python -m benchmarks.sweep $(BENCH_ARGS)

clean:
	rm -rf $(VENV) "$(CHATD_HOME)"
