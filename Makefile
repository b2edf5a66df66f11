# Two entry points (README.md): `make run` and `make test`. Both create .venv and install everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PG_TEST_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: install install-dev run test test-sqlite test-pg lint

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned, so pip takes the CPU build that lies on disk instead of a CUDA download
install: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e .

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'

run: install
	$(BIN)/hotline run

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/pytest -q

test-pg: install-dev
	HOTLINE_TEST_DATABASE_URL=$(PG_TEST_URL) $(BIN)/pytest -q

lint: install-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
